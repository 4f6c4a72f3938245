"""Fast Attentive Normalization: one read of x for all statistics, one fused write, BN-sized saved activations.

The reference layer runs BatchNorm (a pass over x, and it saves x), computes the attention statistic (another pass)
and then ``xhat * gamma + beta`` (two more passes, and autograd saves ``xhat``, a second full-size tensor). Here:

* :class:`InstanceMoments` reads x once for the per-(sample, channel) mean and biased variance (float32, also under
  autocast). The batch statistics follow exactly from them (law of total variance), and so does the attention input.
* The rest is (N, C) / (N, K) arithmetic: running-stat update, attention (the layer's own conv / BatchNorm_K /
  hard-sigmoid), ``gamma = lam @ W``, ``beta = lam @ B``, folded with the statistics into one scale ``a`` and shift
  ``b`` per (sample, channel). In eval mode this is the folded form ``out = x * a + b``.
* :class:`ChannelAffine` writes ``x * a + b`` in one pass; its backward reads the gradient and x once.

Both autograd functions save only x (the same storage) and (N, C) tensors: no more than BatchNorm saves. Their
backward formulas are analytic and checked with ``torch.autograd.gradcheck`` in float64 (tests/test_fast_norm.py).
On CUDA these are plain PyTorch ops (compiled ones under torch.compile); no hand-written kernel is used, because
none could be measured against torch.compile on a GPU in this project yet.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['InstanceMoments', 'ChannelAffine', 'fast_attentive_norm']


_SINGLE_PASS_BYTES = 16 << 20  # up to this size one scratch tensor; above, chunks of about _SCRATCH_BYTES
_SCRATCH_BYTES = 4 << 20


def stats_input(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype AN statistics are computed in: float32 for float16 / bfloat16 (autocast), else unchanged
    (float64 stays float64, e.g. for gradcheck). Shared by the reference and the fast implementation."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def instance_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, biased var)`` over H*W per (sample, channel), float32 (float64 for float64 input), no autograd.

    Shifted sums: with ``k`` = the first position of each (sample, channel), ``mean = k + sum(d) / M`` and
    ``var = sum(d^2) / M - (sum(d) / M)^2`` for ``d = x - k``, which avoids the cancellation of the plain
    ``E[x^2] - E[x]^2`` when |mean| >> std. Vectorised sums are several times faster on CPU than torch.var_mean's
    Welford loop over the H, W dims of (especially channels_last) tensors.
    """
    spatial = x.shape[2] * x.shape[3]
    # chunks of samples keep the scratch tensor small: it stays in cache and in the allocator's reused memory
    per_sample = x[0].numel() * 4
    chunk = x.shape[0]
    if per_sample * chunk > _SINGLE_PASS_BYTES:
        chunk = max(1, _SCRATCH_BYTES // per_sample)
    shifts, sums, squares = [], [], []
    for part in x.split(chunk):
        xs = stats_input(part)
        shift = xs[:, :, :1, :1]
        d = xs - shift
        sums.append(d.sum(dim=(2, 3)))
        squares.append(d.square_().sum(dim=(2, 3)))
        shifts.append(shift.flatten(1))
    shift, s1, s2 = (torch.cat(t) if len(t) > 1 else t[0] for t in (shifts, sums, squares))
    mean_d = s1 / spatial
    return shift + mean_d, (s2 / spatial - mean_d.square()).clamp_(min=0)


class InstanceMoments(torch.autograd.Function):
    """``(mean, biased var)`` of x over H*W per (sample, channel): (N, C) each, float32 (or float64)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mean, var = instance_moments(x)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: Optional[torch.Tensor], grad_var: Optional[torch.Tensor]):
        x, mean = ctx.saved_tensors
        spatial = x.shape[2] * x.shape[3]
        # d mean / dx = 1 / M;  d var / dx = 2 (x - mean) / M  ->  grad = x * scale + shift, per (n, c)
        scale = torch.zeros_like(mean) if grad_var is None else grad_var * (2.0 / spatial)
        shift = -mean * scale
        if grad_mean is not None:
            shift = shift + grad_mean / spatial
        grad = torch.addcmul(shift[:, :, None, None].to(x.dtype), x, scale[:, :, None, None].to(x.dtype))
        return grad


class ChannelAffine(torch.autograd.Function):
    """``x * a + b`` with a per-(sample, channel) scale ``a`` and shift ``b`` of shape (N, C)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        return torch.addcmul(shift[:, :, None, None].to(x.dtype), x, scale[:, :, None, None].to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale = ctx.saved_tensors
        grad_x = grad_scale = grad_shift = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * scale[:, :, None, None].to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * x).sum(dim=(2, 3), dtype=scale.dtype)
        if ctx.needs_input_grad[2]:
            grad_shift = grad.sum(dim=(2, 3), dtype=scale.dtype)
        return grad_x, grad_scale, grad_shift


def _running_stats_factor(bn: nn.Module) -> float:
    """Count one more training batch and return the running-statistics update factor, as ``nn.BatchNorm2d`` does
    (``momentum``, or the cumulative average ``1 / num_batches_tracked`` when momentum is None)."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _batch_statistics(norm: nn.Module, mean_nc: torch.Tensor, var_nc: torch.Tensor, count: int):
    """Batch mean / biased var per channel from per-instance moments, updating ``norm``'s running statistics
    exactly as ``nn.BatchNorm2d`` does (unbiased variance, momentum or cumulative average)."""
    mean = mean_nc.mean(0)
    var = var_nc.mean(0) + (mean_nc - mean).pow(2).mean(0)  # law of total variance
    if norm.track_running_stats:
        with torch.no_grad():
            factor = _running_stats_factor(norm)
            unbiased = var * (count / max(count - 1, 1))
            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
            norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), factor)
    return mean, var


def _mixture_weights(attn: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """``attn.gate(s)`` with the 1x1 conv on a (N, C, 1, 1) tensor done as a matrix product (on CPU the
    convolution call costs several times the arithmetic) and BatchNorm_K on the (N, K) matrix directly."""
    bn = attn.bn
    if type(bn) is not nn.BatchNorm2d:  # e.g. SyncBatchNorm: keep the module's own semantics
        return attn.gate(s)
    weight = attn.conv.weight
    z = F.linear(s.to(weight.dtype), weight.flatten(1))
    factor = _running_stats_factor(bn) if bn.training and bn.track_running_stats else 0.0
    use_batch_stats = bn.training or not bn.track_running_stats
    z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, use_batch_stats, factor, bn.eps)
    return F.hardsigmoid(z)


def fast_attentive_norm(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of an :class:`~an_zoo.layers.AttentiveBatchNorm2d` ``layer``, computed the fast way.

    Requires ``layer.norm`` to be a plain ``nn.BatchNorm2d`` in training mode, or any BatchNorm-like module with
    running statistics in eval mode (frozen, SyncBatchNorm in eval); the layer checks that before calling.
    """
    n, _, h, w = x.shape
    spatial = h * w
    mean_nc, var_nc = InstanceMoments.apply(x)
    norm = layer.norm
    if norm.training:
        mean, var = _batch_statistics(norm, mean_nc, var_nc, n * spatial)
    else:
        mean, var = norm.running_mean.to(mean_nc.dtype), norm.running_var.to(mean_nc.dtype)
    rstd = torch.rsqrt(var + norm.eps)
    # attention input from the same moments: unbiased variance (0 for a single position, see the reference layer)
    var_unbiased = var_nc * (spatial / (spatial - 1)) if spatial > 1 else torch.zeros_like(var_nc)
    lam = _mixture_weights(layer.attn, mean_nc * torch.rsqrt(var_unbiased + layer.attn.eps))
    lam = lam.to(layer.mixture_weight.dtype)
    scale = (lam @ layer.mixture_weight) * rstd.to(lam.dtype)
    shift = lam @ layer.mixture_bias - mean.to(lam.dtype) * scale
    return ChannelAffine.apply(x, scale, shift)
