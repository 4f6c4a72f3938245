"""AOGNet-AN: AND-OR grammar networks with Attentive Normalization, and their BatchNorm twins.

Papers: `AOGNets: Compositional Grammatical Architectures for Deep Learning` - https://arxiv.org/abs/1711.05847,
`Attentive Normalization` - https://arxiv.org/abs/1908.01259
Reference code (research-only license, read for facts only): https://github.com/iVMCL/AOGNet-v2 (legacy),
https://github.com/tfwu/iVMCL-Release (refactored).

Written from the facts of the official code (no code copied). A block is an AND-OR graph over ``d`` channel groups
(:mod:`an_zoo.models._aog_grammar`); each node is a bottleneck op with an explicit residual input; the block's
output is the root's, passed through one more BatchNorm + ReLU. AN sits only on the 3x3-conv norm of the nodes
that span the whole block (K = 10, 10, 20, 20 by stage); everything else is BatchNorm.

* ``an_aognet_12m`` / ``an_aognet_40m``: the reference AOGNet-12M-AN / 40M-AN (12,373,355 / 40,388,880 parameters).
* ``aognet_12m`` / ``aognet_40m``: the same networks with BatchNorm everywhere (the papers' baselines).

Each block's wiring is turned into per-node plans (plain ints and floats) at construction, so the forward is a
static loop that TorchScript, FX tracing and ``torch.compile(fullgraph=True)`` all accept. Parameter order and
shapes equal the official ones; ``checkpoint_filter_fn`` maps both official layouts onto these names.
"""
import re
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import create_classifier
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .._manifest import pretrained_cfgs
from ..layers import AttentiveBatchNorm2d, attentive_norm_no_weight_decay
from ._aog_grammar import OR_NODE, T_NODE, AOGraph, build_aog
from ._builder import build_an_model
from ._checkpoint import remap_state_dict

__all__ = ['AOGNet', 'AOGNodeOp', 'AOGBlock', 'AOGStage', 'block_channels', 'bottleneck_width']

DEFAULT_STAGE_MIXTURES = (10, 10, 20, 20)


def bottleneck_width(out_chs: int) -> int:
    """Bottleneck width m of a node op: ``floor(out / 4 + 0.5)`` (round half up)."""
    return (out_chs + 2) // 4


def block_channels(in_chs: int, out_chs: int, num_blocks: int, num_primitives: int) -> List[int]:
    """Output channels of each block of a stage: a constant step, a multiple of d (the nearest one, the lower on
    a tie), except that the last block ends at ``out_chs``."""
    step = (out_chs - in_chs) // num_blocks
    rest = step % num_primitives
    if rest:
        step = step - rest if 2 * rest <= num_primitives else step - rest + num_primitives
    return [in_chs + step * (j + 1) for j in range(num_blocks - 1)] + [out_chs]


def _gather(
        x: torch.Tensor,
        outs: Dict[int, torch.Tensor],
        kind: str,
        in_start: int,
        in_end: int,
        parts: List[int],
        scales: List[float],
        laterals_res: List[int],
        laterals_in: List[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Input and residual of one node op, by the official forward rules.

    T-node: the input channels of its primitives, as input and residual. AND-node: its two halves concatenated
    (``parts``, in children order), the residual scaled per part by ``npaths(node) / npaths(part)``. OR-node: the sum of
    its alternatives (T-node and AND-nodes), the residual likewise scaled. Same-width lateral children add to the
    input, and to the residual too when they share no parent with the node.
    """
    if kind == 'T':  # literals: TorchScript does not read module globals
        inp = x[:, in_start:in_end]
        return inp, inp
    if kind == 'AND':
        inp = torch.cat([outs[u] for u in parts], 1)
        res = torch.cat([outs[u] if f == 1.0 else outs[u] * f for u, f in zip(parts, scales)], 1)
    else:
        inp = outs[parts[0]]
        res = outs[parts[0]] if scales[0] == 1.0 else outs[parts[0]] * scales[0]
        for i in range(1, len(parts)):
            inp = inp + outs[parts[i]]
            res = res + (outs[parts[i]] if scales[i] == 1.0 else outs[parts[i]] * scales[i])
    # laterals without a common parent go into input and residual, the others into the input only
    for u in laterals_res:
        inp = inp + outs[u]
        res = res + outs[u]
    for u in laterals_in:
        inp = inp + outs[u]
    return inp, res


class AOGNodeOp(nn.Module):
    """Node operation: ``ReLU(BN(conv1x1(ReLU(N2(conv3x3(ReLU(BN(conv1x1(in))))))))) + S(res))``, N2 AN or BN,
    Dropout2d before the add, S a 1x1 conv + BN projection when the channel count changes.

    Also carries the node's forward plan (which outputs feed its input and residual), read by :class:`AOGBlock`.
    """
    parts: List[int]
    scales: List[float]
    laterals_res: List[int]
    laterals_in: List[int]

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            num_mixtures: int = 0,
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_chs: Input channels (of both the input and the residual).
            out_chs: Output channels.
            num_mixtures: K of the AN on the 3x3 conv's norm; 0 for BatchNorm.
            drop_rate: Dropout2d probability before the residual add (0: none).
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        mid = bottleneck_width(out_chs)
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid, **dd)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False, **dd)
        self.bn2 = AttentiveBatchNorm2d(mid, num_mixtures, **dd) if num_mixtures else nn.BatchNorm2d(mid, **dd)
        self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out_chs, **dd)
        self.drop = nn.Dropout2d(drop_rate) if drop_rate > 0 else nn.Identity()
        self.downsample = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 1, bias=False, **dd), nn.BatchNorm2d(out_chs, **dd),
        ) if in_chs != out_chs else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        # forward plan, set by AOGBlock
        self.node_id, self.kind, self.in_start, self.in_end = 0, T_NODE, 0, in_chs
        self.parts, self.scales, self.laterals_res, self.laterals_in = [], [], [], []

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.drop(self.bn3(self.conv3(x)))
        return self.act(x + self.downsample(residual))


class AOGBlock(nn.Module):
    """One AND-OR graph block: its node ops (``ops.node_<id>``, in evaluation order), then BatchNorm + ReLU."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            graph: AOGraph,
            num_mixtures: int = 0,
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_chs: Block input channels (a multiple of the graph's number of primitives d).
            out_chs: Block output channels (a multiple of d).
            graph: The block's AND-OR graph (:func:`~an_zoo.models._aog_grammar.build_aog`).
            num_mixtures: K of the AN layers (nodes spanning all primitives); 0 for BatchNorm everywhere.
            drop_rate: Dropout2d probability of every node op.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        d = graph.num_primitives
        if in_chs % d or out_chs % d:
            raise ValueError(f'block channels {in_chs} -> {out_chs} must be multiples of d = {d}')
        in_p, out_p = in_chs // d, out_chs // d
        nodes = graph.nodes
        self.ops = nn.ModuleDict()
        for v in graph.order:
            node = nodes[v]
            (a, b), width = node.span, node.width
            op = AOGNodeOp(
                width * in_p if node.type == T_NODE else width * out_p, width * out_p,
                num_mixtures=num_mixtures if width == d else 0, drop_rate=drop_rate, **dd)
            op.node_id = v
            op.kind = node.type
            op.in_start, op.in_end = a * in_p, (b + 1) * in_p
            if node.type != T_NODE:
                if node.type == OR_NODE:  # alternatives: its T-node and AND-nodes; laterals: the OR-nodes beside it
                    lateral = [u for u in node.children if nodes[u].type == OR_NODE]
                else:  # parts: the two halves; laterals: the AND-nodes as wide as it
                    lateral = [u for u in node.children if nodes[u].width == width]
                op.parts = [u for u in node.children if u not in lateral]
                op.scales = [node.npaths / nodes[u].npaths for u in op.parts]
                shares_parent = [bool(set(nodes[u].parents) & set(node.parents)) for u in lateral]
                op.laterals_res = [u for u, s in zip(lateral, shares_parent) if not s]
                op.laterals_in = [u for u, s in zip(lateral, shares_parent) if s]
            self.ops[f'node_{v}'] = op
        self.root_id = 0
        self.norm = nn.BatchNorm2d(out_chs, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: Dict[int, torch.Tensor] = {}
        for op in self.ops.values():
            inp, res = _gather(x, outs, op.kind, op.in_start, op.in_end, op.parts, op.scales, op.laterals_res,
                               op.laterals_in)
            outs[op.node_id] = op(inp, res)
        return self.act(self.norm(outs[self.root_id]))


class AOGTransition(nn.Module):
    """Between stages: 1x1 conv + BN + ReLU, then a 2x2 stride-2 average pool."""

    def __init__(self, chs: int, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(chs, chs, 1, bias=False, **dd)
        self.bn = nn.BatchNorm2d(chs, **dd)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class AOGStage(nn.Module):
    """A transition (stages 2-4; identity in stage 1) and the stage's blocks."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            num_blocks: int,
            num_primitives: int,
            pruning_mode: int,
            num_mixtures: int = 0,
            drop_rate: float = 0.,
            transition: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.transition = AOGTransition(in_chs, **dd) if transition else nn.Identity()
        graph = build_aog(num_primitives, pruning_mode)
        chs = [in_chs] + block_channels(in_chs, out_chs, num_blocks, num_primitives)
        self.blocks = nn.Sequential(*[
            AOGBlock(chs[j], chs[j + 1], graph, num_mixtures=num_mixtures, drop_rate=drop_rate, **dd)
            for j in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transition(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class AOGStem(nn.Module):
    """Three 3x3 conv + BN + ReLU (the first with stride 2); the 2x2 max pool that follows is the network's."""

    def __init__(self, in_chans: int, out_chs: int, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        mid = out_chs // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=2, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid, **dd)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(mid, **dd)
        self.conv3 = nn.Conv2d(mid, out_chs, 3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out_chs, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.act(self.bn3(self.conv3(x)))


class AOGNet(nn.Module):
    """AOGNet (optionally with Attentive Normalization) with timm's model contract.

    Stem (stride 4 with its max pool), four stages of AND-OR graph blocks (a transition with a 2x2 average pool
    before stages 2-4), global average pool, linear classifier.
    """

    def __init__(
            self,
            filter_list: Sequence[int] = (32, 128, 256, 512, 824),
            blocks: Sequence[int] = (2, 2, 2, 1),
            dims: Sequence[int] = (2, 2, 4, 4),
            pruning_modes: Sequence[int] = (1, 2, 1, 2),
            stage_mixtures: Optional[Sequence[int]] = DEFAULT_STAGE_MIXTURES,
            drop_rates: Sequence[float] = (0., 0., 0.1, 0.1),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            filter_list: Stem output channels, then each stage's output channels.
            blocks: Number of blocks per stage.
            dims: Number of primitives d of the blocks of each stage.
            pruning_modes: Symmetric-split pruning mode (1 or 2) of each stage's graph.
            stage_mixtures: AN mixture components K per stage; None (or a 0 entry): BatchNorm instead of AN.
            drop_rates: Dropout2d probability of the node ops of each stage.
            num_classes: Classifier outputs (0: no classifier).
            in_chans: Input image channels.
            global_pool: timm global pool type.
            drop_rate: Dropout before the classifier (the reference has none).
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        stage_mixtures = tuple(stage_mixtures or (0, 0, 0, 0))
        if len(filter_list) != 5:
            raise ValueError(f'filter_list needs 5 entries (stem, 4 stages), got {tuple(filter_list)}')
        for name, value in (('blocks', blocks), ('dims', dims), ('pruning_modes', pruning_modes),
                            ('stage_mixtures', stage_mixtures), ('drop_rates', drop_rates)):
            if len(value) != 4:
                raise ValueError(f'{name} needs one entry per stage (4), got {tuple(value)}')
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stage_mixtures = stage_mixtures

        self.stem = AOGStem(in_chans, filter_list[0], **dd)
        self.stem_pool = nn.MaxPool2d(2, 2)
        self.feature_info = [dict(num_chs=filter_list[0], reduction=2, module='stem')]
        # four named stages, as timm's ResNet: the default features_only wrapper keeps the model's names
        for s in range(4):
            self.add_module(f'layer{s + 1}', AOGStage(
                filter_list[s], filter_list[s + 1], blocks[s], dims[s], pruning_modes[s],
                num_mixtures=stage_mixtures[s], drop_rate=drop_rates[s], transition=s > 0, **dd))
            self.feature_info.append(dict(num_chs=filter_list[s + 1], reduction=4 * 2 ** s, module=f'layer{s + 1}'))
        self.num_features = self.head_hidden_size = filter_list[-1]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self._init_weights()

    def _init_weights(self) -> None:
        # official init: Kaiming normal convs (fan_out), BN 1 / 0; AN layers init themselves (mixture N(1, .1) /
        # N(0, .1)) and their plain parts are covered here; the classifier keeps PyTorch's Linear init
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem\.',
            blocks=r'^layer(\d+)\.' if coarse else [
                (r'^layer(\d+)\.transition\.', (0,)),
                (r'^layer(\d+)\.blocks\.(\d+)\.', None),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        ref = next(self.stem.parameters())
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, device=ref.device, dtype=ref.dtype)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The (K, C) mixture parameters get no weight decay in timm's optimizer factory (see docs/models.md)."""
        return attentive_norm_no_weight_decay(self)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (stem before its max pool, then each stage).

        Args:
            x: Input image tensor.
            indices: Take last n of the 5 levels if int, all if None, select matching indices if sequence.
            norm: Unused (no final norm).
            stop_early: Stop after the last requested level.
            output_fmt: Only 'NCHW'.
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(5, indices)
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.stem_pool(x)
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        for i, stage in enumerate(stages[:max_index] if stop_early else stages, start=1):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune the stages (and head) not needed for the intermediates ``indices``; returns the kept indices."""
        take_indices, max_index = feature_take_indices(5, indices)
        for s in range(max_index, 4):
            setattr(self, f'layer{s + 1}', nn.Sequential())  # empty: forward passes x through
        if max_index == 0:
            self.stem_pool = nn.Identity()
        if max_index < 4:
            # the features end at the last kept level, the head was sized for the final ones
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_pool(self.stem(x))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _official_rename(key: str) -> str:
    """Official AOGNet names (legacy AOGNet-v2 or refactored iVMCL-Release) -> an_zoo names (AN parts follow)."""
    m = re.match(r'^stem\.(\d)\.conv_norm\.conv_norm\.([01])\.(.*)$', key)  # legacy stem
    if m:
        return f'stem.{"conv" if m.group(2) == "0" else "bn"}{int(m.group(1)) + 1}.{m.group(3)}'
    m = re.match(r'^stem\.conv1\.(\d)\.(conv|bn)\.(.*)$', key)  # refactored stem
    if m:
        return f'stem.{m.group(2)}{int(m.group(1)) + 1}.{m.group(3)}'
    m = re.match(r'^stage(\d+)\.stage_\d+_block_0_transition\.0\.conv_norm\.conv_norm\.([01])\.(.*)$', key)
    if m:
        return f'layer{int(m.group(1)) + 1}.transition.{"conv" if m.group(2) == "0" else "bn"}.{m.group(3)}'
    m = re.match(r'^layer(\d+)\.0\.transition\.0\.(conv|bn)\.(.*)$', key)
    if m:
        return f'layer{m.group(1)}.transition.{m.group(2)}.{m.group(3)}'
    m = re.match(r'^stage(\d+)\.stage_\d+_block_(\d+)\.(.*)$', key)  # legacy block
    if m:
        stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    else:
        m = re.match(r'^layer(\d+)\.(\d+)\.(.*)$', key)  # refactored block: odd indices (even: transitions)
        if not m or int(m.group(2)) % 2 == 0:
            return key
        stage, block, rest = int(m.group(1)) - 1, (int(m.group(2)) - 1) // 2, m.group(3)
    prefix = f'layer{stage + 1}.blocks.{block}.'
    if rest.startswith('extra_norm_ac.0.'):
        return prefix + 'norm.' + rest[len('extra_norm_ac.0.'):]
    m = re.match(r'^stage_\d+_block_\d+_node_(\d+)_op\.(.*)$', rest)
    if not m:
        return key
    op, rest = f'{prefix}ops.node_{m.group(1)}.', m.group(2)
    for official, ours in (
            ('conv_norm_ac_1.conv_norm.conv_norm.0.', 'conv1.'), ('conv_norm_ac_1.conv_norm.conv_norm.1.', 'bn1.'),
            ('conv_norm_ac_2.conv_norm.conv_norm.0.', 'conv2.'), ('conv_norm_ac_2.conv_norm.conv_norm.1.', 'bn2.'),
            ('conv_norm_3.conv_norm.0.', 'conv3.'), ('conv_norm_3.conv_norm.1.', 'bn3.'),
            ('shortcut.conv_norm.0.', 'downsample.0.'), ('shortcut.conv_norm.1.', 'downsample.1.'),
            ('downsample.conv.', 'downsample.0.'), ('downsample.bn.', 'downsample.1.'),
            ('AttnBN2d2.', 'bn2.')):
        if rest.startswith(official):
            return op + ours + rest[len(official):]
    return op + rest


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """Map an official AOGNet(-AN) checkpoint (legacy or refactored layout) or an an_zoo one onto ``model``."""
    return remap_state_dict(state_dict, model, rename_fn=_official_rename)


def _create_aognet(variant: str, pretrained: bool = False, **kwargs: Any) -> AOGNet:
    return build_an_model(
        AOGNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _arch() -> Dict[str, Any]:
    return dict(first_conv='stem.conv1', classifier='fc', pool_size=(7, 7))


default_cfgs = generate_default_cfgs(pretrained_cfgs({
    'an_aognet_12m': _arch(),
    'an_aognet_40m': _arch(),
    'aognet_12m': _arch(),
    'aognet_40m': _arch(),
}))

_AOGNET_12M = dict(filter_list=(32, 128, 256, 512, 824), blocks=(2, 2, 2, 1))
_AOGNET_40M = dict(filter_list=(56, 224, 448, 896, 1400), blocks=(2, 2, 3, 1))


@register_model
def an_aognet_12m(pretrained: bool = False, **kwargs: Any) -> AOGNet:
    """AOGNet-12M-AN (12,373,355 parameters)."""
    model_args = dict(_AOGNET_12M, stage_mixtures=DEFAULT_STAGE_MIXTURES)
    return _create_aognet('an_aognet_12m', pretrained, **dict(model_args, **kwargs))


@register_model
def an_aognet_40m(pretrained: bool = False, **kwargs: Any) -> AOGNet:
    """AOGNet-40M-AN (40,388,880 parameters)."""
    model_args = dict(_AOGNET_40M, stage_mixtures=DEFAULT_STAGE_MIXTURES)
    return _create_aognet('an_aognet_40m', pretrained, **dict(model_args, **kwargs))


@register_model
def aognet_12m(pretrained: bool = False, **kwargs: Any) -> AOGNet:
    """AOGNet-12M with BatchNorm only (the AN model's baseline)."""
    model_args = dict(_AOGNET_12M, stage_mixtures=None)
    return _create_aognet('aognet_12m', pretrained, **dict(model_args, **kwargs))


@register_model
def aognet_40m(pretrained: bool = False, **kwargs: Any) -> AOGNet:
    """AOGNet-40M with BatchNorm only (the AN model's baseline)."""
    model_args = dict(_AOGNET_40M, stage_mixtures=None)
    return _create_aognet('aognet_40m', pretrained, **dict(model_args, **kwargs))
