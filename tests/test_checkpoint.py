"""Official checkpoint layouts (legacy and refactored), safe reading of foreign pickles, and clear refusals."""
import pickle
import sys
import textwrap
from collections import OrderedDict

import pytest
import timm
import torch
from safetensors.torch import save_file

from an_zoo import AttentiveBatchNorm2d, CheckpointError, load_checkpoint_file

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
    with pytest.raises(RuntimeError, match='not published .*pretrained_cfg_overlay=dict\\(file='):
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
