"""The refactored release's ResNet AN placements (an_bn1 / an_bn12 / an_bn3 / an_all) and the unsuffixed names.

The refactored layout is written here independently of an_zoo's converter, from the specification's naming rules:
a norm at block position i is ``AttnBN2d<i>`` when it is AN, the stem AN is the top-level ``AttnBN2d1``, a shortcut
AN keeps the name ``downsample.1``, and an AN layer holds ``weight_``, ``bias_``, its running statistics and
``attn_weights.attention.{0,1}.*``.
"""
import re

import pytest
import timm
import torch
import torch.nn as nn

from an_zoo import AttentiveBatchNorm2d
from an_zoo._manifest import weight_entry
from helpers import calibrated

pytestmark = pytest.mark.usefixtures('one_thread')

_AN_LEAVES = {'mixture_weight': 'weight_', 'mixture_bias': 'bias_', 'norm.running_mean': 'running_mean',
              'norm.running_var': 'running_var', 'norm.num_batches_tracked': 'num_batches_tracked'}


def _refactored_name(key: str, an_paths: set) -> str:
    for path in sorted(an_paths, key=len, reverse=True):
        if not key.startswith(path + '.'):
            continue
        leaf = key[len(path) + 1:]
        leaf = _AN_LEAVES.get(leaf) or re.sub(r'^attn\.conv\.', 'attn_weights.attention.0.',
                                              re.sub(r'^attn\.bn\.', 'attn_weights.attention.1.', leaf))
        if path == 'bn1':
            path = 'AttnBN2d1'
        elif 'downsample' not in path:
            path = re.sub(r'\.bn(\d)$', r'.AttnBN2d\1', path)
        return f'{path}.{leaf}'
    return key


def _refactored_checkpoint(model: nn.Module) -> dict:
    an_paths = {n for n, m in model.named_modules() if isinstance(m, AttentiveBatchNorm2d)}
    return {'module.' + _refactored_name(k, an_paths): v for k, v in model.state_dict().items()}


def _randomized(name: str) -> nn.Module:
    """A model whose every tensor matters: zero-initialized AN mixtures (last norm of each block) made non-zero."""
    model = timm.create_model(name, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AttentiveBatchNorm2d):
                m.mixture_weight.normal_(1.0, 0.1)
                m.mixture_bias.normal_(0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
    return calibrated(model, torch.randn(4, 3, 64, 64))  # running statistics that keep the activations finite


PLACEMENTS = {
    # name: (AN layers, example refactored keys and shapes from the specification)
    'an_resnet34_bn1': (16, {'layer1.0.AttnBN2d1.weight_': (10, 64),
                             'layer1.0.AttnBN2d1.attn_weights.attention.0.weight': (10, 64, 1, 1),
                             'layer1.0.bn2.weight': (64,), 'layer2.0.downsample.0.weight': (128, 64, 1, 1),
                             'layer2.0.downsample.1.running_var': (128,)}),
    'an_resnet34_bn12': (32, {'layer2.0.AttnBN2d2.bias_': (10, 128)}),
    'an_resnet50_bn3': (16, {'layer3.0.AttnBN2d3.weight_': (20, 1024), 'layer3.0.bn2.weight': (256,)}),
    'an_resnet50_all': (53, {'conv1.weight': (64, 3, 7, 7), 'AttnBN2d1.weight_': (10, 64),
                             'layer1.0.downsample.1.weight_': (10, 256),
                             'layer4.0.downsample.1.attn_weights.attention.0.weight': (20, 2048, 1, 1)}),
}


@pytest.mark.parametrize('name', sorted(PLACEMENTS))
def test_refactored_layout_loads_exactly(name, tmp_path):
    an_layers, examples = PLACEMENTS[name]
    source = _randomized(name)
    assert sum(isinstance(m, AttentiveBatchNorm2d) for m in source.modules()) == an_layers
    state = _refactored_checkpoint(source)
    for key, shape in examples.items():
        assert tuple(state['module.' + key].shape) == shape, key
    path = tmp_path / 'refactored.pth'
    torch.save({'state_dict': state}, path)
    model = timm.create_model(name, pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
        assert expected.isfinite().all() and expected.std() > 0
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_an_all_norms():
    model = timm.create_model('an_resnet50_all')
    assert isinstance(model.bn1, AttentiveBatchNorm2d) and model.bn1.num_mixtures == 10
    for stage, k in zip((model.layer1, model.layer2, model.layer3, model.layer4), (10, 10, 20, 20)):
        for block in stage:
            for norm in (block.bn1, block.bn2, block.bn3):
                assert isinstance(norm, AttentiveBatchNorm2d) and norm.num_mixtures == k
            # zero_init_residual: the block's last norm starts at 0 (an AN there: weight_ = bias_ = 0)
            assert not block.bn3.mixture_weight.any() and not block.bn3.mixture_bias.any()
        assert isinstance(stage[0].downsample[1], AttentiveBatchNorm2d) and stage[0].downsample[1].num_mixtures == k
    # the only BatchNorms left are the inner parts of the AN layers (affine-free standardization, BN over K)
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert plain and all(n.endswith(('.attn.bn', '.norm')) for n in plain)


def test_an_bn3_placement():
    model = timm.create_model('an_resnet50_bn3')
    for stage, k in zip((model.layer1, model.layer2, model.layer3, model.layer4), (10, 10, 20, 20)):
        for block in stage:
            assert isinstance(block.bn3, AttentiveBatchNorm2d) and block.bn3.num_mixtures == k
            assert type(block.bn1) is nn.BatchNorm2d and type(block.bn2) is nn.BatchNorm2d
            assert not block.bn3.mixture_weight.any() and not block.bn3.mixture_bias.any()
    assert type(model.bn1) is nn.BatchNorm2d
    assert type(model.layer1[0].downsample[1]) is nn.BatchNorm2d


@pytest.mark.parametrize('name,twin', [('an_resnet18', 'an_resnet18_bn1'), ('an_resnet34', 'an_resnet34_bn1')])
def test_unsuffixed_basic_block_names(name, twin, tmp_path):
    """``an_resnet18`` / ``an_resnet34`` are the reference's default placement (AN on bn1) and share the ``_bn1``
    weights: same architecture, same manifest entries (by tag), each loads the other's checkpoint."""
    model, reference = timm.create_model(name), timm.create_model(twin)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
           [(k, v.shape) for k, v in reference.state_dict().items()]
    assert model.layer1[0].an_norms == ('bn1',)
    tags = {t.partition('.')[2] for t in timm.list_models(twin, include_tags=True) if '.' in t}
    assert tags == {t.partition('.')[2] for t in timm.list_models(name, include_tags=True) if '.' in t}
    for tag in tags:
        entry = weight_entry(f'{name}.{tag}')
        assert entry is not None and entry is weight_entry(f'{twin}.{tag}') and name in entry.aliases
        assert timm.get_pretrained_cfg(f'{name}.{tag}').description == entry.provenance['recipe']
