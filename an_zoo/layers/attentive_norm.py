"""Attentive Normalization (AN) — reference implementation.

Paper: `Attentive Normalization`, Xilai Li, Wei Sun, Tianfu Wu, ECCV 2020 — https://arxiv.org/abs/1908.01259

AN keeps BatchNorm's standardization and replaces its single per-channel affine transform with a mixture of K
affine transforms whose weights are computed per instance by a small squeeze-and-excitation style branch:

    xhat  = BatchNorm(x) without affine
    s     = mean_hw(x) * rsqrt(var_hw(x) + 1e-3)          (per sample and channel, from the PRE-norm x)
    lam   = hardsigmoid(BatchNorm_K(conv1x1_{C->K}(s)))    (N, K), each entry in [0, 1]
    out   = (lam @ W) * xhat + (lam @ B)                   W, B: (K, C)

This module holds the readable reference, written from the specification, which the fast implementation
(:mod:`an_zoo.layers.fast_attentive_norm`, the default, same results) is tested against; ``impl='reference'`` or
``AN_ZOO_IMPL=reference`` selects it. The layer is built by composition rather than by subclassing ``nn.BatchNorm2d``: the standardization and
the attention's ``BatchNorm_K`` are ordinary ``nn.BatchNorm2d`` children, so stock tools that key on BatchNorm
(``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, timm's ``freeze_batch_norm_2d``) reach exactly the parts they
should and can never silently strip the attention or the mixture.

Behaviour where the official code is undefined (documented and tested):
    * ``H * W == 1``: the unbiased variance is undefined (the official code returns NaN). Here the variance of a
      single value is 0, so ``s = x * rsqrt(1e-3)``; outputs stay finite.
    * training with batch size 1: the attention branch normalizes over the batch, so — like ``nn.BatchNorm2d`` on
      an input with one value per channel — a ``ValueError`` is raised.
    * mixed precision: the per-sample statistics are computed in float32; the output has the input's dtype.
"""
import os
from typing import Any, Dict, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_act_layer, register_notrace_module

from .fast_attentive_norm import fast_attentive_norm, stats_input

__all__ = ['AttentiveBatchNorm2d', 'AttentiveBatchNormAct2d', 'MixtureAttention', 'instance_attention_stats',
           'default_impl', 'IMPLEMENTATIONS']

# 'fast': an_zoo.layers.fast_attentive_norm (default); 'reference': the spec, step by step (this file)
IMPLEMENTATIONS = ('fast', 'reference')


def default_impl() -> str:
    """The implementation new layers use: ``AN_ZOO_IMPL`` (``fast`` or ``reference``), default ``fast``."""
    impl = os.environ.get('AN_ZOO_IMPL', 'fast').strip().lower() or 'fast'
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f'AN_ZOO_IMPL must be one of {IMPLEMENTATIONS}, got {impl!r}')
    return impl

# Epsilon of the attention statistic (mean * rsqrt(var + eps)); fixed by the reference, distinct from the BN eps.
ATTENTION_EPS = 1e-3


def instance_attention_stats(x: torch.Tensor, eps: float = ATTENTION_EPS) -> torch.Tensor:
    """Per-(sample, channel) attention input ``mean_hw(x) * rsqrt(var_hw(x) + eps)``, shape (N, C, 1, 1), float32
    (float64 for float64 input).

    ``var_hw`` is the unbiased variance over H*W (as the reference). A single spatial position has no unbiased
    variance; its variance is taken as 0 instead of the reference's NaN.
    """
    spatial = x.shape[2] * x.shape[3]
    correction = 1 if spatial > 1 else 0
    var, mean = torch.var_mean(stats_input(x), dim=(2, 3), correction=correction, keepdim=True)
    return mean * torch.rsqrt(var + eps)


class MixtureAttention(nn.Module):
    """Instance-specific mixture weights ``lam = hardsigmoid(BN_K(conv1x1(s)))`` of shape (N, K)."""

    def __init__(
            self,
            num_features: int,
            num_mixtures: int,
            eps: float = ATTENTION_EPS,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            num_features: Channels C of the normalized input.
            num_mixtures: Number K of affine transforms mixed.
            eps: Epsilon of the per-instance statistic.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.eps = eps
        self.conv = nn.Conv2d(num_features, num_mixtures, kernel_size=1, bias=False, **dd)
        self.bn = nn.BatchNorm2d(num_mixtures, **dd)
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(instance_attention_stats(x, self.eps).flatten(1))

    def gate(self, s: torch.Tensor) -> torch.Tensor:
        """Mixture weights (N, K) from the attention input ``s`` (N, C)."""
        # float32 statistics are handed to the conv in its own dtype (autocast, if active, recasts as usual)
        z = self.bn(self.conv(s[:, :, None, None].to(self.conv.weight.dtype)))
        return F.hardsigmoid(z).flatten(1)


@register_notrace_module  # a leaf for FX feature extraction: its shape checks must not be traced through
class AttentiveBatchNorm2d(nn.Module):
    """Attentive Normalization on top of BatchNorm (reference implementation).

    Drop-in for ``nn.BatchNorm2d(num_features)`` wherever a timm / torchvision model takes a ``norm_layer``:
    ``norm_layer=partial(AttentiveBatchNorm2d, num_mixtures=10)``.

    State (names are those of an_zoo checkpoints):
        ``norm.running_mean``, ``norm.running_var``, ``norm.num_batches_tracked``: standardization statistics.
        ``mixture_weight``, ``mixture_bias``: the K affine transforms, shape (K, C).
        ``attn.conv.weight`` (K, C, 1, 1), ``attn.bn.*`` (K): the attention branch.
    Parameters: ``3 * K * C + 2 * K``.
    """

    def __init__(
            self,
            num_features: int,
            num_mixtures: int = 10,
            eps: float = 1e-5,
            momentum: Optional[float] = 0.1,
            attn_eps: float = ATTENTION_EPS,
            impl: Optional[str] = None,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            num_features: Number of channels C.
            num_mixtures: Number K of affine transforms in the mixture (reference: 5 to 20 per stage).
            eps: BatchNorm epsilon of the standardization.
            momentum: BatchNorm momentum of the running statistics (None: cumulative average).
            attn_eps: Epsilon of the attention statistic ``mean * rsqrt(var + attn_eps)``.
            impl: ``'fast'`` (one pass for all statistics, fused apply, BN-sized saved activations) or
                ``'reference'`` (the specification step by step); default from ``AN_ZOO_IMPL``, else ``'fast'``.
                Both give the same results; TorchScript always runs the reference code.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.impl = impl or default_impl()
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f'impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}')
        self.num_features = num_features
        self.num_mixtures = num_mixtures
        self.norm = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False, **dd)
        self.attn = MixtureAttention(num_features, num_mixtures, eps=attn_eps, **dd)
        self.mixture_weight = nn.Parameter(torch.empty(num_mixtures, num_features, **dd))
        self.mixture_bias = nn.Parameter(torch.empty(num_mixtures, num_features, **dd))
        self.frozen = False
        self.reset_parameters()

    @property
    def eps(self) -> float:
        return self.norm.eps

    @property
    def momentum(self) -> Optional[float]:
        return self.norm.momentum

    def reset_parameters(self, zero_init: bool = False) -> None:
        """Reference init: scales ~ N(1, 0.1), offsets ~ N(0, 0.1); ``zero_init`` (last norm of a residual
        branch) sets both to 0 so the block starts as identity."""
        if zero_init:
            nn.init.zeros_(self.mixture_weight)
            nn.init.zeros_(self.mixture_bias)
        else:
            nn.init.normal_(self.mixture_weight, 1.0, 0.1)
            nn.init.normal_(self.mixture_bias, 0.0, 0.1)

    def freeze(self) -> 'AttentiveBatchNorm2d':
        """Freeze the running statistics, the mixture and the attention's BatchNorm (the AN counterpart of
        ``FrozenBatchNorm2d``, for small-batch fine-tuning such as detection). The attention is still computed
        per instance and its 1x1 conv stays trainable. The state_dict is unchanged."""
        self.frozen = True
        for param in (self.mixture_weight, self.mixture_bias, *self.attn.bn.parameters()):
            param.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> 'AttentiveBatchNorm2d':
        super().train(mode)
        if self.frozen:  # frozen statistics: the BatchNorms never estimate from the batch
            self.norm.eval()
            self.attn.bn.eval()
        return self

    def extra_repr(self) -> str:
        frozen = ', frozen=True' if self.frozen else ''
        return (f'{self.num_features}, num_mixtures={self.num_mixtures}, eps={self.eps}, '
                f'momentum={self.momentum}{frozen}')

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            hint = ': add the batch dimension (x.unsqueeze(0))' if x.dim() == 3 else ''
            raise ValueError(f'AttentiveBatchNorm2d expects a 4D (N, C, H, W) input, got {x.dim()}D input of '
                             f'shape {list(x.shape)}{hint}')
        if x.shape[1] != self.num_features:
            raise ValueError(
                f'AttentiveBatchNorm2d({self.num_features}) got an input with {x.shape[1]} channels (shape '
                f'{list(x.shape)}), expected {self.num_features}: the layer before it must output '
                f'{self.num_features} channels (or build this layer with num_features={x.shape[1]})')
        if self.attn.bn.training and x.shape[0] == 1:
            # the attention branch normalizes its (N, K) logits over the batch, as BatchNorm does (a frozen
            # layer keeps that BatchNorm in eval mode and takes any batch size)
            raise ValueError(
                f'Expected more than 1 value per channel when training, got input size {list(x.shape)}: '
                f'AttentiveBatchNorm2d normalizes its attention over the batch, so training needs batch size > 1 '
                f'(use model.eval() for single-sample inference, or an_zoo.freeze_batch_norm_2d to fine-tune '
                f'with frozen statistics).')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attentive_norm(x)

    def _attentive_norm(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # TorchScript (script and trace) records the reference ops: a custom autograd Function cannot be scripted,
        # and a traced one fails trace checking with autograd on
        if not torch.jit.is_scripting() and not torch.jit.is_tracing() and self.impl == 'fast' \
                and self._fast_supported():
            return self._fast(x)
        return self._reference(x)

    @torch.jit.unused
    def _fast_supported(self) -> bool:
        # batch statistics need a plain BatchNorm2d (a SyncBatchNorm must all-reduce them: reference path);
        # running statistics (eval, frozen) can come from any BatchNorm-like module
        return type(self.norm) is nn.BatchNorm2d or not self.norm.training

    @torch.jit.unused
    def _fast(self, x: torch.Tensor) -> torch.Tensor:
        return fast_attentive_norm(self, x)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.norm(x)
        lam = self.attn(x).to(self.mixture_weight.dtype)
        gamma = lam @ self.mixture_weight  # (N, C)
        beta = lam @ self.mixture_bias
        out = x_hat * gamma[:, :, None, None] + beta[:, :, None, None]
        return out.to(x.dtype)


@register_notrace_module
class AttentiveBatchNormAct2d(AttentiveBatchNorm2d):
    """AN followed by dropout and an activation: the counterpart of timm's ``BatchNormAct2d`` for timm blocks that
    fuse norm and activation (EfficientNet / MobileNet builders). Same state_dict as :class:`AttentiveBatchNorm2d`.
    """

    def __init__(
            self,
            num_features: int,
            num_mixtures: int = 10,
            eps: float = 1e-5,
            momentum: Optional[float] = 0.1,
            attn_eps: float = ATTENTION_EPS,
            apply_act: bool = True,
            act_layer: Type[nn.Module] = nn.ReLU,
            act_kwargs: Optional[Dict[str, Any]] = None,
            inplace: bool = True,
            drop_layer: Optional[Type[nn.Module]] = None,
            impl: Optional[str] = None,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            num_features, num_mixtures, eps, momentum, attn_eps, impl: As :class:`AttentiveBatchNorm2d`.
            apply_act: Apply ``act_layer`` after the normalization.
            act_layer, act_kwargs, inplace: The activation (timm ``create_act_layer`` arguments).
            drop_layer: Optional dropout layer class applied before the activation.
        """
        super().__init__(num_features, num_mixtures, eps=eps, momentum=momentum, attn_eps=attn_eps, impl=impl,
                         device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act_kwargs = act_kwargs or {}
        self.act = create_act_layer(act_layer, inplace=inplace, **act_kwargs) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self._attentive_norm(x)))
