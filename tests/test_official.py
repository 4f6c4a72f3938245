"""Weights from the official release, offline: a Google Drive look-alike on 127.0.0.1 (tests/drive_server.py) serves
archives built here in the official layouts, reached by the real gdown client through an HTTPS proxy.

Covered: licence not accepted / accepted; first download records the lock, later loads verify it; a tampered archive
or converted file is refused and kept; a pinned archive hash; a config of another architecture; unsafe archive
members; a truncated download resumed; offline with and without a cached copy; an iVMCL-Release model folder; torchrun
downloading once; import-official -> publish -> Hub load, bit-exact; the golden outputs from legacy-serialized
(pre-zip) checkpoints holding an apex-like foreign object.
"""
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from drive_server import LocalDrive
from helpers import TWO_RANKS_PRETRAINED, run_python
from hf_server import LocalHub

REPO = Path(__file__).resolve().parents[1]
ZIP_WEIGHT, ZIP_CASE = 'an_mobilenetv2_100.aog_e150_in1k', 'legacy_an_mobilenetv2'
FOLDER_WEIGHT, FOLDER_CASE = 'an_densenet121.ivmcl_e120_in1k', 'refactored_an_densenet121'

import gdown  # noqa: F401  (test extras: missing means a broken install, not a skip)
import cryptography  # noqa: F401

_FOREIGN = '''
class LossScaler:
    """Stands for apex's loss scaler, pickled by the official training code with its state; if this class were
    imported on loading, restoring its state would write the marker file."""
    def __init__(self, scale):
        self.cur_scale = scale

    def __setstate__(self, state):
        import pathlib
        pathlib.Path({marker!r}).write_text('code from the checkpoint ran')
'''


def _nested(expect: dict) -> dict:
    """The config a training run writes for these architecture keys (dotted keys -> nested mappings)."""
    out: dict = {}
    for key, value in expect.items():
        node = out
        *parents, leaf = key.split('.')
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _mmcv_config(expect: dict) -> str:
    config = _nested(expect)
    lines = ['# model settings'] + [f'{k} = {v!r}' for k, v in config.items() if not isinstance(v, dict)]
    for key, value in config.items():
        if isinstance(value, dict):
            lines.append(f'{key} = dict(' + ', '.join(f'{k}={v!r}' for k, v in value.items()) + ')')
    return '\n'.join(lines) + '\ntotal_epochs = 120\nbatch_size = 256  # per gpu\n'


@pytest.fixture(scope='module')
def official(golden, golden_checkpoints, tmp_path_factory):
    """Official files of two weights: a legacy AOGNet-v2 zip (pre-zip torch serialization, an apex-like object in
    'optimizer') and an iVMCL-Release model folder; plus the golden expectations."""
    from an_zoo._manifest import weight_entry
    tmp = tmp_path_factory.mktemp('official')
    cases, _, root = golden
    marker = tmp / 'MARKER'
    (tmp / 'apex_like').mkdir()
    (tmp / 'apex_like' / '__init__.py').write_text(_FOREIGN.format(marker=str(marker)))
    sys.path.insert(0, str(tmp))
    try:
        import apex_like
        legacy = torch.load(golden_checkpoints[ZIP_CASE], map_location='cpu', weights_only=True)
        legacy['optimizer'] = {'loss_scaler': apex_like.LossScaler(128.0), 'state': {}}
        buffer = io.BytesIO()
        torch.save(legacy, buffer, _use_new_zipfile_serialization=False)
    finally:
        sys.path.remove(str(tmp))
        sys.modules.pop('apex_like', None)
        shutil.rmtree(tmp / 'apex_like')
    zip_entry = weight_entry(ZIP_WEIGHT)
    config = yaml.safe_dump(_nested(zip_entry.official_source['expect']))
    folder_entry = weight_entry(FOLDER_WEIGHT)
    expected = {case['name']: load_file(str(root / case['expected']['file'])) for case in cases}
    return dict(checkpoint=buffer.getvalue(), config=config, marker=marker,
                folder_checkpoint=Path(golden_checkpoints[FOLDER_CASE]).read_bytes(),
                folder_config=_mmcv_config(folder_entry.official_source['expect']),
                expected=expected, cases={c['name']: c for c in cases})


def _archive(members: dict, path: Path) -> bytes:
    with zipfile.ZipFile(path, 'w') as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path.read_bytes()


@pytest.fixture()
def drive(official, tmp_path, monkeypatch):
    """A fresh Drive with both weights, a manifest copy pointing at it, an empty an_zoo cache, env set."""
    drive = LocalDrive(tmp_path / 'certs').start()
    zip_id = drive.add_file('mobilenetv2-an-imagenet.zip', _archive(
        {'mobilenetv2-an-imagenet/config.yaml': official['config'],
         'mobilenetv2-an-imagenet/model_best.pth.tar': official['checkpoint']}, tmp_path / 'a.zip'))
    from an_zoo._manifest import weight_entry
    folder_entry = weight_entry(FOLDER_WEIGHT)
    name = folder_entry.official_source['path']
    model_folder = drive.add_folder(f'{name}-top1-77.4-top1_reallabels-83.7', [
        drive.add_file(f'{name}.py', official['folder_config'].encode()),
        drive.add_file('current.pth', official['folder_checkpoint'])])
    other = drive.add_folder(f'{name}_200e_ls_mixup-top1-80.0', [drive.add_file('current.pth', b'not this one')])
    release = drive.add_folder('ivmcl-release', [other, model_folder])
    raw = json.loads((REPO / 'weights_manifest.json').read_text())
    for w in raw['weights']:
        if f'{w["model"]}.{w["tag"]}' == ZIP_WEIGHT:
            w['official_source']['id'] = zip_id
        if w['official_source']['kind'] == 'gdrive_folder':
            w['official_source']['id'] = release
    manifest = tmp_path / 'manifest.json'
    manifest.write_text(json.dumps(raw, indent=2))
    env = dict(drive.env(), AN_ZOO_MANIFEST=str(manifest), AN_ZOO_CACHE=str(tmp_path / 'cache'),
               HF_HOME=str(tmp_path / 'hf_home'))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ('AN_ZOO_ACCEPT_LICENSE', 'HF_HUB_OFFLINE'):
        monkeypatch.delenv(key, raising=False)
    drive.zip_id, drive.manifest, drive.cache, drive.environ = zip_id, manifest, tmp_path / 'cache', env
    yield drive
    drive.stop()


def _golden_eval(model, official, case):
    expected = official['expected'][case]
    with torch.no_grad():
        logits = model.eval()(expected['input_eval'].float())
    tol = official['cases'][case]['tolerance']
    bound = tol['atol_eval'] * max(1.0, expected['logits_eval'].pow(2).mean().sqrt().item())
    assert (logits - expected['logits_eval']).abs().max().item() <= bound + tol['rtol'] * expected['logits_eval'].abs().max().item()


def _cache_folder(drive, weight):
    return drive.cache / 'official' / weight


def test_license_must_be_accepted_first(drive):
    from an_zoo.licenses import LicenseNotAcceptedError
    with pytest.raises(LicenseNotAcceptedError) as err:
        timm.create_model(ZIP_WEIGHT, pretrained=True)
    message = str(err.value)
    for text in ('AOGNet-v2 research-only license', 'https://github.com/iVMCL/AOGNet-v2/blob/master/LICENSE',
                 'AN_ZOO_ACCEPT_LICENSE=aognet-v2', 'an_zoo.accept_license("aognet-v2")', '--accept-license'):
        assert text in message
    assert drive.downloads(drive.zip_id) == 0 and not drive.cache.exists()


def test_download_convert_lock_then_verified_cache(drive, official, capsys):
    import an_zoo
    an_zoo.accept_license('aognet-v2')  # remembered in the an_zoo cache
    model = timm.create_model(ZIP_WEIGHT, pretrained=True)
    _golden_eval(model, official, ZIP_CASE)  # from the legacy-serialized official checkpoint
    cfg = model.pretrained_cfg  # says where the weights came from and under which licence
    assert cfg['source'] == 'official' and cfg['file'].endswith('model.safetensors')
    assert 'research and non-commercial use only' in cfg['notes'][0]
    assert not official['marker'].exists()  # the pickled apex-like object never ran
    folder = _cache_folder(drive, ZIP_WEIGHT)
    lock = json.loads((folder / 'lock.json').read_text())
    assert lock['official_files']['official.zip']['size'] == len(drive.files[drive.zip_id][1])
    printed = capsys.readouterr().err
    assert lock['official_files']['official.zip']['sha256'] in printed and lock['converted']['sha256'] in printed
    assert drive.downloads(drive.zip_id) == 1
    again = timm.create_model(ZIP_WEIGHT, pretrained=True)  # from the cache, verified against the lock
    assert drive.downloads(drive.zip_id) == 1
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    # the converted file changed on disk: refused, kept as it is
    converted = folder / 'model.safetensors'
    damaged = bytearray(converted.read_bytes())
    damaged[-1] ^= 0xFF
    converted.write_bytes(bytes(damaged))
    from an_zoo.hub import WeightsVerificationError
    with pytest.raises(WeightsVerificationError, match='differ from those recorded'):
        timm.create_model(ZIP_WEIGHT, pretrained=True)
    assert converted.read_bytes() == bytes(damaged)
    result = run_python(['-m', 'an_zoo', 'verify', ZIP_WEIGHT], dict(os.environ), check=False)
    assert result.returncode == 1 and 'FAILED' in result.stdout


def test_tampered_archive_is_refused_and_kept(drive, monkeypatch):
    monkeypatch.setenv('AN_ZOO_ACCEPT_LICENSE', 'aognet-v2')
    timm.create_model(ZIP_WEIGHT, pretrained=True)
    folder = _cache_folder(drive, ZIP_WEIGHT)
    (folder / 'model.safetensors').unlink()
    (folder / 'download' / 'official.zip').unlink()
    name, data = drive.files[drive.zip_id]
    drive.tamper(drive.zip_id, data[:-10] + b'0123456789')
    from an_zoo.hub import WeightsVerificationError
    with pytest.raises(WeightsVerificationError, match='differs from the one recorded at its first download'):
        timm.create_model(ZIP_WEIGHT, pretrained=True)
    assert (folder / 'download' / 'official.zip').read_bytes() == drive.files[drive.zip_id][1]  # kept
    assert not (folder / 'model.safetensors').exists()


def test_pinned_hash_is_checked_before_extraction(drive, monkeypatch):
    raw = json.loads(drive.manifest.read_text())
    entry = next(w for w in raw['weights'] if f'{w["model"]}.{w["tag"]}' == ZIP_WEIGHT)
    entry['official_source']['sha256'] = '0' * 64
    drive.manifest.write_text(json.dumps(raw))
    monkeypatch.setenv('AN_ZOO_ACCEPT_LICENSE', 'aognet-v2')
    from an_zoo.hub import WeightsVerificationError
    with pytest.raises(WeightsVerificationError, match='pinned in the manifest'):
        timm.create_model(ZIP_WEIGHT, pretrained=True)
    folder = _cache_folder(drive, ZIP_WEIGHT)
    assert (folder / 'download' / 'official.zip').is_file() and not (folder / 'extracted').exists()


@pytest.mark.parametrize('members, expected', [
    ({'m/config.yaml': 'arch: resnet50\n', 'm/model_best.pth.tar': b'x'}, 'does not describe'),
    ({'../config.yaml': 'x', 'm/model_best.pth.tar': b'x'}, 'leaves the archive folder'),
    ({'/abs/config.yaml': 'x', 'm/model_best.pth.tar': b'x'}, 'an absolute path'),
    ({'m/model_best.pth.tar': b'x'}, r"has no \['config.yaml'\]"),
])
def test_bad_archives_are_refused(drive, monkeypatch, members, expected, tmp_path):
    if members.get('m/config.yaml') == 'arch: resnet50\n':  # the right model's config with another K
        from an_zoo._manifest import weight_entry
        expect = dict(weight_entry(ZIP_WEIGHT).official_source['expect'], norm_k=[5, 5, 5, 5, 10, 10, 20])
        members['m/config.yaml'] = yaml.safe_dump(_nested(expect))
    drive.tamper(drive.zip_id, _archive(members, tmp_path / 'bad.zip'))
    monkeypatch.setenv('AN_ZOO_ACCEPT_LICENSE', 'aognet-v2')
    from an_zoo.official import OfficialFileError
    with pytest.raises(OfficialFileError, match=expected) as err:
        timm.create_model(ZIP_WEIGHT, pretrained=True)
    if expected == 'does not describe':
        assert 'norm_k: [5, 5, 5, 5, 10, 10, 20] (expected [5, 5, 5, 5, 10, 10, 10])' in str(err.value)
    folder = _cache_folder(drive, ZIP_WEIGHT)
    assert not (folder / 'model.safetensors').exists() and not (folder / 'lock.json').exists()
    assert not (tmp_path.parent / 'config.yaml').exists()


def test_symlink_member_is_refused(tmp_path):
    from an_zoo._official_files import OfficialFileError, extract_members
    path = tmp_path / 'link.zip'
    with zipfile.ZipFile(path, 'w') as zf:
        info = zipfile.ZipInfo('m/config.yaml')
        info.external_attr = (0o120777 << 16)  # a symbolic link
        zf.writestr(info, '/etc/passwd')
        zf.writestr('m/model_best.pth.tar', b'x')
    with pytest.raises(OfficialFileError, match='a symbolic link'):
        extract_members(path, ['config.yaml', 'model_best.pth.tar'], tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_truncated_download_is_resumed(drive, monkeypatch):
    monkeypatch.setenv('AN_ZOO_ACCEPT_LICENSE', 'aognet-v2')
    drive.cut(drive.zip_id, 3 << 20)  # the connection drops after 3 MiB (gdown writes 512 KiB chunks)
    from an_zoo.hub import WeightsUnavailableError
    with pytest.raises(WeightsUnavailableError, match='resumed by the next attempt'):
        timm.create_model(ZIP_WEIGHT, pretrained=True)
    download = _cache_folder(drive, ZIP_WEIGHT) / 'download'
    assert not (download / 'official.zip').exists() and len(list(download.glob('*.part'))) == 1
    timm.create_model(ZIP_WEIGHT, pretrained=True)
    ranges = [r for path, file_id, r in drive.requests if file_id == drive.zip_id]
    assert ranges[-1] is not None and int(ranges[-1].split('=')[1].rstrip('-')) > 0  # continued, not restarted
    assert (download / 'official.zip').read_bytes() == drive.files[drive.zip_id][1]


def test_offline_with_and_without_cached_copy(drive, monkeypatch):
    monkeypatch.setenv('AN_ZOO_ACCEPT_LICENSE', 'aognet-v2')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    from an_zoo.hub import WeightsUnavailableError
    target = _cache_folder(drive, ZIP_WEIGHT) / 'download' / 'official.zip'
    with pytest.raises(WeightsUnavailableError, match='HF_HUB_OFFLINE is set') as err:
        timm.create_model(ZIP_WEIGHT, pretrained=True)
    assert str(target) in str(err.value) and f'uc?id={drive.zip_id}' in str(err.value)
    assert drive.downloads(drive.zip_id) == 0
    target.parent.mkdir(parents=True)
    target.write_bytes(drive.files[drive.zip_id][1])  # placed by hand, as the message says
    model = timm.create_model(ZIP_WEIGHT, pretrained=True)
    cached = timm.create_model(ZIP_WEIGHT, pretrained=True)  # and again from the conversion
    assert drive.downloads(drive.zip_id) == 0
    assert torch.equal(model.state_dict()['conv_stem.weight'], cached.state_dict()['conv_stem.weight'])


def test_ivmcl_release_folder(drive, official, monkeypatch):
    monkeypatch.setenv('AN_ZOO_ACCEPT_LICENSE', 'ivmcl-release')
    model = timm.create_model(FOLDER_WEIGHT, pretrained=True)
    _golden_eval(model, official, FOLDER_CASE)
    # the model's sub-folder is found by its config name, not the longer "..._200e_ls_mixup" one
    raw = json.loads(drive.manifest.read_text())
    entry = next(w for w in raw['weights'] if f'{w["model"]}.{w["tag"]}' == FOLDER_WEIGHT)
    entry['official_source']['path'] = 'densenet_169_an_imagenet'
    drive.manifest.write_text(json.dumps(raw))
    shutil.rmtree(drive.cache / 'official')
    from an_zoo.official import OfficialSourceError
    with pytest.raises(OfficialSourceError, match="no sub-folder.*densenet_121_an_imagenet-top1-77.4"):
        timm.create_model(FOLDER_WEIGHT, pretrained=True)


def test_mmcv_config_is_read_as_data(tmp_path):
    from an_zoo._official_files import OfficialFileError, read_config
    good = tmp_path / 'good.py'
    good.write_text("model = dict(type='ResNetAN', depth=34, num_affine_trans=(10, 10, 20, 20))\nlr = 0.1 * 8\n")
    assert read_config(good) == {'model': {'type': 'ResNetAN', 'depth': 34, 'num_affine_trans': [10, 10, 20, 20]},
                                 'lr': 0.8}
    marker = tmp_path / 'ran'
    for code in (f"import os\nos.system('touch {marker}')\n", f"x = open('{marker}', 'w')\n",
                 "model = dict(type=__import__('os').getcwd())\n"):
        bad = tmp_path / 'bad.py'
        bad.write_text(code)
        with pytest.raises(OfficialFileError, match='data'):
            read_config(bad)
    assert not marker.exists()


def test_torchrun_downloads_once(drive, tmp_path):
    script = tmp_path / 'ddp.py'
    script.write_text(TWO_RANKS_PRETRAINED)
    env = dict(os.environ, AN_ZOO_ACCEPT_LICENSE='aognet-v2', PYTHONPATH=str(REPO))
    run_python([str(script), ZIP_WEIGHT], env)
    assert drive.downloads(drive.zip_id) == 1


def test_import_official_publish_then_hub_load_bit_exact(drive, tmp_path):
    out = tmp_path / 'converted'
    with LocalHub() as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN='test-token', HF_HUB_DISABLE_TELEMETRY='1',
                   PYTHONPATH=str(REPO))
        result = run_python(['-m', 'an_zoo', 'import-official', ZIP_WEIGHT, '--accept-license', '--out', str(out)],
                             env)
        assert f'python scripts/publish.py {ZIP_WEIGHT} --dir {out}' in result.stdout
        entry = next(w for w in json.loads(drive.manifest.read_text())['weights']
                     if f'{w["model"]}.{w["tag"]}' == ZIP_WEIGHT)
        lock = json.loads((_cache_folder(drive, ZIP_WEIGHT) / 'lock.json').read_text())
        assert entry['sha256'] == lock['converted']['sha256'] and entry['num_params'] == 3_672_760
        assert entry['official_source']['sha256'] == lock['official_files']['official.zip']['sha256']
        assert {p.name for p in (out / ZIP_WEIGHT).iterdir()} == {'model.safetensors', 'config.json', 'README.md'}
        run_python(['scripts/publish.py', ZIP_WEIGHT, '--dir', str(out)], env)
        shutil.rmtree(drive.cache)  # the Hub copy, not the official conversion, must be what loads now
        code = (f'import torch, timm, an_zoo\nm = timm.create_model("{ZIP_WEIGHT}", pretrained=True)\n'
                f'torch.save(m.state_dict(), "{tmp_path / "hub.pt"}")\nprint(m.pretrained_cfg.get("hf_hub_id"))')
        result = run_python(['-c', code], dict(env, AN_ZOO_ACCEPT_LICENSE=''))
        assert f'an-zoo/{ZIP_WEIGHT}' in result.stdout
    hub_state = torch.load(tmp_path / 'hub.pt', weights_only=True)
    converted = load_file(str(out / ZIP_WEIGHT / 'model.safetensors'))
    assert hub_state.keys() == converted.keys()
    for key, value in converted.items():
        assert torch.equal(hub_state[key], value), key


def test_missing_gdown_says_how_to_install(drive, monkeypatch):
    monkeypatch.setenv('AN_ZOO_ACCEPT_LICENSE', 'aognet-v2')
    monkeypatch.setitem(sys.modules, 'gdown', None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "an_zoo\[official\]"'):
        timm.create_model(ZIP_WEIGHT, pretrained=True)
    assert drive.downloads(drive.zip_id) == 0
