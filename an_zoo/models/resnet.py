"""AN-ResNet / AN-ResNeXt: timm's ResNet with Attentive Normalization where the reference puts it.

Paper: `Attentive Normalization` - https://arxiv.org/abs/1908.01259
Reference code (research-only license, read for facts only): https://github.com/iVMCL/AOGNet-v2 (legacy),
https://github.com/tfwu/iVMCL-Release (refactored).

Nothing of timm's ResNet is forked: the blocks below are timm's ``BasicBlock`` / ``Bottleneck`` with the chosen norms
swapped for :class:`~an_zoo.layers.AttentiveBatchNorm2d`, bound per stage to that stage's number of mixture
components K and handed to timm's ``ResNet``.

* Bottleneck (50/101/152, ResNeXt): AN replaces only ``bn2`` (after the 3x3 conv); K per stage = (10, 10, 20, 20).
* BasicBlock (18/34): AN on ``bn1`` only (``_bn1`` models, also registered without the suffix: the refactored
  release's default placement and its better ResNet-34) or on ``bn1`` and ``bn2`` (``_bn12`` models).
* ResNet-50 placements of the refactored release: AN on ``bn3`` only (``an_resnet50_bn3``), or on every norm outside
  the attention branches, stem and shortcut norms included (``an_resnet50_all``).
* ``d`` models: deep 3x3 stem (32, 32, 64), 2x2 stride-2 max pool, average-pool shortcuts (ResNetV1d-AN).
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence, Set, Tuple, Type, Union

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from .._manifest import pretrained_cfgs
from ..layers import AttentiveBatchNorm2d, attentive_norm_no_weight_decay
from ._builder import build_an_model
from ._checkpoint import remap_state_dict

__all__ = ['ANResNet', 'AttentiveBasicBlock', 'AttentiveBottleneck']

# the reference's number of mixture components per stage
DEFAULT_STAGE_MIXTURES = (10, 10, 20, 20)


def _use_attentive_norms(block: nn.Module, names: Sequence[str], num_mixtures: int, **dd: Any) -> None:
    """Replace the block's norms ``names`` by AN layers of the same width (same position in the state_dict)."""
    for name in names:
        width = getattr(block, name).num_features
        setattr(block, name, AttentiveBatchNorm2d(width, num_mixtures=num_mixtures, **dd))


class AttentiveBasicBlock(BasicBlock):
    """timm's ``BasicBlock`` with AN on ``an_norms`` (``('bn1',)`` or ``('bn1', 'bn2')``)."""

    def __init__(
            self,
            inplanes: int,
            planes: int,
            *args: Any,
            num_mixtures: int = 10,
            an_norms: Tuple[str, ...] = ('bn1',),
            **kwargs: Any,
    ) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)
        self.an_norms = tuple(an_norms)
        _use_attentive_norms(self, self.an_norms, num_mixtures, device=kwargs.get('device'), dtype=kwargs.get('dtype'))

    def zero_init_last(self) -> None:
        if isinstance(self.bn2, AttentiveBatchNorm2d):
            self.bn2.reset_parameters(zero_init=True)  # every mixture component 0: the branch starts at 0
        else:
            super().zero_init_last()


class AttentiveBottleneck(Bottleneck):
    """timm's ``Bottleneck`` with AN on ``an_norms`` (reference: ``('bn2',)``, the norm after the 3x3 conv)."""

    def __init__(
            self,
            inplanes: int,
            planes: int,
            *args: Any,
            num_mixtures: int = 10,
            an_norms: Tuple[str, ...] = ('bn2',),
            **kwargs: Any,
    ) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)
        self.an_norms = tuple(an_norms)
        _use_attentive_norms(self, self.an_norms, num_mixtures, device=kwargs.get('device'), dtype=kwargs.get('dtype'))

    def zero_init_last(self) -> None:
        if isinstance(self.bn3, AttentiveBatchNorm2d):
            self.bn3.reset_parameters(zero_init=True)
        else:
            super().zero_init_last()


def _stage_blocks(block: Type[nn.Module], stage_mixtures: Sequence[int], an_norms: Tuple[str, ...]) -> Tuple:
    """One block factory per stage, bound to that stage's K."""
    fns = []
    for k in stage_mixtures:
        fn = partial(block, num_mixtures=k, an_norms=an_norms)
        fn.expansion = block.expansion  # timm's make_blocks reads the expansion off the block fn
        fns.append(fn)
    return tuple(fns)


class ANResNet(ResNet):
    """timm ``ResNet`` with Attentive Normalization blocks.

    Takes every argument of :class:`timm.models.resnet.ResNet` plus the AN ones below; the model contract
    (``forward_features``, ``forward_head``, ``forward_intermediates``, ``feature_info``, ``reset_classifier``, grad
    checkpointing, ``group_matcher``) is timm's.
    """

    def __init__(
            self,
            block: Union[Type[AttentiveBasicBlock], Type[AttentiveBottleneck]],
            layers: Tuple[int, ...],
            stage_mixtures: Sequence[int] = DEFAULT_STAGE_MIXTURES,
            an_norms: Optional[Tuple[str, ...]] = None,
            an_stem: bool = False,
            an_downsample: bool = False,
            stem_pool_size: int = 3,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            block: ``AttentiveBasicBlock`` or ``AttentiveBottleneck``.
            layers: Number of blocks per stage.
            stage_mixtures: Number K of AN mixture components per stage.
            an_norms: Names of the block norms that are AN (default: the block's reference placement).
            an_stem: AN on the stem norm ``bn1`` too, with the first stage's K (the reference's "an_all").
            an_downsample: AN on the shortcut norms ``layerX.0.downsample.<last>`` too, with their stage's K.
            stem_pool_size: 3 (timm / torchvision: 3x3 stride-2 max pool, padding 1) or 2 (2x2 stride-2 max pool,
                as the reference ResNetV1d-AN models).
            **kwargs: Passed to timm's ``ResNet``.
        """
        channels = kwargs.get('channels') or (64, 128, 256, 512)
        if len(stage_mixtures) != len(channels):
            raise ValueError(f'stage_mixtures needs one K per stage ({len(channels)}), got {tuple(stage_mixtures)}')
        if an_norms is None:
            an_norms = ('bn2',) if issubclass(block, Bottleneck) else ('bn1',)
        super().__init__(_stage_blocks(block, stage_mixtures, tuple(an_norms)), layers, **kwargs)
        if stem_pool_size == 2:
            self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        elif stem_pool_size != 3:
            raise ValueError(f'stem_pool_size must be 2 or 3, got {stem_pool_size}')
        self.stage_mixtures = tuple(stage_mixtures)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        if an_stem:
            _use_attentive_norms(self, ('bn1',), stage_mixtures[0], **dd)
        if an_downsample:
            for stage, k in zip((self.layer1, self.layer2, self.layer3, self.layer4), stage_mixtures):
                for block in stage:
                    if block.downsample is not None:  # Sequential([pool,] conv, norm)
                        _use_attentive_norms(block.downsample, (str(len(block.downsample) - 1),), k, **dd)

    def no_weight_decay(self) -> Set[str]:
        """The (K, C) mixture parameters get no weight decay in timm's optimizer factory (see docs/models.md)."""
        return attentive_norm_no_weight_decay(self)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """Map an official AN-ResNet checkpoint (legacy or refactored layout) or an an_zoo one onto ``model``."""
    renames = (
        (r'^stem\.([0-6])\.', r'conv1.\1.'),  # refactored ResNetV1d deep stem: stem.{0..6} -> conv1.{0..6}
        (r'^stem\.7\.', 'bn1.'),               # ... and its last stem norm
        (r'^AttnBN2d1\.', 'bn1.'),            # refactored "an_all": the stem AN
    )
    return remap_state_dict(state_dict, model, renames=renames)


def _create_an_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ANResNet:
    return build_an_model(ANResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _arch(first_conv: str = 'conv1') -> Dict[str, Any]:
    return dict(first_conv=first_conv, classifier='fc', pool_size=(7, 7))


default_cfgs = generate_default_cfgs(pretrained_cfgs({
    'an_resnet18': _arch(),
    'an_resnet18_bn1': _arch(),
    'an_resnet18_bn12': _arch(),
    'an_resnet34': _arch(),
    'an_resnet34_bn1': _arch(),
    'an_resnet34_bn12': _arch(),
    'an_resnet50': _arch(),
    'an_resnet50_bn3': _arch(),
    'an_resnet50_all': _arch(),
    'an_resnet101': _arch(),
    'an_resnet152': _arch(),
    'an_resnet50d': _arch('conv1.0'),
    'an_resnet101d': _arch('conv1.0'),
    'an_resnext50_32x4d': _arch(),
    'an_resnext101_32x8d': _arch(),
    'an_resnext101_64x4d': _arch(),
}))


_D_ARGS = dict(stem_width=32, stem_type='deep', avg_down=True, stem_pool_size=2)


@register_model
def an_resnet18(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-18 with the reference's default BasicBlock placement: AN on the first norm (as ``an_resnet18_bn1``)."""
    model_args = dict(block=AttentiveBasicBlock, layers=(2, 2, 2, 2), an_norms=('bn1',))
    return _create_an_resnet('an_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet18_bn1(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-18, AN on the first norm of each BasicBlock (refactored release's "an_bn1")."""
    model_args = dict(block=AttentiveBasicBlock, layers=(2, 2, 2, 2), an_norms=('bn1',))
    return _create_an_resnet('an_resnet18_bn1', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet18_bn12(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-18, AN on both norms of each BasicBlock (refactored release's "an_bn12")."""
    model_args = dict(block=AttentiveBasicBlock, layers=(2, 2, 2, 2), an_norms=('bn1', 'bn2'))
    return _create_an_resnet('an_resnet18_bn12', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet34(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-34 with the reference's default BasicBlock placement: AN on the first norm (as ``an_resnet34_bn1``,
    the more accurate of the two released ResNet-34 placements)."""
    model_args = dict(block=AttentiveBasicBlock, layers=(3, 4, 6, 3), an_norms=('bn1',))
    return _create_an_resnet('an_resnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet34_bn1(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-34, AN on the first norm of each BasicBlock (refactored release's "an_bn1")."""
    model_args = dict(block=AttentiveBasicBlock, layers=(3, 4, 6, 3), an_norms=('bn1',))
    return _create_an_resnet('an_resnet34_bn1', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet34_bn12(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-34, AN on both norms of each BasicBlock (refactored release's "an_bn12")."""
    model_args = dict(block=AttentiveBasicBlock, layers=(3, 4, 6, 3), an_norms=('bn1', 'bn2'))
    return _create_an_resnet('an_resnet34_bn12', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet50(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-50 (25.76 M parameters)."""
    model_args = dict(block=AttentiveBottleneck, layers=(3, 4, 6, 3))
    return _create_an_resnet('an_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet50_bn3(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-50, AN on the third norm (after the 1x1 expansion) of each Bottleneck (refactored "an_bn3")."""
    model_args = dict(block=AttentiveBottleneck, layers=(3, 4, 6, 3), an_norms=('bn3',))
    return _create_an_resnet('an_resnet50_bn3', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet50_all(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-50, AN on every norm: stem, the three of each Bottleneck and the shortcuts (refactored "an_all")."""
    model_args = dict(block=AttentiveBottleneck, layers=(3, 4, 6, 3), an_norms=('bn1', 'bn2', 'bn3'), an_stem=True,
                      an_downsample=True)
    return _create_an_resnet('an_resnet50_all', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet101(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-101 (45.00 M parameters)."""
    model_args = dict(block=AttentiveBottleneck, layers=(3, 4, 23, 3))
    return _create_an_resnet('an_resnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet152(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-152."""
    model_args = dict(block=AttentiveBottleneck, layers=(3, 8, 36, 3))
    return _create_an_resnet('an_resnet152', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet50d(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-50-D: deep stem, 2x2 stem pool, avg-pool shortcuts (reference ResNetV1d-50-AN)."""
    model_args = dict(block=AttentiveBottleneck, layers=(3, 4, 6, 3), **_D_ARGS)
    return _create_an_resnet('an_resnet50d', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnet101d(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNet-101-D: deep stem, 2x2 stem pool, avg-pool shortcuts (reference ResNetV1d-101-AN)."""
    model_args = dict(block=AttentiveBottleneck, layers=(3, 4, 23, 3), **_D_ARGS)
    return _create_an_resnet('an_resnet101d', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnext50_32x4d(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNeXt-50 32x4d."""
    model_args = dict(block=AttentiveBottleneck, layers=(3, 4, 6, 3), cardinality=32, base_width=4)
    return _create_an_resnet('an_resnext50_32x4d', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnext101_32x8d(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNeXt-101 32x8d."""
    model_args = dict(block=AttentiveBottleneck, layers=(3, 4, 23, 3), cardinality=32, base_width=8)
    return _create_an_resnet('an_resnext101_32x8d', pretrained, **dict(model_args, **kwargs))


@register_model
def an_resnext101_64x4d(pretrained: bool = False, **kwargs: Any) -> ANResNet:
    """AN-ResNeXt-101 64x4d."""
    model_args = dict(block=AttentiveBottleneck, layers=(3, 4, 23, 3), cardinality=64, base_width=4)
    return _create_an_resnet('an_resnext101_64x4d', pretrained, **dict(model_args, **kwargs))
