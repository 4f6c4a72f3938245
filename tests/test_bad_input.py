"""Bad input: every case fails with an error that says what was wrong and what to do, and no failure modifies or
deletes anything the user already has on disk (checkpoint files, the Hugging Face cache: hashed before and after).
"""
import dataclasses
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from an_zoo import AttentiveBatchNorm2d, CheckpointError
from helpers import PickledCall
from hf_server import LocalHub

REPO = Path(__file__).resolve().parents[1]
IMG = 32


pytestmark = pytest.mark.usefixtures('one_thread')


def _snapshot(path: Path) -> dict:
    """sha256 of every file under ``path`` (or of ``path`` itself), symlinks by their target."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob('*') if p.is_file() or p.is_symlink())
    out = {}
    for file in files:
        key = str(file.relative_to(path)) if file != path else file.name
        if file.is_symlink():
            out[key + ' ->'] = os.readlink(file)
        if file.exists():
            out[key] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def _assert_kept(before: dict, path: Path) -> None:
    """Everything that was there before is still there, unchanged (new files, e.g. lock files, are allowed)."""
    after = _snapshot(path)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f'modified or deleted by a failed load: {changed}'


def _load(name: str, path: Path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


# ----------------------------------------------------------------------------------------------- input tensors
def test_layer_input_errors_say_what_to_do():
    layer = AttentiveBatchNorm2d(16, 4).eval()
    with pytest.raises(ValueError, match=r'4D \(N, C, H, W\).*3D input of shape \[16, 5, 5\].*x\.unsqueeze\(0\)'):
        layer(torch.randn(16, 5, 5))
    with pytest.raises(ValueError, match=r'8 channels \(shape \[2, 8, 5, 5\]\), expected 16.*output 16 channels'):
        layer(torch.randn(2, 8, 5, 5))


@pytest.mark.parametrize('name', ['an_resnet18_bn12', 'an_mobilenetv2_050'])
def test_model_input_errors(name):
    # the stem conv / BatchNorm see the input first: these are torch's messages, which name expected and got
    model = timm.create_model(name).eval()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r'expected input\[2, 4, 32, 32\] to have 3 channels, but got 4'):
            model(torch.randn(2, 4, IMG, IMG))
        with pytest.raises((ValueError, RuntimeError, AssertionError), match=r"expected 4D input \(got 3D input\)"):
            model(torch.randn(3, IMG, IMG))  # a single unbatched image
        assert model(torch.randn(3, IMG, IMG)[None]).shape == (1, 1000)


# ----------------------------------------------------------------------------------------------- model names
def test_unknown_model_name():
    # timm 1.0.31 raises in create_model before any an_zoo code runs, without suggestions; it has no hook for
    # them (an_zoo does not monkeypatch timm). Close names are offered where an_zoo owns the lookup (below).
    with pytest.raises(RuntimeError, match=r'^Unknown model \(an_resnet5\)$'):
        timm.create_model('an_resnet5')
    assert 'an_resnet50' in timm.list_models('an_resnet5*')  # what the README tells users to run


def test_unknown_weight_tag_suggests_close_tags():
    with pytest.raises(RuntimeError, match=r'Invalid pretrained tag \(aog_e120\) for an_resnet50\. Did you mean '
                                           r'an_resnet50\.aog_e120_in1k\?.*timm\.list_models'):
        timm.create_model('an_resnet50.aog_e120')
    with pytest.raises(RuntimeError, match=r'Did you mean an_resnet50d\.ivmcl_e200_lsmix_in1k'):
        timm.create_model('an_resnet50d.ivmcl_e200', pretrained=True)
    with pytest.raises(RuntimeError, match=r'Invalid pretrained tag \(in1k\) for an_resnet18_bn12\. Known: none'):
        timm.create_model('an_resnet18_bn12.in1k')
    assert timm.create_model('an_resnet50.aog_e120_in1k').pretrained_cfg['tag'] == 'aog_e120_in1k'


def test_cli_unknown_weight_suggests_close_names():
    from an_zoo.__main__ import main
    with pytest.raises(SystemExit, match=r"unknown or ambiguous weight 'an_resnet5'\. Did you mean an_resnet50"):
        main(['download', 'an_resnet5'])
    with pytest.raises(SystemExit, match=r'Did you mean .*an_mobilenetv2_100\.aog_e150_in1k'):
        main(['verify', 'an_mobilenetv2_100.aog_e150'])


def test_torch_hub_unknown_entry_point():
    # torch.hub looks the name up in dir(hubconf) itself: no hook for suggestions; its message names the entry
    with pytest.raises(RuntimeError, match='Cannot find callable an_resnet5 in hubconf'):
        torch.hub.load(str(REPO), 'an_resnet5', source='local')


# ----------------------------------------------------------------------------------------------- checkpoints
def test_num_classes_mismatch_says_how_to_load(tmp_path):
    source = timm.create_model('an_resnet18_bn1', num_classes=10)
    path = tmp_path / 'finetuned.safetensors'
    save_file(source.state_dict(), str(path))
    before = _snapshot(path)
    with pytest.raises(CheckpointError) as info:
        _load('an_resnet18_bn1', path)
    message = str(info.value)
    assert 'classifier fc has 10 outputs' in message and 'the model 1000' in message
    assert 'num_classes=10 and pretrained_cfg_overlay=dict(..., num_classes=10)' in message
    _assert_kept(before, tmp_path)
    # following the advice loads every tensor, the head included
    model = timm.create_model('an_resnet18_bn1', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert _load('an_resnet18_bn1', path, num_classes=5).fc.out_features == 5  # a new head


def test_in_chans_mismatch_says_how_to_load(tmp_path):
    source = timm.create_model('an_resnet50d', in_chans=4)
    path = tmp_path / 'rgbd.pth'
    torch.save({'state_dict': source.state_dict()}, path)
    before = _snapshot(path)
    with pytest.raises(CheckpointError, match=r'first conv conv1\.0\.weight takes 4 input channel\(s\).*the model 3.*'
                                              r'Create the model with in_chans=4'):
        _load('an_resnet50d', path)
    _assert_kept(before, tmp_path)
    model = _load('an_resnet50d', path, in_chans=4)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)


@pytest.mark.parametrize('source_name, target, expected', [
    ('an_mobilenetv2_075', 'an_mobilenetv2_050',
     r'does not fit an_mobilenetv2_050: \d+ tensor\(s\) have another shape.*conv_stem\.weight: checkpoint \[24, 3, 3, '
     r'3\], model \[16, 3, 3, 3\].*another variant.*create the model it was trained with'),
    ('resnet18', 'an_resnet18_bn1',  # a plain BatchNorm ResNet-18 from timm: AN tensors missing
     r"does not fit an_resnet18_bn1: .*map to no parameter of the model: \['layer1\.0\.bn1\.bias'.*"
     r"not in the checkpoint: \['layer1\.0\.bn1\.mixture_weight'.*Check that the checkpoint is for this architecture"),
])
def test_other_variant_or_plain_bn_is_refused(source_name, target, expected, tmp_path):
    path = tmp_path / 'other.safetensors'
    save_file(timm.create_model(source_name).state_dict(), str(path))
    before = _snapshot(path)
    with pytest.raises(CheckpointError, match=expected):
        _load(target, path)
    _assert_kept(before, tmp_path)


def test_missing_keys_are_listed(tmp_path):
    state_dict = timm.create_model('an_resnet18_bn1').state_dict()
    del state_dict['layer2.1.bn1.mixture_bias'], state_dict['layer3.0.conv2.weight']
    path = tmp_path / 'partial.pth'
    torch.save(state_dict, path)
    before = _snapshot(path)
    with pytest.raises(CheckpointError, match=r"0 checkpoint key\(s\) map to no parameter.*2 model key\(s\) are not in "
                                              r"the checkpoint: \['layer2\.1\.bn1\.mixture_bias', "
                                              r"'layer3\.0\.conv2\.weight'\]"):
        _load('an_resnet18_bn1', path)
    _assert_kept(before, tmp_path)


def _garbage(seed: int) -> bytes:
    rnd = random.Random(seed)
    return bytes(rnd.getrandbits(8) for _ in range(rnd.choice([1, 2, 7, 64, 4096])))


def _corrupt(name: str, tmp_path: Path) -> bytes:
    """The bytes of a damaged checkpoint ``name`` (written from a real an_resnet18_bn1 state_dict)."""
    if name in ('empty.pth', 'empty.safetensors'):
        return b''
    if name == 'text.pth.tar':
        return b'<html>404 Not Found</html>\n'  # an error page saved as the checkpoint
    if name.startswith('garbage'):
        return _garbage(int(name.split('.')[0].split('_')[1]))
    state_dict = timm.create_model('an_resnet18_bn1').state_dict()
    if name == 'list.pth':  # a valid torch file that holds no state_dict
        torch.save([torch.zeros(2)], tmp_path / name)
        return (tmp_path / name).read_bytes()
    if name == 'truncated_legacy.pth':  # torch's pre-1.6 (non-zip) format
        torch.save(state_dict, tmp_path / name, _use_new_zipfile_serialization=False)
        return (tmp_path / name).read_bytes()[:(tmp_path / name).stat().st_size // 3]
    save_file(state_dict, str(tmp_path / 'good.safetensors'))
    data = (tmp_path / 'good.safetensors').read_bytes()
    header_len = int.from_bytes(data[:8], 'little')
    if name == 'bad_header.safetensors':
        return data[:8] + b'{' * header_len + data[8 + header_len:]
    assert name == 'huge_header_length.safetensors'
    return (2 ** 40).to_bytes(8, 'little') + data[8:]


# random bytes on which torch's weights_only unpickler fails with these (torch 2.14):
GARBAGE_SEEDS = (0, 4, 17, 35, 44)  # UnpicklingError, struct.error, KeyError, UnicodeDecodeError, IndexError


@pytest.mark.parametrize('name', ['empty.pth', 'text.pth.tar', 'list.pth', 'truncated_legacy.pth',
                                  *[f'garbage_{seed}.pth' for seed in GARBAGE_SEEDS], 'empty.safetensors',
                                  'bad_header.safetensors', 'huge_header_length.safetensors', 'garbage_1.safetensors'])
def test_corrupt_file_is_refused_and_kept(name, tmp_path):
    path = tmp_path / 'user' / name
    path.parent.mkdir()
    path.write_bytes(_corrupt(name, tmp_path))
    before = _snapshot(path.parent)
    with pytest.raises(CheckpointError) as info:
        _load('an_resnet18_bn1', path)
    message = str(info.value)
    assert str(path) in message
    if name == 'list.pth':
        assert 'holds no state_dict (found list)' in message
    else:
        assert 'truncated' in message and 'corrupt' in message and 'download it again' in message
    _assert_kept(before, path.parent)


def test_pickled_calls_are_never_run(tmp_path):
    source = timm.create_model('an_resnet18_bn1')
    victim = tmp_path / 'victim'
    victim.mkdir()
    (victim / 'keep.txt').write_text('the user\'s data')
    # shutil.rmtree: torch's weights_only unpickler would import it; an_zoo substitutes an inert placeholder
    path = tmp_path / 'rmtree.pth.tar'
    torch.save({'state_dict': source.state_dict(), 'optimizer': PickledCall(shutil.rmtree, str(victim))}, path)
    before = _snapshot(tmp_path)
    model = _load('an_resnet18_bn1', path)
    assert (victim / 'keep.txt').read_text() == "the user's data", 'code referenced by the checkpoint was executed'
    assert torch.equal(model.fc.weight, source.fc.weight)  # the weights load
    _assert_kept(before, tmp_path)
    # os.system: torch refuses the module outright; the error says so instead of blaming a truncated download
    marker = tmp_path / 'marker'
    path = tmp_path / 'system.pth.tar'
    torch.save({'state_dict': source.state_dict(), 'optimizer': PickledCall(os.system, f'echo ran > {marker}')}, path)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"(?s)cannot read checkpoint .*system\.pth\.tar safely: it references "
                                              r"\['posix\.system'\].*Nothing from the file was run\. If you trust the "
                                              r"file, extract its state_dict yourself"):
        _load('an_resnet18_bn1', path)
    assert not marker.exists()
    _assert_kept(before, tmp_path)


# ----------------------------------------------------------------------------------------------- manifest
def _manifest_with(tmp_path: Path, edit) -> Path:
    raw = json.loads((REPO / 'weights_manifest.json').read_text())
    edit(raw['weights'][0], raw)
    path = tmp_path / 'manifest.json'
    path.write_text(json.dumps(raw))
    return path


def _set(key, value):
    def edit(entry, raw):
        entry[key] = value
    return edit


def _published(entry, raw):
    entry.update(published=True, sha256=None, revision='a' * 40, size=10, num_params=10)


def _drop_provenance_field(entry, raw):
    del entry['provenance']['origin_url']


def _duplicate(entry, raw):
    raw['weights'].append(dict(entry))


def _drop_weights(entry, raw):
    del raw['weights']


def _result(eval_set, top1):
    def edit(entry, raw):
        entry['reported']['results'][eval_set] = {'top1': top1}
    return edit


def _alias_taken(entry, raw):
    raw['weights'][1]['aliases'] = [entry['model']]
    raw['weights'][1]['tag'] = entry['tag']


@pytest.mark.parametrize('edit, expected', [
    (_set('sha256', 'ABC'), r'weights\[0\] \(an_resnet50\.aog_e120_in1k\)\.sha256 must be 64 lowercase hex digits, '
                            r"got 'ABC'"),
    (_set('sha256', 'F' * 64), r'\.sha256 must be 64 lowercase hex digits'),
    (_set('revision', 'main'), r"\.revision must be a full 40-hex commit id, got 'main'"),
    (_set('size', -1), r'\.size must be a positive integer, got -1'),
    (_published, r"is marked published but has no \['sha256'\] \(run scripts/convert_official\.py"),
    (_drop_provenance_field, r"weights\[0\] \(an_resnet50\.aog_e120_in1k\)\.provenance is missing required field\(s\) "
                             r"\['origin_url'\]"),
    (_duplicate, r'an_resnet50\.aog_e120_in1k\) is listed twice'),
    (_drop_weights, r"the top level is missing required field\(s\) \['weights'\]"),
    (_set('aliases', 'an_resnet34'), r"\.aliases must be a list of architecture names, got 'an_resnet34'"),
    (_result('imagenet-x', 1.0), r"\.reported\.results names unknown evaluation set 'imagenet-x'; known: "),
    (_result('imagenet-1k', 787), r'\.reported\.results\.imagenet-1k\.top1 must be a percentage, got 787'),
    (_alias_taken, r'an_resnet101\.aog_e120_in1k\) is listed twice \(as an entry or an alias\)'),
])
def test_bad_manifest_field(edit, expected, tmp_path):
    from an_zoo._manifest import ManifestError, load_manifest
    path = _manifest_with(tmp_path, edit)
    before = _snapshot(path)
    with pytest.raises(ManifestError, match=expected) as info:
        load_manifest(path)
    assert str(path) in str(info.value)  # names the file
    _assert_kept(before, path)


def test_unreadable_manifest(tmp_path):
    from an_zoo._manifest import ManifestError, load_manifest
    path = tmp_path / 'manifest.json'
    path.write_text('{"format_version": 1, ')
    with pytest.raises(ManifestError, match=f'cannot read the weights manifest {path}'):
        load_manifest(path)
    with pytest.raises(ManifestError, match='cannot read the weights manifest .*missing.json'):
        load_manifest(tmp_path / 'missing.json')


# ----------------------------------------------------------------------------------------------- the Hub
@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """A local Hub with one repo, and a Hugging Face cache that already holds a file the user downloaded."""
    from huggingface_hub import constants
    from an_zoo.hub import fetch_weights
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)  # an outer HF_HUB_OFFLINE=1, read at import
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    cache = tmp_path / 'hf_cache'
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    with LocalHub() as hub:
        monkeypatch.setenv('HF_ENDPOINT', hub.url)
        data = b'the user\'s weights'
        sha = hub.add_file('org/an_resnet18_bn1.mine', 'model.safetensors', data)
        hub.add_file('org/an_resnet18_bn1.mine', 'model.safetensors', b'a newer commit')
        kept = fetch_weights(repo_id='org/an_resnet18_bn1.mine', revision=sha)
        assert kept.read_bytes() == data
        yield dict(hub=hub, cache=cache, sha=sha, before=_snapshot(cache), data=data)


def _entry(**fields):
    from an_zoo._manifest import load_manifest
    base = next(e for e in load_manifest() if e.name == 'an_mobilenetv2_100.aog_e150_in1k')
    return dataclasses.replace(base, **fields)


def test_missing_repo_revision_or_file_keeps_the_cache(hub_env):
    from an_zoo.hub import WeightsUnavailableError, fetch_weights
    hub, cache = hub_env['hub'], hub_env['cache']
    cases = [
        (dict(repo_id='org/missing'), r'org/missing: model\.safetensors at revision main of org/missing is not on '
                                      r'http://127\.0\.0\.1:\d+ \(RepositoryNotFoundError\)'),
        (dict(repo_id='org/an_resnet18_bn1.mine', filename='pytorch_model.bin'),
         r'pytorch_model\.bin at revision main of org/an_resnet18_bn1\.mine is not on .*EntryNotFoundError'),
        (dict(entry=_entry(hf_hub_id='org/an_resnet18_bn1.mine', revision='0' * 40, published=True)),
         r'an_mobilenetv2_100\.aog_e150_in1k: model\.safetensors at revision 0{40} .*RevisionNotFoundError'),
    ]
    for kwargs, expected in cases:
        with pytest.raises(WeightsUnavailableError, match=expected) as info:
            fetch_weights(kwargs.pop('entry', None), **kwargs)
        assert 'Check the repo id and revision, or load a local file with pretrained_cfg_overlay=dict(file=' \
            in str(info.value)
        _assert_kept(hub_env['before'], cache)
    assert not [r for r in hub.requests if r[0] not in ('GET', 'HEAD')]  # nothing uploaded or deleted remotely


def test_manifest_hash_mismatch_is_refused_and_the_cache_kept(hub_env):
    from an_zoo.hub import WeightsVerificationError, fetch_weights
    cache, data = hub_env['cache'], hub_env['data']
    entry = _entry(hf_hub_id='org/an_resnet18_bn1.mine', revision=hub_env['sha'], published=True,
                   sha256=hashlib.sha256(b'something else').hexdigest(), size=len(data))
    with pytest.raises(WeightsVerificationError) as info:
        fetch_weights(entry)
    message = str(info.value)
    assert f'sha256 mismatch for {entry.name}' in message and entry.sha256 in message
    assert hashlib.sha256(data).hexdigest() in message and 'The file was not loaded' in message
    assert f'python -m an_zoo download {entry.name}' in message
    wrong_size = dataclasses.replace(entry, size=len(data) + 1)
    with pytest.raises(WeightsVerificationError, match=f'has {len(data)} bytes, expected {len(data) + 1}: the file '
                                                       'is truncated or corrupt and was not loaded'):
        fetch_weights(wrong_size)
    _assert_kept(hub_env['before'], cache)


class _NoSleep:
    """Stands in for the ``time`` module of huggingface_hub's HTTP retry loop: the retries (about 23 s of
    back-off against an unreachable endpoint) run without the waits."""

    def __init__(self):
        import time
        self._time = time
        self.slept = []

    def sleep(self, seconds):
        self.slept.append(seconds)

    def __getattr__(self, name):
        return getattr(self._time, name)


def test_offline_or_unreachable_endpoint_keeps_the_cache(hub_env, monkeypatch):
    from huggingface_hub.utils import _http
    from an_zoo.hub import WeightsUnavailableError, fetch_weights
    cache = hub_env['cache']
    no_sleep = _NoSleep()
    monkeypatch.setattr(_http, 'time', no_sleep)
    dead = LocalHub().start()
    dead_url = dead.url
    dead.stop()  # connection refused from now on
    monkeypatch.setenv('HF_ENDPOINT', dead_url)

    manifest_entry = _entry(hf_hub_id='org/an_resnet18_bn1.mine', revision=hub_env['sha'], published=True,
                            sha256=hashlib.sha256(hub_env['data']).hexdigest(), size=len(hub_env['data']))
    # the pinned revision is cached: no network needed, unreachable or offline
    assert fetch_weights(manifest_entry).read_bytes() == hub_env['data']

    with pytest.raises(WeightsUnavailableError) as info:
        fetch_weights(repo_id='org/an_resnet18_bn1.mine', revision='b' * 40)
    message = str(info.value)
    assert f'{dead_url} could not be reached and model.safetensors (repo org/an_resnet18_bn1.mine, revision ' \
           f'{"b" * 40}) is not in the cache {cache}' in message
    assert 'huggingface_hub.hf_hub_download("org/an_resnet18_bn1.mine"' in message  # not in the manifest
    assert 'pretrained_cfg_overlay=dict(file=' in message
    assert no_sleep.slept, 'huggingface_hub no longer retries: drop _NoSleep'
    _assert_kept(hub_env['before'], cache)

    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    assert fetch_weights(manifest_entry).read_bytes() == hub_env['data']
    requests = len(no_sleep.slept)
    for kwargs in (dict(entry=dataclasses.replace(manifest_entry, revision='c' * 40)),
                   dict(repo_id='org/an_resnet18_bn1.mine')):  # 'main' was never resolved while online
        with pytest.raises(WeightsUnavailableError) as info:
            fetch_weights(kwargs.pop('entry', None), **kwargs)
        assert 'HF_HUB_OFFLINE is set' in str(info.value) and f'is not in the cache {cache}' in str(info.value)
    assert f'python -m an_zoo download {manifest_entry.name}' in _offline_message(manifest_entry)
    assert len(no_sleep.slept) == requests  # offline: no request was even attempted
    _assert_kept(hub_env['before'], cache)


def _offline_message(entry) -> str:
    from an_zoo.hub import WeightsUnavailableError, fetch_weights
    with pytest.raises(WeightsUnavailableError) as info:
        fetch_weights(dataclasses.replace(entry, revision='d' * 40))
    return str(info.value)
