"""The fast AN implementation equals the reference layer: outputs, every gradient, running statistics; gradcheck of
its autograd functions; saved activations no larger than BatchNorm's."""
import copy

import pytest
import torch
import torch.nn as nn

from an_zoo import AttentiveBatchNorm2d
from an_zoo.layers.fast_attentive_norm import AttentiveNormFunction, instance_moments


def _pair(c=24, k=6, **kwargs):
    torch.manual_seed(0)
    ref = AttentiveBatchNorm2d(c, k, impl='reference', **kwargs)
    with torch.no_grad():
        ref.norm.running_mean.uniform_(-0.5, 0.5)
        ref.norm.running_var.uniform_(0.5, 2.0)
        ref.attn.bn.weight.uniform_(0.5, 1.5)
    fast = copy.deepcopy(ref)
    fast.impl = 'fast'
    return ref, fast


def _close(actual, expected, name, rel=1e-5, atol=1e-6):
    """float32-tight: max |difference| within ``rel`` of the tensor's own scale (sums over N*H*W elements are
    accumulated in a different order by the two implementations)."""
    bound = rel * expected.abs().max().item() + atol
    diff = (actual - expected).abs().max().item()
    assert diff <= bound, f'{name}: max |diff| {diff:.3g} > {bound:.3g}'


def _compare(ref, fast, x, rel=1e-5):
    xr, xf = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out_r, out_f = ref(xr), fast(xf)
    _close(out_f, out_r, 'output', rel)
    grad = torch.randn_like(out_r)
    out_r.backward(grad)
    out_f.backward(grad)
    _close(xf.grad, xr.grad, 'input gradient', rel)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        if p.grad is None:  # frozen parameters
            assert q.grad is None, name
        elif name == 'attn.conv.weight' and ref.training and x.shape[0] == 2:
            # BatchNorm over a batch of 2 maps each attention logit to about -1 / +1 whatever its input, so this
            # gradient is nearly 0 and both implementations return float32 rounding noise of ~1e-6
            assert q.grad.abs().max() < 1e-5 and p.grad.abs().max() < 1e-5, name
        else:
            _close(q.grad, p.grad, f'gradient of {name}', rel)
    for (name, b), c in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)
    return out_f


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('shape', [(4, 24, 9, 7), (3, 24, 1, 1), (2, 24, 2, 1), (8, 24, 16, 16)])
def test_fast_equals_reference(training, shape):
    ref, fast = _pair()
    ref.train(training)
    fast.train(training)
    x = torch.randn(*shape) * 3 + 1
    for _ in range(2):  # the second step sees updated running statistics
        _compare(ref, fast, x)


@pytest.mark.parametrize('training', [True, False])
def test_batchnorm_kernel_path_as_accurate_as_reference(training, monkeypatch):
    """channels_last samples of >= 1e5 elements take the statistics and (in large tensors) the backward's reductions
    from BatchNorm's own CPU kernels (one call per sample; they did run). Measured against the reference in float64: the output and
    every gradient within 4x the float32 reference's error, or within 5e-5 of the tensor's scale, which is the
    accuracy of BatchNorm's own weight and bias gradients: its backward kernel sums each channel in float32 in
    sequence (measured here: ~2e-5 of the scale for the attention's parameter gradients, ~4e-6 for the reference's
    pairwise sums)."""
    from an_zoo.layers import fast_attentive_norm, statistics
    calls = {'moments': 0, 'grad_sums': 0}

    def spy(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped
    monkeypatch.setattr(statistics, '_batchnorm_kernel_moments', spy('moments', statistics._batchnorm_kernel_moments))
    monkeypatch.setattr(fast_attentive_norm, 'batchnorm_kernel_grad_sums',
                        spy('grad_sums', statistics.batchnorm_kernel_grad_sums))
    # (the backward kernel pays from ~2.2M elements; this tensor is smaller, to keep the float64 reference quick)
    monkeypatch.setattr(statistics, '_BATCHNORM_BACKWARD_KERNEL_MIN_TOTAL', 0)
    ref, fast = _pair()
    exact = copy.deepcopy(ref).double()
    x = (torch.randn(6, 24, 72, 60) * 3 + 1).to(memory_format=torch.channels_last)  # 103680 elements per sample
    grad = torch.randn_like(x)
    results = []
    for layer, xi in ((ref, x), (fast, x), (exact, x.double())):
        layer.train(training)
        xi = xi.clone().requires_grad_()
        out = layer(xi)
        out.backward(grad.to(out.dtype))
        results.append([out, xi.grad, *(p.grad for p in layer.parameters()), *layer.buffers()])
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)
    assert calls == {'moments': 1, 'grad_sums': 1}
    names = ['output', 'input gradient', *(f'gradient of {n}' for n, _ in ref.named_parameters()),
             *(n for n, _ in ref.named_buffers())]
    for name, r32, f32, r64 in zip(names, *results):
        if r64 is None or not r64.is_floating_point():
            continue
        scale = r64.abs().max().item()
        err_ref, err_fast = ((t.double() - r64).abs().max().item() for t in (r32, f32))
        assert err_fast <= max(4 * err_ref, 5e-5 * scale, 1e-7), f'{name}: {err_fast:.3g} vs reference {err_ref:.3g}'


@pytest.mark.parametrize('grad_mode', [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('shape', [(4, 24, 9, 7), (3, 24, 1, 1)])
def test_without_autograd_equals_reference(grad_mode, training, shape):
    """Inference runs the forward without the autograd Function (eval: the folded form); training without autograd
    still updates the running statistics."""
    ref, fast = _pair()
    ref.train(training)
    fast.train(training)
    x = (torch.randn(*shape) * 3 + 1).to(memory_format=torch.channels_last)
    for _ in range(2):
        with grad_mode():
            out_r, out_f = ref(x), fast(x)
        _close(out_f, out_r, 'output')
        assert out_f.is_contiguous(memory_format=torch.channels_last)
        for (name, b), c in zip(ref.named_buffers(), fast.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)


def test_channels_last_and_momentum_none():
    ref, fast = _pair(momentum=None)
    x = torch.randn(4, 24, 6, 5).to(memory_format=torch.channels_last)
    out = _compare(ref, fast, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _compare(ref, fast, torch.randn(4, 24, 6, 5))  # cumulative average over two batches


class _NoGradientToFirst(torch.autograd.Function):
    """a + b whose backward gives a no gradient (None), as a custom op downstream of a layer may."""

    @staticmethod
    def forward(ctx, a, b):
        return a + b

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def test_output_without_gradient_leaves_none_like_batchnorm():
    # the fast layer's node takes an absent output gradient (it makes no zero gradients): no gradient flows on,
    # exactly as through nn.BatchNorm2d, and the rest of the graph is unaffected
    _, fast = _pair(8, 3)
    bn = nn.BatchNorm2d(8)
    for layer in (fast, bn):
        x = torch.randn(4, 8, 5, 5, requires_grad=True)
        other = torch.randn(4, 8, 5, 5, requires_grad=True)
        _NoGradientToFirst.apply(layer(x), other).sum().backward()
        assert x.grad is None and other.grad is not None
        assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast(dtype, training):
    ref, fast = _pair()
    ref.train(training)
    fast.train(training)
    without_autograd = copy.deepcopy(fast)
    x = torch.randn(4, 24, 8, 8) * 100
    with torch.autocast('cpu', dtype=dtype):
        xr, xf = x.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()
        out_r, out_f = ref(xr), fast(xf)
        with torch.inference_mode():
            out_i = without_autograd(x.to(dtype))
    assert out_f.dtype == out_r.dtype == out_i.dtype == dtype
    torch.testing.assert_close(out_f.float(), out_r.float(), rtol=0.05, atol=0.1)
    torch.testing.assert_close(out_i.float(), out_r.float(), rtol=0.05, atol=0.1)
    torch.testing.assert_close(fast.norm.running_var, ref.norm.running_var, rtol=1e-3, atol=1e-3)
    grad = torch.randn_like(out_r)
    out_r.backward(grad)
    out_f.backward(grad)
    assert xf.grad.dtype == dtype and fast.mixture_weight.grad.dtype == torch.float32
    torch.testing.assert_close(xf.grad.float(), xr.grad.float(), rtol=0.05, atol=0.05)
    for p, q in zip(ref.parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0.05, atol=0.05 * p.grad.abs().max().item())


def test_frozen_and_sync_batchnorm_paths():
    ref, fast = _pair()
    ref.freeze()
    fast.freeze()
    _compare(ref, fast, torch.randn(1, 24, 5, 5))
    # a SyncBatchNorm in training needs cross-process statistics: the fast path steps aside
    _, fast = _pair()
    fast = nn.SyncBatchNorm.convert_sync_batchnorm(fast)
    assert not fast._use_fast()
    assert fast.eval()._use_fast()


def _function_inputs(n=3, c=4, k=3, hw=(4, 3), norm_batch=True, attn_batch=True, requires_grad=(True,) * 6):
    """Float64 inputs of AttentiveNormFunction: x and the five parameters, running statistics or None (batch)."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    tensors = [torch.randn(n, c, *hw, **d) * 2 + 0.5, torch.randn(k, c, 1, 1, **d), torch.rand(k, **d) + 0.5,
               torch.randn(k, **d) * 0.5, torch.randn(k, c, **d) * 0.5 + 1, torch.randn(k, c, **d) * 0.5]
    tensors = [t.requires_grad_(r) for t, r in zip(tensors, requires_grad)]
    norm_stats = (None, None) if norm_batch else (torch.randn(c, **d) * 0.3, torch.rand(c, **d) + 0.5)
    attn_stats = (None, None) if attn_batch else (torch.randn(k, **d) * 0.3, torch.rand(k, **d) + 0.5)
    return tensors, (*norm_stats, *attn_stats, 1e-5, 1e-3, 1e-5)


@pytest.mark.parametrize('norm_batch, attn_batch', [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize('hw', [(4, 3), (1, 1)])
def test_gradcheck_fused_function(norm_batch, attn_batch, hw):
    """Analytic backward of the whole-layer Function against finite differences, w.r.t. x and every parameter:
    training (batch statistics), eval (running statistics) and the mixed cases."""
    tensors, rest = _function_inputs(hw=hw, norm_batch=norm_batch, attn_batch=attn_batch)
    assert torch.autograd.gradcheck(lambda *t: AttentiveNormFunction.apply(*t, *rest)[0], tensors)


def test_gradcheck_fused_function_frozen():
    """A frozen layer: running statistics, only x and the attention's conv need gradients."""
    tensors, rest = _function_inputs(norm_batch=False, attn_batch=False,
                                     requires_grad=(True, True, False, False, False, False))
    assert torch.autograd.gradcheck(lambda *t: AttentiveNormFunction.apply(*t, *rest)[0], tensors)
    # and an input that needs no gradient (parameters only)
    tensors, rest = _function_inputs(requires_grad=(False, True, True, True, True, True))
    assert torch.autograd.gradcheck(lambda *t: AttentiveNormFunction.apply(*t, *rest)[0], tensors)


def test_gradcheck_layer_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    layer = AttentiveBatchNorm2d(3, 2, impl='fast').double()
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    layer.freeze()
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


def test_instance_moments_are_shift_robust():
    """Mean far from zero (|mean| / std = 1e4): the shifted sums keep the variance accurate in float32."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64) + 1e4
    mean, var = instance_moments(x.float().to(memory_format=torch.channels_last))
    torch.testing.assert_close(mean.double(), x.mean(dim=(2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x.var(dim=(2, 3), unbiased=False), rtol=1e-2, atol=0)


def test_switch(monkeypatch):
    monkeypatch.setenv('AN_ZOO_IMPL', 'reference')
    assert AttentiveBatchNorm2d(8).impl == 'reference'
    monkeypatch.setenv('AN_ZOO_IMPL', 'fast')
    assert AttentiveBatchNorm2d(8).impl == 'fast'
    monkeypatch.setenv('AN_ZOO_IMPL', 'bogus')
    with pytest.raises(ValueError, match='AN_ZOO_IMPL'):
        AttentiveBatchNorm2d(8)
    with pytest.raises(ValueError, match='impl must be one of'):
        AttentiveBatchNorm2d(8, impl='triton')


def _saved_bytes(module, x):
    """Activation bytes kept for backward, by storage (parameters and buffers excluded: resident anyway)."""
    resident = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident:
            storages[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def test_saved_activations_no_more_than_batchnorm():
    n, c = 8, 64
    x = torch.randn(n, c, 16, 16, requires_grad=True)
    bn = nn.BatchNorm2d(c)
    ref, fast = _pair(c, 10)
    bn_bytes, fast_bytes, ref_bytes = _saved_bytes(bn, x), _saved_bytes(fast, x), _saved_bytes(ref, x)
    # the fast layer keeps x (as BatchNorm does) plus only two per-(sample, channel) vectors (the instance mean and
    # the attention's rsqrt) and a few per-channel / (sample, mixture) ones
    assert fast_bytes - bn_bytes <= 3 * n * c * 4, (fast_bytes, bn_bytes)
    assert ref_bytes > 1.9 * bn_bytes  # the reference also keeps xhat: that is what the fast path removes


def test_saved_activations_whole_network():
    import timm
    x = torch.randn(4, 3, 128, 128).to(memory_format=torch.channels_last)
    an = timm.create_model('an_mobilenetv2_100').to(memory_format=torch.channels_last)  # the worst case
    bn = timm.create_model('mobilenetv2_100').to(memory_format=torch.channels_last)
    assert _saved_bytes(an, x) <= 1.02 * _saved_bytes(bn, x)


@pytest.mark.parametrize('an_name,bn_name', [('an_resnet50_all', 'resnet50'), ('an_aognet_12m', 'aognet_12m'),
                                             ('an_densenet121', 'densenet121')])
def test_saved_activations_new_families(an_name, bn_name):
    import timm
    x = torch.randn(2, 3, 128, 128).to(memory_format=torch.channels_last)
    an = timm.create_model(an_name).to(memory_format=torch.channels_last)
    bn = timm.create_model(bn_name).to(memory_format=torch.channels_last)
    assert _saved_bytes(an, x) <= 1.02 * _saved_bytes(bn, x)


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('grad', [True, False])
def test_compile_fullgraph_fast_path(training, grad):
    """The autograd Function (grad) and the folded inference path (no grad) both compile without graph breaks."""
    _, fast = _pair()
    fast.train(training)
    x = torch.randn(4, 24, 6, 6, requires_grad=grad)
    expected = copy.deepcopy(fast)(x)
    with torch.set_grad_enabled(grad):
        out = torch.compile(fast, fullgraph=True, backend='aot_eager')(x)
    torch.testing.assert_close(out, expected)
    if grad:
        out.sum().backward()
