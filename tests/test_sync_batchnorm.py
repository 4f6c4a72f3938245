"""Synchronised BatchNorm with AN: CPU (gloo) DDP with sync-BN equals one process on the whole batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

WORKER = Path(__file__).with_name('ddp_sync_worker.py')


def _torchrun(*args, nproc=2, timeout=240, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('PYTEST_XDIST_WORKER', None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.mark.parametrize('model_name', ['an_resnet18_bn12', 'an_mobilenetv2_050'])
def test_two_process_sync_bn_equals_one_process_on_the_whole_batch(model_name, tmp_path):
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64) * 2 + 0.5, torch.randint(0, 5, (8,))
    torch.save((x, y), tmp_path / 'batch.pt')
    result = _torchrun(str(WORKER), model_name, str(tmp_path / 'batch.pt'), str(tmp_path / 'rank.pt'))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f'rank.pt.{rank}', weights_only=True) for rank in (0, 1)]

    torch.manual_seed(0)
    reference = timm.create_model(model_name, num_classes=5, drop_rate=0.0).double().train()  # no dropout
    out = reference(x)
    F.cross_entropy(out, y).backward()
    # train-mode outputs depend on the batch statistics: equal only if both processes used the global ones
    torch.testing.assert_close(torch.cat([r['out'] for r in ranks]), out.detach(), atol=1e-9, rtol=1e-7)
    # per tensor, relative to its norm: random-init AN-MobileNetV2 is ill-conditioned enough that float64 summation
    # order alone moves some gradients by ~3e-8 relative, and gradients that are 0 analytically come out as ~1e-12
    # noise; a missing synchronisation moves them by O(1)
    for rank in ranks:
        for kind, reference_tensors in (('grads', {n: p.grad for n, p in reference.named_parameters()}),
                                        ('buffers', dict(reference.named_buffers()))):
            for name, expected in reference_tensors.items():
                error = (rank[kind][name].double() - expected.double()).norm()
                assert error <= 1e-6 * expected.double().norm() + 1e-9, f'{kind} {name}: |diff| {error:.3g}'
