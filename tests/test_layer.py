"""AttentiveBatchNorm2d against an independent float64 computation of the specification, and its edge cases."""
import pytest
import torch
import torch.nn as nn

from an_zoo import AttentiveBatchNorm2d
from an_zoo.layers import instance_attention_stats
from helpers import layer_with_statistics, spec_forward


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('hw', [(7, 5), (1, 1), (2, 1)])
def test_matches_spec(training, hw):
    layer = layer_with_statistics().train(training)
    x = torch.randn(6, 16, *hw) * 2 + 0.3
    expected = spec_forward(layer, x, training)
    out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_running_stats_follow_batchnorm():
    layer = layer_with_statistics()
    reference = nn.BatchNorm2d(16, affine=False)
    reference.load_state_dict(layer.norm.state_dict())
    x = torch.randn(4, 16, 6, 6)
    layer.train()(x)
    reference.train()(x)
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(layer.norm, name), getattr(reference, name))


def test_single_position_is_defined():
    # the reference divides by H*W - 1 = 0 here and returns NaN; an_zoo defines var = 0
    x = torch.randn(4, 16, 1, 1)
    s = instance_attention_stats(x)
    torch.testing.assert_close(s, x * (1e-3) ** -0.5)
    layer = layer_with_statistics()
    out = layer(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_batch_of_one_training_raises_like_batchnorm():
    layer = layer_with_statistics().train()
    with pytest.raises(ValueError, match='Expected more than 1 value per channel when training'):
        layer(torch.randn(1, 16, 4, 4))
    layer.eval()
    assert torch.isfinite(layer(torch.randn(1, 16, 4, 4))).all()


def test_bad_input_rank_and_channels():
    layer = layer_with_statistics()
    with pytest.raises(ValueError, match='4D'):
        layer(torch.randn(2, 16, 4))
    with pytest.raises(ValueError, match='8 channels'):
        layer(torch.randn(2, 8, 4, 4))


def test_parameter_count_and_init():
    c, k = 32, 7
    layer = AttentiveBatchNorm2d(c, num_mixtures=k)
    assert sum(p.numel() for p in layer.parameters()) == 3 * k * c + 2 * k
    assert abs(layer.mixture_weight.mean().item() - 1.0) < 0.05
    assert abs(layer.mixture_weight.std().item() - 0.1) < 0.03
    assert abs(layer.mixture_bias.mean().item()) < 0.05
    layer.reset_parameters(zero_init=True)
    assert not layer.mixture_weight.any() and not layer.mixture_bias.any()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_statistics_in_float32(dtype):
    layer = layer_with_statistics()
    x = torch.randn(4, 16, 8, 8) * 1e3  # float16 sums of squares would overflow
    with torch.autocast('cpu', dtype=dtype):
        out = layer(x.to(dtype))
        assert instance_attention_stats(x.to(dtype)).dtype == torch.float32
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    reference = layer(x.to(dtype).float())
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_channels_last():
    layer = layer_with_statistics()
    x = torch.randn(4, 16, 6, 5)
    out = layer(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _layer_copy(layer)(x))


def _layer_copy(layer):
    copy = AttentiveBatchNorm2d(layer.num_features, layer.num_mixtures)
    copy.load_state_dict(layer.state_dict())
    return copy.train(layer.training)


@pytest.mark.parametrize('training', [True, False])
def test_compile_fullgraph(training):
    layer = layer_with_statistics().train(training)
    x = torch.randn(4, 16, 6, 6, requires_grad=True)
    expected = _layer_copy(layer)(x)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None and layer.mixture_weight.grad is not None


def test_torchscript():
    layer = layer_with_statistics().eval()
    x = torch.randn(2, 16, 5, 5)
    scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x), layer(x))
    with pytest.raises(Exception, match='4D'):
        scripted(torch.randn(2, 16, 5))


def test_frozenlayer_with_statistics():
    layer = layer_with_statistics()
    keys = set(layer.state_dict())
    frozen = _layer_copy(layer).freeze().train()
    assert frozen.frozen and set(frozen.state_dict()) == keys and 'frozen=True' in repr(frozen)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(1, 16, 5, 5)  # batch 1 is fine: nothing is estimated from the batch
    out = frozen(x)
    torch.testing.assert_close(out, layer.eval()(x))
    out.sum().backward()
    for k, v in frozen.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert frozen.mixture_weight.grad is None and frozen.attn.bn.weight.grad is None
    assert frozen.attn.conv.weight.grad is not None  # the attention is still learned


def test_layer_family_shares_the_mixture_base():
    from an_zoo.layers import AttentiveGroupNorm, MixtureAttention, MixtureNorm
    bn_layer, gn_layer = AttentiveBatchNorm2d(16, 4), AttentiveGroupNorm(16, 4, num_groups=4)
    for layer in (bn_layer, gn_layer):
        assert isinstance(layer, MixtureNorm) and isinstance(layer.attn, MixtureAttention)
        assert type(layer).reset_parameters is MixtureNorm.reset_parameters
        layer.reset_parameters(zero_init=True)
        assert not layer.mixture_weight.any() and not layer.mixture_bias.any()
    # the attention takes its normalization as an argument (state_dict names as the checkpoints')
    attn = MixtureAttention(16, 4, norm=nn.GroupNorm(1, 4), norm_name='norm')
    assert set(attn.state_dict()) == {'conv.weight', 'norm.weight', 'norm.bias'}
    assert set(MixtureAttention(16, 4, norm=nn.Identity(), norm_name='norm', conv_bias=True).state_dict()) == {
        'conv.weight', 'conv.bias'}
    assert set(MixtureAttention(16, 4).state_dict()) == {
        'conv.weight', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var', 'bn.num_batches_tracked'}
