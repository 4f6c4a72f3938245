"""Synchronised BatchNorm that also works on CPU (gloo), and an AN-aware converter.

torch's ``SyncBatchNorm`` raises for CPU tensors ("expected input tensor to be on GPU") and DistributedDataParallel
refuses a CPU module that contains one, so a torchrun job on CPU nodes (and our 2-process gloo CI test) could not
use ``--sync-bn`` at all. :func:`convert_sync_batchnorm` keeps timm's / torch's converter for accelerator modules
and, for CPU modules, uses the layers here, which compute the global batch statistics with differentiable
all-reduces.

An :class:`~an_zoo.layers.AttentiveBatchNorm2d` holds its standardization and its attention's BatchNorm over K as
plain ``BatchNorm2d`` children, so converting those children synchronises every statistic AN uses while its
attention and mixture stay untouched; the per-instance attention statistics need no synchronisation.
"""
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm

from .statistics import stats_input, update_running_stats

__all__ = ['SyncBatchNorm', 'SyncBatchNormAct', 'convert_sync_batchnorm']


def _global_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm with statistics over the batch of every process in ``bn.process_group``.

    Two all-reduces (sum and count, then the centred sum of squares) keep the variance as accurate as a local
    two-pass one. ``torch.distributed.nn.functional.all_reduce`` is differentiable (its backward all-reduces the
    gradient), so each process gets the gradient of the global statistics, exactly as torch's CUDA kernels do.
    """
    from torch.distributed.nn.functional import all_reduce

    group = bn.process_group or dist.group.WORLD
    channels = x.shape[1]
    xf = stats_input(x)  # float32 statistics for half / bfloat16 inputs, as BatchNorm computes them
    local_count = x.numel() // channels
    sums = torch.cat([xf.sum(dim=(0, 2, 3)), xf.new_full((1,), float(local_count))])
    sums = all_reduce(sums, group=group)
    count = sums[-1]
    mean = sums[:channels] / count
    centred = xf - mean[None, :, None, None]
    var = all_reduce((centred * centred).sum(dim=(0, 2, 3)), group=group) / count  # biased, for normalizing
    total = float(count)
    update_running_stats(bn, mean.detach(), var.detach() * (total / max(total - 1.0, 1.0)))
    out = centred * torch.rsqrt(var + bn.eps)[None, :, None, None]
    if bn.affine:
        out = out * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    return out.to(x.dtype)


def _needs_sync(bn: nn.BatchNorm2d) -> bool:
    return (bn.training and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(bn.process_group or dist.group.WORLD) > 1)


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batches of all processes, on any device.

    Not a subclass of ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses CPU modules that contain one.
    Outside a multi-process run (or in eval mode) it is an ordinary BatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[object] = None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _needs_sync(self):
            self._check_input_dim(x)
            return _global_batch_norm(self, x)
        return super().forward(x)


class SyncBatchNormAct(BatchNormAct2d):
    """timm's ``BatchNormAct2d`` (BatchNorm + drop + act) with the synchronisation of :class:`SyncBatchNorm`."""

    def __init__(self, *args, process_group: Optional[object] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_sync(self):
            return super().forward(x)
        return self.act(self.drop(_global_batch_norm(self, x)))


def _on_cpu(module: nn.Module) -> bool:
    tensor = next(iter(module.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(module.buffers()), None)
    return tensor is None or tensor.device.type == 'cpu'


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[object] = None) -> nn.Module:
    """Synchronise every BatchNorm2d of ``module`` (including the two inside each AN layer) and timm
    ``BatchNormAct2d`` across processes. AN layers stay AN layers: only their BatchNorm children are swapped.

    A module on CUDA (or another accelerator) gets timm's converter (torch ``SyncBatchNorm`` and timm
    ``SyncBatchNormAct``, the fused kernels); a module on CPU gets :class:`SyncBatchNorm` / :class:`SyncBatchNormAct`,
    which DDP accepts on CPU (gloo). Parameters and buffers are shared with the originals. Returns the converted
    module (a new object when ``module`` itself is a BatchNorm, as torch's converter does).
    """
    if not _on_cpu(module):
        return timm_convert_sync_batchnorm(module, process_group)
    return _convert_cpu(module, process_group)


def _convert_cpu(module: nn.Module, process_group: Optional[object]) -> nn.Module:
    converted = module
    if type(module) in (nn.BatchNorm2d, BatchNormAct2d):
        if isinstance(module, BatchNormAct2d):
            converted = SyncBatchNormAct(module.num_features, module.eps, module.momentum, module.affine,
                                         module.track_running_stats, apply_act=False, process_group=process_group)
            converted.act, converted.drop = module.act, module.drop
        else:
            converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats, process_group)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        new_child = _convert_cpu(child, process_group)
        if new_child is not child:
            converted.add_module(name, new_child)
    return converted
