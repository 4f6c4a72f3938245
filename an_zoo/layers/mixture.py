"""The parts every Attentive Normalization layer shares: the attention that computes the per-instance mixture
weights, and the mixture of K affine transforms it weights.

Paper: `Attentive Normalization`, Xilai Li, Wei Sun, Tianfu Wu, ECCV 2020 — https://arxiv.org/abs/1908.01259

    s     = mean_hw(x) * rsqrt(var_hw(x) + 1e-3)          (per sample and channel, from the PRE-norm x)
    lam   = hardsigmoid(NORM_K(conv1x1_{C->K}(s)))          (N, K), each entry in [0, 1]
    out   = (lam @ W) * xhat + (lam @ B)                    W, B: (K, C)

:class:`MixtureAttention` is the ``lam`` branch; its normalization over the K logits (BatchNorm for AN over BatchNorm,
GroupNorm or none for AN over GroupNorm) is given to it. :class:`MixtureNorm` holds ``W`` and ``B`` with their
initialisation and applies the mixture to a standardized ``xhat``; the concrete layers
(:class:`~an_zoo.layers.AttentiveBatchNorm2d`, :class:`~an_zoo.layers.AttentiveGroupNorm`) add the standardization.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .statistics import stats_input

__all__ = ['ATTENTION_EPS', 'instance_attention_stats', 'MixtureAttention', 'MixtureNorm']

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
    """Instance-specific mixture weights ``lam = hardsigmoid(NORM_K(conv1x1(s)))`` of shape (N, K).

    The normalization of the K logits is an argument: by default (``norm=None``) a ``BatchNorm2d(K)`` child named
    ``bn`` (AN over BatchNorm); AN over GroupNorm passes its per-sample one under the name ``norm``.
    """

    def __init__(
            self,
            num_features: int,
            num_mixtures: int,
            eps: float = ATTENTION_EPS,
            norm: Optional[nn.Module] = None,
            norm_name: str = 'bn',
            conv_bias: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            num_features: Channels C of the normalized input.
            num_mixtures: Number K of affine transforms mixed.
            eps: Epsilon of the per-instance statistic.
            norm: Normalization of the (N, K, 1, 1) logits; None: ``nn.BatchNorm2d(K)``.
            norm_name: Attribute (and state_dict prefix) of ``norm``: ``'bn'`` (AN-BN) or ``'norm'`` (AN-GN).
            conv_bias: Give the 1x1 conv a bias (zero at init), for an attention without normalization.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.eps = eps
        self.conv = nn.Conv2d(num_features, num_mixtures, kernel_size=1, bias=False, **dd)
        if conv_bias:  # added after construction: the conv's weight init draws the same random numbers either way
            self.conv.bias = nn.Parameter(torch.zeros(num_mixtures, **dd))
        self.add_module(norm_name, norm if norm is not None else nn.BatchNorm2d(num_mixtures, **dd))
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(instance_attention_stats(x, self.eps).flatten(1))

    def normalize_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The normalization of the (N, K, 1, 1) logits (subclasses that name it ``norm`` override this: TorchScript
        needs a fixed attribute)."""
        return self.bn(z)

    def gate(self, s: torch.Tensor) -> torch.Tensor:
        """Mixture weights (N, K) from the attention input ``s`` (N, C)."""
        # float32 statistics are handed to the conv in its own dtype (autocast, if active, recasts as usual)
        z = self.normalize_logits(self.conv(s[:, :, None, None].to(self.conv.weight.dtype)))
        return F.hardsigmoid(z).flatten(1)


class MixtureNorm(nn.Module):
    """Base of the AN layers: the K affine transforms ``mixture_weight``, ``mixture_bias`` (K, C), their
    initialisation, and the mixture step ``(lam @ W) * xhat + lam @ B``."""

    def __init__(self, num_features: int, num_mixtures: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_mixtures = num_mixtures

    def _create_mixture(self, device=None, dtype=None) -> None:
        """Create and initialise ``mixture_weight`` and ``mixture_bias``; subclasses call this after registering
        their standardization and attention (the registration order is the state_dict order of checkpoints and
        the parameter order of optimizer states)."""
        dd = {'device': device, 'dtype': dtype}
        self.mixture_weight = nn.Parameter(torch.empty(self.num_mixtures, self.num_features, **dd))
        self.mixture_bias = nn.Parameter(torch.empty(self.num_mixtures, self.num_features, **dd))
        self.reset_parameters()

    def reset_parameters(self, zero_init: bool = False) -> None:
        """Reference init: scales ~ N(1, 0.1), offsets ~ N(0, 0.1); ``zero_init`` (last norm of a residual
        branch) sets both to 0 so the block starts as identity."""
        if zero_init:
            nn.init.zeros_(self.mixture_weight)
            nn.init.zeros_(self.mixture_bias)
        else:
            nn.init.normal_(self.mixture_weight, 1.0, 0.1)
            nn.init.normal_(self.mixture_bias, 0.0, 0.1)

    def mix(self, x_hat: torch.Tensor, lam: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(lam @ W) * x_hat + lam @ B`` per (sample, channel), returned in ``dtype`` (the input's)."""
        lam = lam.to(self.mixture_weight.dtype)
        gamma = lam @ self.mixture_weight  # (N, C)
        beta = lam @ self.mixture_bias
        out = x_hat * gamma[:, :, None, None] + beta[:, :, None, None]
        return out.to(dtype)
