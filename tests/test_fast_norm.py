"""The fast AN implementation equals the reference layer: outputs, every gradient, running statistics; gradcheck of
its autograd functions; saved activations no larger than BatchNorm's."""
import copy

import pytest
import torch
import torch.nn as nn

from an_zoo import AttentiveBatchNorm2d
from an_zoo.layers.fast_attentive_norm import ChannelAffine, InstanceMoments


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


def _compare(ref, fast, x):
    xr, xf = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out_r, out_f = ref(xr), fast(xf)
    _close(out_f, out_r, 'output')
    grad = torch.randn_like(out_r)
    out_r.backward(grad)
    out_f.backward(grad)
    _close(xf.grad, xr.grad, 'input gradient')
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        if p.grad is None:  # frozen parameters
            assert q.grad is None, name
        else:
            _close(q.grad, p.grad, f'gradient of {name}')
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


def test_channels_last_and_momentum_none():
    ref, fast = _pair(momentum=None)
    x = torch.randn(4, 24, 6, 5).to(memory_format=torch.channels_last)
    out = _compare(ref, fast, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _compare(ref, fast, torch.randn(4, 24, 6, 5))  # cumulative average over two batches


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    ref, fast = _pair()
    x = torch.randn(4, 24, 8, 8) * 100
    with torch.autocast('cpu', dtype=dtype):
        out_r, out_f = ref(x.to(dtype)), fast(x.to(dtype))
    assert out_f.dtype == out_r.dtype == dtype
    torch.testing.assert_close(out_f.float(), out_r.float(), rtol=0.05, atol=0.1)
    torch.testing.assert_close(fast.norm.running_var, ref.norm.running_var, rtol=1e-3, atol=1e-3)


def test_frozen_and_sync_batchnorm_paths():
    ref, fast = _pair()
    ref.freeze()
    fast.freeze()
    _compare(ref, fast, torch.randn(1, 24, 5, 5))
    # a SyncBatchNorm in training needs cross-process statistics: the fast path steps aside
    _, fast = _pair()
    fast = nn.SyncBatchNorm.convert_sync_batchnorm(fast)
    assert not fast._fast_supported()
    assert fast.eval()._fast_supported()


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: InstanceMoments.apply(t), (x,))
    scale = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ChannelAffine.apply, (x, scale, shift))
    layer = AttentiveBatchNorm2d(3, 2, impl='fast').double()
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


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
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
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
    # the fast layer keeps x (as BatchNorm does) plus only per-(sample, channel) vectors of the attention algebra
    assert fast_bytes - bn_bytes <= 16 * n * c * 4, (fast_bytes, bn_bytes)
    assert ref_bytes > 1.9 * bn_bytes  # the reference also keeps xhat: that is what the fast path removes


def test_saved_activations_whole_network():
    import timm
    x = torch.randn(4, 3, 128, 128).to(memory_format=torch.channels_last)
    an = timm.create_model('an_mobilenetv2_100').to(memory_format=torch.channels_last)  # the worst case
    bn = timm.create_model('mobilenetv2_100').to(memory_format=torch.channels_last)
    assert _saved_bytes(an, x) <= 1.02 * _saved_bytes(bn, x)


def test_compile_fullgraph_fast_path():
    _, fast = _pair()
    x = torch.randn(4, 24, 6, 6, requires_grad=True)
    expected = copy.deepcopy(fast)(x)
    out = torch.compile(fast, fullgraph=True, backend='aot_eager')(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
