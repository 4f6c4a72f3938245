"""Repository contracts: README set-up commands, CI entry point, generated docs, hubconf, demo, packaging."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def _setup_commands():
    text = (REPO / 'README.md').read_text()
    block = re.search(r'```bash\n(.*?)```', text, re.S)
    assert block and text.index(block.group(0)) < text.index('## '), 'set-up commands must open the README'
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_second():
    commands = _setup_commands()
    assert len(commands) == 2
    assert commands[0] == 'pip install -e ".[train]" && python -m an_zoo.train'
    assert 'pytest' in commands[1]
    ci = [line for line in (REPO / '.ci' / 'run').read_text().splitlines() if line and not line.startswith('#')]
    assert ci[-1] == commands[1]


@pytest.mark.slow
def test_docs_tables_are_generated():
    result = subprocess.run([sys.executable, str(REPO / 'scripts' / 'model_table.py'), '--check'],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    models = (REPO / 'docs' / 'models.md').read_text()
    for name in timm.list_models('an_*'):
        assert f'`{name}`' in models


def test_readme_is_short_and_its_links_resolve():
    text = (REPO / 'README.md').read_text(encoding='utf-8')
    assert len(text) <= 10_000
    links = re.findall(r'\]\(([^)#]+)\)', text)
    local = [link for link in links if not link.startswith('http')]
    assert {'docs/models.md', 'docs/weights.md', 'docs/training.md', 'SECURITY.md', 'CONTRIBUTING.md'} <= set(local)
    assert [link for link in local if not (REPO / link).is_file()] == []


def test_product_files_speak_of_the_project_alone():
    """No reference to folders outside the repository or to files it does not contain."""
    files = [*REPO.glob('*.md'), *REPO.glob('docs/*.md'), *REPO.glob('an_zoo/**/*.py'), *REPO.glob('scripts/*.py'),
             *REPO.glob('tests/*.py'), REPO / 'weights_manifest.json']
    pattern = re.compile('|'.join([r'\.\./' + 'shared', 'AN_' + 'SPEC', '/' + 'work/']))  # not matching this line
    offenders = [str(f.relative_to(REPO)) for f in files if pattern.search(f.read_text(encoding='utf-8'))]
    assert offenders == []


def test_packaged_data_are_files_equal_to_the_repository_copies():
    for name in ('weights_manifest.json', 'export_status.json'):
        packaged = REPO / 'an_zoo' / name
        assert packaged.is_file() and not packaged.is_symlink(), name
        assert packaged.read_bytes() == (REPO / name).read_bytes(), f'{name}: the repository copy differs'


def test_hubconf_exposes_every_model_and_loads_local(tmp_path):
    source = timm.create_model('an_resnet18_bn12')
    path = tmp_path / 'weights.safetensors'
    save_file(source.state_dict(), str(path))
    model = torch.hub.load(str(REPO), 'an_resnet18_bn12', source='local', pretrained=True, num_classes=5,
                           pretrained_cfg_overlay=dict(file=str(path)))
    assert model.fc.out_features == 5
    torch.testing.assert_close(model.state_dict()['layer1.0.bn2.mixture_bias'],
                               source.state_dict()['layer1.0.bn2.mixture_bias'])
    assert set(timm.list_models('an_*')) <= set(_hub_entries())


def _hub_entries():
    import importlib.util
    spec = importlib.util.spec_from_file_location('an_zoo_hubconf', REPO / 'hubconf.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith('_')]


@pytest.mark.slow
def test_readme_main_command_trains_offline_and_reaches_the_stated_accuracy(tmp_path):
    """The README's first command, exactly (minus its install step), on the embedded default, network off."""
    import sklearn  # noqa: F401  (test extra: its absence is a failure, not a skip)
    command = _setup_commands()[0].split('&&', 1)[1].split()
    assert command[:3] == ['python', '-m', 'an_zoo.train']
    env = dict(__import__('os').environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    env.pop('PYTEST_XDIST_WORKER', None)
    result = subprocess.run([sys.executable, *command[1:], '--no-progress'], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith('| an_resnet18_bn12 |'))
    top1 = float(row.split('|')[2])
    assert top1 >= 95.0, result.stdout  # README: held-out top-1 of the embedded default
    assert list((tmp_path / 'output' / 'train').glob('*-an_resnet18_bn12-digits/curves.png'))


def test_demo_runs_offline(monkeypatch):
    import sklearn  # noqa: F401  (test extra: its absence is a failure, not a skip)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    result = subprocess.run([sys.executable, '-m', 'an_zoo.demo', '--model', 'an_resnet18_bn1'],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert 'china.jpg (640x427)' in result.stdout and 'flower.jpg' in result.stdout
    assert 'features_only pyramid' in result.stdout


def test_manifest_ships_with_the_package():
    import an_zoo
    from an_zoo._manifest import PACKAGED_MANIFEST as MANIFEST_PATH
    assert MANIFEST_PATH.parent == Path(an_zoo.__file__).parent
    assert MANIFEST_PATH.resolve().read_text() == (REPO / 'weights_manifest.json').read_text()


def test_wheel_contains_the_manifest(tmp_path):
    import shutil
    source = tmp_path / 'src'  # build from a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(REPO, source,
                    ignore=shutil.ignore_patterns('.git', 'build', '*.egg-info', '__pycache__', '.pytest_cache'))
    result = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                             '-w', str(tmp_path), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, f'the wheel does not build: {result.stderr[-2000:]}'
    import zipfile
    wheel = next(tmp_path.glob('an_zoo-*.whl'))
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read('an_zoo/weights_manifest.json').decode() == (REPO / 'weights_manifest.json').read_text()


def test_bad_manifest_is_refused_clearly(tmp_path):
    import json
    from an_zoo._manifest import ManifestError, load_manifest
    raw = json.loads((REPO / 'weights_manifest.json').read_text())
    del raw['weights'][0]['license']
    path = tmp_path / 'manifest.json'
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"an_resnet50.aog_e120_in1k.*missing required field\(s\) \['license'\]"):
        load_manifest(path)
    raw = json.loads((REPO / 'weights_manifest.json').read_text())
    raw['weights'][0]['license'] = 'nonexistent'
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match='not defined under "licenses"'):
        load_manifest(path)


def test_console_commands_are_installed_and_run():
    import importlib.metadata
    import shutil
    points = {p.name: p for p in importlib.metadata.entry_points(group='console_scripts')}
    for name in ('an-zoo', 'an-zoo-train', 'an-zoo-validate'):
        assert name in points, f'{name}: not installed (pip install -e .)'
        assert callable(points[name].load())
        result = subprocess.run([shutil.which(name) or name, '--help'], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and 'usage' in result.stdout.lower(), (name, result.stderr[-2000:])
