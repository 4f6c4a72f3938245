"""Export an_zoo models for inference: ONNX (checked in onnxruntime), torch.export, TorchScript, and the checks behind
the README's export / precision matrix.

    import timm, an_zoo
    from an_zoo.export import export_onnx
    model = timm.create_model('an_resnet50', pretrained=True)
    result = export_onnx(model, 'an_resnet50.onnx', input_size=(3, 224, 224))   # raises if onnxruntime disagrees
    print(result.max_abs_diff, result.tolerance)

ONNX exporter. ``exporter='dynamo'`` (the default, and the one PyTorch >= 2.9 recommends: ``torch.onnx.export(...,
dynamo=True)``, built on :func:`torch.export.export`, needs ``onnxscript``) traces the eval-mode fast AN path, so each
AN layer becomes its folded inference form ``x * a + b`` with ``a``, ``b`` per (sample, channel), computed from one
reduction over H*W; running statistics, the mixture and the attention's BatchNorm are folded into (N, C) / (N, K)
arithmetic. ``exporter='torchscript'`` (the legacy ``dynamo=False`` exporter, deprecated since PyTorch 2.9) cannot
translate the fast path correctly (it emits a graph that onnxruntime refuses), so it exports the *reference* AN code
instead (BatchNormalization in inference mode, then the per-sample affine): correct, checked the same way, but not
folded. Use it only for runtimes that need opsets below 18.

Every check compares against the eager PyTorch model in eval mode on a batch size *different* from the one the graph
was exported with (proving the dynamic batch axis), with the tolerance ``atol + rtol * max|reference|`` (the scale of
the outputs sets what a float32 difference means), and raises :class:`ExportCheckError` with the measured maximum
difference when it is exceeded. :func:`check_onnx_inference_graph` / :func:`check_exported_program_inference` verify
that an exported graph has no training-only parts (batch statistics, running-statistics updates, training-mode
BatchNormalization, dropout / random ops, control flow) and, for the dynamo ONNX graph, that every AN layer is applied
as exactly one ``Mul`` and one ``Add`` over the full-size tensor.

The ``check_*`` functions (one per target of ``scripts/export_matrix.py``) never raise: they return a
:class:`TargetResult` (status, message, measured max abs diff, tolerance).
"""
import ast
import contextlib
import copy
import math
import os
import platform
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .layers import AttentiveBatchNorm2d

__all__ = [
    'ExportCheckError', 'ExportGraphError', 'TargetResult', 'OnnxExportResult', 'Tolerance', 'TOLERANCES', 'TARGETS',
    'CUDA_TARGETS', 'export_onnx', 'onnxruntime_outputs', 'check_onnx_inference_graph',
    'check_exported_program_inference', 'example_batch', 'prepare_for_checks', 'randomize_norm_affines',
    'calibrate_running_stats', 'an_layer_names', 'reference_an_layers',
    'check_compile_fullgraph', 'check_onnx', 'check_torch_export', 'check_jit_script', 'check_jit_trace',
    'check_channels_last', 'check_autocast', 'run_target', 'environment', 'TARGET_LABELS', 'export_status_path',
    'load_export_status', 'render_export_matrix', 'render_model_status',
]

PathLike = Union[str, 'os.PathLike[str]']
DEFAULT_OPSET = {'dynamo': 18, 'torchscript': 17}
EXPORTERS = tuple(DEFAULT_OPSET)


class ExportCheckError(RuntimeError):
    """An exported model's outputs differ from PyTorch's by more than the tolerance."""

    def __init__(self, message: str, max_abs_diff: float, tolerance: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


class ExportGraphError(RuntimeError):
    """An exported inference graph contains training-only parts, or AN is not in its folded form."""


@dataclass(frozen=True)
class Tolerance:
    """``|out - ref| <= atol + rtol * max|ref|`` elementwise-max; ``rtol`` is relative to the output scale."""
    rtol: float
    atol: float

    def bound(self, ref_max: float) -> float:
        return self.atol + self.rtol * ref_max


# float32: rewrites of the same computation (other kernels, other summation order, the reference AN path for
# TorchScript); float16 / bfloat16: one AN layer under autocast against the float32 layer on the same input
# (see check_autocast): a few roundings of the output, a and b (AN statistics are float32).
TOLERANCES: Dict[str, Tolerance] = {
    'float32': Tolerance(rtol=1e-3, atol=1e-5),
    'float16': Tolerance(rtol=4 * 2.0 ** -10, atol=1e-4),  # 4 x machine epsilon of float16
    'bfloat16': Tolerance(rtol=4 * 2.0 ** -7, atol=1e-3),  # 4 x machine epsilon of bfloat16
}


@dataclass
class TargetResult:
    """Outcome of one export / precision target for one model.

    status: ``'ok'``; ``'mismatch'`` (ran, outputs out of tolerance); ``'error'`` (did not run: the message says
    why); ``'not measured'`` (the target needs hardware or a package this run did not have: the message says which).
    """
    target: str
    status: str
    message: str = ''
    max_abs_diff: Optional[float] = None
    tolerance: Optional[float] = None
    ref_max: Optional[float] = None
    seconds: Optional[float] = None
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 'ok'

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        for key in ('max_abs_diff', 'tolerance', 'ref_max'):
            if out[key] is not None:
                out[key] = float(f'{out[key]:.3g}')
        if out['seconds'] is not None:
            out['seconds'] = round(out['seconds'], 1)
        if not out['details']:
            del out['details']
        return out


@dataclass
class OnnxExportResult:
    """What :func:`export_onnx` wrote and measured (``max_abs_diff`` etc. are None when ``check=False``)."""
    path: Path
    exporter: str
    opset: int
    dynamic_batch: bool
    export_batch_size: int
    check_batch_size: Optional[int] = None
    max_abs_diff: Optional[float] = None
    tolerance: Optional[float] = None
    ref_max: Optional[float] = None
    graph: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# helpers


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
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
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


def _outputs(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    raise TypeError(f'cannot compare model outputs of type {type(out).__name__}')


def _compare(outputs: Sequence[Any], reference: Sequence[torch.Tensor], tol: Tolerance) -> Tuple[float, float, float]:
    """``(max abs diff, bound, max|ref|)`` over all outputs; non-finite values count as infinite difference."""
    if len(outputs) != len(reference):
        raise ExportCheckError(f'{len(outputs)} outputs, PyTorch gives {len(reference)}', math.inf, 0.0)
    diff, ref_max = 0.0, 0.0
    for out, ref in zip(outputs, reference):
        out = torch.as_tensor(out).float().cpu()
        ref = ref.detach().float().cpu()
        if out.shape != ref.shape:
            raise ExportCheckError(f'output shape {tuple(out.shape)}, PyTorch gives {tuple(ref.shape)}', math.inf, 0.0)
        d = (out - ref).abs()
        d = torch.where(torch.isfinite(out) & torch.isfinite(ref), d, torch.full_like(d, math.inf))
        diff = max(diff, float(d.max()) if d.numel() else 0.0)
        ref_max = max(ref_max, float(ref.abs().max()) if ref.numel() else 0.0)
    return diff, tol.bound(ref_max), ref_max


def _check_close(what: str, outputs: Sequence[Any], reference: Sequence[torch.Tensor],
                 tol: Tolerance) -> Tuple[float, float, float]:
    diff, bound, ref_max = _compare(outputs, reference, tol)
    if not diff <= bound:
        raise ExportCheckError(
            f'{what} differs from PyTorch: max abs diff {diff:.3g} > tolerance {bound:.3g} '
            f'(atol {tol.atol:g} + rtol {tol.rtol:g} * max|ref| {ref_max:.3g})', diff, bound)
    return diff, bound, ref_max


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


def _example(model: nn.Module, input_size: Sequence[int], batch_size: int, seed: int = 0) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return example_batch(batch_size, input_size, seed).to(device=device, dtype=dtype)


def _input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if input_size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        input_size = cfg.get('input_size') or (3, 224, 224)
    if len(input_size) != 3:
        raise ValueError(f'input_size must be (C, H, W), got {tuple(input_size)}')
    return tuple(int(s) for s in input_size)


# --------------------------------------------------------------------------------------------------------------------
# graph checks


_RANDOM_OPS = {'RandomNormal', 'RandomNormalLike', 'RandomUniform', 'RandomUniformLike', 'Bernoulli',
               'Multinomial'}
_CONTROL_FLOW_OPS = {'If', 'Loop', 'Scan'}
_REDUCE_OPS = {'ReduceMean', 'ReduceSum', 'ReduceSumSquare', 'ReduceL1', 'ReduceL2', 'ReduceMax', 'ReduceMin',
               'ReduceProd', 'ReduceLogSum', 'ReduceLogSumExp'}
_ELEMENTWISE_OPS = {'Mul', 'Add', 'Sub', 'Div', 'Sqrt', 'Reciprocal', 'Pow', 'Cast', 'Neg', 'BatchNormalization',
                    'InstanceNormalization', 'Where', 'Max', 'Min', 'Clip'}


def _load_onnx(model: Any) -> Any:
    import onnx
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(model), load_external_data=False)
    return model


def _constant_values(graph: Any) -> Dict[str, List[int]]:
    """Integer constants of the graph (initializers and Constant nodes) by name: for reading Reduce* axes."""
    from onnx import numpy_helper
    values: Dict[str, List[int]] = {}
    for init in graph.initializer:
        if init.data_type in (6, 7, 9) and len(init.dims) <= 1:  # int32 / int64 / bool vectors
            values[init.name] = [int(v) for v in numpy_helper.to_array(init).reshape(-1)]
    for node in graph.node:
        if node.op_type == 'Constant':
            for attr in node.attribute:
                if attr.name == 'value' and attr.t.data_type in (6, 7, 9):
                    values[node.output[0]] = [int(v) for v in numpy_helper.to_array(attr.t).reshape(-1)]
                elif attr.name in ('value_int', 'value_ints'):
                    values[node.output[0]] = [attr.i] if attr.name == 'value_int' else list(attr.ints)
    return values


def _shapes(graph: Any) -> Dict[str, List[Union[int, str]]]:
    shapes = {}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        if v.type.HasField('tensor_type') and v.type.tensor_type.HasField('shape'):
            shapes[v.name] = [d.dim_value if d.HasField('dim_value') else (d.dim_param or '?')
                              for d in v.type.tensor_type.shape.dim]
    return shapes


def _reduce_axes(node: Any, consts: Dict[str, List[int]], rank: Optional[int]) -> Optional[List[int]]:
    """The axes a Reduce* node reduces over (None: unknown); all axes when it has none."""
    axes = None
    for attr in node.attribute:
        if attr.name == 'axes':
            axes = list(attr.ints)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = consts.get(node.input[1])
        if axes is None:
            return None
    if axes is None:  # no axes: every axis (unless noop_with_empty_axes, which reduces nothing)
        noop = any(a.name == 'noop_with_empty_axes' and a.i for a in node.attribute)
        return [] if noop else (list(range(rank)) if rank else None)
    return [a + rank if a < 0 and rank else a for a in axes]


def _name_scopes(node: Any) -> List[str]:
    for prop in node.metadata_props:
        if prop.key == 'pkg.torch.onnx.name_scopes':
            try:
                return list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return []
    return []


def check_onnx_inference_graph(onnx_model: Any, an_layers: Sequence[str] = (), *, expect_folded: bool = True,
                               dynamic_batch: Optional[bool] = None) -> Dict[str, Any]:
    """Verify that an ONNX graph (a ``ModelProto`` or a path) is a pure inference graph; raise
    :class:`ExportGraphError` listing every violation, else return a summary.

    Checked on the whole graph: one input; no BatchNormalization in training mode (``training_mode=1`` or the extra
    running-statistics outputs); no reduction over the batch axis (batch statistics exist only in training; the AN
    attention statistic reduces over H, W); no Dropout / random ops; no If / Loop / Scan (no branches); the batch
    axis of the input and outputs is symbolic when ``dynamic_batch`` is True (static when False).

    With ``expect_folded`` (graphs of the dynamo exporter, whose nodes carry their PyTorch module scope), for every
    AN layer named in ``an_layers``: no BatchNormalization inside the layer, and the path from the layer's input to
    its output over full-size (N, C, H, W) tensors is exactly one ``Mul`` and one ``Add``, i.e. ``x * a + b`` (the
    reference form ``(x - mean) * rstd * gamma + beta`` has three or four full-size ops, or a BatchNormalization).
    """
    import onnx
    model = _load_onnx(onnx_model)
    try:  # fills in the value shapes the TorchScript exporter leaves out (ranks, for the reduction check)
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is a help, not a requirement
        pass
    graph = model.graph
    consts = _constant_values(graph)
    shapes = _shapes(graph)
    problems: List[str] = []
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1:
        problems.append(f'graph has {len(inputs)} inputs ({[i.name for i in inputs]}), expected the image only')
    if dynamic_batch is not None:
        for v in list(inputs) + list(graph.output):
            dim0 = shapes.get(v.name, ['?'])[0]
            if dynamic_batch and not isinstance(dim0, str):
                problems.append(f'{v.name}: batch axis is static ({dim0}), expected a dynamic axis')
            if not dynamic_batch and isinstance(dim0, str):
                problems.append(f'{v.name}: batch axis is dynamic ({dim0!r}), expected static')
    counts: Dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        where = f'{node.op_type} node {node.name!r}'
        if node.op_type == 'BatchNormalization':
            training = any(a.name == 'training_mode' and a.i for a in node.attribute)
            if training or len([o for o in node.output if o]) > 1:
                problems.append(f'{where} is in training mode (batch statistics / running-statistics outputs)')
        elif node.op_type == 'Dropout':  # inference Dropout (no training_mode input, or a false one) is the identity
            mode = node.input[2] if len(node.input) > 2 else ''
            if mode and consts.get(mode, [1]) != [0]:
                problems.append(f'{where}: dropout in training mode (or a non-constant training_mode)')
        elif node.op_type in _RANDOM_OPS:
            problems.append(f'{where}: random op in an inference graph')
        elif node.op_type in _CONTROL_FLOW_OPS:
            problems.append(f'{where}: control flow (a branch) in the inference graph')
        elif node.op_type in _REDUCE_OPS:
            rank = len(shapes[node.input[0]]) if node.input[0] in shapes else None
            axes = _reduce_axes(node, consts, rank)
            if axes is None and (rank is None or rank > 1):  # (a rank-1 input is a shape vector, not data)
                problems.append(f'{where}: cannot resolve its reduction axes')
            elif axes is None:
                pass
            elif 0 in axes and (rank or 0) > 1:
                problems.append(f'{where} reduces over the batch axis (batch statistics: training only)')
    folded: Dict[str, List[str]] = {}
    if expect_folded and an_layers:
        folded, fold_problems = _check_folded(graph, an_layers, shapes)
        problems += fold_problems
    if problems:
        raise ExportGraphError('exported ONNX graph is not a folded inference graph:\n  ' + '\n  '.join(problems))
    return {'nodes': sum(counts.values()), 'op_counts': dict(sorted(counts.items())), 'an_layers': len(an_layers),
            'folded': bool(expect_folded and an_layers)}


def _full_size(shape: Optional[List[Union[int, str]]]) -> bool:
    return shape is not None and len(shape) == 4 and not (shape[2] == 1 and shape[3] == 1)


def _check_folded(graph: Any, an_layers: Sequence[str],
                  shapes: Dict[str, List[Union[int, str]]]) -> Tuple[Dict[str, List[str]], List[str]]:
    """For each AN layer: the full-size ops between its input and its output (must be exactly Mul, Add)."""
    problems: List[str] = []
    scoped: Dict[str, List[Any]] = {name: [] for name in an_layers}
    for node in graph.node:
        scopes = _name_scopes(node)
        for name in an_layers:
            # nodes of the layer (its norm / attn children included), not of the activation / dropout children of
            # AttentiveBatchNormAct2d, which follow the normalization
            if name in scopes and not any(s in (f'{name}.act', f'{name}.drop') for s in scopes):
                scoped[name].append(node)
    if not any(scoped.values()):
        return {}, ['no node carries a PyTorch module scope (pkg.torch.onnx.name_scopes): cannot locate the AN '
                    'layers; export with the dynamo exporter']
    producer = {o: n for n in graph.node for o in n.output}
    folded: Dict[str, List[str]] = {}
    for name, nodes in scoped.items():
        if not nodes:
            problems.append(f'AN layer {name}: no nodes in the graph')
            continue
        inside = {id(n) for n in nodes}
        produced = {o for n in nodes for o in n.output}
        bns = [n.name for n in nodes if n.op_type == 'BatchNormalization']
        if bns:
            problems.append(f'AN layer {name}: BatchNormalization inside the layer ({bns}): not folded')
        consumers_outside = {i for n in graph.node if id(n) not in inside for i in n.input}
        outputs = [o for o in produced if _full_size(shapes.get(o))
                   and (o in consumers_outside or o in {v.name for v in graph.output})]
        if len(outputs) != 1:
            problems.append(f'AN layer {name}: {len(outputs)} full-size outputs, expected 1')
            continue
        path, stack, seen = [], [outputs[0]], set()
        while stack:  # walk back over full-size tensors produced inside the layer
            tensor = stack.pop()
            node = producer.get(tensor)
            if node is None or id(node) not in inside or id(node) in seen:
                continue
            seen.add(id(node))
            path.append(node.op_type)
            stack += [i for i in node.input if _full_size(shapes.get(i))]
        folded[name] = sorted(path)
        if sorted(path) != ['Add', 'Mul']:
            problems.append(f'AN layer {name}: the input-to-output path is {sorted(path)}, expected one Mul and one '
                            f'Add (x * a + b)')
    return folded, problems


_TRAINING_ONLY_TARGETS = ('_native_batch_norm_legit.default', '_native_batch_norm_legit_functional',
                          'native_batch_norm.default', 'bernoulli', 'rand', 'normal')
_DROPOUT_TARGETS = ('aten.dropout.default', 'aten.native_dropout.default', 'aten.feature_dropout.default',
                    'aten.alpha_dropout.default')


def check_exported_program_inference(program: 'torch.export.ExportedProgram') -> Dict[str, Any]:
    """Verify that a :class:`torch.export.ExportedProgram` is a pure inference graph; raise :class:`ExportGraphError`
    listing every violation, else return a summary.

    No buffer is mutated (running-statistics updates happen only in training), no BatchNorm runs with batch
    statistics (``aten.batch_norm(training=True)``, ``_native_batch_norm_legit`` with training), no dropout / random
    op, and no reduction over the batch axis (``sum`` / ``mean`` / ``var`` / ``var_mean`` over dim 0).
    """
    problems: List[str] = []
    signature = program.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    # the default (training) IR keeps in-place ops: running_mean.lerp_(...), num_batches_tracked.add_(1)
    buffers = dict(signature.inputs_to_buffers)
    for node in program.graph.nodes:
        if node.op == 'call_function' and node.args and getattr(node.args[0], 'name', None) in buffers:
            schema = getattr(node.target, '_schema', None)
            if schema is not None and schema.arguments and schema.arguments[0].alias_info is not None and \
                    schema.arguments[0].alias_info.is_write:
                mutated.add(buffers[node.args[0].name])
    if any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in program.graph.nodes):
        # mutations inside nested graphs (e.g. a torch.no_grad() block: wrap_with_set_grad_enabled): functionalize
        # (only then; it takes seconds on a large model) and read the buffers it writes back
        mutated |= set(program.run_decompositions({}).graph_signature.buffers_to_mutate.values())
    if mutated:
        problems.append(f'buffers mutated by the graph (training-only running-statistics updates): '
                        f'{sorted(mutated)[:6]}')
    reductions = ('sum.dim_IntList', 'mean.dim', 'var.correction', 'var_mean.correction', 'var.dim', 'std.correction')
    counts: Dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op != 'call_function':
            continue
        target = str(node.target)
        counts[target] = counts.get(target, 0) + 1
        if target.endswith('batch_norm.default') and 'legit' not in target and len(node.args) > 5 and node.args[5]:
            problems.append(f'{node.name}: {target} with training=True (batch statistics)')
        elif target in _DROPOUT_TARGETS:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get('train', True)
            if train is not False:  # dropout(p, train=False) is the identity
                problems.append(f'{node.name}: {target} in training mode')
        elif any(t in target for t in _TRAINING_ONLY_TARGETS):
            if 'no_training' not in target:
                problems.append(f'{node.name}: training-only op {target}')
        elif any(target.endswith(r) for r in reductions):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim')
            rank = len(node.args[0].meta['val'].shape) if 'val' in getattr(node.args[0], 'meta', {}) else None
            dims = list(range(rank or 0)) if dims is None else [d % rank if rank else d for d in dims]
            if 0 in dims and (rank or 0) > 1:
                problems.append(f'{node.name}: {target} over the batch axis (batch statistics: training only)')
    if problems:
        raise ExportGraphError('exported program is not an inference graph:\n  ' + '\n  '.join(problems))
    return {'nodes': sum(counts.values())}


# --------------------------------------------------------------------------------------------------------------------
# ONNX


def onnxruntime_outputs(path: PathLike, x: torch.Tensor) -> List[Any]:
    """Run the ONNX file at ``path`` on ``x`` with onnxruntime's CPU execution provider; return its outputs."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.detach().cpu().float().numpy()})


def _require(module: str, extra: str = 'export') -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise ImportError(f'{module} is needed for ONNX export / checks: pip install "an_zoo[{extra}]" '
                          f'(onnx, onnxruntime, onnxscript)')


def export_onnx(
        model: nn.Module,
        path: PathLike,
        input_size: Optional[Sequence[int]] = None,
        dynamic_batch: bool = True,
        opset: Optional[int] = None,
        exporter: str = 'dynamo',
        check: bool = True,
        rtol: float = TOLERANCES['float32'].rtol,
        atol: float = TOLERANCES['float32'].atol,
        batch_size: int = 2,
        check_batch_size: Optional[int] = None,
        check_graph: bool = True,
        input_name: str = 'input',
        output_names: Optional[Sequence[str]] = None,
        check_input: Optional[torch.Tensor] = None,
) -> OnnxExportResult:
    """Export ``model`` in eval mode (inference graph: running statistics, folded AN) to the ONNX file ``path``.

    Args:
        model: An an_zoo / timm model (float32, on any device; it is exported from the CPU copy of its weights as
            given; its training flags are restored afterwards).
        path: Output ``.onnx`` file (weights embedded; parent directories are created).
        input_size: ``(C, H, W)`` of the example input; default the model's ``pretrained_cfg['input_size']``.
        dynamic_batch: Make the batch axis of the input and outputs symbolic (``'batch'``).
        opset: ONNX opset; default 18 for the dynamo exporter (its minimum), 17 for the TorchScript one.
        exporter: ``'dynamo'`` (default; folded AN graph, needs onnxscript) or ``'torchscript'`` (legacy, deprecated
            by PyTorch; exports the reference AN code, not folded).
        check: Run the file in onnxruntime (CPU) and compare with PyTorch; with ``dynamic_batch`` on a batch of
            ``check_batch_size`` (default ``batch_size + 1``), so the dynamic axis is exercised.
        rtol, atol: Tolerance of the check: ``max|onnx - torch| <= atol + rtol * max|torch|``.
        batch_size: Batch size of the example input the graph is traced with.
        check_batch_size: Batch size of the check input (must equal ``batch_size`` without ``dynamic_batch``).
        check_graph: Verify the graph is a pure inference graph, and for the dynamo exporter that every AN layer is
            folded to ``x * a + b`` (:func:`check_onnx_inference_graph`); raises :class:`ExportGraphError`.
        input_name, output_names: Graph input / output names (default ``'logits'`` for one output, else
            ``'output_0'``, ...).
        check_input: The check's input (default :func:`example_batch` of ``check_batch_size``); its batch size
            overrides ``check_batch_size``.

    Returns:
        :class:`OnnxExportResult` with the measured max abs diff and the tolerance it met.

    Raises:
        ExportCheckError: onnxruntime's outputs differ from PyTorch's by more than the tolerance (message and
            attributes carry the max abs diff).
        ExportGraphError: the graph has training-only parts, or AN is not folded (dynamo exporter).
        ImportError: onnx / onnxruntime / onnxscript is missing.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f'exporter must be one of {EXPORTERS}, got {exporter!r}')
    _require('onnx')
    if exporter == 'dynamo':
        _require('onnxscript')
    if check:
        _require('onnxruntime')
    opset = opset or DEFAULT_OPSET[exporter]
    input_size = _input_size(model, input_size)
    if check_input is not None:
        check_batch_size = check_input.shape[0]
    if check_batch_size is None:
        check_batch_size = batch_size + 1 if dynamic_batch else batch_size
    if not dynamic_batch and check_batch_size != batch_size:
        raise ValueError('without dynamic_batch the check must use the export batch size')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(model, input_size, batch_size)
    with _eval_mode(model), torch.no_grad():
        n_out = len(_outputs(model(x)))
        names = list(output_names) if output_names else (['logits'] if n_out == 1 else
                                                         [f'output_{i}' for i in range(n_out)])
        if exporter == 'dynamo':
            dynamic_shapes = ({0: torch.export.Dim('batch')},) if dynamic_batch else None
            with warnings.catch_warnings():
                warnings.filterwarnings('ignore', category=UserWarning)  # exporter notes on optional features
                program = torch.onnx.export(model, (x,), dynamo=True, input_names=[input_name], output_names=names,
                                            opset_version=opset, dynamic_shapes=dynamic_shapes, external_data=False,
                                            optimize=True, verbose=False)
            program.save(str(path))
        else:
            axes = {n: {0: 'batch'} for n in [input_name, *names]} if dynamic_batch else None
            with reference_an_layers(model), warnings.catch_warnings():
                warnings.simplefilter('ignore')  # the exporter's own deprecation notice and tracer warnings
                torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=[input_name],
                                  output_names=names, opset_version=opset, dynamic_axes=axes)
        result = OnnxExportResult(path=path, exporter=exporter, opset=opset, dynamic_batch=dynamic_batch,
                                  export_batch_size=batch_size)
        if check_graph:
            result.graph = check_onnx_inference_graph(path, an_layer_names(model),
                                                      expect_folded=exporter == 'dynamo', dynamic_batch=dynamic_batch)
        if check:
            xc = check_input if check_input is not None else _example(model, input_size, check_batch_size, seed=1)
            reference = _outputs(model(xc))
            outputs = onnxruntime_outputs(path, xc)
            tol = Tolerance(rtol=rtol, atol=atol)
            result.max_abs_diff, result.tolerance, result.ref_max = _check_close(
                f'ONNX ({exporter} exporter, onnxruntime CPU, batch {check_batch_size})', outputs, reference, tol)
            result.check_batch_size = check_batch_size
    return result


# --------------------------------------------------------------------------------------------------------------------
# matrix targets: each returns a TargetResult and never raises


def _timed(target: str, fn: Callable[[], TargetResult]) -> TargetResult:
    start = time.perf_counter()
    try:
        result = fn()
    except ExportCheckError as err:
        result = TargetResult(target, 'mismatch', str(err), max_abs_diff=err.max_abs_diff, tolerance=err.tolerance)
    except Exception as err:  # noqa: BLE001 - a failing target is a result, not a crash
        frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
        where = f' ({Path(frame.filename).name}:{frame.lineno})' if frame else ''
        text = '; '.join(line.strip() for line in str(err).strip().splitlines() if line.strip())
        message = f'{type(err).__name__}: {text}'[:400]
        result = TargetResult(target, 'error', message + where)
    result.target = target
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def _fp32_tol(model: nn.Module, x: torch.Tensor) -> Tolerance:
    """The float32 tolerance, widened where the model's own float32 forward is further than that from the exact
    result: its rtol is at least 4x ``max|f32 - f64| / max|f64|`` of the eval forward on ``x`` (a rewrite of the
    computation cannot be asked to agree with eager float32 more closely than eager float32 agrees with float64;
    deep randomly initialised networks can amplify rounding far beyond the usual 1e-3)."""
    tol = TOLERANCES['float32']
    exact = copy.deepcopy(model).double().eval()(x.double())
    ours = model.eval()(x)
    exact, ours = _outputs(exact), _outputs(ours)
    floor = max(float((o.double() - e).abs().max()) for o, e in zip(ours, exact))
    scale = max(float(e.abs().max()) for e in exact) or 1.0
    return Tolerance(rtol=max(tol.rtol, 4 * floor / scale), atol=tol.atol)


def _result(target: str, measured: Tuple[float, float, float], **details: Any) -> TargetResult:
    diff, bound, ref_max = measured
    return TargetResult(target, 'ok', max_abs_diff=diff, tolerance=bound, ref_max=ref_max, details=details)


def check_compile_fullgraph(model: nn.Module, x: torch.Tensor, x_check: torch.Tensor,
                            backend: str = 'inductor') -> TargetResult:
    """``torch.compile(fullgraph=True)``: a training step (forward + backward, ``aot_eager``: graph capture without
    code generation) must capture without graph breaks, then eval-mode inference with ``backend`` must match eager
    float32 on ``x_check``. The model is left in eval mode; its parameters' gradients are cleared."""
    def run() -> TargetResult:
        import torch._dynamo
        torch._dynamo.reset()
        train_batch = x if x.shape[0] > 1 else torch.cat([x, x])  # training AN needs batch size > 1
        model.train()
        compiled_train = torch.compile(model, fullgraph=True, backend='aot_eager')
        state = {k: v.clone() for k, v in model.state_dict().items()}  # the training step updates running stats
        compiled_train(train_batch).float().mean().backward()
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        model.eval()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        with torch.no_grad():
            reference = _outputs(model(x_check))
            measured = _check_close(f'torch.compile({backend})', _outputs(compiled(x_check)), reference,
                                    _fp32_tol(model, x_check))
        torch._dynamo.reset()
        return _result('compile_fullgraph', measured, backend=backend, train_capture='aot_eager')
    return _timed('compile_fullgraph', run)


def check_onnx(model: nn.Module, x: torch.Tensor, x_check: torch.Tensor, exporter: str = 'dynamo',
               opset: Optional[int] = None) -> TargetResult:
    """ONNX export with a dynamic batch (traced at ``x``'s batch size), the inference-graph / folded-AN check, and
    onnxruntime CPU parity on ``x_check`` (another batch size)."""
    import importlib.util
    missing = [m for m in ('onnx', 'onnxruntime', 'onnxscript') if importlib.util.find_spec(m) is None]
    if missing:
        return TargetResult('onnx_ort', 'not measured', f'not installed: {", ".join(missing)}')

    def run() -> TargetResult:
        tol = _fp32_tol(model, x_check)
        with tempfile.TemporaryDirectory() as tmp:
            res = export_onnx(model, Path(tmp) / 'model.onnx', input_size=tuple(x.shape[1:]), opset=opset,
                              exporter=exporter, batch_size=x.shape[0], check_input=x_check, rtol=tol.rtol)
        return _result('onnx_ort', (res.max_abs_diff, res.tolerance, res.ref_max), exporter=exporter,
                       opset=res.opset, folded=res.graph.get('folded', False),
                       batch=f'{res.export_batch_size}->{res.check_batch_size}')
    return _timed('onnx_ort', run)


def check_torch_export(model: nn.Module, x: torch.Tensor, x_check: torch.Tensor) -> TargetResult:
    """``torch.export.export`` (eval, dynamic batch): inference-graph check, then parity of the exported module on
    ``x_check``."""
    def run() -> TargetResult:
        model.eval()
        with torch.no_grad():
            program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))
            check_exported_program_inference(program)
            measured = _check_close('torch.export', _outputs(program.module()(x_check)), _outputs(model(x_check)),
                                    _fp32_tol(model, x_check))
        return _result('torch_export', measured)
    return _timed('torch_export', run)


def check_jit_script(model: nn.Module, x: torch.Tensor, x_check: torch.Tensor) -> TargetResult:
    """``torch.jit.script`` (runs the reference AN code) against eager (the fast one), float32."""
    def run() -> TargetResult:
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # PyTorch's deprecation notice of TorchScript
            scripted = torch.jit.script(model)
        with torch.no_grad():
            measured = _check_close('torch.jit.script', _outputs(scripted(x_check)), _outputs(model(x_check)),
                                    _fp32_tol(model, x_check))
        return _result('jit_script', measured)
    return _timed('jit_script', run)


def check_jit_trace(model: nn.Module, x: torch.Tensor, x_check: torch.Tensor) -> TargetResult:
    """``torch.jit.trace`` of the eval model under ``torch.no_grad()`` (traced at ``x``, run at ``x_check``)."""
    def run() -> TargetResult:
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            warnings.simplefilter('ignore', FutureWarning)  # PyTorch's deprecation notice of TorchScript
            traced = torch.jit.trace(model, (x,))
            measured = _check_close('torch.jit.trace', _outputs(traced(x_check)), _outputs(model(x_check)),
                                    _fp32_tol(model, x_check))
        return _result('jit_trace', measured)
    return _timed('jit_trace', run)


def check_channels_last(model: nn.Module, x: torch.Tensor, x_check: torch.Tensor) -> TargetResult:
    """Eval forward with channels_last weights and input against the contiguous float32 forward."""
    def run() -> TargetResult:
        model.eval()
        with torch.no_grad():
            reference = _outputs(model(x_check))
            try:
                model.to(memory_format=torch.channels_last)
                out = _outputs(model(x_check.to(memory_format=torch.channels_last)))
            finally:
                model.to(memory_format=torch.contiguous_format)
            measured = _check_close('channels_last', out, reference, _fp32_tol(model, x_check))
        return _result('channels_last', measured)
    return _timed('channels_last', run)


def check_autocast(model: nn.Module, x: torch.Tensor, x_check: torch.Tensor, dtype: torch.dtype,
                   device: str = 'cpu') -> TargetResult:
    """Eval forward under ``torch.autocast(device, dtype)``; on ``'cuda'`` without a GPU: ``'not measured (no GPU)'``.

    Judged per AN layer: inside the autocast run each AN layer receives a ``dtype`` input and must give what the
    float32 layer gives on the same input (upcast), within ``atol + rtol * max|ref|`` (:data:`TOLERANCES` of
    ``dtype``): this isolates AN's own low-precision handling (float32 statistics, the folded apply) from the
    rounding every conv adds. ``max_abs_diff`` is the worst AN layer; the logits' difference from the float32 network
    is recorded in ``details`` (on randomly initialised networks it mostly measures how the random net propagates
    rounding, and is shown, not judged). The run must also produce finite ``dtype`` outputs.
    """
    short = {torch.bfloat16: 'bf16', torch.float16: 'fp16'}[dtype]
    target = f'{short}_{device}'
    if device == 'cuda' and not torch.cuda.is_available():
        return TargetResult(target, 'not measured', 'not measured (no GPU)')
    tol = TOLERANCES[str(dtype).split('.')[-1]]

    def run() -> TargetResult:
        model.eval().to(device)
        captured: List[Tuple[str, torch.Tensor, torch.Tensor]] = []
        # clone: a following in-place activation (timm ResNets' ReLU(inplace=True)) would overwrite the output
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: captured.append((n, i[0].clone(), o.clone())))
                 for n, m in model.named_modules() if isinstance(m, AttentiveBatchNorm2d)]
        try:
            xc = x_check.to(device)
            with torch.no_grad():
                reference = _outputs(model(xc))
                captured.clear()
                with torch.autocast(device, dtype=dtype):
                    out = _outputs(model(xc))
                for h in hooks:
                    h.remove()
                if any(o.dtype != dtype for o in out):
                    raise RuntimeError(f'autocast did not run in {dtype}: outputs are {[o.dtype for o in out]}')
                if not all(torch.isfinite(o).all() for o in out):
                    raise RuntimeError(f'non-finite outputs under autocast {dtype}')
                worst = (0.0, tol.atol, 0.0)
                for name, inp, got in captured:
                    if inp.dtype != dtype:
                        continue  # an AN layer that autocast did not reach in low precision (fp32 input)
                    layer = model.get_submodule(name)
                    want = layer(inp.float())
                    diff, bound, ref_max = _check_close(f'AN layer {name} under autocast {dtype} on {device}',
                                                        [got], [want], tol)
                    if diff / bound >= worst[0] / worst[1]:
                        worst = (diff, bound, ref_max)
                low = [n for n, i, _ in captured if i.dtype == dtype]
                if not low:
                    raise RuntimeError(f'no AN layer received a {dtype} input under autocast')
                logits, _, logits_max = _compare(out, reference, tol)
                ref_norm = sum(float(r.float().norm() ** 2) for r in reference) ** 0.5
                err_norm = sum(float((o.float() - r.float()).norm() ** 2) for o, r in zip(out, reference)) ** 0.5
        finally:
            for h in hooks:
                h.remove()
            model.to('cpu')
        return _result(target, worst, an_layers_checked=len(low), logits_max_abs_diff=float(f'{logits:.3g}'),
                       logits_rel_l2=float(f'{err_norm / max(ref_norm, 1e-12):.3g}'),
                       logits_ref_max=float(f'{logits_max:.3g}'))
    return _timed(target, run)


TARGETS: Dict[str, Callable[..., TargetResult]] = {
    'compile_fullgraph': check_compile_fullgraph,
    'onnx_ort': check_onnx,
    'torch_export': check_torch_export,
    'jit_script': check_jit_script,
    'jit_trace': check_jit_trace,
    'channels_last': check_channels_last,
    'bf16_cpu': lambda m, x, xc: check_autocast(m, x, xc, torch.bfloat16, 'cpu'),
    'fp16_cpu': lambda m, x, xc: check_autocast(m, x, xc, torch.float16, 'cpu'),
    'bf16_cuda': lambda m, x, xc: check_autocast(m, x, xc, torch.bfloat16, 'cuda'),
    'fp16_cuda': lambda m, x, xc: check_autocast(m, x, xc, torch.float16, 'cuda'),
}
CUDA_TARGETS = ('bf16_cuda', 'fp16_cuda')


def run_target(target: str, model: nn.Module, x: torch.Tensor, x_check: torch.Tensor, **kwargs: Any) -> TargetResult:
    """Run one target of :data:`TARGETS` on a float32 CPU ``model``: traced / exported at ``x``, checked at
    ``x_check`` (a different batch size)."""
    if target not in TARGETS:
        raise ValueError(f'unknown target {target!r}; known: {list(TARGETS)}')
    return TARGETS[target](model, x, x_check, **kwargs)


def environment() -> Dict[str, Any]:
    """Versions and machine of a measurement (for ``export_status.json``)."""
    import importlib.metadata as md
    import timm

    def version(pkg: str) -> Optional[str]:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    except OSError:
        pass
    return {
        'torch': torch.__version__, 'timm': timm.__version__, 'onnx': version('onnx'),
        'onnxruntime': version('onnxruntime'), 'onnxscript': version('onnxscript'),
        'python': platform.python_version(),
        'machine': f'{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPU threads',
        'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# --------------------------------------------------------------------------------------------------------------------
# export_status.json: the measured matrix (written by scripts/export_matrix.py), rendered for the README and the cards

PACKAGED_STATUS = Path(__file__).with_name('export_status.json')

# column order and headers of the matrix; the keys are those of TARGETS
TARGET_LABELS: Dict[str, str] = {
    'compile_fullgraph': 'torch.compile fullgraph',
    'onnx_ort': 'ONNX + onnxruntime',
    'torch_export': 'torch.export',
    'jit_script': 'jit.script',
    'jit_trace': 'jit.trace',
    'channels_last': 'channels_last',
    'bf16_cpu': 'bf16 (CPU)',
    'fp16_cpu': 'fp16 (CPU)',
    'bf16_cuda': 'bf16 (CUDA)',
    'fp16_cuda': 'fp16 (CUDA)',
}


def export_status_path() -> Path:
    """``AN_ZOO_EXPORT_STATUS`` if set, else the packaged ``export_status.json``."""
    return Path(os.environ.get('AN_ZOO_EXPORT_STATUS') or PACKAGED_STATUS)


def load_export_status(path: Optional[PathLike] = None) -> Optional[Dict[str, Any]]:
    """The measured export / precision status, or None when no file exists."""
    import json
    file = Path(path) if path is not None else export_status_path()
    if not file.is_file():
        return None
    return json.loads(file.read_text(encoding='utf-8'))


def _cell(record: Optional[Dict[str, Any]]) -> str:
    if record is None:
        return 'not measured'
    status = record['status']
    if status == 'ok':
        return f'✅ {record["max_abs_diff"]:.1e}' if record.get('max_abs_diff') is not None else '✅'
    if status == 'mismatch':
        return f'❌ {record["max_abs_diff"]:.1e} > {record["tolerance"]:.1e}'
    if status == 'error':
        return '❌ error'
    return record.get('message') or status


def _measured_on(status: Dict[str, Any], models: Sequence[str]) -> List[str]:
    seen: Dict[str, List[str]] = {}
    for name in models:
        row = status['models'][name]
        env = row.get('environment', {})
        key = (f'{row.get("date", "?")}: torch {env.get("torch")}, timm {env.get("timm")}, onnx {env.get("onnx")}, '
               f'onnxruntime {env.get("onnxruntime")}, onnxscript {env.get("onnxscript")}, '
               f'{env.get("machine")}, GPU: {env.get("gpu") or "none"}')
        seen.setdefault(key, []).append(name)
    if len(seen) == 1:
        return [f'Measured {next(iter(seen))}.']
    return [f'Measured {key} ({", ".join(f"`{n}`" for n in names)}).' for key, names in seen.items()]


def render_export_matrix(status: Dict[str, Any]) -> str:
    """The README block: one row per model, one column per target, cells from real runs (never hand-written)."""
    settings = status.get('settings', {})
    targets = [t for t in TARGET_LABELS if t in status.get('targets', TARGET_LABELS)]
    models = list(status['models'])
    rows = ['| model | ' + ' | '.join(TARGET_LABELS[t] for t in targets) + ' |',
            '|---|' + '---|' * len(targets)]
    errors: List[str] = []
    for name in models:
        cells = []
        for t in targets:
            record = status['models'][name]['targets'].get(t)
            cell = _cell(record)
            if record is not None and record['status'] == 'error':
                errors.append(f'`{name}` {TARGET_LABELS[t]}: {record["message"]}')
                cell += f' [{len(errors)}]'
            cells.append(cell)
        rows.append(f'| `{name}` | ' + ' | '.join(cells) + ' |')
    tols = settings.get('tolerances', {})
    tol_text = '; '.join(f'{k}: atol {v["atol"]:g} + rtol {v["rtol"]:.3g} x max|ref|' for k, v in tols.items())
    notes = [
        '',
        f'Cells: ✅ and the measured max abs difference from eager float32 PyTorch, or ❌. Inputs '
        f'{settings.get("img_size")} px, traced / exported at batch {settings.get("export_batch")} and checked at '
        f'batch {settings.get("check_batch")} (dynamic batch axis); randomly initialised weights with calibrated '
        f'running statistics. Tolerances: {tol_text}; the float32 rtol is raised to 4x the model\'s own float32 '
        f'rounding (max|eager float32 - eager float64| / max|ref|) where that is larger (deep random networks, e.g. '
        f'AOGNet-40M at 64 px). torch.compile: training step captured with fullgraph '
        f'(`aot_eager`), inference with the `{settings.get("compile_backend")}` backend. ONNX: '
        f'`{settings.get("onnx_exporter")}` exporter, opset {settings.get("opset")}, onnxruntime CPU, graph checked '
        f'to be the folded inference form. jit.trace under `torch.no_grad()`. bf16 / fp16: autocast; each AN layer '
        f'against float32 on the same input (the logits\' difference is in `export_status.json`). CUDA columns are '
        f'measured only on a machine with a GPU.',
        *_measured_on(status, models),
        'Generated from `export_status.json` by `python scripts/export_matrix.py --write`.',
    ]
    if errors:
        notes += [''] + [f'[{i}] {e}' for i, e in enumerate(errors, 1)]
    return '\n'.join(rows + notes)


def render_model_status(status: Optional[Dict[str, Any]], model: str) -> str:
    """The model card section: the model's row of the matrix as a list (or a line saying it is not measured)."""
    if not status or model not in status.get('models', {}):
        return 'Export / precision status: not yet measured (`python scripts/export_matrix.py --write`).'
    row = status['models'][model]
    lines = []
    for t, label in TARGET_LABELS.items():
        record = row['targets'].get(t)
        if record is None:
            continue
        if record['status'] == 'not measured':
            lines.append(f'- {label}: {record.get("message") or "not measured"}')
            continue
        text = record['status']
        if record.get('max_abs_diff') is not None:
            what = 'worst AN layer vs float32' if t.startswith(('bf16', 'fp16')) else 'vs eager float32'
            text += f' ({what}: max abs diff {record["max_abs_diff"]:.1e}, tolerance {record["tolerance"]:.1e}'
            logits = record.get('details', {}).get('logits_max_abs_diff')
            text += f'; logits vs float32: {logits:.1e})' if logits is not None else ')'
        if record['status'] != 'ok' and record.get('message'):
            text += f': {record["message"]}'
        lines.append(f'- {label}: {text}')
    settings = status.get('settings', {})
    env = row.get('environment', {})
    lines.append(f'\nMeasured {row.get("date")} with torch {env.get("torch")}, timm {env.get("timm")}, onnxruntime '
                 f'{env.get("onnxruntime")} on {env.get("machine")}; {settings.get("img_size")} px inputs, random '
                 f'weights with calibrated statistics; method: the export section of the an_zoo README '
                 f'(`scripts/export_matrix.py`).')
    return '\n'.join(lines)
