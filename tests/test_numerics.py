"""Numerics of Attentive Normalization: float16 / bfloat16 (autocast and real low-precision weights) against float32,
large activations in float16, and the edge cases H*W == 1, very large H*W, batch 1 in eval, zero-variance channels.

Both implementations (``impl='fast'``, the default, and ``impl='reference'``), training and eval mode, CPU and CUDA
(the CUDA cases skip without a GPU). Error measure: relative error ``||y - y32|| / ||y32||`` (Frobenius norm over
the whole tensor) against the float32 computation.

Tolerances (the measured errors are in docs/numerics.md, not repeated here):

* one AN layer, given the same reduced-precision input as its float32 counterpart (the error AN itself adds):
  fast path float16 ``1.5e-3``, bfloat16 ``1.2e-2`` (about three units of roundoff of the output dtype: statistics
  and the (N, C) algebra run in float32, only ``x * a + b`` is written in the low dtype); reference path float16
  ``1e-2``, bfloat16 ``3e-2`` (its attention conv and mixture matmuls run in the low dtype, as autocast runs them).
* logits of ``an_resnet18_bn12`` (64 px, calibrated running statistics), autocast or ``.half()`` / ``.bfloat16()``:
  float16 ``5e-3``, bfloat16 ``3e-2``. A randomly initialised MobileNetV2 amplifies rounding chaotically (its
  BatchNorm twin too), so there every AN layer is held to the layer tolerance inside the network instead.

Large activations: statistics accumulate in float32, so inputs scaled by 1e3 give finite, accurate outputs; after
``model.half()`` a running variance above 65504 becomes inf in the float16 buffer, exactly as in ``nn.BatchNorm2d``.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn

from an_zoo import AttentiveBatchNorm2d
from helpers import calibrated
from an_zoo.layers import instance_attention_stats
from an_zoo.layers import statistics
from an_zoo.layers.fast_attentive_norm import instance_moments
from an_zoo import set_an_impl
from helpers import layer_with_statistics, spec_forward

LAYER_TOL = {
    'fast': {torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2},
    # the reference code's attention 1x1 conv and mixture matmuls run in the low dtype, as autocast runs any conv
    'reference': {torch.float16: 1e-2, torch.bfloat16: 3e-2},
}
MODEL_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
FP32_TOL = 1e-5  # float32 against the float64 specification

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device: the CUDA numerics run on a GPU')
DEVICES = ['cpu', pytest.param('cuda', marks=CUDA)]
IMPLS = ['fast', 'reference']
# autocast: float32 weights, low-precision activations; cast: the layer / model converted with .to(dtype)
MODES = [('autocast', torch.float16), ('autocast', torch.bfloat16), ('cast', torch.float16), ('cast', torch.bfloat16)]
MODE_IDS = [f'{m}-{str(d)[6:]}' for m, d in MODES]


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(autouse=True)
def _full_float32():
    """float32 references in true float32 on CUDA (TF32 convolutions / matmuls would be the larger error)."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def _layer(impl, device, c=16, k=5, training=True):
    return layer_with_statistics(c, k, impl=impl).to(device).train(training)




def _run_low(module, x, mode, dtype):
    """(output in low precision, float32 counterpart of the same module on the same rounded input)."""
    device = x.device.type
    x_low = x.to(dtype)
    if mode == 'autocast':
        reference = copy.deepcopy(module)
        with torch.autocast(device, dtype=dtype):
            out = module(x_low)
    else:
        module = module.to(dtype)
        reference = copy.deepcopy(module).float()
        out = module(x_low)
    return out, reference(x_low.float()), module, reference


# ----------------------------------------------------------------------------------------------- layer level
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('mode, dtype', MODES, ids=MODE_IDS)
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('impl', IMPLS)
def test_layer_reduced_precision(impl, training, mode, dtype, device):
    layer = _layer(impl, device, training=training)
    x = torch.randn(4, 16, 9, 7, device=device) * 2 + 0.5
    out, expected, layer, reference = _run_low(layer, x, mode, dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, expected) <= LAYER_TOL[impl][dtype]
    if training:  # running statistics: float32 buffers under autocast; stored in dtype after .to(dtype)
        for name in ('norm.running_mean', 'norm.running_var', 'attn.bn.running_mean', 'attn.bn.running_var'):
            got, want = layer.get_buffer(name), reference.get_buffer(name)
            assert got.dtype == (torch.float32 if mode == 'autocast' else dtype)
            # under autocast the statistics are float32 computations of the same input; the reference code's
            # attention 1x1 conv, like any conv under autocast, runs in the low dtype (the fast code's in float32)
            exact = mode == 'autocast' and (name.startswith('norm.') or impl == 'fast')
            assert rel_err(got, want) <= (1e-5 if exact else LAYER_TOL[impl][dtype]), name
        out.float().square().mean().backward()
        grads = [x_.grad for x_ in layer.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('mode', ['autocast', 'cast'])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('impl', IMPLS)
def test_large_activations_float16(impl, training, mode, device):
    """x * 1e3 in float16: per-(sample, channel) sums of squares ~1e8 would overflow float16 (max 65504)."""
    torch.manual_seed(0)
    x16 = (torch.randn(4, 16, 8, 8, device=device) * 1e3 + 500).half()
    x64 = x16.double()
    # the AN statistics themselves, as both implementations compute them: float32, finite, accurate
    mean, var = instance_moments(x16)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), x64.mean(dim=(2, 3)), rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(var.double(), x64.var(dim=(2, 3), unbiased=False), rtol=1e-4, atol=0)
    s = instance_attention_stats(x16)
    expected_s = x64.mean(dim=(2, 3), keepdim=True) * (x64.var(dim=(2, 3), keepdim=True) + 1e-3).rsqrt()
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    torch.testing.assert_close(s.double(), expected_s, rtol=1e-4, atol=1e-6)

    layer = _layer(impl, device, training=training)
    out, expected, layer, reference = _run_low(layer, x16.float(), mode, torch.float16)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) <= LAYER_TOL[impl][torch.float16]
    if not training:
        return
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    running_var = layer.norm.running_var
    if mode == 'autocast':  # float32 buffers: the batch variance (~1e6) is stored as it is
        assert torch.isfinite(running_var).all() and running_var.min() > 65504  # float16's largest value
        torch.testing.assert_close(running_var, reference.norm.running_var, rtol=1e-5, atol=0)
    else:  # float16 buffers cannot hold 1e6: inf, exactly like nn.BatchNorm2d after .half()
        bn = nn.BatchNorm2d(16).to(device).half().train()
        bn(x16)
        assert torch.equal(torch.isinf(running_var), torch.isinf(bn.running_var))
        assert torch.isfinite(layer.norm.running_mean).all()  # the mean (~500) fits


# ----------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('impl', IMPLS)
def test_single_position_reduced_precision(impl, training, device):
    # H*W == 1 (the reference code returns NaN): var_hw is defined as 0, s = x * rsqrt(1e-3); float32 matches the
    # float64 specification, autocast stays within the layer tolerance, gradients are finite
    layer = _layer(impl, device, training=training)
    x = torch.randn(6, 16, 1, 1, device=device) * 2 + 0.3
    out = layer(x.requires_grad_())
    torch.testing.assert_close(out.double(), spec_forward(layer, x.detach(), training), rtol=FP32_TOL, atol=FP32_TOL)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    for mode, dtype in MODES[:2]:
        low, expected, _, _ = _run_low(_layer(impl, device, training=training), x.detach(), mode, dtype)
        assert torch.isfinite(low).all() and rel_err(low, expected) <= LAYER_TOL[impl][dtype]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('impl', IMPLS)
def test_very_large_spatial_size(impl, training, device):
    """2 x 4 x 1024 x 1024 with |mean| = 200 std: no cancellation in the statistics (E[x^2] - E[x]^2 in float32
    would lose them entirely); the float16 input is converted to float32 for the statistics in chunks of samples.

    Samples differ in mean and scale, as images do: with identically distributed samples the attention's
    BatchNorm over the batch would normalize differences of the order of float32 rounding (a property of AN's
    attention, not of its arithmetic)."""
    torch.manual_seed(0)
    n = torch.arange(2.0, device=device)[:, None, None, None]
    x = torch.randn(2, 4, 1024, 1024, device=device) * (0.5 + 0.25 * n) + 100.0 + 0.5 * n
    x64 = x.double()
    layer = _layer(impl, device, c=4, k=3, training=training)
    with torch.no_grad():
        layer.norm.running_mean.fill_(100.0)
        old_var = layer.norm.running_var.double()
        out = layer(x)
        expected = spec_forward(layer, x, training)
    assert torch.isfinite(out).all()
    # float32 output rounding at |mean| / std = 200, where (x - mean) keeps ~17 bits: measured 9e-6 for the fast
    # code's folded x * a + b, 3e-6 for the reference (and for nn.BatchNorm2d itself)
    assert rel_err(out, expected) <= 3e-5
    if training:
        mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3))
        torch.testing.assert_close(layer.norm.running_mean.double(), 0.9 * 100.0 + 0.1 * mean, rtol=1e-7, atol=0)
        torch.testing.assert_close(layer.norm.running_var.double(), 0.9 * old_var + 0.1 * var, rtol=1e-5, atol=0)
    # float16: the statistics of the converted input, in chunks; |mean| / std about 1 (see
    # test_reduced_precision_with_large_mean for larger ratios; nn.BatchNorm2d itself, which the reference code
    # uses, loses accuracy on float16 input of this size on CPU when |mean| >> std)
    x = x - 100.0
    with torch.no_grad():
        low, ref, _, _ = _run_low(_layer(impl, device, c=4, k=3, training=training), x, 'autocast', torch.float16)
    assert torch.isfinite(low).all() and rel_err(low, ref) <= LAYER_TOL[impl][torch.float16]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('impl', IMPLS)
def test_batch_of_one_in_eval(impl, device):
    # eval mode is per sample: a batch of one gives the same result as that sample inside a batch
    layer = _layer(impl, device, training=False)
    x = torch.randn(4, 16, 6, 5, device=device) * 2 + 0.5
    with torch.no_grad():
        batch = layer(x)
        for i in range(4):
            single = layer(x[i:i + 1])
            assert single.shape == (1, 16, 6, 5) and torch.isfinite(single).all()
            torch.testing.assert_close(single, batch[i:i + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(x[:1]).double(), spec_forward(layer, x[:1], False), rtol=FP32_TOL,
                                   atol=FP32_TOL)


def _zero_variance_input(device):
    x = torch.randn(4, 8, 5, 6, device=device) * 2 + 0.5
    x[:, 0] = 3.0  # constant everywhere: batch and per-sample variance 0
    x[:, 1] = 0.0  # all zeros
    x[:, 2] = torch.arange(4.0, device=device)[:, None, None]  # constant per sample, varies over the batch
    x[:, 3] = torch.linspace(-1, 1, 6, device=device)  # the same spatial pattern in every sample
    return x


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('impl', IMPLS)
def test_zero_variance_channels(impl, training, device):
    layer = _layer(impl, device, c=8, k=4, training=training)
    x = _zero_variance_input(device).requires_grad_()
    out = layer(x)
    assert torch.isfinite(out).all()
    # a zero-variance channel is standardized by 1/sqrt(eps) = 316: the fast code's folded x * a + b (a = gamma *
    # 316, b = beta - mean * a) cancels |mean * a| ~ 1e3 down to beta in float32, an absolute error of about
    # 2e-4 here (the unfolded reference: ~1e-7)
    torch.testing.assert_close(out.double(), spec_forward(layer, x.detach(), training), rtol=1e-4, atol=1e-3)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    for name in ('running_mean', 'running_var'):
        assert torch.isfinite(getattr(layer.norm, name)).all()


# The fast code writes out = x * a + b; in float16 / bfloat16 it centres x on its per-(sample, channel) mean first,
# since with |mean| >> std (or a constant channel, standardized by 1/sqrt(eps)) x * a and b would cancel and lose
# log2(|mean| / std) bits. These two tests hold it to the same tolerance as any other input.


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('mode, dtype', MODES, ids=MODE_IDS)
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('impl', IMPLS)
def test_zero_variance_channels_reduced_precision(impl, training, mode, dtype, device):
    x = _zero_variance_input(device)
    low, expected, _, _ = _run_low(_layer(impl, device, c=8, k=4, training=training), x, mode, dtype)
    assert torch.isfinite(low).all()
    assert rel_err(low, expected) <= LAYER_TOL[impl][dtype]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('mode, dtype', MODES, ids=MODE_IDS)
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('impl', IMPLS)
def test_reduced_precision_with_large_mean(impl, training, mode, dtype, device):
    # |mean| / std about 50 per channel, samples differing in mean and scale
    n = torch.arange(4.0, device=device)[:, None, None, None]
    x = torch.randn(4, 16, 16, 16, device=device) * (0.5 + 0.25 * n) + 30.0 + 0.5 * n
    layer = _layer(impl, device, training=training)
    with torch.no_grad():
        layer.norm.running_mean.fill_(30.0)
        layer.norm.running_var.fill_(0.5)
    low, expected, _, _ = _run_low(layer, x, mode, dtype)
    assert torch.isfinite(low).all()
    assert rel_err(low, expected) <= LAYER_TOL[impl][dtype]


# ----------------------------------------------------------------------------------------------- model level
def _model(name, impl, device, x, num_classes=1000):
    torch.manual_seed(0)
    model = set_an_impl(timm.create_model(name, num_classes=num_classes), impl).to(device)
    return calibrated(model, x)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('mode, dtype', MODES, ids=MODE_IDS)
@pytest.mark.parametrize('impl', IMPLS)
def test_model_logits_reduced_precision(impl, mode, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64, device=device)
    model = _model('an_resnet18_bn12', impl, device, x)
    with torch.no_grad():
        expected = model(x)
        if mode == 'autocast':
            with torch.autocast(device, dtype=dtype):
                out = model(x)
        else:
            out = model.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, expected) <= MODEL_TOL[dtype]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['float16', 'bfloat16'])
@pytest.mark.parametrize('name', ['an_resnet18_bn12', 'an_mobilenetv2_050'])
@pytest.mark.parametrize('impl', IMPLS)
def test_every_an_layer_in_a_model_within_the_layer_tolerance(impl, name, dtype, device):
    """Under autocast, each AN layer's output (its activation included, for the fused norm-act layers of
    MobileNetV2) against a float32 copy of the layer applied to the same reduced-precision input."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64, device=device)
    model = _model(name, impl, device, x)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AttentiveBatchNorm2d)}
    references = {n: copy.deepcopy(m).float() for n, m in layers.items()}
    errors = {}

    def hook(layer_name):
        def check(module, inputs, output):
            with torch.autocast(device, enabled=False):
                expected = references[layer_name](inputs[0].float())
            assert output.dtype == dtype
            errors[layer_name] = rel_err(output, expected)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.isfinite(out).all()
    assert len(errors) == len(layers) > 0
    worst = max(errors, key=errors.get)
    assert errors[worst] <= LAYER_TOL[impl][dtype], f'{worst}: {errors[worst]:.2e}'


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('impl', IMPLS)
def test_model_large_activations_float16_autocast(impl, device):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64, device=device) * 1e3
    model = _model('an_resnet18_bn12', impl, device, x, num_classes=10)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast(device, dtype=torch.float16):
            out = model(x)
    assert torch.isfinite(out).all() and rel_err(out, expected) <= MODEL_TOL[torch.float16]
    model.train()
    with torch.autocast(device, dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x).float(), torch.arange(4, device=device))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers())


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', ['an_resnet18_bn12', 'an_mobilenetv2_050'])
@pytest.mark.parametrize('impl', IMPLS)
def test_model_single_position_maps_and_batch_of_one(impl, name, device):
    # 32 px: the last stage runs at 1x1 (H*W == 1 in its AN layers)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32, device=device)
    model = _model(name, impl, device, x, num_classes=10)
    sizes = set()
    handles = [m.register_forward_hook(lambda mod, inp, out: sizes.add(inp[0].shape[-2:].numel()))
               for m in model.modules() if isinstance(m, AttentiveBatchNorm2d)]
    with torch.no_grad():
        batch = model(x)
        singles = [model(x[i:i + 1]) for i in range(2)]
        assert torch.isfinite(batch).all() and all(torch.isfinite(single).all() for single in singles)
        # per sample in eval: compared in float64, as float32 convolutions of batch 1 and batch 4 round differently
        # and a random network amplifies that (by 1e3 for MobileNetV2)
        model64 = copy.deepcopy(model).double()
        batch = model64(x.double())
        for i in range(2):
            torch.testing.assert_close(model64(x[i:i + 1].double()), batch[i:i + 1], rtol=1e-9, atol=1e-12)
    for handle in handles:
        handle.remove()
    assert 1 in sizes
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.arange(4, device=device))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------------- float32, |mean| >> std
# Two ways to the per-instance moments: sums of values shifted by one position of their own (sample, channel), which
# keep float32 accuracy whatever the mean (torch.var_mean, two-pass, is the yardstick), and on CPU BatchNorm's own
# statistics kernel, exactly as accurate as BatchNorm's statistics of the same data (its mean is a float32 sum:
# relative variance error up to ~3e-5 at |mean| / std = 1e4, ~1e-3 at 1e5).
@pytest.mark.parametrize('mean, std', [(1e4, 1.0), (-1e4, 1.0), (1e3, 1e-2), (1.0, 1e-4), (0.0, 1.0)])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('kernels', ['shifted_sums', 'batchnorm'])
def test_instance_moments_float32_large_mean(mean, std, channels_last, kernels, monkeypatch):
    monkeypatch.setattr(statistics, 'use_batchnorm_kernels', lambda *t: kernels == 'batchnorm')
    x = (torch.randn(4, 8, 12, 10, dtype=torch.float64) * std + mean).float()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mu, var = instance_moments(x)
    exp_var, exp_mu = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    tolerance = 1e-6 if kernels == 'shifted_sums' else (1e-4 if abs(mean) / std <= 1e4 else 3e-3)
    assert ((var.double() - exp_var).abs() / exp_var).max() <= tolerance
    assert ((mu.double() - exp_mu).abs() / (exp_mu.abs() + exp_var.sqrt())).max() <= 1e-6
    # float16 / bfloat16 input: the same float32 statistics of the rounded values (always the shifted sums)
    monkeypatch.undo()
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        mu, var = instance_moments(low)
        exp_var, exp_mu = torch.var_mean(low.double(), dim=(2, 3), correction=0)
        assert ((var.double() - exp_var).abs() / exp_var.clamp(min=1e-30)).max() <= 1e-5


def test_batchnorm_kernels_are_chosen_where_they_pay():
    """BatchNorm's kernels for eager CPU float32 / float64 channels_last tensors with large samples (its backward
    kernel only in large tensors too); the shifted sums elsewhere (small samples, contiguous tensors, half precision,
    other or mixed layouts)."""
    large = torch.randn(2, 64, 40, 40).to(memory_format=torch.channels_last)
    assert statistics.use_batchnorm_kernels(large) and statistics.use_batchnorm_kernels(large.double())
    assert statistics.use_batchnorm_kernels(large, torch.randn_like(large))
    assert not statistics.use_batchnorm_kernels(large.contiguous())
    assert not statistics.use_batchnorm_kernels(torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last))
    assert not statistics.use_batchnorm_kernels(large.to(torch.bfloat16))
    assert not statistics.use_batchnorm_kernels(large, large.contiguous())
    # the backward's kernel only for large tensors as well (below ~2.2M elements the sums' extra write is cheap)
    assert not statistics.use_batchnorm_backward_kernels(large, torch.randn_like(large))
    huge = torch.randn(2, 64, 150, 150).to(memory_format=torch.channels_last)  # 2.88M elements
    assert statistics.use_batchnorm_backward_kernels(huge, torch.randn_like(huge))
    assert not statistics.use_batchnorm_backward_kernels(huge, torch.randn_like(huge).contiguous())


@pytest.mark.parametrize('channels_last', [False, True])
def test_batchnorm_kernel_gradient_sums(channels_last):
    """The backward's two reductions through BatchNorm's backward kernel equal the plain sums."""
    x, grad = torch.randn(3, 16, 7, 5, dtype=torch.float64), torch.randn(3, 16, 7, 5, dtype=torch.float64)
    if channels_last:
        x, grad = (t.to(memory_format=torch.channels_last) for t in (x, grad))
    mean = torch.randn(16, dtype=torch.float64)
    d_sum, d_centered = statistics.batchnorm_kernel_grad_sums(grad, x, mean)
    torch.testing.assert_close(d_sum, grad.sum(dim=(2, 3)))
    torch.testing.assert_close(d_centered, (grad * (x - mean[:, None, None])).sum(dim=(2, 3)))


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('ratio', [1e2, 1e4])
def test_float32_layer_with_large_instance_means(impl, training, ratio):
    """Per-sample means of +-ratio (std 1 within each sample): float32 against the float64 specification, as
    accurate as nn.BatchNorm2d on the same input (the fast path lost 1.45e-4 here when its instance mean came from
    unshifted sums)."""
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None, None, None]
    x = (torch.randn(4, 16, 9, 7, dtype=torch.float64) + sign * ratio).float()
    layer = _layer(impl, 'cpu', training=True)
    with torch.no_grad():  # calibrated running statistics for eval
        calibrated(layer, x).train(training)
    expected = spec_forward(layer, x, training)
    with torch.no_grad():
        out = layer(x)
    bn = nn.BatchNorm2d(16).train(training)
    with torch.no_grad():
        bn.running_mean.copy_(layer.norm.running_mean)
        bn.running_var.copy_(layer.norm.running_var)
        bn_err = rel_err(bn(x), spec_forward_bn(bn, x, training))
    assert rel_err(out, expected) <= max(5 * bn_err, 1e-6), (rel_err(out, expected), bn_err)


def spec_forward_bn(bn, x, training):
    x = x.double()
    if training:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    return (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)


# ------------------------------------------------------------------------------------------ non-finite input
# BatchNorm's semantics, extended to what AN mixes (documented in docs: numerics): in training a NaN / inf reaches
# the batch statistics, so it poisons the running statistics of its channel (as nn.BatchNorm2d) and, through the
# attention (its statistic of that sample feeds every logit, normalized over the batch), every running statistic of
# the attention's BatchNorm and every output of the batch. In eval only the sample that holds it is affected, but all
# of its channels: the attention mixes the channels of a sample.
@pytest.mark.parametrize('value', [float('nan'), float('inf'), float('-inf')])
@pytest.mark.parametrize('impl', IMPLS)
def test_non_finite_input_in_training(impl, value):
    layer = _layer(impl, 'cpu', training=True)
    bn = nn.BatchNorm2d(16, affine=False)
    bn.load_state_dict(layer.norm.state_dict())
    x = torch.randn(4, 16, 5, 5)
    x[1, 3, 2, 2] = value
    out = layer(x)
    bn(x)
    for name in ('running_mean', 'running_var'):
        got, expected = getattr(layer.norm, name), getattr(bn, name)
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), name  # only channel 3, as BatchNorm
        assert not torch.isfinite(got[3]) and torch.isfinite(got[torch.arange(16) != 3]).all()
        assert not torch.isfinite(getattr(layer.attn.bn, name)).any(), name  # every logit statistic
    assert not torch.isfinite(out).any()
    assert layer.norm.num_batches_tracked == 1 and layer.attn.bn.num_batches_tracked == 1


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
@pytest.mark.parametrize('impl', IMPLS)
def test_non_finite_input_in_eval(impl, value):
    layer = _layer(impl, 'cpu', training=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 16, 5, 5)
    x[1, 3, 2, 2] = value
    with torch.no_grad():
        out = layer(x)
    assert not torch.isfinite(out[1]).any()  # every channel of that sample
    assert torch.isfinite(out[[0, 2, 3]]).all()  # the other samples are untouched
    torch.testing.assert_close(out[[0, 2, 3]], layer(x[[0, 2, 3]]).detach())
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True)
