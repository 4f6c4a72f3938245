#!/usr/bin/env python
"""AN networks against their timm BatchNorm twins, measured in the same run.

    python scripts/benchmark.py                                  # CPU defaults (the CPU table of docs/performance.md)
    python scripts/benchmark.py --compile both --layers --ort --json out.json --markdown out.md   # the full CPU set
    python scripts/benchmark.py --device cuda --precision bf16 --compile both --batch-infer 256 --batch-train 128
    python scripts/benchmark.py --impl reference                 # the reference AN layer instead of the fast one

For each pair (an_resnet50 / resnet50, an_resnext50_32x4d / resnext50_32x4d, an_mobilenetv2_100 / mobilenetv2_100,
an_aognet_12m / aognet_12m, an_densenet121 / densenet121, an_resnet50_all / resnet50; ``--pairs`` also takes
``an_name:bn_name``) and each requested mode it measures images/s of inference and of a full training step (forward,
backward, SGD step), eager and / or ``torch.compile``d, AN and BN interleaved round by round (AN first in odd
rounds, BN first in even ones) because shared machines are noisy, and reports the median of the per-round AN/BN
ratios with its spread (min..max). Deterministic memory measures: bytes autograd saves for backward in one training
forward (torch.autograd.graph.saved_tensors_hooks, deduplicated by storage, the model's parameters and buffers left
out) and, on CUDA, peak allocated memory of a training step. ``--layers``: per-layer AN - BN µs at real layer shapes
(scripts/bench_layers.py); ``--ort``: ONNX Runtime CPU inference ratio of ``export_onnx`` files
(scripts/bench_ort.py). Prints a table and writes JSON (--json) with the environment (versions, CPU/GPU, threads)
and markdown (--markdown, scripts/bench_report.py) with the targets.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import timm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench_* helpers next to this file

PAIRS = (('an_resnet50', 'resnet50'), ('an_resnext50_32x4d', 'resnext50_32x4d'),
         ('an_mobilenetv2_100', 'mobilenetv2_100'), ('an_aognet_12m', 'aognet_12m'), ('an_densenet121', 'densenet121'),
         ('an_resnet50_all', 'resnet50'))


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == 'fp32':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, precision: str) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward, by storage; the model's own
    parameters and buffers are not activations (they are resident anyway) and are left out."""
    resident = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: Dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident:
            storages[ptr] = t.untyped_storage().nbytes()
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(x.device, precision):
        model(x)
    return sum(storages.values())


def _runner(model: torch.nn.Module, mode: str, x: torch.Tensor, precision: str, compiled: bool,
            backend: str = 'inductor') -> Callable:
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    if mode == 'infer':
        model.eval()
        fn = torch.compile(model, backend=backend) if compiled else model

        def step():
            with torch.inference_mode(), _autocast(x.device, precision):
                fn(x)
    else:
        model.train()
        fn = torch.compile(model, backend=backend) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            with _autocast(x.device, precision):
                loss = torch.nn.functional.cross_entropy(fn(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def _time(step: Callable, iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return time.perf_counter() - start


def measure_pair(an_name: str, bn_name: str, mode: str, args, device: torch.device, compiled: bool) -> Dict:
    batch, size = (args.batch_infer, args.img_infer) if mode == 'infer' else (args.batch_train, args.img_train)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    if compiled:
        torch._dynamo.reset()  # AN and BN twins share forward code: earlier pairs must not use up its recompile limit
    steps, peaks, compile_s = {}, {}, {}
    for name in (an_name, bn_name):
        if device.type == 'cuda':  # peak of this model's step above what is allocated before it (the other model)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        model = timm.create_model(name).to(device).to(memory_format=torch.channels_last)
        steps[name] = _runner(model, mode, x, args.precision, compiled, args.compile_backend)
        start = time.perf_counter()
        for _ in range(max(args.warmup, 1)):  # includes compilation
            steps[name]()
        _sync(device)
        compile_s[name] = time.perf_counter() - start
        if device.type == 'cuda':
            peaks[name] = torch.cuda.max_memory_allocated(device) - before
    ratios, ips = [], {an_name: [], bn_name: []}
    for r in range(args.rounds):
        order = (an_name, bn_name) if r % 2 == 0 else (bn_name, an_name)
        seconds = {name: _time(steps[name], args.iters, device) for name in order}
        for name in order:
            ips[name].append(batch * args.iters / seconds[name])
        ratios.append(seconds[bn_name] / seconds[an_name])  # AN images/s over BN images/s
    result = dict(
        an=an_name, bn=bn_name, mode=mode, compiled=compiled, precision=args.precision, batch=batch, img=size,
        ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
        an_images_per_s=statistics.median(ips[an_name]), bn_images_per_s=statistics.median(ips[bn_name]),
        warmup_s={n: round(t, 2) for n, t in compile_s.items()})
    if peaks:
        result['an_peak_bytes'], result['bn_peak_bytes'] = peaks[an_name], peaks[bn_name]
        result['peak_memory_ratio'] = peaks[an_name] / peaks[bn_name] if mode == 'train' else None
    return result


def environment(device: torch.device) -> Dict:
    """The shared machine / versions description plus what this benchmark varies (device, threads, AN path)."""
    from an_zoo._env import cpu_name, describe_environment, device_name
    env = describe_environment('onnxruntime', 'onnx')
    env.update(device=device.type, cpu=cpu_name(), cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
               an_zoo_impl=os.environ.get('AN_ZOO_IMPL', 'fast'))
    if device.type == 'cuda':
        env.update(gpu=device_name(device), cuda=torch.version.cuda)
    return env


def parse_pairs(spec: str) -> List[Tuple[str, str]]:
    """``an_resnet50,an_mobilenetv2_100`` (twins from PAIRS) or ``an_resnet18:resnet18`` (any AN / BN names)."""
    twins = dict(PAIRS)
    pairs = []
    for item in filter(None, spec.split(',')):
        an_name, _, bn_name = item.partition(':')
        if not bn_name and an_name not in twins:
            raise SystemExit(f'{an_name}: no known BN twin, give it as {an_name}:bn_model_name')
        pairs.append((an_name, bn_name or twins[an_name]))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', default='fp32', choices=('fp32', 'bf16', 'fp16'))
    parser.add_argument('--compile', default='eager', choices=('eager', 'compiled', 'both'))
    parser.add_argument('--compile-backend', default='inductor', help="torch.compile backend ('eager': trace only)")
    parser.add_argument('--compile-pairs', help='comma list: only these pairs compiled (default: all --pairs)')
    parser.add_argument('--modes', default='infer,train', help='comma list of infer, train')
    parser.add_argument('--pairs', default=','.join(a for a, _ in PAIRS),
                        help='comma list of AN model names (or an_name:bn_name)')
    parser.add_argument('--batch-infer', type=int, default=8)
    parser.add_argument('--img-infer', type=int, default=224)
    parser.add_argument('--batch-train', type=int, default=16)
    parser.add_argument('--img-train', type=int, default=128)
    parser.add_argument('--rounds', type=int, default=11, help='interleaved AN/BN rounds (median reported)')
    parser.add_argument('--iters', type=int, default=1,
                        help='steps timed per round (1: AN and BN alternate step by step, which a machine whose speed '
                             'drifts disturbs least)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--impl', choices=('fast', 'reference'), help='AN implementation (sets AN_ZOO_IMPL)')
    parser.add_argument('--memory-only', action='store_true', help='only the saved-activation measure')
    parser.add_argument('--skip-memory', action='store_true', help='no saved-activation measure')
    parser.add_argument('--layers', action='store_true', help='per-layer AN - BN µs (scripts/bench_layers.py)')
    parser.add_argument('--layer-pairs', default='an_resnet50,an_mobilenetv2_100')
    parser.add_argument('--layer-sites', type=int, default=4, help='AN layers measured per network')
    parser.add_argument('--layer-batch', type=int, default=8)
    parser.add_argument('--layer-img', type=int, default=224)
    parser.add_argument('--layer-iters', type=int, default=20)
    parser.add_argument('--ort', action='store_true', help='ONNX Runtime CPU inference ratio (scripts/bench_ort.py)')
    parser.add_argument('--ort-pairs', default='an_resnet50,an_mobilenetv2_100')
    parser.add_argument('--threads', type=int, help='torch intra-op threads (default: torch\'s)')
    parser.add_argument('--json', help='write the results here')
    parser.add_argument('--markdown', help='write the markdown tables here (scripts/bench_report.py)')
    return parser


def _print_speed(r: Dict) -> None:
    extra = f'  peak mem {r["peak_memory_ratio"]:.3f}' if r.get('peak_memory_ratio') else ''
    print(f'{r["mode"]:5s} {"compiled" if r["compiled"] else "eager":8s} {r["precision"]} {r["an"]:22s} '
          f'AN/BN images/s {r["ratio_median"]:.3f} (min {r["ratio_min"]:.3f}, max {r["ratio_max"]:.3f}; '
          f'AN {r["an_images_per_s"]:.1f}, BN {r["bn_images_per_s"]:.1f} img/s){extra}', flush=True)


def _save(results: Dict, path: Optional[str]) -> None:
    """Write the results so far: a run stopped by a time limit (scripts/gpu_check.py) keeps what it measured."""
    if path:
        tmp = f'{path}.partial'
        with open(tmp, 'w') as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, path)


def run(args: argparse.Namespace) -> Dict:
    """Every requested measure; the results dict that --json writes (rewritten after each measure)."""
    if args.impl:
        os.environ['AN_ZOO_IMPL'] = args.impl
    if args.threads:
        torch.set_num_threads(args.threads)
    import an_zoo  # noqa: F401  (registers the an_* models; after AN_ZOO_IMPL is set)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # convolution algorithms autotuned during the warm-up steps
    torch.manual_seed(0)
    pairs = parse_pairs(args.pairs)
    results = dict(environment=environment(device), args=vars(args), memory=[], speed=[], layers=[], ort=[])

    for an_name, bn_name in ([] if args.skip_memory else pairs):
        x = torch.randn(args.batch_train, 3, args.img_train, args.img_train, device=device)
        x = x.to(memory_format=torch.channels_last)
        sizes = {n: saved_activation_bytes(timm.create_model(n).to(device).to(memory_format=torch.channels_last),
                                           x, args.precision) for n in (an_name, bn_name)}
        results['memory'].append(dict(an=an_name, bn=bn_name, an_bytes=sizes[an_name], bn_bytes=sizes[bn_name],
                                      ratio=sizes[an_name] / sizes[bn_name]))
        _save(results, args.json)
        print(f'saved activations  {an_name:22s} / {bn_name:18s} {sizes[an_name] / sizes[bn_name]:.4f} '
              f'({sizes[an_name] / 2**20:.1f} / {sizes[bn_name] / 2**20:.1f} MiB)', flush=True)
    if args.memory_only:
        return results
    compiled_modes = {'eager': (False,), 'compiled': (True,), 'both': (False, True)}[args.compile]
    compile_only = {a for a, _ in parse_pairs(args.compile_pairs)} if args.compile_pairs else None
    for compiled in compiled_modes:  # all eager first: compilation state never touches an eager measure
        for an_name, bn_name in pairs:
            if compiled and compile_only is not None and an_name not in compile_only:
                continue
            for mode in args.modes.split(','):
                r = measure_pair(an_name, bn_name, mode, args, device, compiled)
                results['speed'].append(r)
                _save(results, args.json)
                _print_speed(r)
    if args.layers:
        import bench_layers
        for an_name, bn_name in parse_pairs(args.layer_pairs):
            net = bench_layers.measure_network(an_name, bn_name, sites=args.layer_sites, batch=args.layer_batch,
                                               img=args.layer_img, modes=args.modes.split(','),
                                               rounds=args.rounds, iters=args.layer_iters, device=device)
            results['layers'].append(net)
            _save(results, args.json)
            for mode in args.modes.split(','):
                s = bench_layers.summary(net, mode)
                print(f'layers {mode:5s} {an_name:22s} AN - BN per layer: {s["real_us_per_layer"]:.0f} us at real '
                      f'shapes, {s["fixed_us_per_layer"]:.0f} us fixed; x {net["an_layers"]} AN layers = '
                      f'{s["fixed_us_per_forward"] / 1e3:.2f} ms fixed per forward', flush=True)
    if args.ort:
        import bench_ort
        for an_name, bn_name in parse_pairs(args.ort_pairs):
            o = bench_ort.measure_pair(an_name, bn_name, batch=args.batch_infer, img=args.img_infer,
                                       rounds=args.rounds, iters=args.iters)
            results['ort'].append(o)
            _save(results, args.json)
            print(f'onnxruntime cpu {an_name:22s} AN/BN images/s {o["ratio_median"]:.3f} (min {o["ratio_min"]:.3f}, '
                  f'max {o["ratio_max"]:.3f}; AN {o["an_images_per_s"]:.1f}, BN {o["bn_images_per_s"]:.1f} img/s)',
                  flush=True)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    results = run(args)
    print(json.dumps(results['environment']))
    _save(results, args.json)
    if args.markdown:
        import bench_report
        with open(args.markdown, 'w') as f:
            f.write(bench_report.render(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
