"""Hooks on an AN layer's children fire: while a hook is registered on ``norm``, ``attn``, ``attn.conv`` or
``attn.bn`` (or a global module hook), the layer runs the code that calls them, as PyTorch's fused paths stand aside
when they cannot honour the module contract; tools built on hooks (torchinfo) then count AN's compute."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from torch.nn.utils import prune

from an_zoo import AttentiveBatchNorm2d
from helpers import layer_with_statistics

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('child', ['norm', 'attn', 'attn.conv', 'attn.bn'])
def test_forward_hook_on_child_fires(child, training):
    layer = layer_with_statistics(impl='fast').train(training)
    reference = copy.deepcopy(layer)
    reference.impl = 'reference'
    captured = []
    handle = layer.get_submodule(child).register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    x = torch.randn(4, 16, 5, 5)
    out = layer(x)
    assert len(captured) == 1
    torch.testing.assert_close(out, reference(x))
    handle.remove()
    layer(x)
    assert len(captured) == 1  # the hook is gone: the fast path again
    assert layer._use_fast()


def test_pre_hook_that_edits_the_weight_is_honoured():
    # pruning reparametrises attn.conv.weight with a forward pre-hook: the pruned weight must be what is used
    layer = layer_with_statistics(impl='fast').eval()
    expected = copy.deepcopy(layer)
    prune.l1_unstructured(layer.attn.conv, 'weight', amount=0.5)
    with torch.no_grad():
        expected.attn.conv.weight.mul_(layer.attn.conv.weight_mask)
    x = torch.randn(3, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected(x))


def test_global_hook_and_backward_hook():
    layer = layer_with_statistics(impl='fast')
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        layer(torch.randn(2, 16, 4, 4))
    finally:
        handle.remove()
    assert {'BatchNorm2d', 'Conv2d', 'MixtureAttention', 'AttentiveBatchNorm2d'} <= set(calls)
    grads = []
    layer.attn.conv.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    layer(torch.randn(2, 16, 4, 4)).sum().backward()
    assert len(grads) == 1


def test_torchinfo_counts_an_compute():
    import torchinfo  # test extra: its absence is a failure
    counts = {}
    for impl in ('fast', 'reference'):
        model = timm.create_model('an_resnet18_bn12').eval()
        for m in model.modules():
            if isinstance(m, AttentiveBatchNorm2d):
                m.impl = impl
        stats = torchinfo.summary(model, input_size=(1, 3, 64, 64), verbose=0)
        counts[impl] = (stats.total_mult_adds, stats.total_params)
    twin = torchinfo.summary(timm.create_model('resnet18').eval(), input_size=(1, 3, 64, 64), verbose=0)
    assert counts['fast'] == counts['reference']
    assert counts['fast'][0] > twin.total_mult_adds  # AN's attention adds compute to its BatchNorm twin's
