"""The official golden outputs, reproduced through timm.create_model(pretrained=True, file=<official .pth.tar>)."""
import re

import pytest
import timm
import torch
from safetensors.torch import load_file

from an_zoo import AttentiveBatchNorm2d
from golden_cases import load_cases, official_state_dict


def _cases():
    return [case['name'] for case in load_cases()]


def _other_layout_cases():
    """The legacy ResNet / MobileNet cases, converted here to the refactored names; AOGNet's refactored layout and
    DenseNet's torchvision names are checked in tests/test_aognet.py and tests/test_densenet.py."""
    names = _cases()
    return [n for n in names if n.startswith(('legacy_an_resnet', 'legacy_an_mobilenet'))] or names


def _assert_within(actual, expected, rtol, atol):
    bound = atol + rtol * expected.abs()
    excess = (actual - expected).abs() - bound
    assert excess.max().item() <= 0, f'max |diff| {(actual - expected).abs().max().item():.3g} exceeds tolerance'


@pytest.mark.parametrize('case_name', _cases())
def test_golden_case(case_name, golden, golden_checkpoints):
    cases, _, root = golden
    case = next(c for c in cases if c['name'] == case_name)
    n, tol = case['num_classes'], case['tolerance']
    model = timm.create_model(
        case['timm_name'], pretrained=True, num_classes=n, drop_rate=0.0,
        pretrained_cfg_overlay=dict(file=str(golden_checkpoints[case_name]), num_classes=n))
    for module in model.modules():  # the golden train-mode logits were computed with every dropout off
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    assert sum(p.numel() for p in model.parameters()) == case['param_count']
    expected = load_file(str(root / case['expected']['file']))
    model.eval()
    with torch.no_grad():
        logits = model(expected['input_eval'].float())
    rms = expected['logits_eval'].pow(2).mean().sqrt().item()
    _assert_within(logits, expected['logits_eval'], tol['rtol'], tol['atol_eval'] * max(1.0, rms))
    model.train()
    with torch.no_grad():
        logits = model(expected['input_train'].float())
    rms = expected['logits_train'].pow(2).mean().sqrt().item()
    _assert_within(logits, expected['logits_train'], tol['rtol'], tol['atol_train'] * max(1.0, rms))
    # the AN layers are exactly where the reference has them: each official AN layer's mixture weight (a unique
    # random draw) sits in exactly one of ours, and every one of ours receives one
    official = official_state_dict(case_name)
    prefix = case['checkpoint']['key_prefix']
    ours = {name: m.mixture_weight.detach() for name, m in model.named_modules() if isinstance(m, AttentiveBatchNorm2d)}
    placed = {}
    for name in case['an_layers']:
        weight = official[f'{prefix}{name}.weight_'].float()
        matches = [ours_name for ours_name, w in ours.items() if w.shape == weight.shape and torch.equal(w, weight)]
        assert len(matches) == 1, f'official AN layer {name} matches {matches}'
        placed[matches[0]] = name
    assert sorted(placed) == sorted(ours), f'AN layers without an official counterpart: {set(ours) - set(placed)}'


def _refactored_keys(key: str, case_name: str) -> str:
    """The refactored release's names (iVMCL-Release) for a legacy golden key, (the stem, the attention and the AN norms renamed)."""
    key = key[len('module.network.'):].replace('.attention_weights.', '.attn_weights.')
    if 'resnet' in case_name:
        return 'module.' + re.sub(r'^(layer\d\.\d+)\.bn2\.', r'\1.AttnBN2d2.', key)
    groups = [1, 2, 3, 4, 3, 3, 1]  # MobileNetV2 blocks per (t, c, n, s) group
    match = re.match(r'^features\.(\d+)\.(.*)$', key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if index == 0:
            return f'stem.{rest}'
        if index == sum(groups) + 1:
            return f'layer7.1.{rest}'
        start = 1
        for layer, count in enumerate(groups, 1):
            if index < start + count:
                return f'layer{layer}.{index - start}.{rest}'
            start += count
    return key


@pytest.mark.parametrize('case_name', _other_layout_cases())
def test_golden_case_refactored_layout(case_name, golden, golden_checkpoints, tmp_path):
    cases, _, root = golden
    case = next(c for c in cases if c['name'] == case_name)
    legacy = torch.load(golden_checkpoints[case_name], map_location='cpu', weights_only=True)['state_dict']
    path = tmp_path / 'refactored.pth'
    torch.save({'state_dict': {_refactored_keys(k, case_name): v for k, v in legacy.items()}}, path)
    model = timm.create_model(case['timm_name'], pretrained=True, drop_rate=0.0,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    expected = load_file(str(root / case['expected']['file']))
    with torch.no_grad():
        logits = model(expected['input_eval'].float())
    rms = expected['logits_eval'].pow(2).mean().sqrt().item()
    _assert_within(logits, expected['logits_eval'], case['tolerance']['rtol'],
                   case['tolerance']['atol_eval'] * max(1.0, rms))


@pytest.mark.parametrize('case_name', _cases())
def test_golden_checkpoint_as_features_backbone(case_name, golden, golden_checkpoints):
    cases, _, root = golden
    case = next(c for c in cases if c['name'] == case_name)
    file = str(golden_checkpoints[case_name])
    full = timm.create_model(case['timm_name'], pretrained=True, pretrained_cfg_overlay=dict(file=file)).eval()
    backbone = timm.create_model(case['timm_name'], pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=file)).eval()
    x = load_file(str(root / case['expected']['file']))['input_eval'].float()
    with torch.no_grad():
        features = backbone(x)
        _, intermediates = full.forward_intermediates(x, indices=len(features))
    assert len(features) == 5
    for a, b in zip(features, intermediates[-len(features):]):
        torch.testing.assert_close(a, b)
