"""AN-DenseNet-121 (``an_densenet121``): the reference architecture, the official golden outputs in every checkpoint
layout a user may hold, refusals, and timm's model contract (64 px, batch 2)."""
import copy
import re

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.layers import BatchNormAct2d
from timm.models.densenet import DenseLayer

from an_zoo import AttentiveBatchNorm2d, AttentiveBatchNormAct2d, CheckpointError
from an_zoo.models.densenet import ANDenseNet, ANDenseNetFeatures, checkpoint_filter_fn
from helpers import calibrated

pytestmark = pytest.mark.usefixtures('one_thread')

NAME = 'an_densenet121'
CASE = 'refactored_an_densenet121'
IMG = 64
BLOCKS = (6, 12, 24, 16)
STAGE_MIXTURES = (10, 10, 20, 20)


def _input(batch=2, chans=3, size=IMG):
    return torch.randn(batch, chans, size, size)


def _assert_within(actual, expected, rtol=1e-3, atol=1e-3):
    """The golden tolerance: |a - e| <= atol * max(1, rms(e)) + rtol * |e|."""
    bound = atol * max(1.0, expected.pow(2).mean().sqrt().item()) + rtol * expected.abs()
    diff = (actual - expected).abs()
    assert (diff - bound).max().item() <= 0, f'max |diff| {diff.max().item():.3g} exceeds the tolerance'


# ---------------------------------------------------------------------------------------------------------------------
# fixtures (built once per module)

@pytest.fixture(scope='module')
def model():
    """A random-init model, never modified by the tests that use it."""
    return timm.create_model(NAME).eval()


@pytest.fixture(scope='module')
def calibrated_model():
    """A random model in eval mode with running statistics from one batch (finite, moderate activations)."""
    torch.manual_seed(1)
    return calibrated(timm.create_model(NAME), _input())


@pytest.fixture(scope='module')
def weights_file(calibrated_model, tmp_path_factory):
    """``calibrated_model``'s state_dict as a safetensors file (an_zoo's own names)."""
    path = tmp_path_factory.mktemp('an_densenet') / 'weights.safetensors'
    save_file(calibrated_model.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope='module')
def golden_case(golden, tmp_path_factory):
    """(case, official checkpoint path, expected tensors) of the refactored DenseNet-121-AN golden case."""
    cases, materialize, root = golden
    case = next(c for c in cases if c['name'] == CASE)
    path = materialize.materialize(CASE, str(tmp_path_factory.mktemp('golden_densenet')))
    return case, path, load_file(str(root / case['expected']['file']))


@pytest.fixture(scope='module')
def golden_model(golden_case):
    case, path, _ = golden_case
    n = case['num_classes']
    return timm.create_model(NAME, pretrained=True, num_classes=n, drop_rate=0.0,
                             pretrained_cfg_overlay=dict(file=path, num_classes=n)).eval()


@pytest.fixture(scope='module')
def golden_eval_logits(golden_model, golden_case):
    with torch.no_grad():
        return golden_model.eval()(golden_case[2]['input_eval'].float())


@pytest.fixture(scope='module')
def official_state_dict(golden_case):
    """The golden checkpoint's state_dict, official (refactored) names with the ``module.network.`` prefix."""
    return torch.load(golden_case[1], map_location='cpu', weights_only=True)['state_dict']


# ---------------------------------------------------------------------------------------------------------------------
# architecture

def test_architecture(model):
    assert isinstance(model, ANDenseNet) and model.stage_mixtures == STAGE_MIXTURES
    assert sum(p.numel() for p in model.parameters()) == 8_342_288
    assert len(model.state_dict()) == 1075
    assert model.num_features == 1024 and model.classifier.in_features == 1024
    assert model.feature_info[-1]['module'] == 'features.norm5'

    an_layers = {n: m for n, m in model.named_modules() if isinstance(m, AttentiveBatchNorm2d)}
    expected = {f'features.denseblock{b}.denselayer{i}.norm2': k
                for b, (count, k) in enumerate(zip(BLOCKS, STAGE_MIXTURES), 1) for i in range(1, count + 1)}
    assert len(an_layers) == 58
    assert {n: m.num_mixtures for n, m in an_layers.items()} == expected
    for name, an in an_layers.items():
        assert isinstance(an, AttentiveBatchNormAct2d) and an.num_features == 128, name
        assert isinstance(an.act, nn.ReLU), f'{name} must keep the ReLU of the dense layer'
        assert (an.eps, an.momentum) == (1e-5, 0.1)
    # the dense layer: norm1 -> ReLU -> 1x1 conv (-> 128) -> AN -> ReLU -> 3x3 conv (-> 32)
    layer = model.features.denseblock3.denselayer5
    assert layer.conv1.in_channels == 256 + 4 * 32 and layer.conv1.out_channels == 128
    assert layer.conv2.kernel_size == (3, 3) and layer.conv2.out_channels == 32

    # every other norm is a plain (timm BatchNormAct2d) BatchNorm with ReLU: stem, dense-layer input, transitions,
    # final; the only other BatchNorms are the standardization and the attention BN_K inside the AN layers
    plain = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(n.startswith(a + '.') for a in an_layers)}
    expected_plain = {'features.norm0', 'features.norm5', *(f'features.transition{b}.norm' for b in (1, 2, 3)),
                      *(n[:-len('norm2')] + 'norm1' for n in expected)}
    assert set(plain) == expected_plain
    for name, norm in plain.items():
        assert type(norm) is BatchNormAct2d and norm.affine and isinstance(norm.act, nn.ReLU), name

    # reference init: convs Kaiming normal with fan_out (timm's DenseNet: fan_in) ...
    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and '.attn.' not in n]
    for conv in (convs[0], layer.conv1, layer.conv2, model.features.transition2.conv):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert abs(conv.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.1
    # ... mixture weights ~ N(1, 0.1), offsets ~ N(0, 0.1); no weight decay on them
    weights = torch.cat([m.mixture_weight.flatten() for m in an_layers.values()])
    biases = torch.cat([m.mixture_bias.flatten() for m in an_layers.values()])
    assert abs(weights.mean().item() - 1) < 0.01 and abs(weights.std().item() - 0.1) < 0.01
    assert abs(biases.mean().item()) < 0.01 and abs(biases.std().item() - 0.1) < 0.01
    assert model.no_weight_decay() == {f'{n}.{p}' for n in an_layers for p in ('mixture_weight', 'mixture_bias')}


def test_stage_mixtures_must_match_blocks():
    with pytest.raises(ValueError, match='one K per dense block'):
        timm.create_model(NAME, stage_mixtures=(10, 20))


# ---------------------------------------------------------------------------------------------------------------------
# the official golden outputs

def test_golden(golden_case, golden_model, golden_eval_logits):
    case, _, expected = golden_case
    assert case['timm_name'] == NAME and case['param_count'] == 8_342_288
    assert case['tolerance']['rtol'] == case['tolerance']['atol_eval'] == case['tolerance']['atol_train'] == 1e-3
    assert sum(p.numel() for p in golden_model.parameters()) == case['param_count']
    _assert_within(golden_eval_logits, expected['logits_eval'])

    train = copy.deepcopy(golden_model).train()  # a train-mode pass updates running statistics: on a copy
    with torch.no_grad():
        _assert_within(train(expected['input_train'].float()), expected['logits_train'])

    # the AN layers are exactly the official ones (layer<b>.0.denselayer<i>.AttnBN2d2)
    reference = copy.deepcopy(golden_model).eval()
    an_layers = {n: m for n, m in reference.named_modules() if isinstance(m, AttentiveBatchNorm2d)}
    official = {re.sub(r'^layer(\d)\.0\.(denselayer\d+)\.AttnBN2d2$', r'features.denseblock\1.\2.norm2', n)
                for n in case['an_layers']}
    assert set(an_layers) == official and len(official) == 58
    for m in an_layers.values():
        m.impl = 'reference'
    with torch.no_grad():
        _assert_within(reference(expected['input_eval'].float()), expected['logits_eval'])


def _torchvision_key(key, dotted=False, attn='attn_weights'):
    """The torchvision / timm DenseNet name of a refactored official key (written from the official naming, independently of
    an_zoo's mapping): ``dotted`` gives torchvision's old ``norm.1`` / ``conv.2`` names."""
    assert key.startswith('module.network.')
    key = key[len('module.network.'):]
    if key.startswith('stem.conv1.conv.'):
        return 'features.conv0.' + key[len('stem.conv1.conv.'):]
    if key.startswith('stem.conv1.bn.'):
        return 'features.norm0.' + key[len('stem.conv1.bn.'):]
    if key.startswith('classifier.'):
        return key
    block, part, rest = re.match(r'^layer(\d)\.(\d)\.(.*)$', key).groups()
    if part == '0':
        layer, module, leaf = rest.split('.', 2)
        module = {'bn1': 'norm1', 'AttnBN2d2': 'norm2', 'conv1': 'conv1', 'conv2': 'conv2'}[module]
        if dotted:
            module = f'{module[:-1]}.{module[-1]}'
        leaf = leaf.replace('attn_weights.', f'{attn}.')
        return f'features.denseblock{block}.{layer}.{module}.{leaf}'
    if block == '4':
        return f'features.norm5.{rest}'
    module, leaf = rest.split('.', 1)
    return f'features.transition{block}.{dict(bn="norm", conv="conv")[module]}.{leaf}'


@pytest.mark.parametrize('layout', ['torchvision', 'torchvision_dotted'])
def test_golden_torchvision_names(layout, golden_case, golden_model, golden_eval_logits, official_state_dict,
                                  tmp_path):
    case, _, expected = golden_case
    dotted = layout.endswith('dotted')
    converted = {_torchvision_key(k, dotted, attn='attention_weights' if dotted else 'attn_weights'): v
                 for k, v in official_state_dict.items()}
    assert len(converted) == len(official_state_dict) == 1075
    probe = 'features.denseblock1.denselayer1.norm.2.weight_' if dotted else \
        'features.denseblock1.denselayer1.norm2.weight_'
    assert converted[probe].shape == (10, 128)
    path = tmp_path / 'densenet121_an.pth'
    torch.save(converted, path)  # a plain state_dict, no container
    n = case['num_classes']
    model = timm.create_model(NAME, pretrained=True, num_classes=n, drop_rate=0.0,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=n)).eval()
    reference = golden_model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    with torch.no_grad():
        logits = model(expected['input_eval'].float())
    torch.testing.assert_close(logits, golden_eval_logits, rtol=0, atol=0)
    _assert_within(logits, expected['logits_eval'])


# ---------------------------------------------------------------------------------------------------------------------
# refusals

def test_missing_key_refused(official_state_dict, tmp_path):
    broken = dict(official_state_dict)
    del broken['module.network.layer3.0.denselayer7.AttnBN2d2.attn_weights.attention.1.running_var']
    path = tmp_path / 'broken.pth'
    torch.save({'state_dict': broken}, path)
    with pytest.raises(CheckpointError, match=re.escape('features.denseblock3.denselayer7.norm2.attn.bn.running_var')):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_wrong_shape_refused(official_state_dict, model):
    broken = dict(official_state_dict)
    broken['module.network.layer3.0.denselayer7.AttnBN2d2.weight_'] = torch.zeros(10, 128, dtype=torch.float16)
    with pytest.raises(CheckpointError, match=re.escape('features.denseblock3.denselayer7.norm2.mixture_weight')):
        checkpoint_filter_fn(broken, model)


def test_plain_densenet_refused(official_state_dict, model):
    # a plain BN DenseNet-121 (torchvision) file: norm2 holds weight/bias, not the AN tensors
    plain = {_torchvision_key(k): v for k, v in official_state_dict.items() if '.AttnBN2d2.' not in k}
    for name in [n for n in plain if n.endswith('.norm1.weight')]:
        prefix = name[:-len('norm1.weight')] + 'norm2.'
        plain.update({prefix + 'weight': torch.ones(128), prefix + 'bias': torch.zeros(128),
                      prefix + 'running_mean': torch.zeros(128), prefix + 'running_var': torch.ones(128)})
    with pytest.raises(CheckpointError, match=re.escape('features.denseblock1.denselayer1.norm2.weight')) as err:
        checkpoint_filter_fn(plain, model)
    assert 'features.denseblock4.denselayer16.norm2.mixture_weight' in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# timm's model contract (64 px, batch 2)

def test_grad_checkpointing_equal(calibrated_model, monkeypatch):
    model = copy.deepcopy(calibrated_model).eval()
    calls = []
    original = DenseLayer.call_checkpoint_bottleneck
    monkeypatch.setattr(DenseLayer, 'call_checkpoint_bottleneck',
                        lambda self, xs: calls.append(1) or original(self, xs))
    x = _input()
    outputs, grads = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 58  # the checkpointed path ran in every dense layer
    torch.testing.assert_close(outputs[1], outputs[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    efficient = timm.create_model(NAME, memory_efficient=True)
    assert all(m.grad_checkpointing for m in efficient.modules() if isinstance(m, DenseLayer))


@pytest.mark.parametrize('kwargs', [{}, dict(feature_cls='hook'), dict(feature_cls='fx'), dict(out_indices=(1, 2))],
                         ids=['default', 'hook', 'fx', 'out_indices'])
def test_features_only_and_intermediates(kwargs, calibrated_model, weights_file):
    # loaded from a file of the classifier model: every features-only form takes the same weights
    features = timm.create_model(NAME, features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=weights_file), **kwargs).eval()
    if not kwargs.get('feature_cls'):  # own class: the classifier model's names, without the head
        assert isinstance(features, ANDenseNetFeatures)
        keys = set(features.state_dict())
        assert keys <= set(calibrated_model.state_dict()) and not any(k.startswith('classifier.') for k in keys)
    indices = list(kwargs.get('out_indices', range(5)))
    x = _input()
    with torch.no_grad():
        feats = features(x)
        _, intermediates = calibrated_model.forward_intermediates(x)
    info = features.feature_info
    assert info.reduction() == [[2, 4, 8, 16, 32][i] for i in indices]
    assert info.channels() == [[64, 256, 512, 1024, 1024][i] for i in indices]
    assert [f.shape[1] for f in feats] == info.channels()
    assert [IMG // f.shape[-1] for f in feats] == info.reduction()
    assert len(feats) == len(indices)
    for a, i in zip(feats, indices):
        torch.testing.assert_close(a, intermediates[i], rtol=0, atol=0)


def test_pretrained_adaptation(calibrated_model, weights_file):
    source = calibrated_model.state_dict()
    # an_zoo's own state_dict maps onto the model unchanged
    assert checkpoint_filter_fn(source, calibrated_model).keys() == source.keys()
    model = timm.create_model(NAME, pretrained=True, in_chans=1, num_classes=5,
                              pretrained_cfg_overlay=dict(file=weights_file))
    assert 'state_dict' not in model.pretrained_cfg and model.pretrained_cfg['file'] == weights_file
    for key, value in model.state_dict().items():
        if key == 'features.conv0.weight' or key.startswith('classifier.'):
            continue
        torch.testing.assert_close(value, source[key], msg=key)
    torch.testing.assert_close(model.features.conv0.weight, source['features.conv0.weight'].sum(dim=1, keepdim=True))
    assert model.classifier.out_features == 5
    with torch.no_grad():
        assert model.eval()(_input(chans=1)).shape == (2, 5)
