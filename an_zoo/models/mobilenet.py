"""AN-MobileNetV2 / AN-MobileNetV3: timm's EfficientNet / MobileNetV3 builders with Attentive Normalization on
the norm after each depthwise conv.

Paper: `Attentive Normalization` - https://arxiv.org/abs/1908.01259
Reference code (research-only license, read for facts only): https://github.com/iVMCL/AOGNet-v2 (legacy),
https://github.com/tfwu/iVMCL-Release (refactored).

The networks are built by timm's builder from block-definition strings with timm's blocks; afterwards the norm that
follows each depthwise conv (``bn1`` of a depthwise-separable block, ``bn2`` of an inverted residual) is swapped for
an :class:`~an_zoo.layers.AttentiveBatchNormAct2d` of the same width and activation, with the K of its stage.

* AN-MobileNetV2 (the reference): 17 AN layers, K per block group = (5, 5, 5, 5, 10, 10, 10); channels are
  rounded as the reference does (``int(c * width)``), which equals timm's rounding at width 1.0.
* AN-MobileNetV3 (new here, no reference weights): AN on the depthwise norm of every block, and no SE gate. The
  paper's argument is that AN subsumes channel attention: its per-instance mixture weights come from the same
  depthwise output that SE pools and rescale the same channels, so an SE gate beside it is redundant; dropping it
  keeps the cost close to the BN+SE baseline. K per stage mirrors V2: 5 in the early, narrow stages, 10 later.
"""
import re
from functools import partial
from typing import Any, Dict, Sequence, Set

import torch.nn as nn
from timm.layers import get_act_layer
from timm.models import generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet, EfficientNetFeatures
from timm.models.mobilenetv3 import MobileNetV3, MobileNetV3Features

from .._manifest import pretrained_cfgs
from ..layers import AttentiveBatchNormAct2d, attentive_norm_no_weight_decay
from ._builder import build_an_model
from ._checkpoint import remap_state_dict

__all__ = ['ANMobileNetV2', 'ANMobileNetV2Features', 'ANMobileNetV3', 'ANMobileNetV3Features']

MOBILENETV2_STAGE_MIXTURES = (5, 5, 5, 5, 10, 10, 10)
MOBILENETV3_LARGE_STAGE_MIXTURES = (5, 5, 5, 10, 10, 10, 0)  # last stage: 1x1 conv, no depthwise norm
MOBILENETV3_SMALL_STAGE_MIXTURES = (5, 5, 5, 10, 10, 0)


def _use_attentive_depthwise_norms(blocks: nn.Sequential, stage_mixtures: Sequence[int]) -> None:
    """Swap the norm after each depthwise conv for AN with the same width, statistics settings and activation."""
    if len(stage_mixtures) != len(blocks):
        raise ValueError(f'stage_mixtures needs one K per stage ({len(blocks)}), got {tuple(stage_mixtures)}')
    for stage, k in zip(blocks, stage_mixtures):
        for block in stage:
            if isinstance(block, InvertedResidual):
                name = 'bn2'
            elif isinstance(block, DepthwiseSeparableConv):
                name = 'bn1'
            else:
                continue
            if not k:
                raise ValueError(f'a stage with depthwise blocks needs K > 0, got {tuple(stage_mixtures)}')
            old = getattr(block, name)
            ref = old.running_mean
            new = AttentiveBatchNormAct2d(
                old.num_features, k, eps=old.eps, momentum=old.momentum, apply_act=False,
                device=ref.device, dtype=ref.dtype)
            new.drop, new.act = old.drop, old.act  # keep the block's own activation (ReLU6, hard-swish, ...)
            setattr(block, name, new)


class _AttentiveDepthwiseMixin:
    """Builds the timm network as usual, then puts AN after its depthwise convs (one K per stage)."""

    def __init__(self, stage_mixtures: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _use_attentive_depthwise_norms(self.blocks, stage_mixtures)

    def no_weight_decay(self) -> Set[str]:
        """The (K, C) mixture parameters get no weight decay in timm's optimizer factory (see docs/models.md)."""
        return attentive_norm_no_weight_decay(self)


class ANMobileNetV2(_AttentiveDepthwiseMixin, EfficientNet):
    """timm ``EfficientNet`` (MobileNetV2 block definitions) with AN after each depthwise conv."""


class ANMobileNetV2Features(_AttentiveDepthwiseMixin, EfficientNetFeatures):
    """Features-only counterpart of :class:`ANMobileNetV2` (``features_only=True``)."""


class ANMobileNetV3(_AttentiveDepthwiseMixin, MobileNetV3):
    """timm ``MobileNetV3`` with AN after each depthwise conv in place of the SE gates."""


class ANMobileNetV3Features(_AttentiveDepthwiseMixin, MobileNetV3Features):
    """Features-only counterpart of :class:`ANMobileNetV3` (``features_only=True``)."""


# official MobileNetV2 block internals -> timm block attribute names
_DS_INNER = (('conv.0.0.', 'conv_dw.'), ('conv.0.1.', 'bn1.'), ('conv.1.', 'conv_pw.'), ('conv.2.', 'bn2.'))
_IR_INNER = (('conv.0.0.', 'conv_pw.'), ('conv.0.1.', 'bn1.'), ('conv.1.0.', 'conv_dw.'), ('conv.1.1.', 'bn2.'),
             ('conv.2.', 'conv_pwl.'), ('conv.3.', 'bn3.'))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """Map an official AN-MobileNetV2 checkpoint (legacy ``features.N`` or refactored ``stem`` / ``layerN``
    layout) or an an_zoo one onto ``model``."""
    stages = list(model.blocks)
    flat = [(s, b) for s, stage in enumerate(stages) for b in range(len(stage))]

    def block_key(s: int, b: int, rest: str) -> str:
        inner = _DS_INNER if isinstance(stages[s][b], DepthwiseSeparableConv) else _IR_INNER
        for official, ours in inner:
            if rest.startswith(official):
                return f'blocks.{s}.{b}.{ours}{rest[len(official):]}'
        return f'blocks.{s}.{b}.{rest}'

    def rename(key: str) -> str:
        legacy = re.match(r'^features\.(\d+)\.(.*)$', key)
        refactored = re.match(r'^layer(\d+)\.(\d+)\.(.*)$', key)
        if legacy:
            index, rest = int(legacy.group(1)), legacy.group(2)
            if index == 0:
                return {'0': 'conv_stem', '1': 'bn1'}.get(rest[0], 'stem') + rest[1:]
            if index == len(flat) + 1:
                return {'0': 'conv_head', '1': 'bn2'}.get(rest[0], 'head') + rest[1:]
            if 1 <= index <= len(flat):
                return block_key(*flat[index - 1], rest)
        elif refactored:
            stage, index, rest = int(refactored.group(1)) - 1, int(refactored.group(2)), refactored.group(3)
            if stage == len(stages) - 1 and index == len(stages[-1]):  # the head conv sits in the last layer
                return {'0': 'conv_head', '1': 'bn2'}.get(rest[0], 'head') + rest[1:]
            if stage < len(stages) and index < len(stages[stage]):
                return block_key(stage, index, rest)
        elif key.startswith('stem.'):
            return {'0': 'conv_stem', '1': 'bn1'}.get(key[5], 'stem') + key[6:]
        elif key.startswith('classifier.1.'):
            return 'classifier.' + key[len('classifier.1.'):]
        return key

    features_only = isinstance(model, EfficientNetFeatures)
    return remap_state_dict(
        state_dict, model, rename_fn=rename,
        ignore=('conv_head.', 'bn2.', 'classifier.') if features_only else ())


def _create_an_mobilenet(variant: str, model_cls: type, features_cls: type, pretrained: bool = False,
                         **kwargs: Any) -> nn.Module:
    kwargs_filter = None
    features_mode = ''
    if kwargs.pop('features_only', False):
        if 'feature_cfg' in kwargs or 'feature_cls' in kwargs:
            features_mode = 'cfg'
        else:  # timm's own features class for these families, as timm's _create_effnet / _create_mnv3 do
            kwargs_filter = ('num_classes', 'num_features', 'head_conv', 'head_bias', 'head_norm', 'global_pool')
            model_cls = features_cls
            features_mode = 'cls'
    return build_an_model(
        model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        features_only=features_mode == 'cfg', kwargs_filter=kwargs_filter, **kwargs)


def _reference_round(channels: float, multiplier: float = 1.0) -> int:
    """The reference's channel rounding: ``int(c * width)`` (not make_divisible)."""
    return int(channels * multiplier)


def _gen_an_mobilenet_v2(variant: str, width: float = 1.0, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    arch_def = [
        ['ds_r1_k3_s1_c16'],
        ['ir_r2_k3_s2_e6_c24'],
        ['ir_r3_k3_s2_e6_c32'],
        ['ir_r4_k3_s2_e6_c64'],
        ['ir_r3_k3_s1_e6_c96'],
        ['ir_r3_k3_s2_e6_c160'],
        ['ir_r1_k3_s1_e6_c320'],
    ]
    round_chs_fn = partial(_reference_round, multiplier=width)
    kwargs.setdefault('drop_rate', 0.2)  # the reference classifier: Dropout(0.2) + Linear
    kwargs.setdefault('stage_mixtures', MOBILENETV2_STAGE_MIXTURES)
    model_kwargs = dict(
        block_args=decode_arch_def(arch_def),
        num_features=max(1280, round_chs_fn(1280)),
        stem_size=32,
        round_chs_fn=round_chs_fn,
        norm_layer=kwargs.pop('norm_layer', None) or nn.BatchNorm2d,
        act_layer=get_act_layer(kwargs.pop('act_layer', 'relu6')),
        **kwargs,
    )
    return _create_an_mobilenet(variant, ANMobileNetV2, ANMobileNetV2Features, pretrained, **model_kwargs)


def _gen_an_mobilenet_v3(variant: str, width: float = 1.0, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    # timm's MobileNetV3 block definitions without the SE gates: AN takes their place
    if 'small' in variant:
        num_features = 1024
        stage_mixtures = MOBILENETV3_SMALL_STAGE_MIXTURES
        arch_def = [
            ['ds_r1_k3_s2_e1_c16_nre'],
            ['ir_r1_k3_s2_e4.5_c24_nre', 'ir_r1_k3_s1_e3.67_c24_nre'],
            ['ir_r1_k5_s2_e4_c40', 'ir_r2_k5_s1_e6_c40'],
            ['ir_r2_k5_s1_e3_c48'],
            ['ir_r3_k5_s2_e6_c96'],
            ['cn_r1_k1_s1_c576'],
        ]
    else:
        num_features = 1280
        stage_mixtures = MOBILENETV3_LARGE_STAGE_MIXTURES
        arch_def = [
            ['ds_r1_k3_s1_e1_c16_nre'],
            ['ir_r1_k3_s2_e4_c24_nre', 'ir_r1_k3_s1_e3_c24_nre'],
            ['ir_r3_k5_s2_e3_c40_nre'],
            ['ir_r1_k3_s2_e6_c80', 'ir_r1_k3_s1_e2.5_c80', 'ir_r2_k3_s1_e2.3_c80'],
            ['ir_r2_k3_s1_e6_c112'],
            ['ir_r3_k5_s2_e6_c160'],
            ['cn_r1_k1_s1_c960'],
        ]
    kwargs.setdefault('stage_mixtures', stage_mixtures)
    model_kwargs = dict(
        block_args=decode_arch_def(arch_def),
        num_features=num_features,
        stem_size=16,
        fix_stem=width < 0.75,
        round_chs_fn=partial(round_channels, multiplier=width),
        norm_layer=kwargs.pop('norm_layer', None) or nn.BatchNorm2d,
        act_layer=get_act_layer(kwargs.pop('act_layer', 'hard_swish')),
        **kwargs,
    )
    return _create_an_mobilenet(variant, ANMobileNetV3, ANMobileNetV3Features, pretrained, **model_kwargs)


def _arch(classifier: str = 'classifier') -> Dict[str, Any]:
    return dict(first_conv='conv_stem', classifier=classifier, pool_size=(7, 7))


default_cfgs = generate_default_cfgs(pretrained_cfgs({
    'an_mobilenetv2_050': _arch(),
    'an_mobilenetv2_075': _arch(),
    'an_mobilenetv2_100': _arch(),
    'an_mobilenetv2_140': _arch(),
    'an_mobilenetv3_large_100': _arch(),
    'an_mobilenetv3_small_100': _arch(),
}))


@register_model
def an_mobilenetv2_050(pretrained: bool = False, **kwargs: Any) -> ANMobileNetV2:
    """AN-MobileNetV2, width 0.5 (architecture only)."""
    return _gen_an_mobilenet_v2('an_mobilenetv2_050', 0.5, pretrained=pretrained, **kwargs)


@register_model
def an_mobilenetv2_075(pretrained: bool = False, **kwargs: Any) -> ANMobileNetV2:
    """AN-MobileNetV2, width 0.75 (architecture only)."""
    return _gen_an_mobilenet_v2('an_mobilenetv2_075', 0.75, pretrained=pretrained, **kwargs)


@register_model
def an_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> ANMobileNetV2:
    """AN-MobileNetV2, width 1.0: the reference model (3,672,760 parameters)."""
    return _gen_an_mobilenet_v2('an_mobilenetv2_100', 1.0, pretrained=pretrained, **kwargs)


@register_model
def an_mobilenetv2_140(pretrained: bool = False, **kwargs: Any) -> ANMobileNetV2:
    """AN-MobileNetV2, width 1.4 (architecture only)."""
    return _gen_an_mobilenet_v2('an_mobilenetv2_140', 1.4, pretrained=pretrained, **kwargs)


@register_model
def an_mobilenetv3_large_100(pretrained: bool = False, **kwargs: Any) -> ANMobileNetV3:
    """AN-MobileNetV3-Large 1.0: AN after each depthwise conv in place of SE (new architecture, no weights)."""
    return _gen_an_mobilenet_v3('an_mobilenetv3_large_100', 1.0, pretrained=pretrained, **kwargs)


@register_model
def an_mobilenetv3_small_100(pretrained: bool = False, **kwargs: Any) -> ANMobileNetV3:
    """AN-MobileNetV3-Small 1.0: AN after each depthwise conv in place of SE (new architecture, no weights)."""
    return _gen_an_mobilenet_v3('an_mobilenetv3_small_100', 1.0, pretrained=pretrained, **kwargs)
