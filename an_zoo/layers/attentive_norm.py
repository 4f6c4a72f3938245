"""Attentive Normalization (AN) over BatchNorm: the layer, the choice of code path for each call, and the reference
implementation.

Paper: `Attentive Normalization`, Xilai Li, Wei Sun, Tianfu Wu, ECCV 2020 — https://arxiv.org/abs/1908.01259

AN keeps BatchNorm's standardization and replaces its single per-channel affine transform with a mixture of K
affine transforms whose weights are computed per instance by a small squeeze-and-excitation style branch:

    xhat  = BatchNorm(x) without affine
    s     = mean_hw(x) * rsqrt(var_hw(x) + 1e-3)          (per sample and channel, from the PRE-norm x)
    lam   = hardsigmoid(BatchNorm_K(conv1x1_{C->K}(s)))    (N, K), each entry in [0, 1]
    out   = (lam @ W) * xhat + (lam @ B)                   W, B: (K, C)

This module holds the layer: its state, its input checks and the choice of code path for each call. The readable
reference (below, written from the specification, with the attention and mixture of :mod:`an_zoo.layers.mixture`)
is what the fast implementation (:mod:`an_zoo.layers.fast_attentive_norm`, the default, same results) is tested
against; ``impl='reference'`` or ``AN_ZOO_IMPL=reference`` selects it. The reference code also runs wherever the fast
one could not keep the module contract: under TorchScript, under torch.func transforms (vmap, grad, jvp, jacrev),
with BatchNorms that must synchronise batch statistics, and while hooks are registered on the layer's children
(or globally), so that those hooks fire and tools built on hooks (torchinfo, pruning, activation capture) see the
children's compute. Plain ``torch.fx.symbolic_trace`` records the layer as one call of
:func:`an_zoo.layers.functional.attentive_batch_norm`.

The layer is built by composition rather than by subclassing ``nn.BatchNorm2d``: the standardization and the
attention's ``BatchNorm_K`` are ordinary ``nn.BatchNorm2d`` children, so stock tools that key on BatchNorm
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
import torch.fx
import torch.nn as nn
from timm.layers import create_act_layer, register_notrace_module

from .fast_attentive_norm import fast_attentive_norm, fast_path_supported
from .functional import attentive_batch_norm, check_an_input
from .mixture import ATTENTION_EPS, MixtureAttention, MixtureNorm, instance_attention_stats

__all__ = ['AttentiveBatchNorm2d', 'AttentiveBatchNormAct2d', 'MixtureAttention', 'instance_attention_stats',
           'default_impl', 'IMPLEMENTATIONS', 'ATTENTION_EPS']

# 'fast': an_zoo.layers.fast_attentive_norm (default); 'reference': the spec, step by step (this file)
IMPLEMENTATIONS = ('fast', 'reference')

# symbolic tracing records one call of this function per layer (its branches run on real tensors)
torch.fx.wrap('attentive_batch_norm')

_module_globals = torch.nn.modules.module  # where torch keeps the global module hooks


def _global_hooks() -> bool:
    m = _module_globals
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def default_impl() -> str:
    """The implementation new layers use: ``AN_ZOO_IMPL`` (``fast`` or ``reference``), default ``fast``."""
    impl = os.environ.get('AN_ZOO_IMPL', 'fast').strip().lower() or 'fast'
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f'AN_ZOO_IMPL must be one of {IMPLEMENTATIONS}, got {impl!r}')
    return impl


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, jacrev, ...) is running: the fast path's autograd Function and
    its ``out=`` writes are not written for them, the reference code's modules are."""
    return torch._C._are_functorch_transforms_active()


@register_notrace_module  # a leaf for FX feature extraction: its shape checks must not be traced through
class AttentiveBatchNorm2d(MixtureNorm):
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
        super().__init__(num_features, num_mixtures)
        self.impl = impl or default_impl()
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f'impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}')
        self.norm = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False, **dd)
        self.attn = MixtureAttention(num_features, num_mixtures, eps=attn_eps, **dd)
        self._create_mixture(**dd)
        self.frozen = False

    @property
    def eps(self) -> float:
        return self.norm.eps

    @property
    def momentum(self) -> Optional[float]:
        return self.norm.momentum

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
        check_an_input(x, self.num_features, self.attn.bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attentive_norm(x)

    def _attentive_norm(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._symbolic(x):
            return self._traced(x)
        self._check_input(x)
        # TorchScript (script and trace) records the reference ops: a custom autograd Function cannot be scripted,
        # and a traced one fails trace checking with autograd on
        if not torch.jit.is_scripting() and not torch.jit.is_tracing() and self._use_fast():
            return self._fast(x)
        return self._reference(x)

    @torch.jit.unused
    def _symbolic(self, x: torch.Tensor) -> bool:
        return isinstance(x, torch.fx.Proxy)

    @torch.jit.unused
    def _use_fast(self) -> bool:
        """The fast path, unless it would break the module contract: it reads the children's tensors without calling
        them, so hooks on them (or global ones) would never fire; torch.func transforms need the reference code."""
        if self.impl != 'fast':
            return False
        # (the children through _modules: nn.Module.__getattr__ costs, and this runs for every layer call)
        norm, attn = self._modules['norm'], self._modules['attn']
        conv, bn = attn._modules['conv'], attn._modules['bn']
        # batch statistics need plain BatchNorm2d (a SyncBatchNorm must all-reduce them: reference path); running
        # statistics (eval, frozen) can come from any BatchNorm-like module
        if not fast_path_supported(norm, bn):
            return False
        if _hooked(norm) or _hooked(attn) or _hooked(conv) or _hooked(bn) or _global_hooks():
            return False
        return torch.compiler.is_compiling() or not _functorch_active()

    @torch.jit.unused
    def _fast(self, x: torch.Tensor) -> torch.Tensor:
        return fast_attentive_norm(x, self.norm, self.attn.bn, self.attn.conv.weight, self.mixture_weight,
                                   self.mixture_bias, self.attn.eps)

    @torch.jit.unused
    def _traced(self, x: torch.Tensor) -> torch.Tensor:
        norm, bn = self.norm, self.attn.bn
        return attentive_batch_norm(
            x, norm.running_mean, norm.running_var, norm.num_batches_tracked, self.attn.conv.weight, bn.weight,
            bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, self.mixture_weight,
            self.mixture_bias, norm.training, bn.training, norm.momentum, bn.momentum, norm.eps, self.attn.eps,
            bn.eps)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.norm(x), self.attn(x), x.dtype)


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
