"""Models and inputs made fit for export parity checks: image-like example batches, non-degenerate norm affines,
calibrated running statistics, and access to a model's AN layers (their names, their reference implementation)."""
import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import AttentiveBatchNorm2d

__all__ = ['an_layer_names', 'reference_an_layers', 'randomize_norm_affines', 'calibrate_running_stats',
           'example_batch', 'prepare_for_checks']


def an_layer_names(model: nn.Module) -> List[str]:
    """Qualified names of the model's AN layers (as they appear in state_dict keys and ONNX name scopes)."""
    return [name for name, m in model.named_modules() if isinstance(m, AttentiveBatchNorm2d)]


@contextlib.contextmanager
def reference_an_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every AN layer of ``model`` runs the reference implementation (what TorchScript runs)."""
    layers = [m for m in model.modules() if isinstance(m, AttentiveBatchNorm2d)]
    saved = [m.impl for m in layers]
    try:
        for m in layers:
            m.impl = 'reference'
        yield model
    finally:
        for m, impl in zip(layers, saved):
            m.impl = impl


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode within the block; every module's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, flag in flags:
            m.training = flag


@torch.no_grad()
def randomize_norm_affines(model: nn.Module, seed: int = 0, branch_scale: float = 0.2) -> nn.Module:
    """Give every norm's affine parameters random, non-degenerate values (scales ~ N(1, 0.1), shifts ~ N(0, 0.1); AN
    mixtures likewise), in place, and return the model.

    A fresh timm ResNet zero-initialises the last norm of every residual branch (``zero_init_last``): each branch
    then outputs exactly 0, and with it every AN layer inside it; a parity check on such a model compares the stem,
    the shortcuts and the head only. Checks of randomly initialised models call this first.
    """
    gen = torch.Generator().manual_seed(seed)

    def fill(weight: torch.Tensor, bias: torch.Tensor) -> None:
        # zero-initialised scales (last norm of a residual branch) get small ones, as trained residual nets have:
        # with scale-1 branches a deep random net is chaotic and any rounding difference grows with depth
        mean, std = (branch_scale, branch_scale / 4) if not weight.any() else (1.0, 0.1)
        weight.copy_(torch.randn(weight.shape, generator=gen).mul_(std).add_(mean).to(weight))
        bias.copy_(torch.randn(bias.shape, generator=gen).mul_(0.1).to(bias))
    for m in model.modules():
        if isinstance(m, AttentiveBatchNorm2d):
            fill(m.mixture_weight, m.mixture_bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            fill(m.weight, m.bias)
    return model


@torch.no_grad()
def calibrate_running_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics (the AN standardization and attention BatchNorms included) to the
    statistics of ``x``, and return the model in eval mode.

    A randomly initialised network in eval mode (running statistics 0 / 1) grows its activations layer after layer,
    so float rounding differences between two correct implementations become large in absolute terms; with running
    statistics taken from data the outputs keep a sane scale and a parity check measures the export, not the init.
    The BatchNorms' momentum is left as it was.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    try:
        model.train()(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return model.eval()


def example_batch(batch_size: int, input_size: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A float32 batch of image-like inputs (normalized-image range), reproducible from ``seed``.

    Each sample mixes smooth structure (upsampled 8x8 noise) with pixel noise, with its own contrast and per-channel
    offset. Samples thus differ in their per-channel statistics, as real images do, which AN's attention is computed
    from: on i.i.d. Gaussian noise every sample has nearly the same statistics, the attention BatchNorm calibrated on
    them gets tiny variances, and parity checks then measure that artefact.
    """
    import torch.nn.functional as F
    c, h, w = (int(v) for v in input_size)
    gen = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(batch_size, c, 8, 8, generator=gen), size=(h, w), mode='bilinear',
                           align_corners=False)
    noise = torch.randn(batch_size, c, h, w, generator=gen)
    contrast = 0.25 + 1.5 * torch.rand(batch_size, 1, 1, 1, generator=gen)
    mix = torch.rand(batch_size, 1, 1, 1, generator=gen)
    offset = 0.5 * torch.randn(batch_size, c, 1, 1, generator=gen)
    return (mix * 2 * smooth + (1 - mix) * noise) * contrast + offset


def prepare_for_checks(model: nn.Module, input_size: Sequence[int], seed: int = 0,
                       calibration_batch: int = 16) -> nn.Module:
    """A randomly initialised model made fit for parity checks, in place: non-degenerate norm affines
    (:func:`randomize_norm_affines`) and running statistics from :func:`example_batch` data
    (:func:`calibrate_running_stats`). Returns it in eval mode. Not for models with trained weights."""
    randomize_norm_affines(model, seed=seed)
    return calibrate_running_stats(model, example_batch(calibration_batch, input_size, seed=seed + 1000))


def model_example(model: nn.Module, input_size: Sequence[int], batch_size: int, seed: int = 0) -> torch.Tensor:
    """:func:`example_batch` on the model's device, in its parameters' floating dtype."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return example_batch(batch_size, input_size, seed).to(device=device, dtype=dtype)


def model_input_size(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """``input_size`` as ``(C, H, W)`` ints; default the model's ``pretrained_cfg['input_size']``, else 224 px."""
    if input_size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        input_size = cfg.get('input_size') or (3, 224, 224)
    if len(input_size) != 3:
        raise ValueError(f'input_size must be (C, H, W), got {tuple(input_size)}')
    return tuple(int(s) for s in input_size)
