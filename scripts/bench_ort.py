"""ONNX Runtime CPU inference of an AN network against its BN twin, both exported by ``an_zoo.export.export_onnx``.

Both models are exported in eval mode with the dynamo exporter (AN folded to ``x * a + b`` per instance, the
attention computed from the instance statistics of ``x``), run in one onnxruntime CPU session each with full graph
optimization (which folds the twin's BatchNormalization into the preceding Conv; the op counts reported are those of the
optimized graph), and timed AN and BN interleaved
round by round; the median of the per-round images/s ratios is reported with its spread. Used by
``scripts/benchmark.py --ort``.
"""
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import timm
import torch


def _session(path: Path, threads: int, optimized: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)  # the graph as run, to count what the optimizer fused
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no notice that the saved optimized graph is machine-specific
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def _op_counts(path: Path) -> Dict[str, int]:
    import onnx
    return dict(Counter(node.op_type for node in onnx.load(str(path)).graph.node))


def export(name: str, path: Path, img: int, batch: int) -> Path:
    """``name`` (random weights, running statistics set from one batch) exported to ``path`` at a fixed batch."""
    from an_zoo.export import export_onnx, prepare_for_checks
    model = timm.create_model(name)
    prepare_for_checks(model, (3, img, img), calibration_batch=4)
    # the folded-graph check tells full-size tensors by their spatial size: it needs maps larger than 1 x 1
    export_onnx(model, path, input_size=(3, img, img), dynamic_batch=False, batch_size=batch, check=False,
                check_graph=img >= 64)
    return path


def measure_pair(an_name: str, bn_name: str, batch: int = 8, img: int = 224, rounds: int = 7, iters: int = 3,
                 threads: Optional[int] = None, workdir: Optional[str] = None) -> Dict:
    """AN/BN images/s ratio of onnxruntime CPU inference (median, min, max over interleaved rounds)."""
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        paths = {n: export(n, Path(tmp) / f'{n}.onnx', img, batch) for n in (an_name, bn_name)}
        sessions = {n: _session(p, threads, p.with_suffix('.ort.onnx')) for n, p in paths.items()}
        ops = {n: _op_counts(p.with_suffix('.ort.onnx')) for n, p in paths.items()}
        x = np.random.default_rng(0).standard_normal((batch, 3, img, img), dtype=np.float32)
        feeds = {n: {s.get_inputs()[0].name: x} for n, s in sessions.items()}
        for n, s in sessions.items():
            s.run(None, feeds[n])  # warm-up
        ratios: List[float] = []
        ips: Dict[str, List[float]] = {an_name: [], bn_name: []}
        for r in range(rounds):
            order = (an_name, bn_name) if r % 2 == 0 else (bn_name, an_name)
            seconds = {}
            for n in order:
                start = time.perf_counter()
                for _ in range(iters):
                    sessions[n].run(None, feeds[n])
                seconds[n] = time.perf_counter() - start
                ips[n].append(batch * iters / seconds[n])
            ratios.append(seconds[bn_name] / seconds[an_name])
    return dict(an=an_name, bn=bn_name, batch=batch, img=img, threads=threads,
                ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                an_images_per_s=statistics.median(ips[an_name]), bn_images_per_s=statistics.median(ips[bn_name]),
                an_ops=ops[an_name], bn_ops=ops[bn_name])
