"""Official checkpoint layouts (legacy and refactored), safe reading of foreign pickles, and clear refusals."""
import importlib
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap
import uuid
from collections import OrderedDict

import pytest
import timm
import torch
from safetensors.torch import save_file

from an_zoo import AttentiveBatchNorm2d, CheckpointError, load_checkpoint_file
from an_zoo.models._checkpoint_scan import scan_torch_checkpoint

IMG = 64


def _fp16_exact(model):
    """Round every float tensor to float16-representable values, as in official (apex fp16) files."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


def _official_state_dict(model, layout):
    """Write ``model``'s weights with the official names, prefixes and float16/float32 split (independent of
    an_zoo's own mapping code)."""
    an_paths = {n for n, m in model.named_modules() if isinstance(m, AttentiveBatchNorm2d)}
    affine_bn = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and m.affine}
    out = OrderedDict()
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition('.')
        official = key
        for an in an_paths:
            if key.startswith(an + '.'):
                rest = key[len(an) + 1:]
                attn_name = 'attention_weights' if layout == 'legacy' else 'attn_weights'
                rest = {'mixture_weight': 'weight_', 'mixture_bias': 'bias_'}.get(rest, rest)
                rest = rest.replace('norm.', '').replace('attn.conv.', f'{attn_name}.attention.0.')
                rest = rest.replace('attn.bn.', f'{attn_name}.attention.1.')
                an_official = an
                if layout == 'refactored':
                    an_official = an[:-len('bn2')] + 'AttnBN2d2' if an.endswith('bn2') else an
                official = f'{an_official}.{rest}'
        if layout == 'refactored' and hasattr(model.conv1, '__getitem__'):  # ResNetV1d deep stem
            if key.startswith('conv1.'):
                official = 'stem.' + key[len('conv1.'):]
            elif key.startswith('bn1.'):
                official = 'stem.7.' + key[len('bn1.'):]
            elif key.startswith('layer1.0.downsample.'):
                idx, rest = key[len('layer1.0.downsample.'):].split('.', 1)
                official = f'layer1.0.downsample.{int(idx) - 1}.{rest}'
        fp32 = module in affine_bn or key.endswith('num_batches_tracked')
        if value.is_floating_point() and not fp32:
            value = value.half()
        out[('module.network.' if layout == 'legacy' else 'module.') + official] = value
    return out


@pytest.mark.parametrize('name', ['an_resnet50', 'an_resnet50d', 'an_resnet18_bn12', 'an_resnext50_32x4d'])
@pytest.mark.parametrize('layout', ['legacy', 'refactored'])
def test_official_layouts_load_exactly(name, layout, tmp_path):
    source = _fp16_exact(timm.create_model(name)).eval()
    official = _official_state_dict(source, layout)
    assert any(k.endswith('.weight_') for k in official) and not any('mixture' in k for k in official)
    container = {'epoch': 120, 'arch': 'resnet50', 'state_dict': official, 'best_prec1': 78.4, 'optimizer': {}}
    if layout == 'refactored':
        container = {'state_dict': official}
    path = tmp_path / 'official.pth.tar'
    torch.save(container, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    for value in model.state_dict().values():
        assert value.dtype in (torch.float32, torch.int64)


FOREIGN_MODULE = textwrap.dedent('''
    import os

    def restore_scale(*args):
        with open(os.environ["AN_ZOO_TEST_MARKER"], "w") as f:
            f.write("code from the checkpoint ran")
        return args

    class LossScaler:
        def __init__(self):
            self.cur_scale = 128.0

    class DynamicLossScaler:
        def __reduce__(self):
            return (restore_scale, (65536.0,))
''')


def test_foreign_pickled_objects_are_never_imported_or_run(tmp_path, monkeypatch):
    package = tmp_path / 'pkg' / 'fake_apex'
    package.mkdir(parents=True)
    (package / '__init__.py').write_text('')
    (package / 'fp16_utils.py').write_text(FOREIGN_MODULE)
    marker = tmp_path / 'marker'
    monkeypatch.setenv('AN_ZOO_TEST_MARKER', str(marker))
    monkeypatch.syspath_prepend(str(tmp_path / 'pkg'))
    import fake_apex.fp16_utils as foreign
    source = timm.create_model('an_resnet18_bn1').eval()
    path = tmp_path / 'legacy.pth.tar'
    torch.save({'epoch': 120, 'state_dict': _official_state_dict(_fp16_exact(source), 'legacy'),
                'optimizer': {'loss_scaler': foreign.LossScaler(), 'dynamic': foreign.DynamicLossScaler()}}, path)
    # the class's library is not installed where the checkpoint is read
    monkeypatch.delitem(sys.modules, 'fake_apex.fp16_utils')
    monkeypatch.delitem(sys.modules, 'fake_apex')
    monkeypatch.setattr(sys, 'path', [p for p in sys.path if p != str(tmp_path / 'pkg')])
    (package / 'fp16_utils.py').unlink()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    state_dict = load_checkpoint_file(path)
    assert not marker.exists(), 'code referenced by the checkpoint was executed'
    assert 'fake_apex' not in sys.modules and 'fake_apex.fp16_utils' not in sys.modules
    assert 'module.network.layer1.0.bn1.weight_' in state_dict
    model = timm.create_model('an_resnet18_bn1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source(x), rtol=0, atol=0)
    assert not marker.exists()


def test_other_architecture_is_refused_with_the_keys(tmp_path):
    path = tmp_path / 'r18.safetensors'
    save_file(timm.create_model('an_resnet18_bn1').state_dict(), str(path))
    with pytest.raises(CheckpointError) as info:
        timm.create_model('an_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(info.value)
    assert 'does not fit an_resnet50' in message
    assert 'layer1.0.conv3.weight' in message  # a model key the checkpoint lacks
    assert 'layer1.0.bn1.mixture_weight' in message  # a checkpoint key with no place in the model


def test_unmapped_key_is_listed(tmp_path):
    state_dict = timm.create_model('an_resnet18_bn1').state_dict()
    state_dict['layer1.0.bn1.unknown_'] = torch.zeros(3)
    path = tmp_path / 'extra.pth'
    torch.save({'state_dict': state_dict}, path)
    with pytest.raises(CheckpointError, match=r"\['layer1.0.bn1.unknown_'\]"):
        timm.create_model('an_resnet18_bn1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('suffix', ['.pth.tar', '.safetensors'])
def test_truncated_file_is_refused_and_kept(suffix, tmp_path):
    path = tmp_path / f'weights{suffix}'
    state_dict = timm.create_model('an_resnet18_bn1').state_dict()
    if suffix == '.safetensors':
        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated|corrupt'):
        timm.create_model('an_resnet18_bn1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert path.read_bytes() == data[: len(data) // 2]  # the user's file is left as it was


def test_missing_file_and_unpublished_weights():
    with pytest.raises(FileNotFoundError, match='not found'):
        timm.create_model('an_resnet18_bn1', pretrained=True, pretrained_cfg_overlay=dict(file='/nonexistent.pth'))
    # not on the Hub: the official release, once its licence is accepted (tests/test_official.py downloads it)
    with pytest.raises(PermissionError, match='AN_ZOO_ACCEPT_LICENSE=aognet-v2.*pretrained_cfg_overlay=dict\\(file='):
        timm.create_model('an_resnet50', pretrained=True)
    with pytest.raises(RuntimeError, match='no pretrained weights exist for an_resnet152'):
        timm.create_model('an_resnet152', pretrained=True)


def test_native_checkpoint_round_trip(tmp_path):
    source = timm.create_model('an_resnet34_bn12').eval()
    path = tmp_path / 'native.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model('an_resnet34_bn12', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ------------------------------------------------------------------ legacy (pre-1.6, non-zip) torch.save format
def _save(obj, path, fmt):
    """``torch.save`` in the default zip format or the legacy one PyTorch 1.x wrote the official files in."""
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == 'zip')
    return path


@pytest.fixture(scope='module')
def official_state_dict():
    """An official-layout state_dict: float16 weights, float32 affine BN, int64 num_batches_tracked."""
    state_dict = _official_state_dict(_fp16_exact(timm.create_model('an_resnet18_bn1')), 'legacy')
    assert {v.dtype for v in state_dict.values()} == {torch.float16, torch.float32, torch.int64}
    return state_dict


class _Throwaway:
    """FOREIGN_MODULE imported under a fresh name, to pickle its objects; ``uninstall`` then removes it from
    ``sys.modules``, ``sys.path`` and disk, as where a checkpoint is read its library is not installed."""

    def __init__(self, tmp_path, monkeypatch):
        self.name = f'throwaway_apex_{uuid.uuid4().hex}'
        self.file = tmp_path / 'site' / f'{self.name}.py'
        self.file.parent.mkdir()
        self.file.write_text(FOREIGN_MODULE)
        self.marker = tmp_path / 'marker'
        monkeypatch.setenv('AN_ZOO_TEST_MARKER', str(self.marker))
        monkeypatch.syspath_prepend(str(self.file.parent))
        self.module = importlib.import_module(self.name)
        self._monkeypatch = monkeypatch

    def optimizer(self):
        return {'state': {}, 'loss_scaler': self.module.LossScaler(), 'dynamic': self.module.DynamicLossScaler()}

    def uninstall(self):
        del sys.modules[self.name]
        self._monkeypatch.setattr(sys, 'path', [p for p in sys.path if p != str(self.file.parent)])
        self.file.unlink()
        importlib.invalidate_caches()

    def assert_never_loaded(self):
        assert not self.marker.exists(), 'code referenced by the checkpoint was executed'
        assert self.name not in sys.modules, 'the module referenced by the checkpoint was imported'


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    return _Throwaway(tmp_path, monkeypatch)


def _assert_same_tensors(loaded, expected):
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_legacy_format_foreign_objects_are_never_imported_or_run(official_state_dict, throwaway, tmp_path):
    path = _save({'epoch': 120, 'state_dict': official_state_dict, 'optimizer': throwaway.optimizer()},
                 tmp_path / 'model_best.pth.tar', 'legacy')
    throwaway.uninstall()
    assert path.read_bytes()[:4] != b'PK\x03\x04'  # the legacy format, which torch's own scan cannot read
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    _assert_same_tensors(load_checkpoint_file(path), official_state_dict)
    throwaway.assert_never_loaded()


def test_legacy_format_without_foreign_classes_loads(official_state_dict, tmp_path):
    path = _save({'epoch': 3, 'state_dict': official_state_dict,
                  'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1, 'params': [0, 1]}]}},
                 tmp_path / 'plain.pth.tar', 'legacy')
    _assert_same_tensors(load_checkpoint_file(path), official_state_dict)


@pytest.mark.parametrize('foreign', [False, True], ids=['plain', 'foreign'])
def test_zip_and_legacy_formats_give_the_same_state_dict(foreign, official_state_dict, throwaway, tmp_path):
    container = {'epoch': 120, 'state_dict': official_state_dict, 'best_prec1': 78.4,
                 'optimizer': throwaway.optimizer() if foreign else {}}
    paths = {fmt: _save(container, tmp_path / f'{fmt}.pth.tar', fmt) for fmt in ('zip', 'legacy')}
    throwaway.uninstall()
    loaded = {fmt: load_checkpoint_file(path) for fmt, path in paths.items()}
    _assert_same_tensors(loaded['legacy'], loaded['zip'])
    _assert_same_tensors(loaded['zip'], official_state_dict)
    throwaway.assert_never_loaded()


class _Calls:
    """Unpickling this object calls ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
@pytest.mark.parametrize('call, name', [
    (lambda marker: _Calls(os.system, f'echo ran > {marker}'), r'(?:posix|nt)\.system'),  # torch blocks these
    # protocol 2 pickles name subprocess by its Python 2 name, commands
    (lambda marker: _Calls(subprocess.call, ['touch', str(marker)]), r'(?:subprocess|commands)\.call'),
    (lambda marker: _Calls(eval, f'open({str(marker)!r}, "w")'), r'builtins\.eval'),
], ids=['os.system', 'subprocess.call', 'builtins.eval'])
def test_pickled_calls_that_run_code_are_refused(fmt, call, name, tmp_path):
    marker = tmp_path / 'marker'
    path = _save({'state_dict': {'w': torch.ones(2)}, 'optimizer': call(marker)}, tmp_path / 'calls.pth.tar', fmt)
    data = path.read_bytes()
    with pytest.raises(CheckpointError, match=rf"(?s)cannot read checkpoint .*calls\.pth\.tar safely: it references "
                                              rf"\['{name}'\].*Nothing from the file was run\."):
        load_checkpoint_file(path)
    assert not marker.exists(), 'code referenced by the checkpoint was executed'
    assert path.read_bytes() == data


def _pickle_ends(data):
    """Offsets where each of the legacy file's pickles ends: magic number, protocol, sys info, main, storage keys."""
    stream, ends = io.BytesIO(data), []
    for _ in range(5):
        for _op in pickletools.genops(stream):
            pass
        ends.append(stream.tell())
    return ends


def _damage(data, how):
    magic, protocol, sys_info, main, keys = _pickle_ends(data)
    if how == 'few_bytes':
        return data[:5]
    if how == 'header_only':
        return data[:sys_info]
    if how == 'inside_main_pickle':
        return data[:(sys_info + main) // 2]
    if how == 'inside_storage_keys':
        return data[:keys - 3]
    if how == 'half':
        return data[:len(data) // 2]
    assert how == 'huge_length'  # a string length of 2**62 bytes: reading it must stop at the end of the file
    return data[:sys_info] + b'\x80\x02\x8d' + struct.pack('<Q', 2 ** 62) + b'abc'


@pytest.mark.parametrize('foreign', [False, True], ids=['plain', 'foreign'])
@pytest.mark.parametrize('how', ['few_bytes', 'header_only', 'inside_main_pickle', 'inside_storage_keys', 'half',
                                 'huge_length'])
def test_truncated_legacy_file_is_refused_and_kept(how, foreign, official_state_dict, throwaway, tmp_path):
    container = {'state_dict': official_state_dict, 'optimizer': throwaway.optimizer() if foreign else {}}
    path = _save(container, tmp_path / 'model_best.pth.tar', 'legacy')
    throwaway.uninstall()
    damaged = _damage(path.read_bytes(), how)
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert str(path) in message
    assert 'truncated' in message and 'corrupt' in message and 'download it again' in message
    assert path.read_bytes() == damaged  # the user's file is left as it was
    throwaway.assert_never_loaded()


@pytest.mark.filterwarnings('ignore:Detected pickle protocol 4')
def test_legacy_scan_finds_stack_globals_through_the_memo(throwaway, tmp_path):
    """Protocol 4 names globals with STACK_GLOBAL from strings on the stack, re-used through MEMOIZE / BINGET
    (torch's weights_only unpickler reads no protocol 4, so such a file is refused, and nothing is run)."""
    path = tmp_path / 'protocol4.pth.tar'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'optimizer': throwaway.optimizer()}, path, pickle_protocol=4,
               _use_new_zipfile_serialization=False)
    throwaway.uninstall()
    ops = [op.name for op, _, _ in pickletools.genops(path.read_bytes()[_pickle_ends(path.read_bytes())[2]:])]
    assert 'STACK_GLOBAL' in ops and 'BINGET' in ops and 'GLOBAL' not in ops
    found = scan_torch_checkpoint(path.read_bytes(), str(path))
    assert {f'{throwaway.name}.LossScaler', f'{throwaway.name}.restore_scale', 'torch._utils._rebuild_tensor_v2',
            'torch.FloatStorage'} <= found
    assert f'{throwaway.name}.DynamicLossScaler' not in found  # its __reduce__ pickles restore_scale instead
    with pytest.raises(CheckpointError):
        load_checkpoint_file(path)
    throwaway.assert_never_loaded()
