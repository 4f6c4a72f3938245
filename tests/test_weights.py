"""Weights end to end, offline, against a Hugging Face-compatible server on 127.0.0.1 (tests/hf_server.py):
convert -> publish -> create_model(pretrained=True) download + verify + load, cache, HF_HUB_OFFLINE, tampering,
torch.hub, the `python -m an_zoo` command, torchrun rank-0 download.

Flows that depend on which weights are published run in fresh interpreters with AN_ZOO_MANIFEST pointing at a test
copy of the manifest (timm's registry is filled at import from the manifest), and HF_HOME / HF_ENDPOINT /
HF_HUB_OFFLINE set for that process only.
"""
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import timm
import torch

from helpers import TWO_RANKS_PRETRAINED, run_python
from hf_server import LocalHub

REPO = Path(__file__).resolve().parents[1]
WEIGHT = 'an_mobilenetv2_100.aog_e150_in1k'
# one worker runs this module: its local hub with a published weight (three conversion / publish subprocesses) is
# then set up once, not once per xdist worker (pyproject's addopts select --dist loadgroup)
pytestmark = pytest.mark.xdist_group('published_local_hub')
ARCH = 'an_mobilenetv2_100'
HUB_REPO = f'an-zoo/{WEIGHT}'


def _env(tmp: Path, hub_url: str, manifest: Path, cache: str = 'hf_home', **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'AN_ZOO_'))}
    env.update(AN_ZOO_MANIFEST=str(manifest), HF_HOME=str(tmp / cache), HF_ENDPOINT=hub_url,
               HF_HUB_DISABLE_TELEMETRY='1', HF_TOKEN='test-token', PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _run(code: str, env: dict, check: bool = True, args=()) -> subprocess.CompletedProcess:
    return run_python(['-c', textwrap.dedent(code), *args], env, check=check, timeout=300)


# the weights must come back bit-identical, and so must the outputs of the same network computed in this process
# (the test process may run with another thread count, which changes float summation order)
CHECK = f'''
def check(model, data):
    import timm
    state = model.state_dict()
    for key, value in data['state_dict'].items():
        assert torch.equal(state[key], value), key + ' differs from the published weights'
    reference = timm.create_model('{ARCH}')
    reference.load_state_dict(data['state_dict'])
    with torch.no_grad():
        assert torch.equal(model.eval()(data['x']), reference.eval()(data['x'])), 'outputs differ'
'''
LOAD_AND_COMPARE = '''
import sys, torch, timm, an_zoo
''' + CHECK + '''
model = timm.create_model(sys.argv[1], pretrained=True)
check(model, torch.load(sys.argv[2]))
print('LOADED', model.pretrained_cfg.get('hf_hub_id'), model.pretrained_cfg.get('source'))
'''


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """A weight converted from a generated checkpoint and published to a local hub; the manifest copy pins it."""
    tmp = tmp_path_factory.mktemp('weights')
    hub = LocalHub().start()
    manifest = tmp / 'manifest.json'
    shutil.copyfile(REPO / 'weights_manifest.json', manifest)
    torch.manual_seed(0)
    source = timm.create_model(ARCH)
    with torch.no_grad():  # non-trivial running statistics, so a mis-loaded buffer would show
        for name, buf in source.named_buffers():
            if name.endswith('running_var'):
                buf.uniform_(0.5, 2.0)
    torch.save({'epoch': 150, 'state_dict': {'module.' + k: v for k, v in source.state_dict().items()}},
               tmp / 'official.pth.tar')
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.save({'x': x, 'state_dict': source.state_dict()}, tmp / 'expected.pt')
    env = _env(tmp, hub.url, manifest)
    run_python(['scripts/convert_official.py', str(tmp / 'official.pth.tar'), '--model', WEIGHT,
             '--out', str(tmp / 'converted')], env)
    dry = run_python(['scripts/publish.py', WEIGHT, '--dir', str(tmp / 'converted'), '--dry-run'], env)
    assert 'would create' in dry.stdout and not [r for r in hub.requests if r[0] == 'POST']  # dry run: no upload
    run_python(['scripts/publish.py', WEIGHT, '--dir', str(tmp / 'converted')], env)
    yield dict(hub=hub, tmp=tmp, manifest=manifest, expected=tmp / 'expected.pt')
    hub.stop()


def _entry(manifest: Path) -> dict:
    return next(w for w in json.loads(manifest.read_text())['weights'] if f'{w["model"]}.{w["tag"]}' == WEIGHT)


def test_publish_pins_the_commit_and_files(published):
    hub, entry = published['hub'], _entry(published['manifest'])
    assert entry['published'] and entry['revision'] == hub.commits(HUB_REPO)[-1]
    assert entry['num_params'] == 3_672_760 and entry['provenance']['official_file'] == 'official.pth.tar'
    files = {p: hub.file(HUB_REPO, p) for p in ('model.safetensors', 'config.json', 'README.md')}
    assert len(files['model.safetensors']) == entry['size']
    config = json.loads(files['config.json'])
    assert config['architecture'] == ARCH and config['an_zoo']['weights']['sha256'] == entry['sha256']
    card = files['README.md'].decode()
    assert 'library_name: timm' in card and 'license: other' in card and 'arxiv: 1908.01259' in card
    assert entry['sha256'] in card


def test_download_verify_load_then_cache_then_offline(published, tmp_path):
    hub = published['hub']
    env = _env(tmp_path, hub.url, published['manifest'])
    before = len([r for r in hub.requests if r[1].endswith('model.safetensors') and r[0] == 'GET'])
    out = _run(LOAD_AND_COMPARE, env, args=(ARCH, str(published['expected'])))
    assert f'LOADED {HUB_REPO}' in out.stdout
    gets = [r for r in hub.requests if r[1].endswith('model.safetensors') and r[0] == 'GET']
    assert len(gets) == before + 1 and _entry(published['manifest'])['revision'] in gets[-1][1]
    # the pinned revision is in the cache: no server needed
    dead = LocalHub().start()
    dead_url = dead.url
    dead.stop()
    _run(LOAD_AND_COMPARE, _env(tmp_path, dead_url, published['manifest']),
         args=(f'{WEIGHT}', str(published['expected'])))
    _run(LOAD_AND_COMPARE, _env(tmp_path, dead_url, published['manifest'], HF_HUB_OFFLINE='1'),
         args=(ARCH, str(published['expected'])))
    # timm's own hf-hub: names resolve to the same verified path
    _run(LOAD_AND_COMPARE, env, args=(f'hf-hub:{HUB_REPO}', str(published['expected'])))
    listing = _run('import timm, an_zoo; print(timm.list_pretrained("an_*"))', env)
    assert listing.stdout.strip() == str([WEIGHT])


def test_offline_with_empty_cache_says_what_to_do(published, tmp_path):
    env = _env(tmp_path, published['hub'].url, published['manifest'], HF_HUB_OFFLINE='1')
    result = _run(LOAD_AND_COMPARE, env, check=False, args=(ARCH, str(published['expected'])))
    assert result.returncode != 0
    assert 'WeightsUnavailableError' in result.stderr and 'HF_HUB_OFFLINE is set' in result.stderr
    assert 'python -m an_zoo download' in result.stderr and 'pretrained_cfg_overlay=dict(file=' in result.stderr


def test_tampered_download_is_rejected_before_loading(published, tmp_path):
    hub = published['hub']
    original = hub.file(HUB_REPO, 'model.safetensors')
    garbage = b'\0' * len(original)  # not even a safetensors file: loading it would fail differently
    hub.tamper(HUB_REPO, 'model.safetensors', garbage)
    try:
        result = _run(LOAD_AND_COMPARE, _env(tmp_path, hub.url, published['manifest']), check=False,
                      args=(ARCH, str(published['expected'])))
    finally:
        hub.tamper(HUB_REPO, 'model.safetensors', original)
    assert result.returncode != 0
    assert 'WeightsVerificationError' in result.stderr and 'sha256 mismatch' in result.stderr
    assert _entry(published['manifest'])['sha256'] in result.stderr and 'CheckpointError' not in result.stderr
    blobs = list((tmp_path / 'hf_home').rglob('model.safetensors'))
    assert blobs and blobs[0].read_bytes() == garbage  # reported, left in place for the user to inspect/delete


def test_torch_hub_local_goes_through_the_same_path(published, tmp_path):
    code = '''
import sys, torch
''' + CHECK + '''
model = torch.hub.load(sys.argv[3], sys.argv[1], source='local', pretrained=True)
check(model, torch.load(sys.argv[2]))
print('HUB', model.pretrained_cfg.get('hf_hub_id'))
'''
    env = _env(tmp_path, published['hub'].url, published['manifest'])
    out = _run(code, env, args=(ARCH, str(published['expected']), str(REPO)))
    assert f'HUB {HUB_REPO}' in out.stdout


def test_cli_download_verify_bundle(published, tmp_path):
    env = _env(tmp_path, published['hub'].url, published['manifest'])
    out = run_python(['-m', 'an_zoo', 'download', ARCH], env)
    assert 'sha256 verified' in out.stdout
    assert f'{WEIGHT}: ok' in run_python(['-m', 'an_zoo', 'verify'], env).stdout
    blob = next((tmp_path / 'hf_home').rglob('model.safetensors')).resolve()
    good = blob.read_bytes()
    blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # bit rot in the cache
    failed = run_python(['-m', 'an_zoo', 'verify'], env, check=False)
    assert failed.returncode == 1 and 'FAILED' in failed.stdout and 'sha256 mismatch' in failed.stdout
    blob.write_bytes(good)

    bundle = tmp_path / 'bundle'
    run_python(['-m', 'an_zoo', 'bundle', WEIGHT, str(bundle)], env)
    assert {p.name for p in bundle.iterdir()} == {'model.safetensors', 'config.json', 'README.md', 'hubconf.py'}
    refused = run_python(['-m', 'an_zoo', 'bundle', WEIGHT, str(bundle)], env, check=False)
    assert refused.returncode != 0 and 'not empty' in refused.stderr
    moved = tmp_path / 'elsewhere' / 'bundle'  # relocatable
    shutil.move(str(bundle), moved)
    dead = LocalHub().start()
    dead_url = dead.url
    dead.stop()
    offline = _env(tmp_path, dead_url, published['manifest'], cache='empty_home', HF_HUB_OFFLINE='1')
    _run(LOAD_AND_COMPARE, offline, args=(f'local-dir:{moved}', str(published['expected'])))
    code = '''
import sys, torch
''' + CHECK + '''
check(torch.hub.load(sys.argv[1], 'model', source='local'), torch.load(sys.argv[2]))
'''
    _run(code, offline, args=(str(moved), str(published['expected'])))
    # a corrupted bundle is refused before loading
    weights = moved / 'model.safetensors'
    weights.write_bytes(b'\0' * weights.stat().st_size)
    result = _run(LOAD_AND_COMPARE, offline, check=False, args=(f'local-dir:{moved}', str(published['expected'])))
    assert result.returncode != 0 and 'sha256 mismatch' in result.stderr


def test_torchrun_only_local_rank_zero_downloads(published, tmp_path):
    script = tmp_path / 'ddp.py'
    script.write_text(TWO_RANKS_PRETRAINED)
    hub = published['hub']
    before = len([r for r in hub.requests if r[1].endswith('model.safetensors') and r[0] == 'GET'])
    env = _env(tmp_path, hub.url, published['manifest'])
    run_python([str(script), ARCH], env)
    gets = [r for r in hub.requests if r[1].endswith('model.safetensors') and r[0] == 'GET']
    assert len(gets) == before + 1  # one download for two ranks


def test_unknown_repo_and_revision_are_clear(monkeypatch, tmp_path):
    from an_zoo.hub import WeightsUnavailableError, fetch_weights
    with LocalHub() as hub:
        sha = hub.add_file('org/an_resnet18_bn1.x', 'model.safetensors', b'not used')
        monkeypatch.setenv('HF_ENDPOINT', hub.url)
        monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path))
        monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
        with pytest.raises(WeightsUnavailableError, match=r'org/missing is not on .*RepositoryNotFoundError'):
            fetch_weights(repo_id='org/missing')
        with pytest.raises(WeightsUnavailableError, match='revision 0{40}.*RevisionNotFoundError'):
            fetch_weights(repo_id='org/an_resnet18_bn1.x', revision='0' * 40)
        path = fetch_weights(repo_id='org/an_resnet18_bn1.x', revision=sha)
        assert path.read_bytes() == b'not used'


def test_local_file_is_verified_when_its_hash_is_known(tmp_path):
    import dataclasses
    from an_zoo import load_checkpoint_file
    from an_zoo._manifest import load_manifest
    from an_zoo.hub import WeightsVerificationError, sha256_file
    from an_zoo.models._builder import _local_file_expectation
    path = tmp_path / 'model.safetensors'
    path.write_bytes(b'weights')
    entry = dataclasses.replace(load_manifest()[0], sha256=sha256_file(path), size=7)
    assert _local_file_expectation(path, entry) == (entry.sha256, 7, entry.name)
    path.write_bytes(b'weightz')
    with pytest.raises(WeightsVerificationError, match='sha256 mismatch'):  # before the bytes are deserialised
        load_checkpoint_file(path, *_local_file_expectation(path, entry)[:2])
    other = tmp_path / 'my_finetuned.pth'  # a file the manifest knows nothing about is the user's own
    other.write_bytes(b'anything')
    assert _local_file_expectation(other, entry) == (None, None, '')
    official = tmp_path / 'resnet50_an.pth.tar'
    official.write_bytes(b'official')
    entry = dataclasses.replace(entry, provenance=dict(entry.provenance, official_file=official.name,
                                                       official_sha256='0' * 64))
    sha256, size, name = _local_file_expectation(official, entry)
    with pytest.raises(WeightsVerificationError, match='official file'):
        load_checkpoint_file(official, sha256, size, name=name)
