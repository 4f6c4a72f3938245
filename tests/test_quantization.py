"""Plain torch.fx symbolic tracing of AN layers and models, and FX static post-training quantization end to end.

``torch.fx.symbolic_trace`` records each AN layer as one call of ``an_zoo.layers.functional.attentive_batch_norm``
(its parameters and buffers as get_attr inputs), which FX quantization keeps in float; the converted model runs and
agrees with the float model about as closely as the BatchNorm twin's converted model agrees with its float one.
"""
import copy
import warnings

import pytest
import timm
import torch
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from an_zoo import AttentiveBatchNorm2d
from an_zoo.layers.functional import attentive_batch_norm
from helpers import calibrated
from helpers import layer_with_statistics

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.filterwarnings('ignore')]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _an_calls(gm):
    return sum(n.op == 'call_function' and n.target is attentive_batch_norm for n in gm.graph.nodes)


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('momentum', [0.1, None])
def test_symbolic_trace_layer(training, momentum):
    layer = layer_with_statistics(momentum=momentum).train(training)
    expected_layer = copy.deepcopy(layer)
    gm = torch.fx.symbolic_trace(layer)
    assert _an_calls(gm) == 1
    x = torch.randn(4, 16, 6, 5) * 2 + 1
    for _ in range(2):  # running statistics (and the cumulative average) are updated as the layer's
        torch.testing.assert_close(gm(x), expected_layer(x))
    for name, b in expected_layer.named_buffers():
        torch.testing.assert_close(gm.get_buffer(name), b, msg=name)
    # the input checks still run, on the real input
    with pytest.raises(ValueError, match='8 channels'):
        gm(torch.randn(2, 8, 4, 4))
    if training:
        with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
            gm(torch.randn(1, 16, 4, 4))


@pytest.mark.parametrize('name', ['an_resnet18_bn12', 'an_mobilenetv2_050'])
def test_symbolic_trace_model(name):
    x = torch.randn(2, 3, 64, 64)
    model = calibrated(timm.create_model(name), x)
    for m in model.modules():
        if isinstance(m, AttentiveBatchNorm2d):
            m.impl = 'reference'  # the same computation as the traced function: equal up to float32 reordering
    gm = torch.fx.symbolic_trace(model)
    assert _an_calls(gm) == sum(isinstance(m, AttentiveBatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def _ptq_error(name, x, calibration):
    model = calibrated(timm.create_model(name), x)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        prepared = prepare_fx(model, get_default_qconfig_mapping('x86'), example_inputs=(x,))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        converted = convert_fx(prepared)
    with torch.no_grad():
        out = converted(x)
    assert torch.isfinite(out).all()
    return _rel(out, expected), converted


@pytest.mark.parametrize('an_name, bn_name', [('an_resnet18_bn12', 'resnet18'),
                                              ('an_mobilenetv2_050', 'mobilenetv2_050')])
def test_fx_post_training_quantization(an_name, bn_name):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    calibration = [x, torch.randn(4, 3, 64, 64)]
    an_err, converted = _ptq_error(an_name, x, calibration)
    bn_err, _ = _ptq_error(bn_name, x, calibration)
    # AN stays in float (one function call per layer, on float tensors); the convolutions are quantized
    assert _an_calls(converted) == sum(isinstance(m, AttentiveBatchNorm2d) for m in timm.create_model(an_name).modules())
    assert any(type(m).__module__.startswith('torch.ao.nn.quantized') for m in converted.modules())
    # random calibrated weights: the BN twin's own error is the yardstick (ResNet-18 ~0.07 for both, MobileNetV2,
    # which amplifies rounding chaotically at random init, ~1 for both)
    assert an_err <= 1.5 * bn_err, (an_err, bn_err)
