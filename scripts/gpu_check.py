#!/usr/bin/env python
"""The one command for a GPU: every check that needs CUDA, in under 8 minutes on one GPU, written to one folder.

    python scripts/gpu_check.py --out gpu_out            # on a machine with a CUDA GPU
    python scripts/gpu_check.py --out /tmp/x --dry-run   # the same plan on the CPU at toy sizes (no GPU needed)

Sections, in order, each a subprocess with its own time limit and all of them under one overall budget (a section
that cannot start in time is recorded as skipped, one that runs past its limit is killed and recorded as timed out):

1. ``tests``: the CUDA-only pytest cases (``-k cuda`` in tests/test_numerics.py and tests/test_determinism.py: bf16 /
   fp16 numerics of the layer and models, bit-identical CUDA training steps); pass / fail / skip counts and the
   failed test ids.
2. ``eager``: scripts/benchmark.py on CUDA in bf16 autocast, channels_last, eager, inference and training, for
   ResNet-50, ResNeXt-50, MobileNetV2 and AOGNet-12M against their BN twins (images/s ratio, saved-for-backward
   bytes, peak allocated memory).
3. ``compiled-<pair>``: the same with ``torch.compile``, one pair per section (ResNet-50 first), training before
   inference, while budget lasts. The benchmark rewrites its JSON after each measure, so a section stopped by its
   limit still reports what it finished.

Writes ``gpu_results.json`` (environment, every section's command, status, seconds and results) and
``gpu_results.md`` (the benchmark table of scripts/bench_report.py and the test counts) to ``--out``.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / 'scripts'
sys.path.insert(0, str(SCRIPTS))

GPU_PAIRS = ('an_resnet50', 'an_mobilenetv2_100', 'an_resnext50_32x4d', 'an_aognet_12m')
TEST_FILES = ('tests/test_numerics.py', 'tests/test_determinism.py')
# CUDA benchmark settings: ImageNet resolution, batches that keep an H100 / H200 busy
GPU_BENCH = ['--device', 'cuda', '--precision', 'bf16', '--batch-infer', '256', '--img-infer', '224',
             '--batch-train', '128', '--img-train', '224', '--rounds', '5', '--iters', '5', '--warmup', '3']
# the same plan on the CPU at toy sizes; the compile sections trace with the 'eager' backend (no C++ build)
DRY_BENCH = ['--device', 'cpu', '--precision', 'fp32', '--threads', '1', '--batch-infer', '2', '--img-infer', '32',
             '--batch-train', '2', '--img-train', '32', '--rounds', '1', '--iters', '1', '--warmup', '1']
DRY_PAIRS = ('an_resnet18:resnet18',)
# (section, time limit in s, least time worth starting it with)
# (inductor compiles an AN network in 3-4x the time of its twin: a compiled pair is the longest section)
LIMITS = {'tests': (120, 30), 'eager': (120, 40), 'compiled': (240, 100)}


def _run(cmd: List[str], limit: float, env: Dict[str, str], log: Path) -> Dict:
    """``cmd`` in its own process group, killed with its children after ``limit`` seconds; output to ``log``."""
    start = time.monotonic()
    with open(log, 'w') as out:
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=limit)
            status = 'ok' if rc == 0 else 'failed'
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, 'timed out'
    tail = log.read_text(errors='replace')[-3000:]
    return dict(command=' '.join(cmd), status=status, returncode=rc, seconds=round(time.monotonic() - start, 1),
                log=log.name, output_tail=tail if status != 'ok' else '')


def junit_summary(path: Path) -> Dict:
    """Counts and failed ids from a pytest junit XML file."""
    if not path.is_file():
        return {}
    counts = dict(passed=0, failed=0, skipped=0)
    failed = []
    for case in ET.parse(path).getroot().iter('testcase'):
        kinds = {child.tag for child in case}
        if kinds & {'failure', 'error'}:
            counts['failed'] += 1
            failed.append(f'{case.get("classname")}::{case.get("name")}')
        elif 'skipped' in kinds:
            counts['skipped'] += 1
        else:
            counts['passed'] += 1
    return dict(counts, failed_ids=failed)


def tests_section(out: Path, dry_run: bool, limit: float, env: Dict[str, str]) -> Dict:
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-k', 'cuda', *TEST_FILES]
    if dry_run:  # no GPU to run them on: the selection must still name the CUDA cases
        cmd.append('--collect-only')
    else:
        cmd += ['-rfE', f'--junitxml={out / "cuda_tests.xml"}']
    result = _run(cmd, limit, env, out / 'tests.log')
    if dry_run:
        log = (out / 'tests.log').read_text()
        result['collected'] = sum(1 for line in log.splitlines() if '::' in line and 'cuda' in line)
        if result['collected'] == 0:
            result['status'] = 'failed'
    else:
        result.update(junit_summary(out / 'cuda_tests.xml'))
    return result


def bench_section(name: str, out: Path, pairs: List[str], extra: List[str], base: List[str], limit: float,
                  env: Dict[str, str]) -> Dict:
    json_path = out / f'{name}.json'
    cmd = [sys.executable, str(SCRIPTS / 'benchmark.py'), *base, '--pairs', ','.join(pairs), *extra,
           '--json', str(json_path)]
    result = _run(cmd, limit, env, out / f'{name}.log')
    if json_path.is_file():
        result['results'] = json.loads(json_path.read_text())
    return result


def markdown(report: Dict) -> str:
    import bench_report
    lines = [f'# GPU check ({"dry run on the CPU" if report["dry_run"] else "CUDA"}), '
             f'{report["seconds"]:.0f} s of a {report["budget_s"]:.0f} s budget', '',
             '| section | status | seconds | notes |', '|---|---|---|---|']
    for s in report['sections']:
        notes = ''
        if s['name'] == 'tests':
            notes = (f'collected {s.get("collected", 0)}' if report['dry_run'] else
                     f'passed {s.get("passed", 0)}, failed {s.get("failed", 0)}, skipped {s.get("skipped", 0)}'
                     + (f'; failed: {", ".join(s["failed_ids"])}' if s.get('failed_ids') else ''))
        lines.append(f'| {s["name"]} | {s["status"]} | {s.get("seconds", 0)} | {notes} |')
    merged = bench_report.merge([s['results'] for s in report['sections'] if s.get('results')])
    if merged['speed'] or merged['memory']:
        lines += ['', bench_report.render(merged)]
    return '\n'.join(lines) + '\n'


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='gpu_out', help='folder for gpu_results.json / .md and the logs')
    parser.add_argument('--budget', type=float, default=450, help='seconds for all sections together')
    parser.add_argument('--dry-run', action='store_true', help='the whole plan on the CPU at toy sizes')
    parser.add_argument('--sections', default='tests,eager,compiled', help='comma list of tests, eager, compiled')
    parser.add_argument('--pairs', help=f'comma list of AN models to benchmark (default {",".join(GPU_PAIRS)})')
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print('no CUDA device: run with --dry-run to check the plan on the CPU', file=sys.stderr)
            return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])),
               CUBLAS_WORKSPACE_CONFIG=':4096:8')
    base, pairs = (DRY_BENCH, list(DRY_PAIRS)) if args.dry_run else (GPU_BENCH, list(GPU_PAIRS))
    if args.pairs:
        pairs = args.pairs.split(',')
    # dry run: compile traced only, inference only (scripts/benchmark.py's own test covers compiled training)
    compile_extra = (['--compile-backend', 'eager', '--modes', 'infer'] if args.dry_run
                     else ['--modes', 'train,infer'])
    wanted = args.sections.split(',')
    start = time.monotonic()
    sections: List[Dict] = []

    def section(name: str, kind: str, fn) -> None:
        limit, least = LIMITS[kind]
        left = args.budget - (time.monotonic() - start)
        if left < least:
            sections.append(dict(name=name, status='skipped (budget)', seconds=0))
        else:
            sections.append(dict(name=name, **fn(min(limit, left))))
        print(f'{name}: {sections[-1]["status"]} ({sections[-1]["seconds"]} s)', flush=True)

    if 'tests' in wanted:
        section('tests', 'tests', lambda limit: tests_section(out, args.dry_run, limit, env))
    if 'eager' in wanted:
        section('eager', 'eager', lambda limit: bench_section('eager', out, pairs, ['--compile', 'eager'], base,
                                                              limit, env))
    if 'compiled' in wanted:
        for pair in pairs:
            name = f'compiled-{pair.split(":")[0]}'
            section(name, 'compiled', lambda limit, pair=pair, name=name: bench_section(
                name, out, [pair], ['--compile', 'compiled', '--skip-memory', *compile_extra], base, limit, env))
    report = dict(dry_run=args.dry_run, budget_s=args.budget, seconds=round(time.monotonic() - start, 1),
                  sections=sections)
    (out / 'gpu_results.json').write_text(json.dumps(report, indent=2))
    (out / 'gpu_results.md').write_text(markdown(report))
    print((out / 'gpu_results.md').read_text())
    return 0 if all(s['status'] in ('ok', 'skipped (budget)') for s in sections) else 1


if __name__ == '__main__':
    sys.exit(main())
