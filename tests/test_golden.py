"""The official golden outputs, reproduced through timm.create_model(pretrained=True, file=<official .pth.tar>)."""
import pytest
import timm
import torch
from safetensors.torch import load_file

from an_zoo import AttentiveBatchNorm2d


def _cases():
    from conftest import GOLDEN_DIR
    import json
    path = GOLDEN_DIR / 'cases.json'
    if not path.is_file():
        return ['golden-data-absent']
    return [case['name'] for case in json.loads(path.read_text())['cases']]


def _assert_within(actual, expected, rtol, atol):
    bound = atol + rtol * expected.abs()
    excess = (actual - expected).abs() - bound
    assert excess.max().item() <= 0, f'max |diff| {(actual - expected).abs().max().item():.3g} exceeds tolerance'


@pytest.mark.parametrize('case_name', _cases())
def test_golden_case(case_name, golden, golden_checkpoints):
    cases, _, root = golden
    case = next(c for c in cases if c['name'] == case_name)
    if case['timm_name'] not in timm.list_models('an_*'):
        pytest.skip(f'{case["timm_name"]} is not implemented yet')
    n, tol = case['num_classes'], case['tolerance']
    model = timm.create_model(
        case['timm_name'], pretrained=True, num_classes=n, drop_rate=0.0,
        pretrained_cfg_overlay=dict(file=str(golden_checkpoints[case_name]), num_classes=n))
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
    # the AN layers are exactly where the reference has them
    an_layers = [name for name, m in model.named_modules() if isinstance(m, AttentiveBatchNorm2d)]
    assert len(an_layers) == len(case['an_layers'])
