"""Worker for tests/test_sync_batchnorm.py, launched by torchrun: one DDP training step (float64, so that
only the math is compared, not float32 summation order) of a sync-BN-converted model on this process's half of a fixed batch; saves its outputs, gradients and running statistics to
``<out_file>.<rank>``."""
import sys

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

import an_zoo


def main(model_name: str, batch_file: str, out_file: str) -> None:
    dist.init_process_group('gloo')  # env:// rendezvous from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=5, drop_rate=0.0).double()
    model = an_zoo.convert_sync_batchnorm(model).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, y = torch.load(batch_file)
    part = x.shape[0] // world
    local = slice(rank * part, (rank + 1) * part)
    out = ddp(x[local])
    F.cross_entropy(out, y[local]).backward()  # DDP averages the gradients of the per-process mean losses
    torch.save(dict(out=out.detach(), grads={n: p.grad for n, p in model.named_parameters()},
                    buffers=dict(model.named_buffers())), f'{out_file}.{rank}')
    dist.destroy_process_group()


if __name__ == '__main__':
    main(*sys.argv[1:4])
