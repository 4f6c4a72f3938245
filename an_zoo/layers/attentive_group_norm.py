"""Attentive Normalization over GroupNorm (AN-GN), for layers trained from scratch at small batch (detection heads).

Paper: `Attentive Normalization`, Xilai Li, Wei Sun, Tianfu Wu, ECCV 2020 — https://arxiv.org/abs/1908.01259

AN-GN is :class:`~an_zoo.layers.AttentiveBatchNorm2d` with the batch-dependent parts replaced by per-sample ones:

    xhat  = GroupNorm(num_groups, C, affine=False)(x)
    s     = mean_hw(x) * rsqrt(var_hw(x) + 1e-3)             (per sample and channel, from the PRE-norm x, as AN-BN)
    lam   = hardsigmoid(GroupNorm(attn_groups, K)(conv1x1_{C->K}(s)))   (N, K), each entry in [0, 1]
    out   = (lam @ W) * xhat + (lam @ B)                      W, B: (K, C)

No statistic is taken over the batch: the layer trains at batch size 1, behaves the same in train and eval mode and
has no running statistics (nothing to freeze or synchronise).

The attention is normalized the way the reference AN-GN is (facts read from the official code, nothing copied): the
refactored release (iVMCL-Release, ``AttnGroupNorm``) uses a bias-free 1x1 conv, then an affine GroupNorm with one
group over the K logits of each sample (``attn_norm='group'``, ``attn_groups=1``, the default here), instead of the
BatchNorm over K that AN-BN uses; the earlier detection code (AttentiveNorm_Detection, whose AN-GN box head gave the
paper's COCO numbers) uses a 1x1 conv with bias and no normalization at all (``attn_norm='none'``). Both share the
statistic ``s`` and the hard sigmoid with AN-BN.
"""
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

from .mixture import ATTENTION_EPS, MixtureAttention, MixtureNorm, instance_attention_stats

__all__ = ['AttentiveGroupNorm', 'GroupMixtureAttention']

ATTENTION_NORMS = ('group', 'none')


class GroupMixtureAttention(MixtureAttention):
    """:class:`MixtureAttention` whose logits are normalized per sample: ``lam = hardsigmoid(GN_K(conv1x1(s)))``.

    ``attn_norm='group'``: affine ``GroupNorm(attn_groups, K)`` (weight 1, bias 0 at init) after a bias-free conv.
    ``attn_norm='none'``: no normalization; the conv has a bias (zero at init).
    """

    def __init__(
            self,
            num_features: int,
            num_mixtures: int,
            eps: float = ATTENTION_EPS,
            attn_norm: str = 'group',
            attn_groups: int = 1,
            norm_eps: float = 1e-5,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        if attn_norm not in ATTENTION_NORMS:
            raise ValueError(f'attn_norm must be one of {ATTENTION_NORMS}, got {attn_norm!r}')
        # AN-BN's BatchNorm over K is replaced by a per-sample normalization (or none, with a conv bias)
        norm = nn.GroupNorm(attn_groups, num_mixtures, eps=norm_eps, **dd) if attn_norm == 'group' else nn.Identity()
        super().__init__(num_features, num_mixtures, eps=eps, norm=norm, norm_name='norm',
                         conv_bias=attn_norm == 'none', **dd)
        self.attn_norm = attn_norm

    def normalize_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm(z)


@register_notrace_module  # a leaf for FX feature extraction, as AttentiveBatchNorm2d
class AttentiveGroupNorm(MixtureNorm):
    """Attentive Normalization on top of GroupNorm.

    Drop-in for ``nn.GroupNorm(num_groups, C)`` as a torchvision / timm ``norm_layer`` (``callable(C) -> module``):
    ``norm_layer=AttentiveGroupNorm.norm_layer(num_mixtures=10, num_groups=32)``.

    State: ``mixture_weight``, ``mixture_bias`` (K, C); ``attn.conv.weight`` (K, C, 1, 1); ``attn.norm.weight``,
    ``attn.norm.bias`` (K) with ``attn_norm='group'`` (``attn.conv.bias`` instead with ``attn_norm='none'``).
    No buffers. Parameters: ``3 * K * C + 2 * K``, as AN-BN.
    """

    def __init__(
            self,
            num_features: int,
            num_mixtures: int = 10,
            num_groups: int = 32,
            eps: float = 1e-5,
            attn_eps: float = ATTENTION_EPS,
            attn_norm: str = 'group',
            attn_groups: int = 1,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            num_features: Number of channels C.
            num_mixtures: Number K of affine transforms in the mixture (reference detection heads: 10 or 20).
            num_groups: GroupNorm groups of the standardization (C must be divisible by it; reference: 32).
            eps: GroupNorm epsilon (standardization and attention normalization).
            attn_eps: Epsilon of the attention statistic ``mean * rsqrt(var + attn_eps)``.
            attn_norm: ``'group'`` (refactored reference, default) or ``'none'`` (earlier detection code); see the
                module docstring.
            attn_groups: Groups of the GroupNorm over the K attention logits (reference: 1); K must be divisible.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__(num_features, num_mixtures)
        self.num_groups = num_groups
        self.norm = nn.GroupNorm(num_groups, num_features, eps=eps, affine=False, **dd)
        self.attn = GroupMixtureAttention(
            num_features, num_mixtures, eps=attn_eps, attn_norm=attn_norm, attn_groups=attn_groups, norm_eps=eps,
            **dd)
        self._create_mixture(**dd)  # as AN-BN: scales ~ N(1, 0.1), offsets ~ N(0, 0.1)

    @property
    def eps(self) -> float:
        return self.norm.eps

    @classmethod
    def norm_layer(
            cls, num_mixtures: int = 10, num_groups: int = 32, **kwargs) -> Callable[[int], 'AttentiveGroupNorm']:
        """A ``norm_layer`` for torchvision / timm builders: ``callable(num_channels) -> AttentiveGroupNorm``."""
        return partial(cls, num_mixtures=num_mixtures, num_groups=num_groups, **kwargs)

    def extra_repr(self) -> str:
        return (f'{self.num_features}, num_mixtures={self.num_mixtures}, num_groups={self.num_groups}, '
                f'eps={self.eps}, attn_norm={self.attn.attn_norm!r}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f'AttentiveGroupNorm expects a 4D (N, C, H, W) input, got {x.dim()}D input')
        x_hat = self.norm(x)
        if x.shape[0]:
            s = instance_attention_stats(x, self.attn.eps)  # float32 (float64 for float64 input)
        else:  # no RoIs (torchvision runs its heads on empty batches): no statistics, same graph
            s = x.new_zeros(x.shape[:2] + (1, 1), dtype=torch.float32)
        return self.mix(x_hat, self.attn.gate(s.flatten(1)), x.dtype)
