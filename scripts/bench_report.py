"""The stated performance targets of each AN/BN pair, and the markdown tables generated from a benchmark's JSON.

``scripts/benchmark.py --markdown FILE`` (or ``python scripts/bench_report.py eager.json compiled.json``, which
merges runs) renders the results of ``scripts/benchmark.py --json``, so the documentation's tables are the measured
output, never retyped.
"""
import argparse
import json
import sys
from typing import Dict, List, Optional

# AN model -> AN/BN images/s targets (CPU eager inference and training step) and saved-for-backward bytes bound,
# with what limits the ratio. The reference pairs' targets are the issue's; the others follow from their AN
# layer count and width against the twin's time per image (scripts/bench_layers.py measures the per-layer cost).
TARGETS: Dict[str, Dict] = {
    'an_resnet50': dict(infer=0.97, train=0.97, saved=1.02,
                        limit='16 AN layers (the 3x3 conv norms); per layer a few small (N, C) / (N, K) ops and, '
                              'in eval, one more read of x for the attention statistics'),
    'an_resnext50_32x4d': dict(infer=0.97, train=0.97, saved=1.02,
                               limit='as ResNet-50: 16 AN layers, widths 128..1024'),
    'an_mobilenetv2_100': dict(infer=0.90, train=0.90, saved=1.02,
                               limit='17 AN layers at the depthwise outputs of a network with little compute per '
                                     'byte: the extra read of x and the fixed per-layer ops weigh more'),
    'an_aognet_12m': dict(infer=0.93, train=0.93, saved=1.02,
                          limit='24 AN layers on node outputs: the size-dependent passes (the moments pass over x in '
                                'eval, the extra gradient passes in training); the fixed part is < 1 % of a step'),
    'an_densenet121': dict(infer=0.88, train=0.88, saved=1.02,
                           limit='58 AN layers (the 128-channel bottleneck norm of every dense layer) between thin '
                                 '(32-output) convs: fixed per-layer ops x 58 and the extra backward passes weigh '
                                 'more than next to wide convs'),
    'an_resnet50_all': dict(infer=0.92, train=0.92, saved=1.02,
                            limit='53 AN layers (every norm), 3.3x the AN layers of an_resnet50, each with the '
                                  'same per-layer fixed overhead and eval read of x'),
}


def _ratio(r: Optional[Dict]) -> str:
    if not r:
        return 'n/m'
    return f'{r["ratio_median"]:.3f} ({r["ratio_min"]:.3f}..{r["ratio_max"]:.3f})'


def _met(value: Optional[float], target: Optional[float], higher_is_better: bool = True) -> str:
    if value is None or target is None:
        return ''
    ok = value >= target if higher_is_better else value <= target
    return ' ✓' if ok else ' ✗'


def _find(rows: List[Dict], **keys) -> Optional[Dict]:
    return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)


def speed_table(results: Dict) -> List[str]:
    """One row per pair: eager / compiled ratios, saved bytes, ORT ratio, and the targets."""
    args = results.get('args', {})
    speed, memory, ort = results.get('speed', []), results.get('memory', []), results.get('ort', [])
    names = [m['an'] for m in memory] or list(dict.fromkeys(r['an'] for r in speed))
    for extra in [r['an'] for r in speed] + [r['an'] for r in ort]:
        if extra not in names:
            names.append(extra)
    lines = [f'AN/BN images/s, median (min..max) of {args.get("rounds", "?")} interleaved rounds, '
             f'{results.get("environment", {}).get("device", "cpu")} {args.get("precision", "fp32")} channels_last; '
             f'inference batch {args.get("batch_infer")} at {args.get("img_infer")} px, training batch '
             f'{args.get("batch_train")} at {args.get("img_train")} px. ✓/✗: against the target.', '',
             '| AN model | BN twin | inference eager | training eager | inference compiled | training compiled '
             '| saved bytes AN/BN | peak memory AN/BN | ONNX Runtime inference | targets (infer / train / saved) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for an in names:
        target = TARGETS.get(an, {})
        cells = []
        for mode in ('infer', 'train'):
            for compiled in (False, True):
                r = _find(speed, an=an, mode=mode, compiled=compiled)
                cells.append((mode, compiled, r))
        eager = [_ratio(r) + (_met(r['ratio_median'], target.get(mode)) if r else '')
                 for mode, compiled, r in cells if not compiled]
        compiled = [_ratio(r) for mode, c, r in cells if c]
        mem = _find(memory, an=an)
        saved = f'{mem["ratio"]:.4f}{_met(mem["ratio"], target.get("saved"), False)}' if mem else 'n/m'
        train = _find(speed, an=an, mode='train', compiled=False) or _find(speed, an=an, mode='train')
        peak = f'{train["peak_memory_ratio"]:.3f}' if train and train.get('peak_memory_ratio') else 'n/m'
        o = _find(ort, an=an)
        bn = (mem or train or o or {}).get('bn', '')
        goal = f'{target["infer"]} / {target["train"]} / ≤ {target["saved"]}' if target else ''
        lines.append(f'| {an} | {bn} | {eager[0]} | {eager[1]} | {compiled[0]} | {compiled[1]} | {saved} | {peak} '
                     f'| {_ratio(o)} | {goal} |')
    return lines


def layer_table(results: Dict) -> List[str]:
    """Per-layer AN - BN µs per call at real shapes and at (N, C, 1, 1) (the fixed part)."""
    networks = results.get('layers', [])
    if not networks:
        return []
    lines = ['| network (AN layers) | layer | input (N, C, H, W) | K | mode | AN µs | BN µs | AN - BN µs '
             '| fixed part: AN - BN µs at (N, C, 1, 1) | fixed, best of rounds |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for net in networks:
        for site in net['sites']:
            for mode in ('infer', 'train'):
                if mode not in site:
                    continue
                r, f = site[mode], site[mode + '_fixed']
                lines.append(f'| {net["an"]} ({net["an_layers"]}) | {site["layer"]} | {tuple(site["shape"])} '
                             f'| {site["num_mixtures"]} | {mode} | {r["an_us"]:.0f} | {r["bn_us"]:.0f} '
                             f'| {r["diff_us"]:.0f} ({r["diff_us_min"]:.0f}..{r["diff_us_max"]:.0f}) '
                             f'| {f["diff_us"]:.0f} ({f["diff_us_min"]:.0f}..{f["diff_us_max"]:.0f}) '
                             f'| {f.get("diff_us_best", float("nan")):.0f} |')
    return lines


def ort_ops(results: Dict) -> List[str]:
    """Op counts of the onnxruntime-optimized graphs that differ between AN and BN."""
    lines = []
    for o in results.get('ort', []):
        ops = sorted(set(o['an_ops']) | set(o['bn_ops']))
        diff = [f'{op} {o["an_ops"].get(op, 0)}/{o["bn_ops"].get(op, 0)}' for op in ops
                if o['an_ops'].get(op, 0) != o['bn_ops'].get(op, 0)]
        lines.append(f'- {o["an"]} / {o["bn"]} (batch {o["batch"]}, {o["img"]} px, {o["threads"]} threads): '
                     f'ops AN/BN after ORT optimization: ' + ', '.join(diff))
    return lines


def targets_list() -> List[str]:
    return [f'- **{an}**: inference ≥ {t["infer"]}, training step ≥ {t["train"]}, saved bytes ≤ {t["saved"]}x. '
            f'Limited by: {t["limit"]}.' for an, t in TARGETS.items()]


def environment_line(env: Dict) -> str:
    keys = ('cpu', 'cpu_count', 'gpu', 'threads', 'python', 'torch', 'timm', 'onnxruntime', 'an_zoo', 'an_zoo_impl')
    return ', '.join(f'{k} {env[k]}' for k in keys if k in env)


def render(results: Dict) -> str:
    """The markdown of one benchmark run: environment, pair table, per-layer table, ORT op counts."""
    parts = [f'Environment: {environment_line(results.get("environment", {}))}', '', *speed_table(results)]
    if results.get('layers'):
        parts += ['', *layer_table(results)]
    if results.get('ort'):
        parts += ['', *ort_ops(results)]
    return '\n'.join(parts) + '\n'


def merge(runs: List[Dict]) -> Dict:
    """One results dict from several runs (e.g. an eager and a compiled one): their measures concatenated, the
    environment and settings of the first run that has them."""
    merged: Dict = dict(environment={}, args={}, memory=[], speed=[], layers=[], ort=[])
    for r in runs:
        merged['environment'] = merged['environment'] or r.get('environment', {})
        merged['args'] = merged['args'] or r.get('args', {})
        for key in ('memory', 'speed', 'layers', 'ort'):
            merged[key] += r.get(key, [])
    return merged


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('json_files', nargs='+', help='outputs of scripts/benchmark.py --json (merged)')
    parser.add_argument('--targets', action='store_true', help='also list the targets and their limits')
    args = parser.parse_args(argv)
    runs = []
    for path in args.json_files:
        with open(path) as f:
            runs.append(json.load(f))
    print(render(merge(runs)))
    if args.targets:
        print('\n'.join(targets_list()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
