#!/usr/bin/env python
"""AN networks against their timm BatchNorm twins, measured in the same run.

    python scripts/benchmark.py                                  # CPU defaults (the README's CPU table)
    python scripts/benchmark.py --device cuda --precision bf16 --compile both --batch-infer 256 --batch-train 128
    python scripts/benchmark.py --impl reference                 # the reference AN layer instead of the fast one

For each pair (an_resnet50 / resnet50, an_resnext50_32x4d / resnext50_32x4d, an_mobilenetv2_100 / mobilenetv2_100,
an_aognet_12m / aognet_12m, an_densenet121 / densenet121, an_resnet50_all / resnet50) and each requested mode it measures images/s of inference and of a full training step (forward, backward, SGD
step), AN and BN interleaved round by round (AN first in odd rounds, BN first in even ones) because shared
machines are noisy, and reports the median of the per-round AN/BN ratios with its spread (min..max). Deterministic
memory measures: bytes autograd saves for backward in one training forward (torch.autograd.graph
.saved_tensors_hooks, deduplicated by storage, the model's parameters and buffers left out) and, on CUDA, peak allocated memory of a training step.
Prints a table and writes JSON (--json) with the environment (versions, CPU/GPU, threads).
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import timm

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


def _runner(model: torch.nn.Module, mode: str, x: torch.Tensor, precision: str, compiled: bool) -> Callable:
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    if mode == 'infer':
        model.eval()
        fn = torch.compile(model) if compiled else model

        def step():
            with torch.inference_mode(), _autocast(x.device, precision):
                fn(x)
    else:
        model.train()
        fn = torch.compile(model) if compiled else model
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
    steps, peaks = {}, {}
    for name in (an_name, bn_name):
        model = timm.create_model(name).to(device).to(memory_format=torch.channels_last)
        steps[name] = _runner(model, mode, x, args.precision, compiled)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):  # includes compilation
            steps[name]()
        _sync(device)
        if device.type == 'cuda':
            peaks[name] = torch.cuda.max_memory_allocated(device)
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
        an_images_per_s=statistics.median(ips[an_name]), bn_images_per_s=statistics.median(ips[bn_name]))
    if peaks:
        result['peak_memory_ratio'] = peaks[an_name] / peaks[bn_name] if mode == 'train' else None
    return result


def environment(device: torch.device) -> Dict:
    env = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
               platform=platform.platform(), processor=platform.processor() or platform.machine(),
               threads=torch.get_num_threads(), an_zoo_impl=os.environ.get('AN_ZOO_IMPL', 'fast'))
    try:
        import an_zoo
        env['an_zoo'] = an_zoo.__version__
    except ImportError:
        pass
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
    else:
        try:
            with open('/proc/cpuinfo') as f:
                env['cpu'] = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
        except OSError:
            pass
        env['cpu_count'] = os.cpu_count()
    return env


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', default='fp32', choices=('fp32', 'bf16', 'fp16'))
    parser.add_argument('--compile', default='eager', choices=('eager', 'compiled', 'both'))
    parser.add_argument('--modes', default='infer,train', help='comma list of infer, train')
    parser.add_argument('--pairs', default=','.join(a for a, _ in PAIRS), help='comma list of AN model names')
    parser.add_argument('--batch-infer', type=int, default=8)
    parser.add_argument('--img-infer', type=int, default=224)
    parser.add_argument('--batch-train', type=int, default=16)
    parser.add_argument('--img-train', type=int, default=128)
    parser.add_argument('--rounds', type=int, default=7, help='interleaved AN/BN rounds (median reported)')
    parser.add_argument('--iters', type=int, default=3, help='steps timed per round')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--impl', choices=('fast', 'reference'), help='AN implementation (sets AN_ZOO_IMPL)')
    parser.add_argument('--memory-only', action='store_true', help='only the saved-activation measure')
    parser.add_argument('--json', help='write the results here')
    args = parser.parse_args(argv)
    if args.impl:
        os.environ['AN_ZOO_IMPL'] = args.impl
    import an_zoo  # noqa: F401  (registers the an_* models; after AN_ZOO_IMPL is set)
    device = torch.device(args.device)
    torch.manual_seed(0)
    wanted = args.pairs.split(',')
    pairs = [p for p in PAIRS if p[0] in wanted]
    results = dict(environment=environment(device), args=vars(args), memory=[], speed=[])

    for an_name, bn_name in pairs:
        x = torch.randn(args.batch_train, 3, args.img_train, args.img_train, device=device)
        x = x.to(memory_format=torch.channels_last)
        sizes = {n: saved_activation_bytes(timm.create_model(n).to(device).to(memory_format=torch.channels_last),
                                           x, args.precision) for n in (an_name, bn_name)}
        results['memory'].append(dict(an=an_name, bn=bn_name, an_bytes=sizes[an_name], bn_bytes=sizes[bn_name],
                                      ratio=sizes[an_name] / sizes[bn_name]))
        print(f'saved activations  {an_name:22s} / {bn_name:18s} {sizes[an_name] / sizes[bn_name]:.4f} '
              f'({sizes[an_name] / 2**20:.1f} / {sizes[bn_name] / 2**20:.1f} MiB)', flush=True)
    if not args.memory_only:
        compiled_modes = {'eager': (False,), 'compiled': (True,), 'both': (False, True)}[args.compile]
        for an_name, bn_name in pairs:
            for mode in args.modes.split(','):
                for compiled in compiled_modes:
                    r = measure_pair(an_name, bn_name, mode, args, device, compiled)
                    results['speed'].append(r)
                    extra = f'  peak mem {r["peak_memory_ratio"]:.3f}' if r.get('peak_memory_ratio') else ''
                    print(f'{mode:5s} {"compiled" if compiled else "eager":8s} {args.precision} {an_name:22s} '
                          f'AN/BN images/s {r["ratio_median"]:.3f} (min {r["ratio_min"]:.3f}, max '
                          f'{r["ratio_max"]:.3f}; AN {r["an_images_per_s"]:.1f}, BN {r["bn_images_per_s"]:.1f} '
                          f'img/s){extra}', flush=True)
    print(json.dumps(results['environment']))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
