"""Export for inference: ONNX (dynamo exporter) checked in onnxruntime with a dynamic batch, torch.export, jit.trace,
the folded-graph check, scripts/export.py, and the generated export matrix (export_status.json, docs/export.md, model
cards).

Models are random inits made fit for parity checks (non-degenerate norm affines, calibrated running statistics:
an_zoo._export_prep.prepare_for_checks), at 64 px.
"""
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import an_zoo
from an_zoo import _export_graph as export_graph
from an_zoo import _export_prep as prep
from an_zoo import _export_status as status_mod
from an_zoo import _export_targets as targets
from an_zoo import export as ex
from an_zoo._docs import read_block

REPO = Path(__file__).resolve().parents[1]
IMG = (3, 64, 64)
sys.path.insert(0, str(REPO / 'scripts'))
import export_matrix  # noqa: E402

# the export stack is part of the test extras: a missing module is a failed install, not a reason to skip
import onnx  # noqa: E402,F401
import onnxruntime  # noqa: E402,F401
import onnxscript  # noqa: E402,F401


@functools.lru_cache(maxsize=None)
def _state(name):
    model = timm.create_model(name)
    prep.prepare_for_checks(model, IMG)
    return model.state_dict()


def _model(name):
    model = timm.create_model(name)
    model.load_state_dict(_state(name))
    return model.eval()


def _tiny(act=False):
    """conv -> AN (-> act) -> pool -> linear: a second-scale export for the graph-check cases."""
    torch.manual_seed(0)
    norm = an_zoo.AttentiveBatchNormAct2d(8, num_mixtures=3) if act else an_zoo.AttentiveBatchNorm2d(8, num_mixtures=3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    return prep.prepare_for_checks(model, (3, 16, 16))


def _onnx_export(model, x, path, train=False):
    """A raw dynamo export (no checks), for feeding the graph check hand-made cases."""
    model.train(train)
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, external_data=False,
                                    dynamic_shapes=({0: torch.export.Dim('batch')},))
    program.save(str(path))
    return path


def _assert_onnx_matches(path, model, batch_size, seed=5):
    x = prep.example_batch(batch_size, IMG, seed=seed)
    with torch.no_grad():
        ref = model(x)
    out = torch.from_numpy(ex.onnxruntime_outputs(path, x)[0])
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=ex.TOLERANCES['float32'].bound(float(ref.abs().max())))


def _assert_dynamic_and_folded(path, model):
    import onnx
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'batch'
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == 'batch'
    summary = export_graph.check_onnx_inference_graph(path, prep.an_layer_names(model), dynamic_batch=True)
    assert summary['folded'] and summary['an_layers'] == len(prep.an_layer_names(model)) > 0
    # AN's standardization folded, its attention's BatchNorm into the 1x1 conv, plain BNs into convs
    assert 'BatchNormalization' not in summary['op_counts']


@pytest.mark.slow
def test_onnx_dynamic_batch_parity_large_model(tmp_path):
    """The large family member through the library (the small one goes through scripts/export.py below)."""
    model = _model('an_resnet50')
    result = ex.export_onnx(model, tmp_path / 'model.onnx', input_size=IMG)  # dynamo exporter, checked at batch 3
    assert result.exporter == 'dynamo' and result.opset == 18
    assert result.export_batch_size == 2 and result.check_batch_size == 3
    assert result.max_abs_diff <= result.tolerance, result
    assert result.graph['folded'] and result.graph['an_layers'] == 16
    _assert_dynamic_and_folded(result.path, model)
    _assert_onnx_matches(result.path, model, batch_size=1)  # a third batch size


def test_onnx_check_reports_the_difference(tmp_path, monkeypatch):
    model = _tiny()
    result = ex.export_onnx(model, tmp_path / 'tiny.onnx', input_size=(3, 16, 16))
    assert result.max_abs_diff <= result.tolerance
    real = ex.onnxruntime_outputs
    monkeypatch.setattr(ex, 'onnxruntime_outputs', lambda path, x: [o + 0.5 for o in real(path, x)])
    with pytest.raises(ex.ExportCheckError, match=r'max abs diff 0\.5') as err:
        ex.export_onnx(model, tmp_path / 'tiny.onnx', input_size=(3, 16, 16))
    assert err.value.max_abs_diff == pytest.approx(0.5, rel=1e-5) and err.value.tolerance < 0.5


def test_static_batch_and_torchscript_exporter(tmp_path):
    import onnx
    model = _tiny(act=True)
    static = ex.export_onnx(model, tmp_path / 'static.onnx', input_size=(3, 16, 16), dynamic_batch=False)
    assert static.check_batch_size == static.export_batch_size == 2
    assert onnx.load(str(static.path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    with pytest.raises(ValueError, match='batch size'):
        ex.export_onnx(model, tmp_path / 'x.onnx', input_size=(3, 16, 16), dynamic_batch=False, check_batch_size=3)
    # the legacy exporter: the reference AN code (BatchNormalization in inference mode), checked the same way
    legacy = ex.export_onnx(model, tmp_path / 'legacy.onnx', input_size=(3, 16, 16), exporter='torchscript')
    assert legacy.opset == 17 and legacy.max_abs_diff <= legacy.tolerance
    assert not legacy.graph['folded'] and legacy.graph['op_counts'].get('BatchNormalization')
    assert model.training is False and all(m.impl == 'fast' for m in model.modules()
                                           if isinstance(m, an_zoo.AttentiveBatchNorm2d))


@pytest.mark.filterwarnings('ignore:Exporting a model while it is in training mode')
@pytest.mark.parametrize('act', [False, True])
def test_graph_check_rejects_unfolded_and_training_graphs(act, tmp_path):
    model = _tiny(act)
    names = prep.an_layer_names(model)
    x = prep.example_batch(2, (3, 16, 16))
    good = export_graph.check_onnx_inference_graph(_onnx_export(model, x, tmp_path / 'good.onnx'), names,
                                                   dynamic_batch=True)
    assert good['folded'] and good['an_layers'] == 1
    with pytest.raises(ex.ExportGraphError, match='static'):
        export_graph.check_onnx_inference_graph(tmp_path / 'good.onnx', names, dynamic_batch=False)
    # the reference code exported as is: standardization (BatchNormalization), then the per-sample affine
    with prep.reference_an_layers(model):
        unfolded = _onnx_export(model, x, tmp_path / 'reference.onnx')
    with pytest.raises(ex.ExportGraphError, match=r"BatchNormalization of a full-size tensor inside the layer.*\n"
                                                  r".*path is \['Add', 'BatchNormalization', 'Mul'\]"):
        export_graph.check_onnx_inference_graph(unfolded, names)
    # a training-mode graph: batch statistics
    training = _onnx_export(model, x, tmp_path / 'train.onnx', train=True)
    with pytest.raises(ex.ExportGraphError, match='reduces over the batch axis'):
        export_graph.check_onnx_inference_graph(training, names, expect_folded=False)


@pytest.mark.parametrize('name', ['an_mobilenetv2_050'])  # (ResNets: inside the ONNX tests' dynamo export)
def test_torch_export_parity(name):
    model = _model(name)
    x, x_check = prep.example_batch(2, IMG, seed=1), prep.example_batch(3, IMG, seed=2)
    result = targets.check_torch_export(model, x, x_check)  # dynamic batch: exported at 2, run at 3
    assert result.ok, result.message
    assert result.max_abs_diff <= result.tolerance


def test_exported_program_check_rejects_training():
    model = _tiny().train()
    program = torch.export.export(model, (prep.example_batch(2, (3, 16, 16)),))
    with pytest.raises(ex.ExportGraphError, match='buffers mutated'):
        export_graph.check_exported_program_inference(program)
    with torch.no_grad():
        program = torch.export.export(model.eval(), (prep.example_batch(2, (3, 16, 16)),))
        export_graph.check_exported_program_inference(program)
    # with autograd on, the eval layer's graph holds BatchNorm_K as native_batch_norm(training=False): inference
    program = torch.export.export(model.eval(), (prep.example_batch(2, (3, 16, 16)),), strict=False)
    assert any('native_batch_norm.default' in str(n.target) for n in program.graph.nodes)
    export_graph.check_exported_program_inference(program)


def test_jit_trace_parity():
    model = _model('an_resnet18_bn1')
    result = targets.check_jit_trace(model, prep.example_batch(2, IMG, seed=1), prep.example_batch(3, IMG, seed=2))
    assert result.ok, result.message


def test_autocast_target_checks_every_an_layer():
    model = _tiny()
    x, x_check = prep.example_batch(2, (3, 16, 16)), prep.example_batch(3, (3, 16, 16), seed=1)
    result = targets.check_autocast(model, x, x_check, torch.bfloat16)
    assert result.ok, result.message
    assert result.details['an_layers_checked'] == 1
    # judged against the stated bf16 tolerance of the worst AN layer; bf16 really ran (nonzero, finite differences)
    assert result.tolerance == pytest.approx(ex.TOLERANCES['bfloat16'].bound(result.ref_max))
    assert 0 < result.max_abs_diff <= result.tolerance
    assert 0 < result.details['logits_max_abs_diff'] < float('inf')
    # an AN layer that goes wrong in low precision only (its float32 run, the reference, is untouched) is caught
    layer = model[1]
    hook = layer.register_forward_hook(
        lambda m, i, o: o + (1 + o.abs().max()) if i[0].dtype == torch.bfloat16 else None)
    try:
        broken = targets.check_autocast(model, x, x_check, torch.bfloat16)
    finally:
        hook.remove()
    assert broken.status == 'mismatch' and broken.max_abs_diff > broken.tolerance, broken
    assert 'AN layer 1 under autocast' in broken.message
    if not torch.cuda.is_available():
        cuda = targets.check_autocast(model, None, None, torch.float16, 'cuda')
        assert cuda.status == 'not measured' and cuda.message == targets.NOT_MEASURED_ON_GPU
        assert cuda.message == 'not yet measured on a GPU'


@pytest.mark.slow
def test_export_script_self_check(tmp_path):
    """The small family member: scripts/export.py with a checkpoint, its self-check, then the file itself."""
    from safetensors.torch import save_file
    checkpoint = tmp_path / 'weights.safetensors'
    save_file(_state('an_resnet18_bn1'), str(checkpoint))
    output = tmp_path / 'out' / 'an_resnet18_bn1.onnx'
    result = subprocess.run(
        [sys.executable, str(REPO / 'scripts' / 'export.py'), 'an_resnet18_bn1', '--checkpoint', str(checkpoint),
         '--output', str(output), '--img-size', '64'], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'self-check: onnxruntime (CPU) vs PyTorch at batch 3: max abs diff' in result.stdout
    assert '8 AN layers folded to x * a + b' in result.stdout and 'batch axis dynamic' in result.stdout
    model = _model('an_resnet18_bn1')
    _assert_dynamic_and_folded(output, model)
    _assert_onnx_matches(output, model, batch_size=1)
    _assert_onnx_matches(output, model, batch_size=4)
    missing = subprocess.run([sys.executable, str(REPO / 'scripts' / 'export.py'), 'an_resnet18_bn1',
                              '--checkpoint', str(tmp_path / 'nope.pth'), '--output', str(output)],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert missing.returncode == 2 and 'checkpoint file not found' in missing.stderr


def test_export_status_covers_the_registry():
    status = status_mod.load_export_status(export_matrix.STATUS)
    problems = export_matrix.check_status(status, timm.list_models('an_*'))
    assert not problems, '\n'.join(problems) + '\nrun python scripts/export_matrix.py --write'
    # shipped with the package as a real file; the repository-root copy is byte-equal
    assert export_matrix.STATUS.is_file() and not export_matrix.STATUS.is_symlink()
    assert export_matrix.STATUS.read_bytes() == export_matrix.ROOT_STATUS.read_bytes()
    for name, row in status['models'].items():
        assert row['environment']['torch'] and row['date'], name
        for target in targets.CUDA_TARGETS:
            record = row['targets'][target]
            if not row['environment']['gpu']:
                assert record == {'target': target, 'status': 'not measured', 'message': 'not yet measured on a GPU',
                                  'max_abs_diff': None, 'tolerance': None, 'ref_max': None, 'seconds': None}


def test_docs_export_matrix_is_generated():
    """The block in docs/export.md is the rendering of the status file; a page without the block is a failure."""
    block = read_block(export_matrix.PAGE.read_text(encoding='utf-8'), export_matrix.MARKER)
    assert block is not None, 'docs/export.md has no <!-- export-matrix:start --> ... <!-- export-matrix:end --> block'
    status = status_mod.load_export_status(export_matrix.STATUS)
    assert block == status_mod.render_export_matrix(status), 'run python scripts/export_matrix.py --update-docs'
    assert '| not yet measured on a GPU |' in block and 'no GPU' not in block


def test_matrix_render_and_model_card():
    from an_zoo._card import model_card
    from an_zoo._manifest import load_manifest
    status = status_mod.load_export_status(export_matrix.STATUS)
    table = status_mod.render_export_matrix(status)
    header = table.splitlines()[0]
    assert all(label in header for label in status_mod.TARGET_LABELS.values())
    assert all(f'| `{name}` |' in table for name in timm.list_models('an_*'))
    entry = load_manifest()[0]
    card = model_card(entry)
    assert '## Export and precision status' in card
    assert status_mod.render_model_status(status, entry.model) in card
    assert '- ONNX + onnxruntime: ' in card and '- bf16 (CUDA): not yet measured on a GPU' in card
    assert 'not yet measured' in status_mod.render_model_status(None, entry.model)


def test_matrix_check_mode(tmp_path):
    """--check runs nothing: it compares the json with the registry and the docs block with its rendering."""
    status = json.loads(export_matrix.STATUS.read_text())
    path = tmp_path / 'status.json'
    path.write_text(json.dumps(status))
    page = tmp_path / 'export.md'
    stale = '# x\n<!-- export-matrix:start -->\nstale\n<!-- export-matrix:end -->\n'
    page.write_text(stale)
    args = ['--check', '--status-file', str(path), '--page', str(page)]
    assert export_matrix.main(args) == 1  # stale block
    assert export_matrix.main(['--update-docs', '--status-file', str(path), '--page', str(page)]) == 0
    assert page.read_text().startswith('# x\n<!-- export-matrix:start -->\n| model |')
    assert export_matrix.main(args) == 0
    page.write_text(stale)  # the former option names still work
    assert export_matrix.main(['--update-readme', '--status-file', str(path), '--readme', str(page)]) == 0
    assert export_matrix.main(args) == 0
    del status['models'][next(iter(status['models']))]
    path.write_text(json.dumps(status))
    assert export_matrix.main(args) == 1  # a registered model without a row
    page.write_text('# x\n')  # no block: a failure, never a silent skip
    assert export_matrix.main(['--update-docs', '--status-file', str(path), '--page', str(page)]) == 1
    assert export_matrix.main(['--check', '--status-file', str(export_matrix.STATUS), '--page', str(page)]) == 1


def test_package_data_writes_keep_the_root_copy_equal(tmp_path):
    from an_zoo._io import write_package_data
    committed = export_matrix.STATUS.read_text()
    (tmp_path / 'pyproject.toml').write_text('')
    package, root = tmp_path / 'an_zoo', tmp_path / 'export_status.json'
    package.mkdir()
    root.write_text('{}')
    packaged = package / 'export_status.json'
    assert write_package_data(packaged, committed, package=package) == [packaged, root]
    assert packaged.read_text() == root.read_text() == committed and not packaged.is_symlink()
    other = tmp_path / 'other.json'
    assert write_package_data(other, committed, package=package) == [other]
    (tmp_path / 'pyproject.toml').unlink()  # an installed package: no repository copy to keep
    assert write_package_data(packaged, committed, package=package) == [packaged]


def test_check_fails_when_the_root_copy_drifts(tmp_path, monkeypatch):
    committed = export_matrix.STATUS.read_bytes()
    packaged, root = tmp_path / 'an_zoo' / 'export_status.json', tmp_path / 'export_status.json'
    packaged.parent.mkdir()
    packaged.write_bytes(committed)
    root.write_bytes(committed)
    monkeypatch.setattr(export_matrix, 'STATUS', packaged)
    monkeypatch.setattr(export_matrix, 'ROOT_STATUS', root)
    check = ['--check', '--status-file', str(packaged), '--page', str(export_matrix.PAGE)]
    assert export_matrix.main(check) == 0
    root.write_bytes(committed + b'\n')
    assert export_matrix.main(check) == 1  # the root copy drifted from the packaged file


# the names an_zoo.export exported before the split (its old __all__)
OLD_EXPORT_NAMES = [
    'ExportCheckError', 'ExportGraphError', 'TargetResult', 'OnnxExportResult', 'Tolerance', 'TOLERANCES', 'TARGETS',
    'CUDA_TARGETS', 'export_onnx', 'onnxruntime_outputs', 'check_onnx_inference_graph',
    'check_exported_program_inference', 'example_batch', 'prepare_for_checks', 'randomize_norm_affines',
    'calibrate_running_stats', 'an_layer_names', 'reference_an_layers', 'check_compile_fullgraph', 'check_onnx',
    'check_torch_export', 'check_jit_script', 'check_jit_trace', 'check_channels_last', 'check_autocast', 'run_target',
    'environment', 'TARGET_LABELS', 'export_status_path', 'load_export_status', 'render_export_matrix',
    'render_model_status', 'PACKAGED_STATUS',
]


def test_export_module_keeps_the_api_and_forwards_moved_names():
    import warnings
    assert sorted(ex.__all__) == sorted(['export_onnx', 'onnxruntime_outputs', 'OnnxExportResult', 'ExportCheckError',
                                         'ExportGraphError', 'Tolerance', 'TOLERANCES', 'DEFAULT_OPSET', 'EXPORTERS'])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the API itself imports without a warning
        for name in ex.__all__:
            getattr(ex, name)
    assert ex.ExportGraphError is export_graph.ExportGraphError
    homes = (export_graph, prep, targets, status_mod)
    for name in OLD_EXPORT_NAMES:
        if name in ex.__all__ or name == 'environment':
            continue
        with pytest.deprecated_call(match=f'an_zoo.export.{name} moved to an_zoo._export_'):
            value = getattr(ex, name)
        assert any(getattr(home, name, None) is value for home in homes), name
    with pytest.deprecated_call():
        from an_zoo.export import TARGETS, check_jit_trace, render_model_status  # the old import statement
    assert TARGETS is targets.TARGETS and check_jit_trace is targets.check_jit_trace
    assert render_model_status is status_mod.render_model_status
    with pytest.deprecated_call(match='describe_environment'):
        from an_zoo.export import environment
    env = environment()
    assert {'torch', 'timm', 'onnx', 'onnxruntime', 'onnxscript', 'machine', 'gpu'} <= set(env)
    with pytest.raises(AttributeError, match='no_such_name'):
        ex.no_such_name
