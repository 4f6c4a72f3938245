"""Per-layer cost of one AN layer against the BatchNorm it replaces, at the shapes of real layers.

For a few AN layers of a network (spread over its stages) this takes the layer and the same-named norm of the BN
twin, records the input shape each sees in the network, and times one call of each on the same input, AN and BN
interleaved round by round (median of the rounds):

* ``infer``: one eval-mode call under ``torch.inference_mode``;
* ``train``: one training-mode forward and backward (input gradient and parameter gradients).

Each is measured twice: at the real ``(N, C, H, W)`` and at ``(N, C, 1, 1)``. The second has the same small
``(N, C)`` / ``(N, K)`` attention and mixture ops and almost no data, so its AN - BN difference is the layer's
fixed overhead (kernel launches and dispatch of the small ops); what the real shape adds on top is the part that
grows with ``H * W`` (for AN in eval: one more read of ``x``, since BatchNorm is folded to one pass but the
attention input needs the instance statistics of ``x`` first). Used by ``scripts/benchmark.py --layers``.
"""
import statistics
import time
from typing import Callable, Dict, List, Sequence

import timm
import torch
from torch import nn

# AN model -> its BN twin; the sites default to ``sites`` AN layers evenly spread over the network
DEFAULT_NETWORKS = (('an_resnet50', 'resnet50'), ('an_mobilenetv2_100', 'mobilenetv2_100'))


def an_layers(model: nn.Module) -> List[str]:
    """Names of the model's AN layers, in forward order of registration."""
    from an_zoo.export import an_layer_names
    return an_layer_names(model)


def input_shapes(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> Dict[str, torch.Size]:
    """Shape of the input each named module sees in one eval forward of ``x``."""
    modules = dict(model.named_modules())
    shapes: Dict[str, torch.Size] = {}
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: shapes.__setitem__(n, a[0].shape))
             for n in names]
    try:
        with torch.inference_mode():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def pick_sites(names: Sequence[str], count: int) -> List[str]:
    """``count`` names evenly spread over ``names`` (first and last included)."""
    if count >= len(names):
        return list(names)
    if count == 1:
        return [names[0]]
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


def _step(layer: nn.Module, x: torch.Tensor, mode: str, device: torch.device) -> Callable[[], None]:
    if mode == 'infer':
        layer.eval()

        def step() -> None:
            with torch.inference_mode():
                layer(x)
        return step
    layer.train()
    xg = x.detach().clone().requires_grad_(True)

    def step() -> None:
        out = layer(xg)
        out.backward(torch.ones_like(out))
        xg.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def _seconds(step: Callable[[], None], iters: int, device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def time_pair(an_layer: nn.Module, bn_layer: nn.Module, x: torch.Tensor, mode: str, rounds: int, iters: int,
              device: torch.device) -> Dict[str, float]:
    """Median µs per call of each layer on ``x`` (interleaved rounds) and the median per-round difference."""
    steps = {'an': _step(an_layer, x, mode, device), 'bn': _step(bn_layer, x, mode, device)}
    for step in steps.values():
        step()  # warm-up (allocator, first-call dispatch)
    times: Dict[str, List[float]] = {'an': [], 'bn': []}
    diffs = []
    for r in range(rounds):
        order = ('an', 'bn') if r % 2 == 0 else ('bn', 'an')
        got = {k: _seconds(steps[k], iters, device) for k in order}
        for k in order:
            times[k].append(got[k] * 1e6)
        diffs.append((got['an'] - got['bn']) * 1e6)
    # best-of-rounds difference: on a shared machine a round can lose a whole scheduler slice (~1 ms), which the
    # median of small per-call differences does not always hide; the fastest round of each is the least disturbed
    return dict(an_us=statistics.median(times['an']), bn_us=statistics.median(times['bn']),
                diff_us=statistics.median(diffs), diff_us_min=min(diffs), diff_us_max=max(diffs),
                diff_us_best=min(times['an']) - min(times['bn']))


def measure_network(an_name: str, bn_name: str, sites: int = 4, batch: int = 8, img: int = 224,
                    modes: Sequence[str] = ('infer', 'train'), rounds: int = 7, iters: int = 20,
                    device: torch.device = torch.device('cpu')) -> Dict:
    """Per-layer AN - BN cost at ``sites`` real layers of ``an_name`` (input ``batch`` x 3 x ``img`` x ``img``).

    Returns the network's AN layer count and, per site and mode, the µs per call of AN and BN at the real shape
    and at ``(N, C, 1, 1)`` (the fixed part)."""
    torch.manual_seed(0)
    an_model = timm.create_model(an_name).to(device)
    bn_model = timm.create_model(bn_name).to(device)
    names = an_layers(an_model)
    chosen = pick_sites(names, sites)
    x = torch.randn(batch, 3, img, img, device=device)
    shapes = input_shapes(an_model, chosen, x)
    an_modules, bn_modules = dict(an_model.named_modules()), dict(bn_model.named_modules())
    rows = []
    for name in chosen:
        an_layer = an_modules[name]
        bn_layer = bn_modules.get(name)
        if bn_layer is None:  # no same-named norm in the twin: the plain BatchNorm of that width
            bn_layer = nn.BatchNorm2d(shapes[name][1]).to(device)
        n, c, h, w = shapes[name]
        row = dict(layer=name, shape=[n, c, h, w], num_mixtures=getattr(an_layer, 'num_mixtures', None),
                   an_type=type(an_layer).__name__, bn_type=type(bn_layer).__name__)
        for mode in modes:
            real = torch.randn(n, c, h, w, device=device).to(memory_format=torch.channels_last)
            tiny = torch.randn(n, c, 1, 1, device=device).to(memory_format=torch.channels_last)
            row[mode] = time_pair(an_layer, bn_layer, real, mode, rounds, iters, device)
            row[mode + '_fixed'] = time_pair(an_layer, bn_layer, tiny, mode, rounds, iters, device)
        rows.append(row)
    return dict(an=an_name, bn=bn_name, an_layers=len(names), batch=batch, img=img, sites=rows)


def summary(network: Dict, mode: str) -> Dict[str, float]:
    """Median over the sites of the AN - BN µs per layer (fixed part: best-of-rounds difference at (N, C, 1, 1)),
    and the fixed part times the network's AN layer count."""
    fixed = statistics.median(s[mode + '_fixed']['diff_us_best'] for s in network['sites'])
    real = statistics.median(s[mode]['diff_us'] for s in network['sites'])
    return dict(fixed_us_per_layer=fixed, real_us_per_layer=real, fixed_us_per_forward=fixed * network['an_layers'])
