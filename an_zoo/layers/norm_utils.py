"""AN-aware versions of the BatchNorm utilities timm and torch provide (sync-BN, freezing, weight decay), and the
model-wide choice of AN implementation."""
import fnmatch
from typing import Callable, Optional, Sequence, Set, Union

import torch.nn as nn
from timm.layers import BatchNormAct2d
from timm.layers import freeze_batch_norm_2d as timm_freeze_batch_norm_2d

from .attentive_group_norm import AttentiveGroupNorm
from .attentive_norm import IMPLEMENTATIONS, AttentiveBatchNorm2d, AttentiveBatchNormAct2d
from .sync_batchnorm import convert_sync_batchnorm  # noqa: F401  (re-exported: one import for AN tooling)

__all__ = ['freeze_batch_norm_2d', 'convert_sync_batchnorm', 'attentive_norm_no_weight_decay', 'convert_bn_to_an',
           'set_an_impl']


def freeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """Freeze every norm of ``module``: AN layers are frozen in place (:meth:`AttentiveBatchNorm2d.freeze`:
    statistics, mixture and attention BatchNorm fixed, attention still per instance), plain BatchNorm becomes timm's
    ``FrozenBatchNorm2d``. timm's own ``freeze_batch_norm_2d`` alone would swap an AN layer's inner BatchNorms but
    leave its mixture trainable. Returns the (possibly new) module, as timm's does."""
    if isinstance(module, AttentiveBatchNorm2d):
        return module.freeze()
    frozen = timm_freeze_batch_norm_2d(module) if not any(
        isinstance(m, AttentiveBatchNorm2d) for m in module.modules()) else module
    if frozen is module:
        for name, child in module.named_children():
            new_child = freeze_batch_norm_2d(child)
            if new_child is not child:
                module.add_module(name, new_child)
    return frozen


def attentive_norm_no_weight_decay(model: nn.Module) -> Set[str]:
    """Names of the AN mixture parameters (AN over BatchNorm and over GroupNorm), for timm's ``no_weight_decay``.

    timm's optimizer factory exempts 1-d parameters and biases only, so the (K, C) ``mixture_weight`` would be
    decayed although it plays the role of a norm's affine weight. Exempting it is our fine-tuning default (as for
    every norm weight in timm); the reference ImageNet runs decayed every parameter, which the recipes reproduce
    with ``no_norm_weight_decay: false``. The attention's 1x1 conv is decayed like any conv.
    """
    return {f'{name}.{param}' for name, m in model.named_modules()
            if isinstance(m, (AttentiveBatchNorm2d, AttentiveGroupNorm)) for param in ('mixture_weight', 'mixture_bias')}


def convert_bn_to_an(
        model: nn.Module,
        num_mixtures: Union[int, Callable[[str, nn.Module], int]] = 10,
        include: Optional[Union[Sequence[str], Callable[[str, nn.Module], bool]]] = None,
) -> nn.Module:
    """Turn chosen BatchNorm2d layers of any CNN (timm, torchvision, your own) into Attentive Normalization.

    Each chosen BatchNorm becomes an :class:`AttentiveBatchNorm2d` (or :class:`AttentiveBatchNormAct2d`, keeping the
    activation, for timm's ``BatchNormAct2d``) with the same width, eps, momentum, device and dtype; its running
    statistics are kept, the mixture is initialised as the reference does (scales ~ N(1, 0.1), offsets ~ N(0, 0.1))
    and its attention is new, so the converted model needs fine-tuning.

    Args:
        model: The model, converted in place (and returned).
        num_mixtures: K for every converted layer, or ``fn(name, module) -> K``.
        include: Which BatchNorms to convert: glob patterns on module names (``['layer*.*.bn2']``) or
            ``fn(name, module) -> bool``. Default: every BatchNorm2d.

    Returns:
        ``model``.

    Raises:
        ValueError: ``include`` matched no BatchNorm2d (the message lists the candidates).
    """
    def chosen(name: str, module: nn.Module) -> bool:
        if include is None:
            return True
        if callable(include):
            return bool(include(name, module))
        return any(fnmatch.fnmatch(name, pattern) for pattern in include)

    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in (nn.BatchNorm2d, BatchNormAct2d) and chosen(name, m)]
    if not targets:
        candidates = [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm2d, BatchNormAct2d)]
        raise ValueError(f'include={include!r} matched no BatchNorm2d; candidates: {candidates[:20]}'
                         f'{" ..." if len(candidates) > 20 else ""}')
    for name, bn in targets:
        k = num_mixtures(name, bn) if callable(num_mixtures) else num_mixtures
        dd = dict(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        if isinstance(bn, BatchNormAct2d):
            an = AttentiveBatchNormAct2d(bn.num_features, k, eps=bn.eps, momentum=bn.momentum, apply_act=False, **dd)
            an.drop, an.act = bn.drop, bn.act
        else:
            an = AttentiveBatchNorm2d(bn.num_features, k, eps=bn.eps, momentum=bn.momentum, **dd)
        an.norm.load_state_dict({k_: v for k_, v in bn.state_dict().items() if k_ not in ('weight', 'bias')})
        an.train(bn.training)
        parent, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent) if parent else model, child, an)
    return model


def set_an_impl(model: nn.Module, impl: str) -> nn.Module:
    """Run every AN layer of ``model`` with ``impl`` (``'fast'`` or ``'reference'``; same results, see the layer);
    ``AN_ZOO_IMPL`` only sets the default of layers created afterwards. Returns ``model``."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f'impl must be one of {IMPLEMENTATIONS}, got {impl!r}')
    for module in model.modules():
        if isinstance(module, AttentiveBatchNorm2d):
            module.impl = impl
    return model
