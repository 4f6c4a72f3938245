"""AN over BatchNorm as one function of tensors: the form a plain ``torch.fx.symbolic_trace`` records.

Tracing an :class:`~an_zoo.layers.AttentiveBatchNorm2d` with torch.fx (``torch.fx.symbolic_trace``,
``torch.ao.quantization.quantize_fx.prepare_fx``) records one call of :func:`attentive_batch_norm` per layer, with the
layer's parameters and buffers as ``get_attr`` inputs (``torch.fx.wrap``: the function runs on real tensors, so its
input checks and shape-dependent branches stay Python). FX quantization does not know the function, so it keeps AN in
float (it dequantizes the input and quantizes what follows), inner BatchNorms included: a BatchNorm without affine
parameters has no quantized counterpart. The train / eval mode of the two BatchNorms is that of tracing time.

The computation is the reference one (``nn.BatchNorm2d``'s functional form, the attention, the mixture), with
BatchNorm's running-statistics update.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .mixture import instance_attention_stats
from .statistics import running_stats_factor

__all__ = ['attentive_batch_norm', 'check_an_input']


def check_an_input(x: torch.Tensor, num_features: int, batch_stats: bool) -> None:
    """The input checks of AN over BatchNorm: 4D, ``num_features`` channels, more than one sample when the
    attention's BatchNorm needs batch statistics (``batch_stats``)."""
    if x.dim() != 4:
        hint = ': add the batch dimension (x.unsqueeze(0))' if x.dim() == 3 else ''
        raise ValueError(f'AttentiveBatchNorm2d expects a 4D (N, C, H, W) input, got {x.dim()}D input of '
                         f'shape {list(x.shape)}{hint}')
    if x.shape[1] != num_features:
        raise ValueError(
            f'AttentiveBatchNorm2d({num_features}) got an input with {x.shape[1]} channels (shape '
            f'{list(x.shape)}), expected {num_features}: the layer before it must output '
            f'{num_features} channels (or build this layer with num_features={x.shape[1]})')
    if batch_stats and x.shape[0] == 1:
        # the attention branch normalizes its (N, K) logits over the batch, as BatchNorm does (a frozen
        # layer keeps that BatchNorm in eval mode and takes any batch size)
        raise ValueError(
            f'Expected more than 1 value per channel when training, got input size {list(x.shape)}: '
            f'AttentiveBatchNorm2d normalizes its attention over the batch, so training needs batch size > 1 '
            f'(use model.eval() for single-sample inference, or an_zoo.freeze_batch_norm_2d to fine-tune '
            f'with frozen statistics).')


def _batch_norm(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                num_batches_tracked: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], training: bool, momentum: Optional[float], eps: float) -> torch.Tensor:
    """``nn.BatchNorm2d.forward`` of a module with these tensors and settings."""
    factor = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        factor = running_stats_factor(num_batches_tracked, momentum)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training or running_mean is None, factor, eps)


def attentive_batch_norm(
        x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
        num_batches_tracked: Optional[torch.Tensor], conv_weight: torch.Tensor, attn_weight: Optional[torch.Tensor],
        attn_bias: Optional[torch.Tensor], attn_running_mean: Optional[torch.Tensor],
        attn_running_var: Optional[torch.Tensor], attn_num_batches_tracked: Optional[torch.Tensor],
        mixture_weight: torch.Tensor, mixture_bias: torch.Tensor, training: bool, attn_training: bool,
        momentum: Optional[float], attn_momentum: Optional[float], eps: float, attn_eps: float, attn_bn_eps: float,
) -> torch.Tensor:
    """AN over BatchNorm (the reference computation) from its tensors: the standardization's running statistics
    (``running_*``, None without), the attention's 1x1 conv weight and BatchNorm_K (``attn_*``), the mixture; the
    BatchNorms' training flags, momenta and epsilons, and the attention statistic's ``attn_eps``."""
    check_an_input(x, mixture_weight.shape[1], attn_training)
    x_hat = _batch_norm(x, running_mean, running_var, num_batches_tracked, None, None, training, momentum, eps)
    s = instance_attention_stats(x, attn_eps)
    z = F.conv2d(s.to(conv_weight.dtype), conv_weight)
    z = _batch_norm(z, attn_running_mean, attn_running_var, attn_num_batches_tracked, attn_weight, attn_bias,
                    attn_training, attn_momentum, attn_bn_eps)
    lam = F.hardsigmoid(z).flatten(1).to(mixture_weight.dtype)
    gamma = lam @ mixture_weight
    beta = lam @ mixture_bias
    return (x_hat * gamma[:, :, None, None] + beta[:, :, None, None]).to(x.dtype)
