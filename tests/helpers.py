"""Small helpers shared by test modules (the tests folder is on sys.path, as for hf_server)."""
import subprocess
import sys
from pathlib import Path

from an_zoo._export_prep import calibrate_running_stats as calibrated  # noqa: F401  (the library's own)

REPO = Path(__file__).resolve().parents[1]


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
