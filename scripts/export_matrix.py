#!/usr/bin/env python
"""Measure the export / precision status of every registered an_* model and keep ``an_zoo/export_status.json`` (and
its repository-root copy) and the matrix in docs/export.md in step with it (generated from real runs, never
hand-written).

    python scripts/export_matrix.py --write             # run every target for every model (minutes), write the json
                                                        # and the docs/export.md block between the export-matrix markers
    python scripts/export_matrix.py --write --models an_resnet50 --targets onnx_ort,jit_script   # re-measure a part
    python scripts/export_matrix.py --check             # no runs: the json covers the registry, the docs block
                                                        # is its rendering (exit 1 otherwise; run by the tests)
    python scripts/export_matrix.py --render            # print the docs block rendered from the json
    python scripts/export_matrix.py --update-docs       # no runs: rewrite the docs block from the json

Targets (an_zoo._export_targets.TARGETS): torch.compile fullgraph, ONNX + onnxruntime parity with a dynamic batch,
torch.export, torch.jit.script, torch.jit.trace, channels_last, bf16 / fp16 autocast on CPU, and the same on CUDA
(recorded as "not yet measured on a GPU" without one). Models are randomly initialised, with non-degenerate norm
affines and running statistics calibrated on image-like data (an_zoo._export_prep.prepare_for_checks), so that the
checks exercise every AN layer.
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import timm
import torch

from an_zoo._docs import read_block, write_block  # (importing an_zoo registers the models)
from an_zoo._env import describe_environment
from an_zoo._export_prep import example_batch, prepare_for_checks
from an_zoo._export_status import TARGET_LABELS, load_export_status, render_export_matrix
from an_zoo._export_targets import CUDA_TARGETS, TARGETS, run_target
from an_zoo._io import write_package_data
from an_zoo.export import DEFAULT_OPSET, TOLERANCES

REPO = Path(__file__).resolve().parents[1]
STATUS = REPO / 'an_zoo' / 'export_status.json'  # the packaged file, the one written and read
ROOT_STATUS = REPO / 'export_status.json'  # its repository-root copy, kept byte-equal (tests/test_repo.py)
PAGE = REPO / 'docs' / 'export.md'
MARKER = 'export-matrix'
FORMAT_VERSION = 1
DEFAULT_SETTINGS = {'img_size': 64, 'export_batch': 2, 'check_batch': 3, 'compile_backend': 'inductor',
                    'onnx_exporter': 'dynamo', 'opset': DEFAULT_OPSET['dynamo'], 'seed': 0}


def registered_models() -> List[str]:
    return timm.list_models('an_*')


def measure(name: str, targets: Sequence[str], settings: Dict[str, Any],
            log: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Run ``targets`` on a fresh ``name`` and return its row of the status file."""
    size = settings['img_size']
    torch.manual_seed(settings['seed'])
    model = timm.create_model(name)
    input_size = (model.pretrained_cfg.get('input_size') or (3, size, size))[0], size, size
    prepare_for_checks(model, input_size, seed=settings['seed'])
    x = example_batch(settings['export_batch'], input_size, seed=settings['seed'] + 1)
    x_check = example_batch(settings['check_batch'], input_size, seed=settings['seed'] + 2)
    results = {}
    for target in targets:
        kwargs: Dict[str, Any] = {}
        if target == 'compile_fullgraph':
            kwargs['backend'] = settings['compile_backend']
        elif target == 'onnx_ort':
            kwargs.update(exporter=settings['onnx_exporter'], opset=settings['opset'])
        result = run_target(target, model, x, x_check, **kwargs)
        results[target] = result.as_dict()
        diff = f' max abs diff {result.max_abs_diff:.2e} (tol {result.tolerance:.2e})' \
            if result.max_abs_diff is not None and result.tolerance is not None else ''
        log(f'{name:28s} {target:18s} {result.status}{diff} {result.message[:160]}'
            f'{f" [{result.seconds:.1f}s]" if result.seconds is not None else ""}')
    environment = describe_environment('onnx', 'onnxruntime', 'onnxscript')
    return {'date': datetime.date.today().isoformat(), 'environment': environment, 'targets': results}


def check_status(status: Optional[Dict[str, Any]], models: Sequence[str]) -> List[str]:
    """Problems of a status file against the registry (empty: consistent)."""
    if status is None:
        return [f'{STATUS.name} is missing: run python scripts/export_matrix.py --write']
    problems = []
    if status.get('format_version') != FORMAT_VERSION:
        problems.append(f'format_version {status.get("format_version")!r}, expected {FORMAT_VERSION}')
    rows = status.get('models', {})
    missing = [m for m in models if m not in rows]
    extra = [m for m in rows if m not in models]
    if missing:
        problems.append(f'models without a row (measure them): {missing}')
    if extra:
        problems.append(f'rows of models that are not registered (remove them): {extra}')
    if list(rows) != sorted(rows):
        problems.append('rows are not sorted by model name')
    for name in models:
        row = rows.get(name)
        if row is None:
            continue
        absent = [t for t in TARGETS if t not in row.get('targets', {})]
        if absent:
            problems.append(f'{name}: targets not measured: {absent}')
        for target, record in row.get('targets', {}).items():
            if record.get('status') not in ('ok', 'mismatch', 'error', 'not measured'):
                problems.append(f'{name} {target}: unknown status {record.get("status")!r}')
            if target in CUDA_TARGETS and record.get('status') == 'not measured' and \
                    row.get('environment', {}).get('gpu'):
                problems.append(f'{name} {target}: a GPU was present but the target is not measured')
            if target in CUDA_TARGETS and record.get('status') != 'not measured' and \
                    not row.get('environment', {}).get('gpu'):
                problems.append(f'{name} {target}: status {record.get("status")!r} without a GPU')
    return problems


def write_status(status: Dict[str, Any], path: Optional[Path] = None) -> List[Path]:
    """Write ``status`` to ``path`` (default the packaged file); writing the packaged file also writes the
    repository-root copy, byte for byte. Returns the files written."""
    status['models'] = dict(sorted(status['models'].items()))
    path = Path(path) if path is not None else STATUS
    text = json.dumps(status, indent=2, ensure_ascii=False) + '\n'
    files = write_package_data(path, text)
    return files


def _update_docs(page: Path, status: Dict[str, Any]) -> bool:
    """Rewrite the matrix block of ``page``; False (with a message) when the page or its block is missing."""
    try:
        changed = write_block(page, MARKER, render_export_matrix(status))
    except (OSError, ValueError) as err:
        print(f'{page}: not updated: {err}', file=sys.stderr)
        return False
    print(f'{"updated" if changed else "unchanged:"} the export matrix in {page.name}', file=sys.stderr)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--write', action='store_true',
                      help='run, then write export_status.json and the docs/export.md block')
    mode.add_argument('--check', action='store_true',
                      help='no runs: fail if the json or the docs/export.md block is out of date')
    mode.add_argument('--render', action='store_true', help='print the docs/export.md block from export_status.json')
    mode.add_argument('--update-docs', action='store_true',
                      help='no runs: rewrite the docs/export.md block from export_status.json')
    # the former name of --update-docs (the matrix used to live in README.md)
    mode.add_argument('--update-readme', dest='update_docs', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--models', default='', help='comma-separated models (default: every registered an_*)')
    parser.add_argument('--targets', default='', help=f'comma-separated targets (default: all of {list(TARGETS)})')
    parser.add_argument('--img-size', type=int, default=DEFAULT_SETTINGS['img_size'])
    parser.add_argument('--compile-backend', default=DEFAULT_SETTINGS['compile_backend'])
    parser.add_argument('--status-file', type=Path, default=STATUS, help=argparse.SUPPRESS)
    parser.add_argument('--page', '--readme', dest='page', type=Path, default=PAGE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    registry = registered_models()
    existing = load_export_status(args.status_file)

    if args.update_docs:
        if existing is None:
            print(f'{args.status_file} is missing: run with --write', file=sys.stderr)
            return 1
        return 0 if _update_docs(args.page, existing) else 1

    if args.check or args.render:
        problems = check_status(existing, registry) if args.check else []
        if existing is not None and args.render:
            print(render_export_matrix(existing))
        if args.check and existing is not None:
            block = read_block(args.page.read_text(encoding='utf-8'), MARKER) if args.page.is_file() else None
            if block is None:  # the matrix must be on the page: a missing block is a failure, not a skip
                problems.append(f'{args.page} has no <!-- {MARKER}:start --> ... <!-- {MARKER}:end --> block')
            elif block != render_export_matrix(existing):
                problems.append(f'{args.page.name} export matrix is out of date: run python scripts/export_matrix.py '
                                f'--update-docs')
        if args.check and args.status_file.resolve() == STATUS.resolve() and STATUS.is_file() and \
                (not ROOT_STATUS.is_file() or ROOT_STATUS.read_bytes() != STATUS.read_bytes()):
            problems.append(f'{ROOT_STATUS} differs from {STATUS}: copy the packaged file over it')
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0

    models = [m for m in args.models.split(',') if m] or registry
    unknown = [m for m in models if m not in registry]
    targets = [t for t in args.targets.split(',') if t] or list(TARGETS)
    bad = [t for t in targets if t not in TARGETS]
    if unknown or bad:
        parser.error(f'unknown models {unknown} / targets {bad}')
    settings = dict(DEFAULT_SETTINGS, img_size=args.img_size, compile_backend=args.compile_backend,
                    tolerances={k: {'rtol': v.rtol, 'atol': v.atol} for k, v in TOLERANCES.items()})
    if existing is not None and args.write and existing.get('settings', {}) != settings and \
            (set(models) != set(registry) or set(targets) != set(TARGETS)):
        parser.error('a partial run must use the settings of export_status.json (img size, backend, tolerances): '
                     f'{existing.get("settings")}; re-measure everything to change them')
    start = time.perf_counter()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    rows = {name: measure(name, targets, settings, log) for name in models}
    log(f'measured {len(models)} models x {len(targets)} targets in {time.perf_counter() - start:.0f} s')
    status = existing if (existing is not None and existing.get('settings') == settings) else \
        {'format_version': FORMAT_VERSION, 'settings': settings, 'models': {}}
    status.update(format_version=FORMAT_VERSION, settings=settings,
                  targets={t: TARGET_LABELS[t] for t in TARGETS})
    for name, row in rows.items():
        if name in status['models'] and set(targets) != set(TARGETS):
            merged = dict(status['models'][name]['targets'], **row['targets'])
            row = dict(row, targets={t: merged[t] for t in TARGETS if t in merged})
        status['models'][name] = row
    status['models'] = {k: v for k, v in status['models'].items() if k in registry}
    if not args.write:
        print(render_export_matrix(dict(status, models=dict(sorted(status['models'].items())))))
        return 0
    for file in write_status(status, args.status_file):
        log(f'wrote {file}')
    _update_docs(args.page, load_export_status(args.status_file))
    failed = [(n, t) for n, row in rows.items() for t, r in row['targets'].items()
              if r['status'] in ('mismatch', 'error')]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
