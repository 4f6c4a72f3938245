"""Loading is bounded and exact: no file makes an_zoo allocate much more than its own size plus the model's, the
bytes verified are the bytes loaded, bundles are verified and stay inside their folder, ambiguous or ill-typed
checkpoints are refused with the keys named, and manifest / bundle values are validated strictly."""
import hashlib
import io
import json
import re
import struct
import tracemalloc
import types
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from an_zoo import CheckpointError, load_checkpoint_file
from an_zoo._manifest import ManifestError, load_manifest
from an_zoo.hub import WeightsVerificationError
from an_zoo.models._builder import _local_dir_weights
from an_zoo.models._checkpoint import remap_state_dict
from helpers import PickledCall

REPO = Path(__file__).resolve().parents[1]
WEIGHT = 'an_mobilenetv2_100.aog_e150_in1k'
ARCH, TAG = WEIGHT.split('.')

pytestmark = pytest.mark.usefixtures('one_thread')


def _python_peak(fn):
    """Run ``fn``; return what it raised and the peak of Python allocations meanwhile (bytearrays are counted)."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            fn()
        return info.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------------------- memory bombs
@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_pickled_bytearray_of_gigabytes_is_refused_before_allocating(fmt, tmp_path):
    path = tmp_path / 'bomb.pth'
    torch.save({'state_dict': {'w': torch.zeros(2)}, 'extra': PickledCall(bytearray, 3_000_000_000)}, path,
               _use_new_zipfile_serialization=fmt == 'zip')
    assert path.stat().st_size < 4096
    error, peak = _python_peak(lambda: load_checkpoint_file(path))
    assert re.search(r'builtins\.bytearray\(3000000000\).*declares 3,000,000,000 bytes, more than the [\d,]+ bytes '
                     r'the file holds', str(error)), error
    assert peak < 50e6


@pytest.mark.parametrize('shape', [(40000, 20000), (10 ** 6, 10 ** 6)])
def test_expanded_tensor_is_refused_before_any_cast(shape, tmp_path):
    """A 2-byte float16 storage expanded (stride 0) to gigabytes: refused when read, and by the model's shapes."""
    state_dict = timm.create_model('an_mobilenetv2_050').state_dict()
    state_dict['classifier.weight'] = torch.zeros(1, dtype=torch.float16).expand(*shape)
    path = tmp_path / 'expanded.pth'
    torch.save(state_dict, path)
    assert path.stat().st_size < 10e6
    with pytest.raises(CheckpointError, match=rf'classifier\.weight has shape \[{shape[0]}, {shape[1]}\] .*its '
                                              r'storage holds only 2 bytes.*expanded'):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match='expanded'):
        timm.create_model('an_mobilenetv2_050', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    # a filter fn handed such a tensor by other means refuses it too, before casting it to float32
    with pytest.raises(CheckpointError, match='expanded'):
        remap_state_dict(state_dict, timm.create_model('an_mobilenetv2_050'))


def test_shapes_are_checked_before_casting(monkeypatch):
    """A dense float16 tensor of another shape is refused by shape before it is cast to the model's float32."""
    model = timm.create_model('an_resnet18_bn1')
    state_dict = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state_dict['layer1.0.conv1.weight'] = torch.zeros(64, 64, 3, 4, dtype=torch.float16)
    casts = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, 'to', lambda self, *a, **k: casts.append(self.shape) or to(self, *a, **k))
    with pytest.raises(CheckpointError, match=r'layer1\.0\.conv1\.weight: checkpoint \[64, 64, 3, 4\]'):
        remap_state_dict(state_dict, model)
    assert not casts


def test_legacy_storage_larger_than_the_file_is_refused_before_allocating(tmp_path):
    """The legacy reader allocates each storage at its pickled size before reading it: 8 GB declared in 5 kB."""
    path = tmp_path / 'legacy.pth'
    torch.save({'w': torch.zeros(1000)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    # BININT2 1000: first the storage's numel (its persistent id), then the tensor's shape
    assert data.count(b'M\xe8\x03') == 2
    path.write_bytes(data.replace(b'M\xe8\x03', b'J' + struct.pack('<i', 2_000_000_000), 1))
    with pytest.raises(CheckpointError, match=r'its storages declares 8,000,000,000 bytes, more than the [\d,]+ '
                                              r'bytes the file holds.*nothing was loaded'):
        load_checkpoint_file(path)


def test_zip_records_must_fit_in_the_file(tmp_path):
    """A deflated zip record would be inflated to its declared size: records larger than the file are refused."""
    import zipfile
    path = tmp_path / 'zip.pth'
    torch.save({'w': torch.zeros(100_000)}, path)
    packed = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(packed, 'w', zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    path.write_bytes(packed.getvalue())
    with pytest.raises(CheckpointError, match=r'its zip archive declares [\d,]+ bytes, more than the [\d,]+ bytes'):
        load_checkpoint_file(path)


# ------------------------------------------------------------------------------ verify the bytes you load
def _published_manifest(tmp_path, monkeypatch, weights: Path) -> dict:
    """A manifest copy in which WEIGHT is published with the hash of ``weights``; AN_ZOO_MANIFEST points at it."""
    raw = json.loads((REPO / 'weights_manifest.json').read_text())
    entry = next(w for w in raw['weights'] if f'{w["model"]}.{w["tag"]}' == WEIGHT)
    data = weights.read_bytes()
    entry.update(published=True, revision='0' * 40, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                 num_params=1)
    path = tmp_path / 'manifest.json'
    path.write_text(json.dumps(raw))
    monkeypatch.setenv('AN_ZOO_MANIFEST', str(path))
    return entry


def _swap_after_hashing(monkeypatch, path: Path, replacement: bytes) -> None:
    """Replace ``path``'s content as soon as an_zoo has computed a sha256: what a file swapped between the check
    and the load would do."""
    import an_zoo.hub

    class Hasher:
        def __init__(self, *args):
            self._h = hashlib.sha256(*args)

        def update(self, data):
            self._h.update(data)

        def hexdigest(self):
            path.write_bytes(replacement)
            return self._h.hexdigest()

    monkeypatch.setattr(an_zoo.hub, 'hashlib', types.SimpleNamespace(sha256=Hasher))


@pytest.mark.parametrize('route', ['file', 'local-dir'])
def test_the_verified_bytes_are_the_loaded_bytes(route, tmp_path, monkeypatch):
    from an_zoo._card import hub_config
    from an_zoo._manifest import weight_entry
    source = timm.create_model(ARCH)
    folder = tmp_path / 'bundle'
    folder.mkdir()
    path = folder / 'model.safetensors'
    save_file(source.state_dict(), str(path))
    _published_manifest(tmp_path, monkeypatch, path)
    tampered = {k: torch.zeros_like(v) for k, v in source.state_dict().items()}
    save_file(tampered, str(tmp_path / 'tampered.safetensors'))
    if route == 'local-dir':
        config = hub_config(weight_entry(WEIGHT), source.pretrained_cfg, source.num_features)
        (folder / 'config.json').write_text(json.dumps(config))
        name, kwargs = f'local-dir:{folder}', {}
    else:
        name, kwargs = ARCH, dict(pretrained_cfg=TAG, pretrained_cfg_overlay=dict(file=str(path)))
    _swap_after_hashing(monkeypatch, path, (tmp_path / 'tampered.safetensors').read_bytes())
    model = timm.create_model(name, pretrained=True, **kwargs)
    assert path.read_bytes() == (tmp_path / 'tampered.safetensors').read_bytes()  # swapped after the check
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), f'{key}: not the bytes that were verified'


# ------------------------------------------------------------------------------------------------ bundles
def _bundle(tmp_path, monkeypatch, weights: dict, tamper: bool = False) -> Path:
    folder = tmp_path / 'bundle'
    folder.mkdir()
    (folder / 'model.safetensors').write_bytes(b'the published weights')
    _published_manifest(tmp_path, monkeypatch, folder / 'model.safetensors')
    if tamper:
        (folder / 'model.safetensors').write_bytes(b'the publisheD weights')  # same size, other bytes
    config = {'architecture': ARCH, 'pretrained_cfg': {'tag': TAG}, 'an_zoo': {'weights': weights}}
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


def test_bundle_without_its_hash_is_verified_against_the_manifest(tmp_path, monkeypatch):
    folder = _bundle(tmp_path, monkeypatch, {'file': 'model.safetensors'}, tamper=True)
    path, (sha256, size, name) = _local_dir_weights(folder, None)
    with pytest.raises(WeightsVerificationError, match=rf'sha256 mismatch for {re.escape(WEIGHT)}'):
        load_checkpoint_file(path, sha256, size, name=name)


def test_bundle_hash_that_differs_from_the_manifest_is_refused(tmp_path, monkeypatch):
    recorded = hashlib.sha256(b'the publisheD weights').hexdigest()  # the altered file's own hash
    folder = _bundle(tmp_path, monkeypatch, {'file': 'model.safetensors', 'sha256': recorded}, tamper=True)
    with pytest.raises(WeightsVerificationError, match='the an_zoo manifest is .*was altered'):
        _local_dir_weights(folder, None)


@pytest.mark.parametrize('file', ['../../x.safetensors', '/etc/passwd', 'sub/model.safetensors', '..'])
def test_bundle_file_must_stay_inside_the_bundle(file, tmp_path, monkeypatch):
    (tmp_path / 'x.safetensors').write_bytes(b'outside')
    folder = _bundle(tmp_path, monkeypatch, {'file': file})
    with pytest.raises(CheckpointError, match=r'an_zoo.weights.file must name a file inside the folder'):
        _local_dir_weights(folder, None)


@pytest.mark.parametrize('config, expected', [
    ({'an_zoo': 'x'}, r'"an_zoo" must be an object'),
    ({'an_zoo': {'weights': {'size': '21'}}}, r'an_zoo.weights.size must be a positive integer'),
    ({'an_zoo': {'weights': {'sha256': 'ab' * 32 + '\n'}}}, r'an_zoo.weights.sha256 must be 64 lowercase hex'),
    (['not', 'an', 'object'], 'must hold a JSON object'),
])
def test_bad_bundle_config_is_refused_clearly(config, expected, tmp_path):
    (tmp_path / 'model.safetensors').write_bytes(b'weights')
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=expected):
        _local_dir_weights(tmp_path, None)


def test_bundle_onto_an_existing_file_refuses_and_keeps_it(tmp_path):
    from an_zoo.__main__ import main
    target = tmp_path / 'notes.txt'
    target.write_text('the user\'s notes')
    name = next(e.name for e in load_manifest() if e.official_source)
    with pytest.raises(SystemExit, match='exists and is not a folder'):
        main(['bundle', name, str(target)])
    assert target.read_text() == 'the user\'s notes'


# ------------------------------------------------------------------------------------ ambiguous checkpoints
@pytest.mark.parametrize('first, second', [
    ('fc.weight', 'module.fc.weight'),
    ('layer1.0.bn1.mixture_weight', 'layer1.0.bn1.weight_'),
])
def test_two_keys_for_one_parameter_are_refused_and_listed(first, second, tmp_path):
    model = timm.create_model('an_resnet18_bn1')
    state_dict = model.state_dict()
    state_dict[second] = torch.zeros_like(state_dict[first])
    path = tmp_path / 'both.pth'
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=rf"ambiguous for an_resnet18_bn1: 1 model key\(s\).*{re.escape(first)} "
                                              rf"<- \['{re.escape(first)}', '{re.escape(second)}'\]"):
        timm.create_model('an_resnet18_bn1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('dtype', [torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_tensor_of_another_kind_is_refused(dtype, tmp_path):
    model = timm.create_model('an_resnet18_bn1')
    state_dict = model.state_dict()
    state_dict['fc.bias'] = state_dict['fc.bias'].to(dtype)
    with pytest.raises(CheckpointError, match=rf"fc\.bias: checkpoint {re.escape(str(dtype))}, model torch\.float32"):
        remap_state_dict(state_dict, model)
    state_dict = model.state_dict()
    state_dict['bn1.num_batches_tracked'] = torch.tensor(3.0)
    with pytest.raises(CheckpointError, match=r"bn1\.num_batches_tracked: checkpoint torch\.float32, model "
                                              r"torch\.int64"):
        remap_state_dict(state_dict, model)


def test_non_string_key_is_reported(tmp_path):
    path = tmp_path / 'keys.pth'
    torch.save({'state_dict': {'fc.weight': torch.zeros(2), 7: torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=r"1 malformed key\(s\) \['7'\]"):
        load_checkpoint_file(path)


# ------------------------------------------------------------------------------------------ manifest values
@pytest.mark.parametrize('field, value, expected', [
    ('sha256', 'ab' * 32 + '\n', 'sha256 must be 64 lowercase hex digits'),
    ('revision', 'a' * 40 + '\n', 'revision must be a full 40-hex commit id'),
    ('hf_hub_id', 'org/../x', r'hf_hub_id must be a Hub repo id'),
    ('hf_hub_id', 'org/x@main', r'hf_hub_id must be a Hub repo id'),
    ('size', '1234', 'size must be a positive integer'),
    ('size', True, 'size must be a positive integer'),
    ('filename', 'sub/model.safetensors', 'filename must be a plain file name'),
])
def test_manifest_values_are_validated_strictly(field, value, expected, tmp_path):
    raw = json.loads((REPO / 'weights_manifest.json').read_text())
    raw['weights'][0][field] = value
    path = tmp_path / 'manifest.json'
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=rf'weights\[0\].*\.{expected}.*got {re.escape(repr(value))}'):
        load_manifest(path)


@pytest.mark.parametrize('suffix', ['.pth', '.pth.tar', '.safetensors'])
def test_empty_file_is_named_as_empty(tmp_path, suffix):
    path = tmp_path / f'weights{suffix}'
    path.write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'is empty \(0 bytes\)'):
        load_checkpoint_file(path)
