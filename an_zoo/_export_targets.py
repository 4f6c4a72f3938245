"""The targets of the export / precision matrix (``scripts/export_matrix.py``): torch.compile, ONNX + onnxruntime,
torch.export, TorchScript, channels_last and autocast, each checked against eager float32 on a float32 CPU model.

Every ``check_*`` function never raises: it returns a :class:`TargetResult` (status, message, measured max abs diff,
tolerance); a target that needs hardware or a package this run lacks is ``'not measured'``.
"""
import copy
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ._export_graph import check_exported_program_inference
from .export import TOLERANCES, ExportCheckError, Tolerance, _check_close, _compare, _outputs, export_onnx
from .layers import AttentiveBatchNorm2d

__all__ = ['TargetResult', 'TARGETS', 'CUDA_TARGETS', 'NOT_MEASURED_ON_GPU', 'run_target', 'check_compile_fullgraph',
           'check_onnx', 'check_torch_export', 'check_jit_script', 'check_jit_trace', 'check_channels_last',
           'check_autocast']

# what a CUDA target records on a machine without a GPU (the matrix shows it as is)
NOT_MEASURED_ON_GPU = 'not yet measured on a GPU'


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


def _timed(target: str, fn: Callable[[], TargetResult]) -> TargetResult:
    """Run one target, timed; an out-of-tolerance check becomes ``'mismatch'``, any other failure ``'error'``."""
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
    """Eval forward under ``torch.autocast(device, dtype)``; on ``'cuda'`` without a GPU: ``'not measured'``
    (:data:`NOT_MEASURED_ON_GPU`).

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
        return TargetResult(target, 'not measured', NOT_MEASURED_ON_GPU)
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

