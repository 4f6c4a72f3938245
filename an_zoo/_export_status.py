"""The measured export / precision status (``export_status.json``, written by ``scripts/export_matrix.py``) and its
renderings: the matrix block of docs/export.md and the status section of each model card."""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

__all__ = ['PACKAGED_STATUS', 'TARGET_LABELS', 'export_status_path', 'load_export_status', 'render_export_matrix',
           'render_model_status']

PathLike = Union[str, 'os.PathLike[str]']

PACKAGED_STATUS = Path(__file__).with_name('export_status.json')

# column order and headers of the matrix; the keys are those of an_zoo._export_targets.TARGETS
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
    """The docs/export.md block: one row per model, one column per target, cells from real runs (never hand-written)."""
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
                 f'weights with calibrated statistics; method: docs/export.md of the an_zoo repository '
                 f'(`scripts/export_matrix.py`).')
    return '\n'.join(lines)
