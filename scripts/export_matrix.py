#!/usr/bin/env python
"""Measure the export / precision status of every registered an_* model and keep ``export_status.json`` and the
README's matrix in step with it (both generated from real runs, never hand-written).

    python scripts/export_matrix.py --write             # run every target for every model (minutes), write the json
                                                        # and the README block between the export-matrix markers
    python scripts/export_matrix.py --write --models an_resnet50 --targets onnx_ort,jit_script   # re-measure a part
    python scripts/export_matrix.py --check             # no runs: the json covers the registry, the README block
                                                        # is its rendering (exit 1 otherwise; run by the tests)
    python scripts/export_matrix.py --render            # print the README block rendered from the json
    python scripts/export_matrix.py --update-readme     # no runs: rewrite the README block from the json

Targets (an_zoo.export.TARGETS): torch.compile fullgraph, ONNX + onnxruntime parity with a dynamic batch,
torch.export, torch.jit.script, torch.jit.trace, channels_last, bf16 / fp16 autocast on CPU, and the same on CUDA
(recorded as "not measured (no GPU)" without one). Models are randomly initialised, with non-degenerate norm affines
and running statistics calibrated on image-like data (an_zoo.export.prepare_for_checks), so that the checks exercise
every AN layer.
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch

import an_zoo  # noqa: F401  (registers the models)
from an_zoo import export as ex
from an_zoo._io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
STATUS = REPO / 'export_status.json'
README = REPO / 'README.md'
MARKER = 'export-matrix'
FORMAT_VERSION = 1
DEFAULT_SETTINGS = {'img_size': 64, 'export_batch': 2, 'check_batch': 3, 'compile_backend': 'inductor',
                    'onnx_exporter': 'dynamo', 'opset': ex.DEFAULT_OPSET['dynamo'], 'seed': 0}


def registered_models() -> List[str]:
    return timm.list_models('an_*')


def measure(name: str, targets: Sequence[str], settings: Dict[str, Any], log=print) -> Dict[str, Any]:
    """Run ``targets`` on a fresh ``name`` and return its row of the status file."""
    size = settings['img_size']
    torch.manual_seed(settings['seed'])
    model = timm.create_model(name)
    input_size = (model.pretrained_cfg.get('input_size') or (3, size, size))[0], size, size
    ex.prepare_for_checks(model, input_size, seed=settings['seed'])
    x = ex.example_batch(settings['export_batch'], input_size, seed=settings['seed'] + 1)
    x_check = ex.example_batch(settings['check_batch'], input_size, seed=settings['seed'] + 2)
    results = {}
    for target in targets:
        kwargs: Dict[str, Any] = {}
        if target == 'compile_fullgraph':
            kwargs['backend'] = settings['compile_backend']
        elif target == 'onnx_ort':
            kwargs.update(exporter=settings['onnx_exporter'], opset=settings['opset'])
        result = ex.run_target(target, model, x, x_check, **kwargs)
        results[target] = result.as_dict()
        diff = f' max abs diff {result.max_abs_diff:.2e} (tol {result.tolerance:.2e})' \
            if result.max_abs_diff is not None and result.tolerance is not None else ''
        log(f'{name:28s} {target:18s} {result.status}{diff} {result.message[:160]}'
            f'{f" [{result.seconds:.1f}s]" if result.seconds is not None else ""}')
    return {'date': datetime.date.today().isoformat(), 'environment': ex.environment(), 'targets': results}


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
        absent = [t for t in ex.TARGETS if t not in row.get('targets', {})]
        if absent:
            problems.append(f'{name}: targets not measured: {absent}')
        for target, record in row.get('targets', {}).items():
            if record.get('status') not in ('ok', 'mismatch', 'error', 'not measured'):
                problems.append(f'{name} {target}: unknown status {record.get("status")!r}')
            if target in ex.CUDA_TARGETS and record.get('status') == 'not measured' and \
                    row.get('environment', {}).get('gpu'):
                problems.append(f'{name} {target}: a GPU was present but the target is not measured')
            if target in ex.CUDA_TARGETS and record.get('status') != 'not measured' and \
                    not row.get('environment', {}).get('gpu'):
                problems.append(f'{name} {target}: status {record.get("status")!r} without a GPU')
    return problems


def readme_block(text: str) -> Optional[str]:
    """The content between the README's export-matrix markers, or None when the markers are absent."""
    start, end = f'<!-- {MARKER}:start -->', f'<!-- {MARKER}:end -->'
    if start not in text or end not in text.partition(start)[2]:
        return None
    return text.partition(start)[2].partition(end)[0].strip('\n')


def replace_block(text: str, content: str) -> str:
    start, end = f'<!-- {MARKER}:start -->', f'<!-- {MARKER}:end -->'
    head, _, rest = text.partition(start)
    return f'{head}{start}\n{content}\n{end}{rest.partition(end)[2]}'


def write_status(status: Dict[str, Any], path: Path = STATUS) -> None:
    status['models'] = dict(sorted(status['models'].items()))
    path = path.resolve()  # the packaged an_zoo/export_status.json is a symlink to this file
    atomic_write_text(path, json.dumps(status, indent=2, ensure_ascii=False) + '\n')


def _update_readme(readme: Path, status: Dict[str, Any]) -> bool:
    text = readme.read_text(encoding='utf-8') if readme.is_file() else ''
    if readme_block(text) is None:
        print(f'{readme} has no <!-- {MARKER}:start --> ... <!-- {MARKER}:end --> block: not updated', file=sys.stderr)
        return False
    readme.write_text(replace_block(text, ex.render_export_matrix(status)), encoding='utf-8')
    print(f'updated the export matrix in {readme.name}', file=sys.stderr)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--write', action='store_true', help='run, then write export_status.json and the README block')
    mode.add_argument('--check', action='store_true', help='no runs: fail if the json or the README is out of date')
    mode.add_argument('--render', action='store_true', help='print the README block from export_status.json')
    mode.add_argument('--update-readme', action='store_true',
                      help='no runs: rewrite the README block from export_status.json')
    parser.add_argument('--models', default='', help='comma-separated models (default: every registered an_*)')
    parser.add_argument('--targets', default='', help=f'comma-separated targets (default: all of {list(ex.TARGETS)})')
    parser.add_argument('--img-size', type=int, default=DEFAULT_SETTINGS['img_size'])
    parser.add_argument('--compile-backend', default=DEFAULT_SETTINGS['compile_backend'])
    parser.add_argument('--status-file', type=Path, default=STATUS, help=argparse.SUPPRESS)
    parser.add_argument('--readme', type=Path, default=README, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    registry = registered_models()
    existing = ex.load_export_status(args.status_file)

    if args.update_readme:
        if existing is None:
            print(f'{args.status_file} is missing: run with --write', file=sys.stderr)
            return 1
        return 0 if _update_readme(args.readme, existing) else 1

    if args.check or args.render:
        problems = check_status(existing, registry) if args.check else []
        if existing is not None and args.render:
            print(ex.render_export_matrix(existing))
        if args.check and existing is not None:
            block = readme_block(args.readme.read_text(encoding='utf-8')) if args.readme.is_file() else None
            if block is None:
                print(f'note: {args.readme.name} has no <!-- {MARKER}:start/end --> block; not compared',
                      file=sys.stderr)
            elif block != ex.render_export_matrix(existing):
                problems.append(f'{args.readme.name} export matrix is out of date: run python scripts/export_matrix.py '
                                f'--write (or --render and paste)')
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0

    models = [m for m in args.models.split(',') if m] or registry
    unknown = [m for m in models if m not in registry]
    targets = [t for t in args.targets.split(',') if t] or list(ex.TARGETS)
    bad = [t for t in targets if t not in ex.TARGETS]
    if unknown or bad:
        parser.error(f'unknown models {unknown} / targets {bad}')
    settings = dict(DEFAULT_SETTINGS, img_size=args.img_size, compile_backend=args.compile_backend,
                    tolerances={k: {'rtol': v.rtol, 'atol': v.atol} for k, v in ex.TOLERANCES.items()})
    if existing is not None and args.write and existing.get('settings', {}) != settings and \
            (set(models) != set(registry) or set(targets) != set(ex.TARGETS)):
        parser.error('a partial run must use the settings of export_status.json (img size, backend, tolerances): '
                     f'{existing.get("settings")}; re-measure everything to change them')
    start = time.perf_counter()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    rows = {name: measure(name, targets, settings, log) for name in models}
    log(f'measured {len(models)} models x {len(targets)} targets in {time.perf_counter() - start:.0f} s')
    status = existing if (existing is not None and existing.get('settings') == settings) else \
        {'format_version': FORMAT_VERSION, 'settings': settings, 'models': {}}
    status.update(format_version=FORMAT_VERSION, settings=settings,
                  targets={t: ex.TARGET_LABELS[t] for t in ex.TARGETS})
    for name, row in rows.items():
        if name in status['models'] and set(targets) != set(ex.TARGETS):
            merged = dict(status['models'][name]['targets'], **row['targets'])
            row = dict(row, targets={t: merged[t] for t in ex.TARGETS if t in merged})
        status['models'][name] = row
    status['models'] = {k: v for k, v in status['models'].items() if k in registry}
    if not args.write:
        print(ex.render_export_matrix(dict(status, models=dict(sorted(status['models'].items())))))
        return 0
    write_status(status, args.status_file)
    log(f'wrote {args.status_file}')
    _update_readme(args.readme, ex.load_export_status(args.status_file))
    failed = [(n, t) for n, row in rows.items() for t, r in row['targets'].items() if r['status'] in ('mismatch', 'error')]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
