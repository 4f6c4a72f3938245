"""AN-DenseNet: timm's DenseNet-BC with Attentive Normalization after the 1x1 bottleneck conv of every dense layer.

Papers:
    * `Attentive Normalization` - https://arxiv.org/abs/1908.01259
    * `Densely Connected Convolutional Networks` - https://arxiv.org/abs/1608.06993
Reference code (research-only license, read for facts only): https://github.com/tfwu/iVMCL-Release (refactored
release, its ``DenseNet`` backbone; there is no legacy AOGNet-v2 DenseNet).

Nothing of timm's DenseNet is forked: the network is built by timm's ``DenseNet``; afterwards the norm of every dense
layer that follows its 1x1 bottleneck conv (``norm2``, a ``BatchNormAct2d`` with ReLU) is swapped for an
:class:`~an_zoo.layers.AttentiveBatchNormAct2d` of the same width keeping the ReLU, with the K of its dense block.
Stem, dense-layer input norms (``norm1``), transitions, the final norm and the head stay timm's.

* AN-DenseNet-121 (the reference, refactored release): growth rate 32, dense blocks of (6, 12, 24, 16) layers,
  bottleneck width 128; 58 AN layers, K per dense block = (10, 10, 20, 20); 8,342,288 parameters at 1000 classes.
"""
import re
from typing import Any, Dict, List, Sequence, Set, Union

import torch
import torch.nn as nn
from timm.models import FeatureInfo, generate_default_cfgs, register_model
from timm.models.densenet import DenseBlock, DenseLayer, DenseNet

from .._manifest import pretrained_cfgs
from ..layers import AttentiveBatchNormAct2d, attentive_norm_no_weight_decay
from ._builder import build_an_model
from ._checkpoint import remap_state_dict

__all__ = ['ANDenseNet', 'ANDenseNetFeatures']

# the reference's number of mixture components per dense block
DEFAULT_STAGE_MIXTURES = (10, 10, 20, 20)


def _use_attentive_bottleneck_norms(features: nn.Sequential, stage_mixtures: Sequence[int]) -> None:
    """Swap ``norm2`` of every dense layer (after the 1x1 bottleneck conv) for AN with the same width, statistics
    settings, dropout and activation; one K per dense block."""
    blocks = [m for m in features.children() if isinstance(m, DenseBlock)]
    if len(stage_mixtures) != len(blocks):
        raise ValueError(f'stage_mixtures needs one K per dense block ({len(blocks)}), got {tuple(stage_mixtures)}')
    for block, k in zip(blocks, stage_mixtures):
        for layer in block.values():
            if not isinstance(layer, DenseLayer):
                continue
            old = layer.norm2
            if not all(hasattr(old, a) for a in ('num_features', 'act', 'drop')):
                raise ValueError(f'AN replaces a timm norm-act layer (BatchNormAct2d), got {type(old).__name__}')
            ref = old.running_mean
            new = AttentiveBatchNormAct2d(
                old.num_features, k, eps=old.eps, momentum=old.momentum, apply_act=False,
                device=ref.device, dtype=ref.dtype)
            new.drop, new.act = old.drop, old.act  # keep the layer's own activation (ReLU)
            layer.norm2 = new


class ANDenseNet(DenseNet):
    """timm ``DenseNet`` with Attentive Normalization after the 1x1 bottleneck conv of every dense layer.

    Takes every argument of :class:`timm.models.densenet.DenseNet` plus ``stage_mixtures``; the model contract
    (``forward_features``, ``forward_head``, ``forward_intermediates``, ``feature_info``, ``reset_classifier``, grad
    checkpointing via ``memory_efficient`` / ``set_grad_checkpointing``, ``group_matcher``) is timm's.
    """

    def __init__(self, stage_mixtures: Sequence[int] = DEFAULT_STAGE_MIXTURES, **kwargs: Any) -> None:
        """
        Args:
            stage_mixtures: Number K of AN mixture components per dense block.
            **kwargs: Passed to timm's ``DenseNet`` (``growth_rate``, ``block_config``, ``bn_size``, ...).
        """
        super().__init__(**kwargs)
        _use_attentive_bottleneck_norms(self.features, stage_mixtures)
        self.stage_mixtures = tuple(stage_mixtures)
        # reference init: convs Kaiming normal (fan_out, relu) - timm's DenseNet uses fan_in; norms and the
        # classifier keep timm's init (BN 1 / 0, bias 0), AN its own (mixture N(1, 0.1) / N(0, 0.1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def no_weight_decay(self) -> Set[str]:
        """The (K, C) mixture parameters get no weight decay in timm's optimizer factory (see docs/models.md)."""
        return attentive_norm_no_weight_decay(self)


class ANDenseNetFeatures(ANDenseNet):
    """Features-only counterpart of :class:`ANDenseNet` (``features_only=True``): the network up to the last requested
    feature, with the same state_dict names as the classifier model (no head); ``forward`` returns the feature maps of
    ``out_indices`` (0: stem norm, stride 2; 1-3: dense blocks 1-3, strides 4-16; 4: final norm, stride 32), as
    ``forward_intermediates`` computes them."""

    def __init__(self, out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3, 4), **kwargs: Any) -> None:
        """
        Args:
            out_indices: Indices of the features to return (negative ones count from the end).
            **kwargs: As :class:`ANDenseNet` (no ``num_classes`` / ``global_pool``: there is no head).
        """
        super().__init__(num_classes=0, global_pool='', **kwargs)
        names = [name for name, _ in self.features.named_children()]
        self.out_indices = self.prune_intermediate_layers(out_indices, prune_head=True)
        kept = {name for name, _ in self.features.named_children()}
        # what a full checkpoint holds beyond the last requested feature: dropped on loading
        self.pruned_prefixes = tuple(f'features.{name}.' for name in names if name not in kept)
        self.feature_info = FeatureInfo(self.feature_info, self.out_indices)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """Map an official AN-DenseNet checkpoint (refactored ``stem`` / ``layerN`` layout), a torchvision / timm-named
    one (also with torchvision's old ``norm.1`` / ``conv.2`` names) or an an_zoo one onto ``model``."""
    num_blocks = len(model.stage_mixtures)  # of the architecture (a features-only model may be cut short)

    def rename(key: str) -> str:
        # torchvision's old dotted names: denselayerN.norm.1 -> norm1, conv.2 -> conv2 (any leaf, AN ones included)
        key = re.sub(r'(denselayer\d+\.(?:norm|relu|conv))\.([12])\.', r'\1\2.', key)
        if key.startswith('stem.conv1.conv.'):
            return 'features.conv0.' + key[len('stem.conv1.conv.'):]
        if key.startswith('stem.conv1.bn.'):
            return 'features.norm0.' + key[len('stem.conv1.bn.'):]
        match = re.match(r'^layer(\d+)\.([01])\.(.*)$', key)
        if match is None:
            return key
        block, part, rest = int(match.group(1)), match.group(2), match.group(3)
        if part == '0':  # the dense block
            layer = re.match(r'^(denselayer\d+)\.(bn1|conv1|AttnBN2d2|conv2)\.(.*)$', rest)
            if layer is None:
                return key
            name = {'bn1': 'norm1', 'AttnBN2d2': 'norm2'}.get(layer.group(2), layer.group(2))
            return f'features.denseblock{block}.{layer.group(1)}.{name}.{layer.group(3)}'
        if block == num_blocks:  # layer<last>.1: the final norm
            return 'features.norm5.' + rest
        transition = re.match(r'^(bn|conv)\.(.*)$', rest)
        if transition is None:
            return key
        name = {'bn': 'norm'}.get(transition.group(1), transition.group(1))
        return f'features.transition{block}.{name}.{transition.group(2)}'

    return remap_state_dict(state_dict, model, rename_fn=rename, ignore=getattr(model, 'pruned_prefixes', ()))


def _create_an_densenet(variant: str, pretrained: bool = False, **kwargs: Any) -> ANDenseNet:
    model_cls = ANDenseNet
    feature_cfg = dict(flatten_sequential=True, **(kwargs.pop('feature_cfg', None) or {}))
    kwargs_filter = None
    features_mode = ''
    if kwargs.pop('features_only', False):
        if len(feature_cfg) > 1 or 'feature_cls' in kwargs:
            features_mode = 'cfg'  # timm's feature wrappers (hooks, fx, getter) around the full model
        else:  # own features class: the classifier model's state_dict names, as mobilenet's features classes
            kwargs_filter = ('num_classes', 'global_pool')
            model_cls = ANDenseNetFeatures
            features_mode = 'cls'
    return build_an_model(
        model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        features_only=features_mode == 'cfg', feature_cfg=feature_cfg,
        kwargs_filter=kwargs_filter, **kwargs)


default_cfgs = generate_default_cfgs(pretrained_cfgs({
    'an_densenet121': dict(first_conv='features.conv0', classifier='classifier', pool_size=(7, 7)),
}))


@register_model
def an_densenet121(pretrained: bool = False, **kwargs: Any) -> ANDenseNet:
    """AN-DenseNet-121 (refactored release's DenseNet-121-AN, 8.342 M parameters)."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 24, 16))
    return _create_an_densenet('an_densenet121', pretrained, **dict(model_args, **kwargs))
