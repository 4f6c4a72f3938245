"""Fine-tune or train an ``an_*`` (or any timm) model: ``python -m an_zoo.train`` / ``an-zoo-train``.

Built on timm's machinery (``create_dataset`` / ``create_loader`` / ``Mixup``, ``create_optimizer_v2`` with its
weight-decay and layer-decay parameter groups, ``create_scheduler_v2``, ``ModelEmaV3``, ``NativeScaler``,
``init_distributed_device``), with what fine-tuning an AN model needs on top:

* an offline default: with no arguments it fine-tunes ``an_resnet18_bn12`` on the handwritten digits that ship
  inside scikit-learn and prints held-out accuracy; ``--compare-bn`` trains the BatchNorm twin with the same recipe;
* a checkpoint per epoch (weights as safetensors, optimizer state as a ``weights_only``-loadable file) and exact
  resume: every epoch's randomness is derived from ``(seed, epoch)``, so a run killed mid-epoch and resumed with
  ``--resume`` ends with the same weights as one that was never interrupted;
* AN-aware tooling: the AN mixture is exempt from weight decay, ``--freeze-groups`` freezes AN layers in place
  (statistics and mixture fixed, attention per instance) and ``--sync-bn`` synchronises both BatchNorms inside
  every AN layer, on CUDA and on CPU (gloo);
* torchrun DDP (``env://`` rendezvous, multi-GPU and multi-node), AMP (bf16 / fp16), channels_last,
  ``torch.compile``, EMA, gradient accumulation, layer-wise lr decay, progress bars with throughput and ETA,
  ``summary.csv`` / ``log.json`` and a ``curves.png`` plot.

Recipes are timm train-args YAML files (``--config recipes/an_resnet50.aog_e120_in1k.yaml``); the keys are the
argument names below.
"""
import argparse
import json
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

import timm
from timm.data import Mixup, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import group_modules
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler, init_distributed_device, update_summary

from . import __version__
from ._io import atomic_write
from .data import EMBEDDED_DATASET, create_train_eval_datasets
from .layers import attentive_norm_no_weight_decay, convert_sync_batchnorm, freeze_batch_norm_2d
from .validate import evaluate

__all__ = ['build_parser', 'parse_args', 'train', 'bn_twin_name', 'main']

# The embedded default recipe: digits are 8x8 grey images, so no flips (a flipped 2 is not a 2) and mild crops;
# measured on 2 CPU cores in the README. Applied only when the dataset is the embedded one.
EMBEDDED_DEFAULTS: Dict[str, Any] = dict(
    model='an_resnet18_bn12', img_size=32, crop_pct=1.0, batch_size=64, epochs=6, opt='sgd', lr=0.1,
    weight_decay=5e-4, sched='cosine', warmup_epochs=1, warmup_lr=0.01, min_lr=1e-4, hflip=0.0,
    scale=(0.75, 1.0), ratio=(0.9, 1.1), color_jitter=0.0, workers=0, interpolation='bilinear',
)
CHECKPOINT_PREFIX = 'checkpoint-'


def _tuple_of_floats(text: str) -> Tuple[float, ...]:
    return tuple(float(v) for v in text.replace(',', ' ').split())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. Destination names follow timm's ``train.py`` so its YAML recipes read the same."""
    p = argparse.ArgumentParser(
        prog='python -m an_zoo.train', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-c', '--config', default=None, metavar='YAML',
                   help='timm train-args YAML recipe; its keys set defaults, the command line still wins')

    g = p.add_argument_group('data')
    g.add_argument('--dataset', default=None,
                   help="'digits' (embedded, offline; the default without --data-dir), 'folder' (ImageFolder "
                        "under --data-dir; the default with it) or any timm create_dataset name ('hfds/<name>', "
                        "'torch/cifar10', ...)")
    g.add_argument('--data-dir', default=None, help='dataset root (an ImageFolder root with train/ and val/)')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--dataset-download', action='store_true', help='allow torch/* datasets to download')
    g.add_argument('--img-size', type=int, default=None, help='input size (default: the model pretrained cfg)')
    g.add_argument('--crop-pct', type=float, default=None)
    g.add_argument('--interpolation', default='', help='eval resize interpolation (default: pretrained cfg)')
    g.add_argument('--train-interpolation', default='random')
    g.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), metavar=('MIN', 'MAX'))
    g.add_argument('--ratio', type=float, nargs=2, default=(3. / 4., 4. / 3.), metavar=('MIN', 'MAX'))
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--aa', default=None, help="auto-augment policy, e.g. 'rand-m9-mstd0.5'")
    g.add_argument('--reprob', type=float, default=0.0, help='random-erasing probability')
    g.add_argument('--workers', type=int, default=4, help='data-loading processes per training process')
    g.add_argument('--train-limit', type=int, default=None, metavar='N', help='use only the first N training images')
    g.add_argument('--eval-limit', type=int, default=None, metavar='N', help='use only the first N held-out images')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='an_resnet50')
    g.add_argument('--pretrained', action='store_true', help="load the model's published weights")
    g.add_argument('--initial-checkpoint', default=None, metavar='FILE',
                   help='start from this checkpoint (an_zoo safetensors, or an official AN .pth.tar)')
    g.add_argument('--num-classes', type=int, default=None, help='default: the dataset class count')
    g.add_argument('--drop', type=float, default=None, help='dropout before the classifier')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate')
    g.add_argument('--freeze-groups', type=int, default=0,
                   help="freeze the first N coarse parameter groups of timm's group_matcher (ResNet: 1 = stem, "
                        "2 = stem + layer1, ...); their norms, AN included, are frozen in place")
    g.add_argument('--sync-bn', action='store_true', help='synchronise BatchNorm and AN statistics under DDP')
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND')

    g = p.add_argument_group('optimizer and schedule')
    g.add_argument('--opt', default='sgd')
    g.add_argument('--opt-eps', type=float, default=None)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--lr', type=float, default=0.1, help='learning rate, used as given (scale it yourself with the global batch size)')
    g.add_argument('--weight-decay', type=float, default=1e-4)
    g.add_argument('--no-norm-weight-decay', action=argparse.BooleanOptionalAction, default=True,
                   help='exempt norm parameters, biases and the AN mixture from weight decay (the reference '
                        "recipes' remove-norm-weight-decay)")
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay, e.g. 0.75')
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--sched', default='cosine')
    g.add_argument('--epochs', type=int, default=100)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--batch-size', type=int, default=128, help='per process')
    g.add_argument('--grad-accum-steps', type=int, default=1)

    g = p.add_argument_group('regularization')
    g.add_argument('--smoothing', type=float, default=0.0)
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-mode', default='batch')
    g.add_argument('--model-ema', action='store_true')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)

    g = p.add_argument_group('precision and device')
    g.add_argument('--amp', action='store_true', help='autocast mixed precision')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')

    g = p.add_argument_group('run')
    g.add_argument('--output', default=None,
                   help='run folder (default: output/train/<time>-<model>-<dataset>); must not hold an earlier '
                        'run unless --resume is given')
    g.add_argument('--resume', nargs='?', const='auto', default=None, metavar='PATH',
                   help='continue from the newest checkpoint in --output (or PATH: a run folder or checkpoint)')
    g.add_argument('--checkpoint-hist', type=int, default=2, help='epoch checkpoints kept (best is kept too)')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=0, help='also print a line every N steps (0: off)')
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    g.add_argument('--compare-bn', action='store_true',
                   help='afterwards, train the BatchNorm twin of --model with the same recipe and compare')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Defaults < embedded-dataset recipe < ``--config`` YAML < command line."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    recipe = load_recipe(first.config, parser) if first.config else {}
    dataset = first.dataset or recipe.get('dataset') or ('folder' if first.data_dir or recipe.get('data_dir')
                                                         else EMBEDDED_DATASET)
    parser.set_defaults(dataset=dataset)
    if dataset == EMBEDDED_DATASET:
        parser.set_defaults(**EMBEDDED_DEFAULTS)
    parser.set_defaults(**recipe)
    return parser.parse_args(argv)


def load_recipe(path: str, parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, Any]:
    """Read a timm train-args YAML file; unknown keys are an error naming them (a typo would silently be ignored)."""
    import yaml

    parser = parser or build_parser()
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f'{path}: a recipe must be a YAML mapping of argument names to values')
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f'{path}: unknown keys {unknown}; valid keys are the argument names of '
                         f'`python -m an_zoo.train --help` (with _ for -)')
    return cfg


def bn_twin_name(model_name: str) -> str:
    """The timm BatchNorm model an ``an_*`` architecture is built from (``an_resnet18_bn12`` -> ``resnet18``)."""
    if not model_name.startswith('an_'):
        raise ValueError(f'{model_name} is not an an_* model, it has no BatchNorm twin')
    name = model_name[len('an_'):]
    for suffix in ('_bn12', '_bn1'):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    if not timm.is_model(name):
        raise ValueError(f'no timm BatchNorm twin {name!r} for {model_name}')
    return name


# ------------------------------------------------------------------------------------------------------ set-up

def _is_main(args: argparse.Namespace) -> bool:
    return args.rank == 0


def _print(args: argparse.Namespace, *values: Any) -> None:
    if _is_main(args):
        print(*values, flush=True)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """All randomness of an epoch (shuffling, augmentation, mixup, dropout) derives from (seed, epoch, rank), so
    re-running an epoch after a resume repeats it exactly."""
    s = seed + 1_000_003 * (epoch + 1) + 7919 * rank
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, '_orig_mod', model)  # torch.compile
    return getattr(model, 'module', model)  # DDP


def create_train_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The model with the requested weights, head size, regularization and frozen groups."""
    kwargs: Dict[str, Any] = dict(num_classes=num_classes)
    if args.drop is not None:
        kwargs['drop_rate'] = args.drop
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    pretrained = args.pretrained
    if args.initial_checkpoint:
        if not Path(args.initial_checkpoint).is_file():
            raise FileNotFoundError(f'--initial-checkpoint {args.initial_checkpoint} does not exist')
        # through the pretrained path, so the head is dropped / the stem adapted as for published weights
        kwargs['pretrained_cfg_overlay'] = dict(file=str(Path(args.initial_checkpoint).resolve()))
        pretrained = True
    model = timm.create_model(args.model, pretrained=pretrained, **kwargs)
    if args.freeze_groups:
        freeze_groups(model, args.freeze_groups)
    return model


def freeze_groups(model: nn.Module, num_groups: int) -> List[str]:
    """Freeze the first ``num_groups`` coarse groups of ``model.group_matcher``: parameters stop training and the
    norms in them (AN included, in place) keep their statistics. Returns the frozen module names."""
    if not hasattr(model, 'group_matcher'):
        raise ValueError(f'{type(model).__name__} has no group_matcher; --freeze-groups needs a timm model')
    groups = group_modules(model, model.group_matcher(coarse=True))
    ordered = sorted(groups)
    if num_groups > len(ordered):
        raise ValueError(f'--freeze-groups {num_groups}: the model has only {len(ordered)} groups')
    names = [name for gid in ordered[:num_groups] for name in groups[gid]]
    for name in names:
        module = model.get_submodule(name)
        for param in module.parameters():
            param.requires_grad_(False)
        frozen = freeze_batch_norm_2d(module)
        if frozen is not module:  # a bare BatchNorm became FrozenBatchNorm2d: put it in its place
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent) if parent else model, child, frozen)
    return names


def create_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory over timm's parameter groups, with the AN mixture exempt from weight decay."""
    no_decay = set(getattr(model, 'no_weight_decay', lambda: set())()) | attentive_norm_no_weight_decay(model)
    if not args.no_norm_weight_decay:
        params: Any = [p for p in model.parameters() if p.requires_grad]
    elif args.layer_decay is not None:
        params = param_groups_layer_decay(model, args.weight_decay, no_weight_decay_list=no_decay,
                                          layer_decay=args.layer_decay)
    else:
        params = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=no_decay)
    kwargs: Dict[str, Any] = dict(momentum=args.momentum)
    if args.opt_eps is not None:
        kwargs['eps'] = args.opt_eps
    return create_optimizer_v2(params, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, **kwargs)


class _Subset(torch.utils.data.Dataset):
    """Chosen samples of a dataset that, unlike ``torch.utils.data.Subset``, forwards ``transform`` (which timm's
    ``create_loader`` sets)."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]


def _num_classes(dataset: torch.utils.data.Dataset) -> int:
    if getattr(dataset, 'classes', None) is not None:
        return len(dataset.classes)
    reader = getattr(dataset, 'reader', None)
    if reader is not None and getattr(reader, 'class_to_idx', None):
        return len(reader.class_to_idx)
    raise ValueError('cannot tell the number of classes of this dataset: pass --num-classes')


# ---------------------------------------------------------------------------------------------- train / evaluate

def _autocast(args: argparse.Namespace, device: torch.device):
    if not args.amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype))


def _progress(args: argparse.Namespace, iterable, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=args.no_progress or not _is_main(args),
                dynamic_ncols=True, leave=False, file=sys.stderr)


def train_one_epoch(args, epoch: int, model: nn.Module, loader, optimizer, criterion, scheduler, device,
                    scaler: Optional[NativeScaler], ema: Optional[ModelEmaV3], mixup: Optional[Mixup],
                    num_updates: int) -> Tuple[Dict[str, float], int]:
    model.train()
    accum = args.grad_accum_steps
    steps = len(loader)
    loss_sum, seen, start = 0.0, 0, time.perf_counter()
    bar = _progress(args, loader, steps, f'epoch {epoch + 1}/{args.epochs} train')
    optimizer.zero_grad(set_to_none=True)
    for step, (images, targets) in enumerate(bar):
        images, targets = images.to(device), targets.to(device)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        need_update = (step + 1) % accum == 0 or step + 1 == steps
        # under DDP, gradients are all-reduced only on the step that updates
        sync = model.no_sync() if args.distributed and not need_update else nullcontext()
        with sync:
            with _autocast(args, device):
                loss = criterion(model(images), targets)
            if scaler is not None:
                scaler(loss / accum, optimizer, clip_grad=args.clip_grad,
                       parameters=[p for p in model.parameters() if p.requires_grad], need_update=need_update)
            else:
                (loss / accum).backward()
                if need_update:
                    if args.clip_grad is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                    optimizer.step()
        if need_update:
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if ema is not None:
                ema.update(model, step=num_updates)
            scheduler.step_update(num_updates=num_updates)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch + 1} step {step + 1}: lower --lr, '
                                     f'or try --amp-dtype bfloat16 / --clip-grad')
        loss_sum += loss.item() * images.shape[0]
        seen += images.shape[0]
        rate = seen * args.world_size / (time.perf_counter() - start)
        lr = optimizer.param_groups[0]['lr']
        bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{lr:.2e}', img_s=f'{rate:.0f}', refresh=False)
        if args.log_interval and (step + 1) % args.log_interval == 0:
            _print(args, f'train: epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} loss {loss.item():.4f} '
                         f'lr {lr:.3e} {rate:.1f} img/s')
    bar.close()
    totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64)
    if args.distributed:
        totals = totals.to(device)
        torch.distributed.all_reduce(totals)
    elapsed = time.perf_counter() - start
    return dict(loss=float(totals[0] / totals[1]), img_per_s=float(totals[1]) / elapsed), num_updates


# ----------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(out_dir: Path, epoch: int, model: nn.Module, ema: Optional[ModelEmaV3], optimizer, scaler,
                    state: Dict[str, Any]) -> Path:
    """``checkpoint-E.safetensors`` (model weights; ``.ema.safetensors`` for EMA) then ``checkpoint-E.pth`` (optimizer,
    scaler, counters, history; plain tensors and numbers, ``weights_only``-loadable). The ``.pth`` is written last,
    atomically, so its presence marks a complete checkpoint."""
    from safetensors.torch import save_file

    stem = out_dir / f'{CHECKPOINT_PREFIX}{epoch}'
    meta = {'epoch': str(epoch), 'model': state['args']['model'], 'an_zoo': __version__}

    def weights(m: nn.Module) -> Dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in _unwrap(m).state_dict().items()}

    atomic_write(stem.with_suffix('.safetensors'), lambda p: save_file(weights(model), p, metadata=meta))
    if ema is not None:
        atomic_write(out_dir / f'{stem.name}.ema.safetensors',
                      lambda p: save_file(weights(ema.module), p, metadata=meta))
    payload = dict(state, epoch=epoch, optimizer=optimizer.state_dict(),
                   scaler=scaler.state_dict() if scaler is not None else None)
    atomic_write(stem.with_suffix('.pth'), lambda p: torch.save(payload, p))
    return stem.with_suffix('.pth')


def _epoch_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):].split('.')[0])


def list_checkpoints(out_dir: Path) -> List[Path]:
    """Complete checkpoints (``.pth`` and its weights present) in ``out_dir``, oldest first."""
    found = [p for p in out_dir.glob(f'{CHECKPOINT_PREFIX}*.pth')
             if p.name[len(CHECKPOINT_PREFIX):-len('.pth')].isdigit() and p.with_suffix('.safetensors').is_file()]
    return sorted(found, key=_epoch_of)


def _prune_checkpoints(out_dir: Path, keep: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        for path in (old, old.with_suffix('.safetensors'), out_dir / f'{old.stem}.ema.safetensors'):
            path.unlink(missing_ok=True)


def resolve_resume(resume: str, out_dir: Optional[Path]) -> Path:
    """The checkpoint ``--resume`` names: a ``checkpoint-E.pth`` file, or the newest complete one in a run folder
    (``auto``: in ``--output``)."""
    target = out_dir if resume == 'auto' else Path(resume)
    if target is None:
        raise ValueError('--resume without a path needs --output (the run folder to continue)')
    if target.is_file():
        return target
    if not target.is_dir():
        raise FileNotFoundError(f'--resume: {target} is neither a checkpoint file nor a run folder')
    found = list_checkpoints(target)
    if not found:
        raise FileNotFoundError(f'--resume: no complete {CHECKPOINT_PREFIX}<epoch>.pth in {target}')
    return found[-1]


def load_checkpoint(path: Path, model: nn.Module, ema: Optional[ModelEmaV3], optimizer, scaler,
                    model_name: str) -> Dict[str, Any]:
    from safetensors.torch import load_file

    state = torch.load(path, map_location='cpu', weights_only=True)
    if state['args']['model'] != model_name:
        raise ValueError(f'{path} is a checkpoint of {state["args"]["model"]}, not of --model {model_name}')
    _unwrap(model).load_state_dict(load_file(str(path.with_suffix('.safetensors'))))
    ema_path = path.with_name(f'{path.stem}.ema.safetensors')
    if ema is not None:
        if not ema_path.is_file():
            raise FileNotFoundError(f'--model-ema is on but {ema_path} is missing (was the run started without it?)')
        ema.module.load_state_dict(load_file(str(ema_path)))
    optimizer.load_state_dict(state['optimizer'])
    if scaler is not None and state.get('scaler'):
        scaler.load_state_dict(state['scaler'])
    return state


# ------------------------------------------------------------------------------------------------------- logs

def write_logs(out_dir: Path, history: List[Dict[str, Any]]) -> None:
    """``log.json`` (every epoch), ``summary.csv`` (timm's format) and ``curves.png`` (if matplotlib is installed)."""
    atomic_write(out_dir / 'log.json', lambda p: Path(p).write_text(json.dumps(history, indent=1)))
    csv_path = out_dir / 'summary.csv'
    csv_path.unlink(missing_ok=True)
    for row in history:
        update_summary(row['epoch'], row['train'], row['eval'], str(csv_path), lr=row['lr'],
                       write_header=row is history[0])
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [row['epoch'] + 1 for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row['train']['loss'] for row in history], 'o-', label='train loss')
    ax_loss.plot(epochs, [row['eval']['loss'] for row in history], 'o-', label='held-out loss')
    ax_acc.plot(epochs, [row['eval']['top1'] for row in history], 'o-', label='held-out top-1')
    if all('ema_top1' in row['eval'] for row in history):
        ax_acc.plot(epochs, [row['eval']['ema_top1'] for row in history], 'o-', label='EMA top-1')
    for ax, label in ((ax_loss, 'loss'), (ax_acc, 'top-1 (%)')):
        ax.set_xlabel('epoch')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(history[-1].get('title', ''))
    fig.tight_layout()
    atomic_write(out_dir / 'curves.png', lambda p: fig.savefig(p, dpi=100, format='png'))
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------- main

def _default_output(args: argparse.Namespace) -> Path:
    dataset = Path(args.data_dir).name if args.data_dir else args.dataset.replace('/', '_') or 'folder'
    return Path('output') / 'train' / f'{datetime.now():%Y%m%d-%H%M%S}-{args.model}-{dataset}'


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one training job as ``args`` describe; returns the final and best held-out metrics and the run folder."""
    device = torch.device(args.device)
    resume_path = resolve_resume(args.resume, Path(args.output) if args.output else None) if args.resume else None
    if args.output:
        out_dir = Path(args.output)
    else:  # a resumed run continues in its own folder; a new one gets a fresh, timestamped folder
        out_dir = resume_path.parent if resume_path is not None else _default_output(args)
    if resume_path is None and list_checkpoints(out_dir):
        raise FileExistsError(f'{out_dir} already holds a run; pass --resume to continue it or choose another '
                              f'--output (nothing there was changed)')
    if _is_main(args):
        out_dir.mkdir(parents=True, exist_ok=True)

    _seed_epoch(args.seed, -1, 0)  # model init: identical on every process
    train_set, eval_set = create_train_eval_datasets(args.dataset, args.data_dir, args.train_split,
                                                     args.val_split, args.dataset_download, args.seed)
    num_classes = args.num_classes or _num_classes(train_set)
    if args.train_limit:
        train_set = _Subset(train_set, range(min(args.train_limit, len(train_set))))
    if args.eval_limit:
        eval_set = _Subset(eval_set, range(min(args.eval_limit, len(eval_set))))
    model = create_train_model(args, num_classes)
    data_cfg = resolve_data_config(vars(args), model=model, verbose=False)
    if args.sync_bn and args.distributed:
        model = convert_sync_batchnorm(model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    optimizer = create_optimizer(args, model)
    scaler = NativeScaler(device=device.type) if args.amp and args.amp_dtype == 'float16' else None
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

    common = dict(input_size=data_cfg['input_size'], interpolation=data_cfg['interpolation'],
                  mean=data_cfg['mean'], std=data_cfg['std'], crop_pct=data_cfg['crop_pct'],
                  num_workers=args.workers, device=device, use_prefetcher=False, persistent_workers=False)
    train_loader = create_loader(
        train_set, batch_size=args.batch_size, is_training=True, re_prob=args.reprob, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        distributed=args.distributed, **dict(common, interpolation=args.train_interpolation))
    if len(train_loader) == 0:
        raise ValueError(f'the training set has {len(train_set)} images, fewer than one batch of --batch-size '
                         f'{args.batch_size} per process')
    # an exact split of the held-out set across processes: no padding, no duplicates
    eval_part = _Subset(eval_set, range(args.rank, len(eval_set), args.world_size)) if args.distributed else eval_set
    eval_loader = create_loader(eval_part, batch_size=args.batch_size, is_training=False, **common)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      mode=args.mixup_mode, label_smoothing=args.smoothing, num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                updates_per_epoch=updates_per_epoch)

    history: List[Dict[str, Any]] = []
    start_epoch, num_updates, best = 0, 0, None
    if resume_path is not None:
        state = load_checkpoint(resume_path, model, ema, optimizer, scaler, args.model)
        start_epoch, num_updates = state['epoch'] + 1, state['num_updates']
        history, best = list(state['history']), state['best']
        _print(args, f'resumed from {resume_path} (epoch {state["epoch"] + 1} done)')

    train_model: nn.Module = model
    if args.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.torchcompile:
        train_model = torch.compile(train_model, backend=args.torchcompile)

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _print(args, f'{args.model}: {n_params / 1e6:.2f} M parameters ({n_train / 1e6:.2f} M trainable), '
                 f'{num_classes} classes, {len(train_set)} train / {len(eval_set)} held-out images, '
                 f'{num_epochs} epochs, {args.world_size} process(es) on {device.type}; run folder {out_dir}')
    run_start = time.perf_counter()
    for epoch in range(start_epoch, num_epochs):
        _seed_epoch(args.seed, epoch, args.rank)
        if args.distributed and hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        scheduler.step(epoch)
        lr = optimizer.param_groups[0]['lr']
        train_metrics, num_updates = train_one_epoch(args, epoch, train_model, train_loader, optimizer, criterion,
                                                     scheduler, device, scaler, ema, mixup, num_updates)
        eval_kwargs = dict(amp_dtype=getattr(torch, args.amp_dtype) if args.amp else None,
                           channels_last=args.channels_last, progress=_is_main(args) and not args.no_progress,
                           distributed=args.distributed)
        eval_metrics = evaluate(model, eval_loader, device, desc=f'epoch {epoch + 1}/{num_epochs} eval', **eval_kwargs)
        if ema is not None:
            eval_metrics['ema_top1'] = evaluate(ema.module, eval_loader, device, desc='ema eval', **eval_kwargs)['top1']
        if best is None or eval_metrics['top1'] > best['top1']:
            best = dict(eval_metrics, epoch=epoch)
        history.append(dict(epoch=epoch, lr=lr, train=train_metrics, eval=eval_metrics,
                            title=f'{args.model} on {args.dataset if not args.data_dir else args.data_dir}'))
        done = epoch + 1 - start_epoch
        eta = (time.perf_counter() - run_start) / done * (num_epochs - epoch - 1)
        _print(args, f'epoch {epoch + 1}/{num_epochs}: train loss {train_metrics["loss"]:.4f} '
                     f'({train_metrics["img_per_s"]:.0f} img/s), held-out loss {eval_metrics["loss"]:.4f} '
                     f'top-1 {eval_metrics["top1"]:.2f}% top-5 {eval_metrics["top5"]:.2f}%'
                     + (f' (EMA {eval_metrics["ema_top1"]:.2f}%)' if ema is not None else '')
                     + f', ETA {eta:.0f} s')
        if _is_main(args):
            state = dict(args=_plain(vars(args)), num_updates=num_updates, history=history, best=best)
            save_checkpoint(out_dir, epoch, model, ema, optimizer, scaler, state)
            if best['epoch'] == epoch:
                atomic_write(out_dir / 'best.safetensors', lambda p: shutil.copyfile(
                    out_dir / f'{CHECKPOINT_PREFIX}{epoch}.safetensors', p))
            _prune_checkpoints(out_dir, args.checkpoint_hist)
            write_logs(out_dir, history)
        if args.distributed:
            torch.distributed.barrier()
    final = history[-1]['eval'] if history else {}
    return dict(model=args.model, final=final, best=best, out_dir=str(out_dir), epochs=num_epochs,
                num_classes=num_classes,
                seconds=time.perf_counter() - run_start)


def _plain(value: Any) -> Any:
    """Arguments as plain lists / numbers / strings (what ``weights_only`` loading accepts)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith('_')}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    args.dist_backend = None
    init_distributed_device(args)
    if args.grad_accum_steps < 1:
        raise SystemExit('--grad-accum-steps must be >= 1')
    if args.compare_bn and args.resume:
        raise SystemExit('--compare-bn cannot be combined with --resume; resume each run on its own')
    results = [train(args)]
    if args.compare_bn:
        twin = argparse.Namespace(**vars(args))
        twin.model = bn_twin_name(args.model)
        twin.output = str(Path(results[0]['out_dir']).with_name(Path(results[0]['out_dir']).name + '-bn-twin'))
        _print(args, f'\nnow the BatchNorm twin {twin.model}, same recipe')
        results.append(train(twin))
    if _is_main(args):
        print('\n| model | held-out top-1 (%) | top-5 (%) | loss | best top-1 (%) | time (s) | run folder |')
        print('|---|---:|---:|---:|---:|---:|---|')
        for r in results:
            print(f'| {r["model"]} | {r["final"]["top1"]:.2f} | {r["final"]["top5"]:.2f} | {r["final"]["loss"]:.4f} '
                  f'| {r["best"]["top1"]:.2f} | {r["seconds"]:.0f} | {r["out_dir"]} |', flush=True)
        best = Path(results[0]['out_dir']) / 'best.safetensors'
        print(f'\nload the best weights: timm.create_model({args.model!r}, num_classes={results[0]["num_classes"]}, '
              f'pretrained=True, pretrained_cfg_overlay=dict(file={str(best)!r}, '
              f'num_classes={results[0]["num_classes"]}))', flush=True)
    if args.distributed:
        torch.distributed.destroy_process_group()
    return dict(runs=results)


def cli() -> int:
    """The ``an-zoo-train`` console command (errors exit non-zero through ``SystemExit``)."""
    main()
    return 0


if __name__ == '__main__':
    main()
