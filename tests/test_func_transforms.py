"""torch.func transforms on AN layers and every AN model: per-sample gradients (vmap of grad, e.g. for differential
privacy), jvp, jacrev and a vmapped forward, equal in float64 to what plain autograd gives sample by sample.

Under a transform the layer runs its reference code (plain modules); the fast path's autograd Function and its
``out=`` writes are not written for functorch. BatchNorm in training mode cannot be vmapped (its running statistics
are updated in place, for AN as for the BatchNorm twins), so per-sample gradients are taken in eval mode, with
``torch.func.functional_call`` and the buffers passed explicitly: the recipe that works for timm's BatchNorm models.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, jvp, vmap

from helpers import calibrated
from helpers import layer_with_statistics
from helpers import COMPILE_DEPTH, MODELS

pytestmark = pytest.mark.usefixtures('one_thread')


def _per_sample_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, b, xi, yi):
        return F.cross_entropy(functional_call(model, (p, b), (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, None, 0, 0))(params, buffers, x, y)


def _loop_grads(model, x, y):
    grads = []
    for xi, yi in zip(x, y):
        model.zero_grad()
        F.cross_entropy(model(xi[None]), yi[None]).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    return {k: torch.stack([g[k] for g in grads]) for k in grads[0]}


def _check_per_sample(model, x, y):
    expected = _loop_grads(model, x, y)
    got = _per_sample_grads(model, x, y)
    assert set(got) == set(expected)
    for k in expected:  # relative to each gradient's scale (random deep networks reach huge gradients)
        diff = (got[k] - expected[k]).abs().max().item()
        assert diff <= 1e-7 * expected[k].abs().max().item() + 1e-12, (k, diff)


class _Head(torch.nn.Module):
    """An AN layer with a linear head: a scalar per class."""

    def __init__(self, impl):
        super().__init__()
        self.an = layer_with_statistics(8, 3, impl=impl)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.an(x).mean(dim=(2, 3)))


@pytest.mark.parametrize('impl', ['fast', 'reference'])
def test_layer_per_sample_grads_jvp_jacrev(impl):
    head = _Head(impl).double().eval()
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    _check_per_sample(head, x, y)
    # jacrev / jvp against plain autograd (the fast path's Function in eval mode)
    jac = jacrev(head)(x)
    expected = torch.autograd.functional.jacobian(head, x)
    torch.testing.assert_close(jac, expected)
    v = torch.randn_like(x)
    out, tangent = jvp(head, (x,), (v,))
    torch.testing.assert_close(out, head(x))
    torch.testing.assert_close(tangent, torch.einsum('nkabcd,abcd->nk', expected, v))
    # a vmapped eval forward (the fast path's no-grad code writes with out=)
    with torch.no_grad():
        batched = vmap(head.an)(x[:, None])
    torch.testing.assert_close(batched[:, 0], head.an(x))


@pytest.mark.parametrize('name', MODELS)
def test_model_per_sample_grads(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = calibrated(timm.create_model(name, num_classes=4, **COMPILE_DEPTH.get(name, {})).double(), x)
    y = torch.tensor([1, 3])
    _check_per_sample(model, x, y)
    with torch.no_grad():  # a vmapped eval forward
        torch.testing.assert_close(vmap(model)(x[:, None])[:, 0], model(x))


@pytest.mark.parametrize('name', ['an_resnet18_bn12', 'an_mobilenetv2_050'])
def test_model_jvp_and_jacrev(name):
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    model = calibrated(timm.create_model(name, num_classes=3, **COMPILE_DEPTH.get(name, {})).double(),
                       torch.randn(2, 3, 32, 32, dtype=torch.float64))
    jac = jacrev(model)(x)
    expected = torch.autograd.functional.jacobian(model, x)
    torch.testing.assert_close(jac, expected)
    v = torch.randn_like(x)
    _, tangent = jvp(model, (x,), (v,))
    torch.testing.assert_close(tangent, torch.einsum('nkabcd,abcd->nk', expected, v))
