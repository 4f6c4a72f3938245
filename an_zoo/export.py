"""Export an_zoo models to ONNX for inference, checked in onnxruntime against PyTorch: :func:`export_onnx`, its
errors and tolerances.

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

The check compares against the eager PyTorch model in eval mode on a batch size *different* from the one the graph
was exported with (proving the dynamic batch axis), with the tolerance ``atol + rtol * max|reference|`` (the scale of
the outputs sets what a float32 difference means), and raises :class:`ExportCheckError` with the measured maximum
difference when it is exceeded. The graph itself is checked by ``an_zoo._export_graph`` (no training-only parts; in
the dynamo graph every AN layer is one ``Mul`` and one ``Add``), raising :class:`ExportGraphError`.

The export / precision matrix lives elsewhere: its targets in ``an_zoo._export_targets``, the status file and its
renderings in ``an_zoo._export_status``, model / input preparation in ``an_zoo._export_prep``. Their names are still
importable from here, with a DeprecationWarning.
"""
import importlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import _export_graph, _export_prep
from ._export_graph import ExportGraphError

__all__ = ['export_onnx', 'onnxruntime_outputs', 'OnnxExportResult', 'ExportCheckError', 'ExportGraphError',
           'Tolerance', 'TOLERANCES', 'DEFAULT_OPSET', 'EXPORTERS']

PathLike = Union[str, 'os.PathLike[str]']
DEFAULT_OPSET = {'dynamo': 18, 'torchscript': 17}
EXPORTERS = tuple(DEFAULT_OPSET)


class ExportCheckError(RuntimeError):
    """An exported model's outputs differ from PyTorch's by more than the tolerance."""

    def __init__(self, message: str, max_abs_diff: float, tolerance: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


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


# comparison helpers, shared with the matrix targets (an_zoo._export_targets)

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
            folded to ``x * a + b`` (``an_zoo._export_graph.check_onnx_inference_graph``); raises
            :class:`ExportGraphError`.
        input_name, output_names: Graph input / output names (default ``'logits'`` for one output, else
            ``'output_0'``, ...).
        check_input: The check's input (default ``an_zoo._export_prep.example_batch`` of ``check_batch_size``); its
            batch size overrides ``check_batch_size``.

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
    input_size = _export_prep.model_input_size(model, input_size)
    if check_input is not None:
        check_batch_size = check_input.shape[0]
    if check_batch_size is None:
        check_batch_size = batch_size + 1 if dynamic_batch else batch_size
    if not dynamic_batch and check_batch_size != batch_size:
        raise ValueError('without dynamic_batch the check must use the export batch size')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _export_prep.model_example(model, input_size, batch_size)
    with _export_prep.eval_mode(model), torch.no_grad():
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
            with _export_prep.reference_an_layers(model), warnings.catch_warnings():
                warnings.simplefilter('ignore')  # the exporter's own deprecation notice and tracer warnings
                torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=[input_name],
                                  output_names=names, opset_version=opset, dynamic_axes=axes)
        result = OnnxExportResult(path=path, exporter=exporter, opset=opset, dynamic_batch=dynamic_batch,
                                  export_batch_size=batch_size)
        if check_graph:
            result.graph = _export_graph.check_onnx_inference_graph(
                path, _export_prep.an_layer_names(model), expect_folded=exporter == 'dynamo',
                dynamic_batch=dynamic_batch)
        if check:
            xc = check_input if check_input is not None else \
                _export_prep.model_example(model, input_size, check_batch_size, seed=1)
            reference = _outputs(model(xc))
            outputs = onnxruntime_outputs(path, xc)
            tol = Tolerance(rtol=rtol, atol=atol)
            result.max_abs_diff, result.tolerance, result.ref_max = _check_close(
                f'ONNX ({exporter} exporter, onnxruntime CPU, batch {check_batch_size})', outputs, reference, tol)
            result.check_batch_size = check_batch_size
    return result


# --------------------------------------------------------------------------------------------------------------------
# names that moved out of this module: old imports keep working, with a DeprecationWarning

_MOVED: Dict[str, str] = {
    **dict.fromkeys(('check_onnx_inference_graph', 'check_exported_program_inference'), '_export_graph'),
    **dict.fromkeys(('an_layer_names', 'reference_an_layers', 'randomize_norm_affines', 'calibrate_running_stats',
                     'example_batch', 'prepare_for_checks'), '_export_prep'),
    **dict.fromkeys(('TargetResult', 'TARGETS', 'CUDA_TARGETS', 'run_target', 'check_compile_fullgraph', 'check_onnx',
                     'check_torch_export', 'check_jit_script', 'check_jit_trace', 'check_channels_last',
                     'check_autocast'), '_export_targets'),
    **dict.fromkeys(('PACKAGED_STATUS', 'TARGET_LABELS', 'export_status_path', 'load_export_status',
                     'render_export_matrix', 'render_model_status'), '_export_status'),
}


def _environment() -> Dict[str, Any]:
    """Versions and machine of a measurement (what the former ``an_zoo.export.environment`` gave)."""
    from ._env import describe_environment
    return describe_environment('onnx', 'onnxruntime', 'onnxscript')


def __getattr__(name: str) -> Any:
    if name == 'environment':
        warnings.warn('an_zoo.export.environment is deprecated: use '
                      "an_zoo._env.describe_environment('onnx', 'onnxruntime', 'onnxscript')",
                      DeprecationWarning, stacklevel=2)
        return _environment
    if name in _MOVED:
        module = f'{__package__}.{_MOVED[name]}'
        warnings.warn(f'an_zoo.export.{name} moved to {module}.{name}; an_zoo.export keeps only the export API',
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
