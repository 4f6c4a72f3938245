"""scripts/benchmark.py (pairs, compile, memory, per-layer, ONNX Runtime, markdown) and scripts/gpu_check.py (its
whole plan as a CPU dry run) at toy sizes, so both are known to work before a long or GPU run."""
import json
import sys

import pytest

from helpers import REPO, run_python

sys.path.insert(0, str(REPO / 'scripts'))

import benchmark  # noqa: E402
import bench_report  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')

TOY = ['--pairs', 'an_resnet18:resnet18', '--batch-infer', '2', '--img-infer', '32', '--batch-train', '2',
       '--img-train', '32', '--rounds', '1', '--iters', '1', '--warmup', '1']


def test_benchmark_every_measure_at_toy_size(tmp_path):
    out_json, out_md = tmp_path / 'bench.json', tmp_path / 'bench.md'
    assert benchmark.main([*TOY, '--device', 'cpu', '--compile', 'both', '--compile-backend', 'eager', '--layers',
                           '--layer-pairs', 'an_resnet18:resnet18', '--layer-sites', '2', '--layer-batch', '2',
                           '--layer-img', '32', '--layer-iters', '1', '--ort', '--ort-pairs', 'an_resnet18:resnet18',
                           '--json', str(out_json), '--markdown', str(out_md)]) == 0
    results = json.loads(out_json.read_text())
    assert {(r['mode'], r['compiled']) for r in results['speed']} == {
        ('infer', False), ('train', False), ('infer', True), ('train', True)}
    assert all(r['ratio_min'] <= r['ratio_median'] <= r['ratio_max'] and r['ratio_median'] > 0
               for r in results['speed'])
    assert results['memory'][0]['an_bytes'] > 0 and results['memory'][0]['bn_bytes'] > 0
    net = results['layers'][0]
    assert net['an_layers'] == 8 and len(net['sites']) == 2
    assert all(site[m]['an_us'] > 0 for site in net['sites'] for m in ('infer', 'train', 'infer_fixed'))
    assert 'diff_us_best' in net['sites'][0]['train_fixed']
    ort = results['ort'][0]
    assert ort['ratio_median'] > 0 and ort['bn_ops'].get('BatchNormalization', 0) == 0  # folded into the Conv
    assert results['environment']['onnxruntime'] and results['environment']['torch']
    md = out_md.read_text()
    assert '| an_resnet18 | resnet18 |' in md and 'fixed part' in md and 'after ORT optimization' in md


def test_pairs_and_report_targets():
    assert benchmark.parse_pairs('an_resnet50,an_resnet18:resnet18') == [('an_resnet50', 'resnet50'),
                                                                        ('an_resnet18', 'resnet18')]
    with pytest.raises(SystemExit):
        benchmark.parse_pairs('an_resnet18')
    assert {a for a, _ in benchmark.PAIRS} == set(bench_report.TARGETS)
    row = dict(an='an_resnet50', bn='resnet50', mode='infer', compiled=False, ratio_median=0.98, ratio_min=0.9,
               ratio_max=0.99)
    md = bench_report.render(dict(environment={}, args={}, speed=[row], memory=[], ort=[]))
    assert '0.980 (0.900..0.990) ✓' in md and '0.97 / 0.97 / ≤ 1.02' in md


def test_gpu_check_dry_run(tmp_path):
    result = run_python(['scripts/gpu_check.py', '--dry-run', '--out', str(tmp_path)],
                        env=dict(__import__('os').environ, PYTHONPATH=str(REPO)))
    report = json.loads((tmp_path / 'gpu_results.json').read_text())
    status = {s['name']: s['status'] for s in report['sections']}
    assert status == {'tests': 'ok', 'eager': 'ok', 'compiled-an_resnet18': 'ok'}, result.stdout
    tests = report['sections'][0]
    assert tests['collected'] >= 90  # the CUDA numerics and determinism cases are selected
    speed = [r for s in report['sections'] for r in s.get('results', {}).get('speed', [])]
    assert {(r['mode'], r['compiled']) for r in speed} == {('infer', False), ('train', False), ('infer', True)}
    assert '| an_resnet18 | resnet18 |' in (tmp_path / 'gpu_results.md').read_text()
