"""Small helpers shared by test modules (the tests folder is on sys.path, as for hf_server)."""
import subprocess
import sys
from pathlib import Path

import timm
import torch

from an_zoo import AttentiveBatchNorm2d
from an_zoo._export_prep import calibrate_running_stats as calibrated  # noqa: F401  (the library's own)

REPO = Path(__file__).resolve().parents[1]
MODELS = timm.list_models('an_*')
# the slow whole-model transforms (TorchScript, torch.compile) run on one model per distinct module graph: the
# others below differ from it only in width, depth or name (same modules, same code paths); the export matrix
# (export_status.json, scripts/export_matrix.py) records both transforms for every full model
SAME_GRAPH_AS = {
    'an_resnet18': 'an_resnet18_bn1', 'an_resnet34': 'an_resnet18_bn1', 'an_resnet34_bn1': 'an_resnet18_bn1',
    'an_resnet34_bn12': 'an_resnet18_bn12', 'an_resnet101': 'an_resnet50', 'an_resnet152': 'an_resnet50',
    'an_resnet101d': 'an_resnet50d', 'an_resnext101_32x8d': 'an_resnext50_32x4d',
    'an_resnext101_64x4d': 'an_resnext50_32x4d', 'an_mobilenetv2_075': 'an_mobilenetv2_050',
    'an_mobilenetv2_100': 'an_mobilenetv2_050', 'an_mobilenetv2_140': 'an_mobilenetv2_050',
    'an_aognet_40m': 'an_aognet_12m',
}
GRAPH_MODELS = [name for name in MODELS if name not in SAME_GRAPH_AS]
# reduced depths that keep every kind of block (and each norm placement) for the slow whole-model transforms
COMPILE_DEPTH = {
    'an_aognet_12m': dict(blocks=(1, 1, 1, 1)),
    'an_aognet_40m': dict(blocks=(1, 1, 1, 1)),
    'an_densenet121': dict(block_config=(2, 2, 2, 2)),
    # every ResNet / ResNeXt: one block per stage keeps the stage's first block (with its shortcut) and each norm
    **{name: dict(layers=(1, 1, 1, 1)) for name in MODELS if name.startswith(('an_resnet', 'an_resnext'))},
}


def run_python(args, env, check=True, timeout=600) -> subprocess.CompletedProcess:
    """``python *args`` in the repo root with ``env``; a failure (with ``check``) shows its output."""
    result = subprocess.run([sys.executable, *args], env=env, cwd=str(REPO), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}')
    return result


# two processes of one node (LOCAL_RANK 0 and 1) in a gloo process group, each creating the model named by argv[1]
# with pretrained=True: what a torchrun launch does when every rank builds its model
TWO_RANKS_PRETRAINED = '''
import os, socket, sys, torch.distributed as dist, torch.multiprocessing as mp


def worker(rank, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    import timm, an_zoo
    timm.create_model(sys.argv[1], pretrained=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port,), nprocs=2)
'''


def spec_forward(layer: AttentiveBatchNorm2d, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The specification written out in float64, independent of the layer's code."""
    x = x.double()
    if training:
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = layer.norm.running_mean.double(), layer.norm.running_var.double()
    x_hat = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
    hw = x.shape[2] * x.shape[3]
    s_mean = x.mean(dim=(2, 3))
    s_var = x.var(dim=(2, 3), unbiased=True) if hw > 1 else torch.zeros_like(s_mean)
    s = s_mean / torch.sqrt(s_var + 1e-3)                                       # (N, C)
    z = s @ layer.attn.conv.weight.double()[:, :, 0, 0].t()                    # (N, K)
    bn = layer.attn.bn
    if training:
        z_mean, z_var = z.mean(0), z.var(0, unbiased=False)
    else:
        z_mean, z_var = bn.running_mean.double(), bn.running_var.double()
    z = (z - z_mean) / torch.sqrt(z_var + bn.eps) * bn.weight.double() + bn.bias.double()
    lam = torch.clamp(z + 3, 0, 6) / 6
    gamma = lam @ layer.mixture_weight.double()
    beta = lam @ layer.mixture_bias.double()
    return gamma[:, :, None, None] * x_hat + beta[:, :, None, None]


def layer_with_statistics(c=16, k=5, **kwargs):
    """An AN layer with non-trivial running statistics and attention affine."""
    layer = AttentiveBatchNorm2d(c, num_mixtures=k, **kwargs)
    with torch.no_grad():  # non-trivial statistics and attention BN affine
        layer.norm.running_mean.uniform_(-0.5, 0.5)
        layer.norm.running_var.uniform_(0.5, 2.0)
        layer.attn.bn.weight.uniform_(0.5, 1.5)
        layer.attn.bn.bias.uniform_(-0.5, 0.5)
        layer.attn.bn.running_var.uniform_(0.5, 2.0)
    return layer


class PickledCall:
    """Unpickling this object calls ``fn(*args)`` (an importable function, not a class of a foreign library);
    pickling it runs and allocates nothing."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args
