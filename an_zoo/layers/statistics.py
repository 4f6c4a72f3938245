"""Statistics shared by every AN code path: the dtype statistics are computed in, per-instance moments over H*W,
and the BatchNorm running-statistics update.

Both AN implementations (the reference layer and the fast functions), the FX-traceable functional form and the CPU
SyncBatchNorm import these, so that the choices made here (float32 statistics for half-precision input, how the
per-instance moments are reduced: BatchNorm's own CPU kernels or shifted sums, BatchNorm's momentum /
cumulative-average rule) are made once.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['stats_input', 'instance_moments', 'use_batchnorm_kernels', 'use_batchnorm_backward_kernels',
           'batchnorm_kernel_grad_sums', 'running_stats_factor', 'update_running_stats', 'update_running_stats_many',
           'uses_batch_stats']

_SINGLE_PASS_BYTES = 16 << 20  # float32 copies of float16 / bfloat16 input: up to this size at once, else chunks
_SCRATCH_BYTES = 4 << 20
_BATCHNORM_KERNEL_MIN_SAMPLE = 100_000  # channels_last elements per sample (see use_batchnorm_kernels)
_BATCHNORM_BACKWARD_KERNEL_MIN_TOTAL = 2_250_000  # elements of the whole tensor (see use_batchnorm_backward_kernels)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (a no-op Tensor.to still costs a dispatch; these layers run dozens of tiny ops, so it shows)
    return t if t.dtype == dtype else t.to(dtype)


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
    # (cheapest tests first: this runs on every layer call, where a tensor method costs about as much as a small op)
    if x.dim() != 4 or x.numel() < _BATCHNORM_KERNEL_MIN_SAMPLE * x.shape[0] or x.device.type != 'cpu':
        return False
    if x.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        return False
    if any(t.stride() != x.stride() or t.dtype != x.dtype for t in others):
        return False
    return x.is_contiguous(memory_format=torch.channels_last)


def use_batchnorm_backward_kernels(x: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the backward's two reductions over ``grad`` and x run through BatchNorm's backward kernel
    (:func:`batchnorm_kernel_grad_sums`): where :func:`use_batchnorm_kernels` holds and the tensors hold at least
    ``_BATCHNORM_BACKWARD_KERNEL_MIN_TOTAL`` elements. Smaller ones keep the sums, whose extra write of ``dy * x``
    is cheap while the tensors fit the CPU's caches: measured on a 2-core CPU, the per-sample backward kernel took
    1.1-2.2x the sums' time up to 1.2M elements, about the same at 1.6-2.1M, and 0.6-0.8x from 2.4M on."""
    return x.numel() >= _BATCHNORM_BACKWARD_KERNEL_MIN_TOTAL and use_batchnorm_kernels(x, grad)


def _batchnorm_kernel_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, biased var)`` per (sample, channel) from BatchNorm's statistics kernel (two passes, no writes)."""
    # (split: the N one-sample views in one call, not one slicing op per sample)
    stats = [torch.batch_norm_update_stats(sample, None, None, 0.0) for sample in x.split(1)]
    return torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats])


def batchnorm_kernel_grad_sums(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum_hw grad, sum_hw grad * (x - mean))`` per (sample, channel), ``mean`` per channel, from BatchNorm's
    backward kernel (its bias and weight gradients with unit inverse std: one fused read of both tensors, no
    writes). For tensors where :func:`use_batchnorm_kernels` holds (the layer calls it where
    :func:`use_batchnorm_backward_kernels` does)."""
    ones = mean.new_ones(mean.shape)
    mask = [False, True, True]
    sums = [torch.ops.aten.native_batch_norm_backward(grad_sample, x_sample, None, None, None, mean, ones, True, 0.0,
                                                      mask) for grad_sample, x_sample in zip(grad.split(1), x.split(1))]
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
    scale = 1.0 / (x.shape[2] * x.shape[3])
    var = s2.addcmul_(s1, s1, value=-scale).mul_(scale).clamp_(min=0)  # (sum d^2 - (sum d)^2 / M) / M
    return torch.add(shift, s1, alpha=scale), var


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether a BatchNorm-like module normalizes with the statistics of the batch (training, or no running ones)."""
    return bn.training or bn.running_mean is None


def running_stats_factor(num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float]) -> float:
    """Count one more training batch and return the running-statistics update factor, as ``nn.BatchNorm2d`` does
    (``momentum``, or the cumulative average ``1 / num_batches_tracked`` when momentum is None)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return _update_factor(num_batches_tracked, momentum)


def _update_factor(num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float]) -> float:
    """The update factor once the batch is counted: ``momentum``, or the cumulative average when it is None."""
    if momentum is None:
        return 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    return momentum


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, 'is_exporting', None)  # (absent from older torch releases)
    return is_exporting is not None and is_exporting()


def update_running_stats(bn: nn.Module, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
    """``nn.BatchNorm2d``'s running-statistics update of ``bn`` from a batch's mean and unbiased variance (in
    training mode with running statistics; otherwise nothing)."""
    with torch.no_grad():
        update_running_stats_many([(bn, mean, var_unbiased)])


def update_running_stats_many(updates: Sequence[Tuple[nn.Module, torch.Tensor, torch.Tensor]]) -> None:
    """:func:`update_running_stats` of several BatchNorms, ``(bn, mean, unbiased var)`` each, as few ops as possible
    (one counter increment and one interpolation for all the BatchNorms with the same momentum): an AN layer
    updates two BatchNorms per training step, and on small feature maps each op costs about as much as a data pass.
    The statistics must not require grad (the caller detaches or runs under no_grad)."""
    updates = [u for u in updates if u[0].training and u[0].track_running_stats and u[0].running_mean is not None]
    if not updates:
        return
    # graphs (compiled, exported) get one op per tensor: exporters such as ONNX's have no foreach ops
    foreach = not (torch.compiler.is_compiling() or _is_exporting())
    counters = [bn.num_batches_tracked for bn, _, _ in updates if bn.num_batches_tracked is not None]
    if foreach and counters:
        torch._foreach_add_(counters, 1)
    else:
        for counter in counters:
            counter.add_(1)
    by_factor: Dict[float, Tuple[List[torch.Tensor], List[torch.Tensor]]] = {}
    for bn, mean, var in updates:
        running, batch = by_factor.setdefault(_update_factor(bn.num_batches_tracked, bn.momentum), ([], []))
        running += [bn.running_mean, bn.running_var]
        batch += [_cast(mean, bn.running_mean.dtype), _cast(var, bn.running_var.dtype)]
    for factor, (running, batch) in by_factor.items():
        if foreach:
            torch._foreach_lerp_(running, batch, factor)
        else:
            for target, value in zip(running, batch):
                target.lerp_(value, factor)
