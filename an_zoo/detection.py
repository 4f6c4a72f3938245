"""Detection and instance segmentation with AN backbones: torchvision Faster / Mask R-CNN on timm features.

The paper fine-tunes AN backbones in Mask R-CNN and adds AN to the heads. This module provides the pieces for
torchvision's detectors (``torchvision.models.detection.FasterRCNN`` / ``MaskRCNN``):

* :func:`an_fpn_backbone`: a ``features_only`` timm model (any ``an_*`` model, or any timm CNN) with a
  ``FeaturePyramidNetwork`` on top, the counterpart of torchvision's ``resnet_fpn_backbone``: frozen norms by
  default, the earliest stages not trainable, ``.out_channels``, an ``OrderedDict`` of feature maps keyed
  ``'0'``, ``'1'``, ... and ``'pool'``.
* :func:`an_gn_box_head`, :func:`an_gn_mask_head`: torchvision's 4-conv box head and mask head with
  :class:`~an_zoo.layers.AttentiveGroupNorm` (AN over GroupNorm), for heads trained from scratch at 2 to 4 images
  per GPU, where batch statistics are unusable.

Norms of the backbone (``norm=``), for fine-tuning at small batch:
    ``'frozen'`` (default, torchvision's ``FrozenBatchNorm2d`` semantics): plain BatchNorm becomes timm's
        ``FrozenBatchNorm2d``; every AN layer is frozen in place (:meth:`AttentiveBatchNorm2d.freeze`): running
        statistics, the (K, C) mixture and the attention's BatchNorm_K are fixed and never estimated from the batch,
        while the mixture weights are still computed per instance and the 1x1 attention conv (an ordinary conv)
        stays trainable. Any batch size works in train mode.
    ``'eval'``: statistics frozen (the norms are held in eval mode), affine / mixture parameters trainable: the
        reference's mmdetection setting (``norm_eval=True``, ``requires_grad=True``).
    ``'train'``: the norms are left alone and estimate batch statistics (needs several images per GPU, or
        ``an_zoo.convert_sync_batchnorm``).

Stages (``trainable_layers``): the model is split at the modules of its ``feature_info`` (one stage per feature
level: for a ResNet the stem and ``layer1``..``layer4``, for a MobileNet the stem with ``blocks.0`` and the block
groups up to each later feature level). ``trainable_layers=k`` trains the last ``k`` stages; the others get
``requires_grad=False`` and their norms are held in eval mode. For a ResNet this is exactly torchvision's
definition (``3``: ``layer2``..``layer4``; ``5``: everything, the stem included).
"""
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .layers import AttentiveBatchNorm2d, AttentiveGroupNorm, freeze_batch_norm_2d

__all__ = ['ANBackboneWithFPN', 'an_fpn_backbone', 'an_gn_box_head', 'an_gn_mask_head', 'feature_stages',
           'NORM_MODES']

NORM_MODES = ('frozen', 'eval', 'train')


def _is_norm(module: nn.Module) -> bool:
    """A norm with train/eval behaviour: BatchNorm of any kind (timm's BatchNormAct2d, SyncBatchNorm) or AN."""
    return isinstance(module, (_BatchNorm, AttentiveBatchNorm2d))


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + '.')


def feature_stages(model: nn.Module) -> Dict[str, int]:
    """Stage index of every submodule of a timm ``features_only`` model, from its ``feature_info``.

    Stage ``i`` is the ``feature_info`` module of level ``i`` and every module registered between it and the module
    of level ``i - 1`` (stage 0: the stem up to the first feature module). Modules after the last feature module
    belong to the last stage. The models' modules are registered in forward order (timm's features models are).
    """
    info = model.feature_info
    names = [info.get('module', i) for i in range(len(info.info))]
    modules = dict(model.named_modules())
    present = []
    for name in names:
        if name in modules:
            present.append(name)
        elif name.replace('.', '_') in modules:  # FeatureListNet flattens nested module names
            present.append(name.replace('.', '_'))
        elif present:  # FeatureListNet drops the modules after the last requested level
            break
        else:
            raise ValueError(f'feature module {name!r} of {type(model).__name__} not found')
    stages: Dict[str, int] = {}
    level, entered = 0, False
    for name in modules:
        if not name:
            continue
        while level < len(present) and entered and not _within(name, present[level]):
            level, entered = level + 1, False
        if level < len(present) and _within(name, present[level]):
            entered = True
        stages[name] = min(level, len(names) - 1)
    return stages


class ANBackboneWithFPN(nn.Module):
    """A timm ``features_only`` model (``body``) with a torchvision ``FeaturePyramidNetwork`` (``fpn``) on top.

    The counterpart of torchvision's ``BackboneWithFPN`` for timm feature extractors. ``forward`` returns an
    ``OrderedDict`` of FPN maps keyed ``'0'``, ``'1'``, ... (finest first) plus the extra blocks' keys (``'pool'``).
    Norms named in ``eval_norms`` (paths inside ``body``) stay in eval mode when the module is put in train mode.

    Attributes:
        out_channels: Channels of every FPN output (what torchvision's detectors read).
    """

    def __init__(
            self,
            body: nn.Module,
            in_channels_list: List[int],
            out_channels: int,
            extra_blocks: Optional[ExtraFPNBlock] = None,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            eval_norms: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=list(in_channels_list),
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer,
        )
        self.out_channels = out_channels
        self.eval_norms = tuple(eval_norms)
        self.train(self.training)

    def train(self, mode: bool = True) -> 'ANBackboneWithFPN':
        super().train(mode)
        if mode:
            for name in self.eval_norms:
                self.body.get_submodule(name).eval()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def an_fpn_backbone(
        model_name: str,
        pretrained: bool = False,
        trainable_layers: int = 3,
        returned_layers: Sequence[int] = (1, 2, 3, 4),
        out_channels: int = 256,
        norm: str = 'frozen',
        extra_blocks: Optional[ExtraFPNBlock] = None,
        fpn_norm_layer: Optional[Callable[..., nn.Module]] = None,
        **model_kwargs: Any,
) -> ANBackboneWithFPN:
    """A timm model (``an_resnet*``, ``an_mobilenetv2/v3*``, any timm CNN) as a torchvision detection backbone with FPN.

    Mirrors ``torchvision.models.detection.backbone_utils.resnet_fpn_backbone``::

        backbone = an_fpn_backbone('an_resnet50', pretrained=True, trainable_layers=3)
        model = torchvision.models.detection.MaskRCNN(backbone, num_classes=91)

    Args:
        model_name: timm model name, built with ``features_only=True, out_indices=returned_layers``.
        pretrained: Load the model's pretrained weights (ImageNet classification).
        trainable_layers: Number of stages trained, counted from the last (0 to the number of feature levels,
            5 for ResNets and MobileNets); see the module docstring.
        returned_layers: Feature levels fed to the FPN (indices into the model's ``feature_info``; for a ResNet
            1..4 are ``layer1``..``layer4``, as torchvision's), strictly increasing.
        out_channels: FPN channels.
        norm: ``'frozen'`` (default), ``'eval'`` or ``'train'``; see the module docstring.
        extra_blocks: FPN extra block (default ``LastLevelMaxPool``: the ``'pool'`` level).
        fpn_norm_layer: ``norm_layer`` of the FPN convs (e.g. ``AttentiveGroupNorm.norm_layer()``; default none).
        **model_kwargs: Passed to ``timm.create_model``.
    """
    if norm not in NORM_MODES:
        raise ValueError(f'norm must be one of {NORM_MODES}, got {norm!r}')
    returned_layers = [int(i) for i in returned_layers]
    if not returned_layers or min(returned_layers) < 0 or any(
            a >= b for a, b in zip(returned_layers, returned_layers[1:])):
        raise ValueError(f'returned_layers must be non-negative and strictly increasing, got {returned_layers}')
    body = timm.create_model(
        model_name, pretrained=pretrained, features_only=True, out_indices=tuple(returned_layers), **model_kwargs)
    num_stages = len(body.feature_info.info)
    if not 0 <= trainable_layers <= num_stages:
        raise ValueError(f'trainable_layers must be in [0, {num_stages}] for {model_name}, got {trainable_layers}')

    if norm == 'frozen':
        body = freeze_batch_norm_2d(body)
    stages = feature_stages(body)
    first_trained = num_stages - trainable_layers
    for name, param in body.named_parameters():
        if stages.get(name.rpartition('.')[0], 0) < first_trained:
            param.requires_grad_(False)
    # norms kept in eval mode: all of them with norm='eval', else those of the frozen stages ('frozen' AN and
    # FrozenBatchNorm2d estimate nothing anyway); the outermost norm of a nest (an AN, not its inner BatchNorms)
    eval_norms = []
    for name, module in body.named_modules():
        if _is_norm(module) and (norm == 'eval' or stages[name] < first_trained):
            if not any(_within(name, outer) for outer in eval_norms):
                eval_norms.append(name)
    return ANBackboneWithFPN(
        body, body.feature_info.channels(), out_channels, extra_blocks=extra_blocks, norm_layer=fpn_norm_layer,
        eval_norms=eval_norms)


def _an_gn_norm_layers(num_mixtures: Union[int, Sequence[int]], count: int, num_groups: int,
                       **kwargs: Any) -> Callable[[int], AttentiveGroupNorm]:
    """A ``norm_layer`` for a head of ``count`` norms that gives the i-th one ``num_mixtures[i]`` components."""
    mixtures = [num_mixtures] * count if isinstance(num_mixtures, int) else [int(k) for k in num_mixtures]
    if len(mixtures) != count:
        raise ValueError(f'num_mixtures needs one K per conv layer ({count}), got {tuple(mixtures)}')
    remaining = iter(mixtures)

    def norm_layer(num_channels: int) -> AttentiveGroupNorm:
        return AttentiveGroupNorm(num_channels, next(remaining), num_groups, **kwargs)
    return norm_layer


def an_gn_box_head(
        in_channels: int = 256,
        resolution: int = 7,
        conv_layers: Sequence[int] = (256, 256, 256, 256),
        fc_layers: Sequence[int] = (1024,),
        num_mixtures: Union[int, Sequence[int]] = (10, 10, 20, 20),
        num_groups: int = 32,
        **norm_kwargs: Any,
) -> FastRCNNConvFCHead:
    """torchvision's conv-fc box head (4 convs + 1 fc, as ``fasterrcnn_resnet50_fpn_v2``) with AN-GN after each
    conv: the AN-GN box head of the paper's Mask R-CNN (reference: K = 10, 10, 20, 20; 32 groups).

    Pass it as ``box_head=`` with a ``box_predictor=FastRCNNPredictor(fc_layers[-1], num_classes)`` (torchvision's
    default predictor expects 1024 features). ``norm_kwargs`` go to :class:`AttentiveGroupNorm`.
    """
    norm_layer = _an_gn_norm_layers(num_mixtures, len(conv_layers), num_groups, **norm_kwargs)
    return FastRCNNConvFCHead((in_channels, resolution, resolution), list(conv_layers), list(fc_layers),
                              norm_layer=norm_layer)


def an_gn_mask_head(
        in_channels: int = 256,
        layers: Sequence[int] = (256, 256, 256, 256),
        dilation: int = 1,
        num_mixtures: Union[int, Sequence[int]] = (10, 10, 20, 20),
        num_groups: int = 32,
        **norm_kwargs: Any,
) -> MaskRCNNHeads:
    """torchvision's Mask R-CNN mask head (4 3x3 convs) with AN-GN after each conv.

    Pass it as ``mask_head=`` with ``mask_predictor=MaskRCNNPredictor(layers[-1], dim_reduced, num_classes)``.
    (The reference's best configuration put AN-GN in the box head and plain GroupNorm in the mask head and FPN;
    ``torchvision.ops.misc.Conv2dNormActivation`` heads with ``nn.GroupNorm`` give that.)
    """
    norm_layer = _an_gn_norm_layers(num_mixtures, len(layers), num_groups, **norm_kwargs)
    return MaskRCNNHeads(in_channels, list(layers), dilation, norm_layer=norm_layer)
