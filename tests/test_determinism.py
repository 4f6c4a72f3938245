"""Determinism: under ``torch.use_deterministic_algorithms(True)`` with fixed seeds, two independent runs of two SGD
training steps give bit-identical losses, parameters, gradients and buffers (running statistics included), for
both AN implementations (``impl='fast'`` and ``impl='reference'``).

CPU: tested here, with one intra-op thread (float sums are ordered by the thread count: runs with different
counts may differ in the last bits). CUDA: the same check runs in a fresh interpreter with
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (which cuBLAS needs for deterministic matmuls and torch demands in deterministic
mode) when a GPU is present, and is skipped otherwise (written without a GPU at hand: not yet run). The fast
implementation has no hand-written kernel and no op that torch documents as nondeterministic on CUDA (no index_add
/ scatter / atomicAdd-based accumulation): its reductions are plain sums over H*W and over the batch, and its small
(N, C) x (C, K) products go through cuBLAS.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from an_zoo import set_an_impl

REPO = Path(__file__).resolve().parents[1]
MODELS = ['an_resnet18_bn12', 'an_mobilenetv2_050']
IMPLS = ['fast', 'reference']


pytestmark = pytest.mark.usefixtures('one_thread')


def train_two_steps(name: str, impl: str, device: str = 'cpu', seed: int = 0):
    """(losses, gradients of the last step, state_dict after two SGD steps), everything on the CPU."""
    torch.manual_seed(seed)
    # stochastic depth and dropout: the random streams must be reproduced too
    model = timm.create_model(name, num_classes=10, drop_rate=0.2, drop_path_rate=0.1)
    model = set_an_impl(model, impl).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    data = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(2):
        # 64 px: at 32 px MobileNetV2's last stages are 1x1, their BatchNorms normalize 4 values per channel, and
        # whether the second step's gradients overflow float32 hangs on the last bits of the first step
        x = torch.randn(4, 3, 64, 64, generator=data).to(device)
        y = torch.randint(0, 10, (4,), generator=data).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return torch.stack(losses).cpu(), grads, state


def assert_identical(a, b):
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = a, b
    # NaN != NaN: a diverging run would read as nondeterministic
    tensors = [loss_a, *grads_a.values(), *(v for v in state_a.values() if v.is_floating_point())]
    assert all(torch.isfinite(t).all() for t in tensors), 'the training steps produced non-finite values'
    assert torch.equal(loss_a, loss_b), f'losses differ: {loss_a.tolist()} vs {loss_b.tolist()}'
    differ = [k for k in grads_a if not torch.equal(grads_a[k], grads_b[k])]
    assert not differ, f'gradients differ: {differ[:10]}'
    differ = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not differ, f'parameters / buffers differ: {differ[:10]}'


@pytest.fixture
def deterministic():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('name', MODELS)
def test_two_training_steps_are_bit_identical_on_cpu(name, impl, deterministic):
    first = train_two_steps(name, impl)
    torch.manual_seed(1234)  # whatever ran in between, the seed alone fixes the run
    torch.randn(100)
    second = train_two_steps(name, impl)
    assert_identical(first, second)
    # not vacuous: the steps changed the weights and the running statistics
    torch.manual_seed(0)
    initial = timm.create_model(name, num_classes=10).state_dict()
    trained = first[2]
    moved = [k for k in trained if k.endswith(('mixture_weight', 'running_var')) and
             not torch.equal(trained[k], initial[k])]
    assert moved


CUDA_SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import an_zoo  # noqa: F401
    from test_determinism import assert_identical, train_two_steps
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    for name in sys.argv[2].split(','):
        for impl in ('fast', 'reference'):
            assert_identical(train_two_steps(name, impl, 'cuda'), train_two_steps(name, impl, 'cuda'))
            print('identical', name, impl)
''')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device: the CUDA determinism check runs on a GPU')
def test_two_training_steps_are_bit_identical_on_cuda():
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=':4096:8', PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, '-c', CUDA_SCRIPT, str(REPO / 'tests'), ','.join(MODELS)], env=env,
                            capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count('identical') == len(MODELS) * len(IMPLS)
