"""Statistics shared by every AN code path: the dtype statistics are computed in, per-instance moments over H*W,
and the BatchNorm running-statistics update.

Both AN implementations (the reference layer and the fast functions), the FX-traceable functional form and the CPU
SyncBatchNorm import these, so that the choices made here (float32 statistics for half-precision input, how the
per-instance moments are reduced: BatchNorm's own CPU kernels or shifted sums, BatchNorm's momentum /
cumulative-average rule) are made once.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['stats_input', 'instance_moments', 'use_batchnorm_kernels', 'batchnorm_kernel_grad_sums',
           'running_stats_factor', 'update_running_stats', 'uses_batch_stats']

_SINGLE_PASS_BYTES = 16 << 20  # float32 copies of float16 / bfloat16 input: up to this size at once, else chunks
_SCRATCH_BYTES = 4 << 20
_BATCHNORM_KERNEL_MIN_SAMPLE = 100_000  # channels_last elements per sample (see use_batchnorm_kernels)


def stats_input(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype AN statistics are computed in: float32 for float16 / bfloat16 (autocast), else unchanged
    (float64 stays float64, e.g. for gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _shifted_sums(x: torch.Tensor, scratch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sum(x - k)``, ``sum((x - k)^2)`` over H*W and the shift ``k`` = mean of the first row, per (sample, channel).

    ``scratch`` (x's shape, dtype and layout) receives ``x - k`` and then its squares: both sums are of shifted values,
    whose size is that of the spread of x, not of its mean, so neither loses precision when |mean| >> std.
    """
    # a new, contiguous tensor: scratch may be x, and a broadcast operand with x's own strides is slower
    shift = x[:, :, :1].mean(dim=3, keepdim=True)
    torch.sub(x, shift, out=scratch)  # the shift broadcasts over H, W
    s1 = scratch.sum(dim=(2, 3))
    return s1, scratch.square_().sum(dim=(2, 3)), shift.view(shift.shape[:2])


def _instance_sums(x: torch.Tensor, scratch: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_shifted_sums` of x, float32 for half-precision x (converted in chunks of samples: a small scratch)."""
    if x.dtype in (torch.float32, torch.float64):
        return _shifted_sums(x, torch.empty_like(x) if scratch is None else scratch)
    chunk = x.shape[0]
    per_sample = x[0].numel() * 4
    if per_sample * chunk > _SINGLE_PASS_BYTES:
        chunk = max(1, _SCRATCH_BYTES // per_sample)
    parts = []
    for part in x.split(chunk):
        part = part.float()
        parts.append(_shifted_sums(part, part))  # d and its squares overwrite the copy
    if len(parts) == 1:
        return parts[0]
    s1, s2, shift = (torch.cat(t) for t in zip(*parts))
    return s1, s2, shift


def use_batchnorm_kernels(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the per-(sample, channel) reductions over x (and ``others``, laid out like x) run through BatchNorm's own
    CPU kernels, one call per sample: eager CPU float32 / float64 channels_last tensors with at least
    ``_BATCHNORM_KERNEL_MIN_SAMPLE`` elements per sample.

    There those kernels read the data without writing any, where the shifted sums write ``x - k`` and its squares.
    A call per sample costs a few microseconds, so small samples keep the sums (measured crossover on a 2-core CPU:
    about 1e5 elements per sample); on contiguous (NCHW) tensors BatchNorm's per-sample kernels measured 2-3x slower
    than the sums. Compiled and exported graphs keep the sums (one fused reduction for the compiler, no loop over the
    batch).
    """
    if x.device.type != 'cpu' or x.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        return False
    if any(t.stride() != x.stride() or t.dtype != x.dtype for t in others):
        return False
    return (x.dim() == 4 and x[0].numel() >= _BATCHNORM_KERNEL_MIN_SAMPLE
            and x.is_contiguous(memory_format=torch.channels_last))


def _batchnorm_kernel_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, biased var)`` per (sample, channel) from BatchNorm's statistics kernel (two passes, no writes)."""
    stats = [torch.batch_norm_update_stats(x[i:i + 1], None, None, 0.0) for i in range(x.shape[0])]
    return torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats])


def batchnorm_kernel_grad_sums(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum_hw grad, sum_hw grad * (x - mean))`` per (sample, channel), ``mean`` per channel, from BatchNorm's
    backward kernel (its bias and weight gradients with unit inverse std: one fused read of both tensors, no
    writes). For tensors where :func:`use_batchnorm_kernels` holds."""
    ones = mean.new_ones(mean.shape)
    mask = [False, True, True]
    sums = [torch.ops.aten.native_batch_norm_backward(grad[i:i + 1], x[i:i + 1], None, None, None, mean, ones, True,
                                                      0.0, mask) for i in range(x.shape[0])]
    return torch.stack([s for _, _, s in sums]), torch.stack([xc for _, xc, _ in sums])


def instance_moments(x: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, biased var)`` over H*W per (sample, channel), float32 (float64 for float64 input), no autograd.

    Both ways are as accurate as a two-pass variance when |mean| >> std (tested up to |mean| / std = 1e4 against
    float64): BatchNorm's CPU statistics kernel where :func:`use_batchnorm_kernels` holds, otherwise plain sums of
    values shifted by ``k`` (the mean of the first row of each (sample, channel), close to the mean: little
    cancellation left), ``mean = k + sum(d) / M``, ``var = sum(d^2) / M - (sum(d) / M)^2`` with ``d = x - k``. Plain
    sums are several times faster on CPU than torch.var_mean's Welford loop over the H, W dims of (especially
    channels_last) tensors, and one fused reduction for compilers.

    ``scratch``: an optional float32 / float64 tensor like x to write ``d`` and its squares into. The layer passes
    the buffer its output goes to next, so that no extra full-size tensor is allocated.
    """
    if use_batchnorm_kernels(x):
        return _batchnorm_kernel_moments(x)
    s1, s2, shift = _instance_sums(x, scratch)
    spatial = x.shape[2] * x.shape[3]
    offset = s1.mul_(1.0 / spatial)  # mean - k
    var = s2.mul_(1.0 / spatial).addcmul_(offset, offset, value=-1).clamp_(min=0)
    return offset.add_(shift), var


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether a BatchNorm-like module normalizes with the statistics of the batch (training, or no running ones)."""
    return bn.training or bn.running_mean is None


def running_stats_factor(num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float]) -> float:
    """Count one more training batch and return the running-statistics update factor, as ``nn.BatchNorm2d`` does
    (``momentum``, or the cumulative average ``1 / num_batches_tracked`` when momentum is None)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        return 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    return momentum


def update_running_stats(bn: nn.Module, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
    """``nn.BatchNorm2d``'s running-statistics update of ``bn`` from a batch's mean and unbiased variance (in
    training mode with running statistics; otherwise nothing)."""
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            factor = running_stats_factor(bn.num_batches_tracked, bn.momentum)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_(var_unbiased.to(bn.running_var.dtype), factor)
