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
argument names of :mod:`an_zoo.train_args`. Training states, run identity and ``--resume`` rules are in
:mod:`an_zoo.train_state`, the logs and plot in :mod:`an_zoo.train_logs`; this module runs the training.
"""
import argparse
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
from timm.utils import ModelEmaV3, NativeScaler, init_distributed_device

from ._io import atomic_write
from .data import create_train_eval_datasets, dataset_num_classes
from .layers import attentive_norm_no_weight_decay, convert_sync_batchnorm, freeze_batch_norm_2d
from .train_args import build_parser, load_recipe, parse_args
from .train_logs import write_logs
from .train_state import (
    CHECKPOINT_PREFIX, RUN_FILE, check_writable, holds_run, load_train_state, new_run_id, prune_train_states,
    resolve_resume, resume_run_dir, save_train_state, write_run_file)
from .validate import evaluate

__all__ = ['build_parser', 'parse_args', 'load_recipe', 'train', 'bn_twin_name', 'freeze_groups', 'main',
           'NonFiniteError', 'nonfinite_report']

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


# ---------------------------------------------------------------------------------------------- train / evaluate

class NonFiniteError(FloatingPointError):
    """Training stopped because the loss or a layer's running statistics became NaN or infinite."""


def _statistics_buffers(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """The floating-point buffers (BatchNorm / AN running statistics) of ``model``, in registration order."""
    model = getattr(model, '_orig_mod', model)
    return [(name, buf) for name, buf in getattr(model, 'module', model).named_buffers() if buf.is_floating_point()]


def nonfinite_report(loss: torch.Tensor, buffers: Sequence[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """None if ``loss`` and every buffer are finite, else what is not: the loss, and the layers whose running
    statistics hold NaN / inf (first in model order: where a bad batch hit first)."""
    loss_ok = bool(torch.isfinite(loss.detach()).all())
    # max |x| per buffer in a few fused kernels (NaN and inf survive it), instead of one check per buffer
    flags = torch.isfinite(torch.stack(torch._foreach_norm([buf for _, buf in buffers], float('inf')))) \
        if buffers else None
    if loss_ok and (flags is None or bool(flags.all())):
        return None
    problems = [] if loss_ok else [f'the loss is {loss.detach().float().mean().item()}']
    if flags is not None:
        layers: Dict[str, List[str]] = {}
        for (name, _), ok in zip(buffers, flags.tolist()):
            if not ok:
                layer, _, buffer = name.rpartition('.')
                layers.setdefault(layer or '<model>', []).append(buffer)
        if layers:
            shown = [f'{layer} ({", ".join(names)})' for layer, names in list(layers.items())[:3]]
            more = f' and {len(layers) - 3} more layer(s)' if len(layers) > 3 else ''
            problems.append(f'the running statistics of {"; ".join(shown)}{more} are NaN / inf')
    return ', and '.join(problems)

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
    # checked every step: a bad batch can poison the running statistics even when its loss is finite or its
    # update is skipped, and later epochs would then evaluate (and save) a broken model
    buffers = _statistics_buffers(model)
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
        problem = nonfinite_report(loss, buffers)
        if problem is not None:
            raise NonFiniteError(f'training stopped at epoch {epoch + 1} step {step + 1}/{steps} (after update '
                                 f'{num_updates}): {problem}. Nothing of this epoch was saved. Check the images of '
                                 f'this step for NaN / inf, lower --lr, or try --amp-dtype bfloat16 / --clip-grad; '
                                 f'then --resume continues from the last saved epoch')
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


# -------------------------------------------------------------------------------------------------------- main

def _default_output(args: argparse.Namespace) -> Path:
    dataset = Path(args.data_dir).name if args.data_dir else args.dataset.replace('/', '_') or 'folder'
    return Path('output') / 'train' / f'{datetime.now():%Y%m%d-%H%M%S}-{args.model}-{dataset}'


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one training job as ``args`` describe; returns the final and best held-out metrics and the run folder.

    A new run needs an ``--output`` that holds no run; a resumed run continues in the folder of its training state
    (see :func:`an_zoo.train_state.resume_run_dir`). A run that fails before its first checkpoint leaves no
    folder it created behind."""
    output = Path(args.output) if args.output else None
    resume: Optional[Tuple[Path, Dict[str, Any]]] = None
    if args.resume:
        resume = resolve_resume(args.resume, output)
        out_dir, run_id = resume_run_dir(resume[0], resume[1], output)
    else:  # a new run gets a fresh, timestamped folder by default
        out_dir, run_id = output or _default_output(args), new_run_id()
        if holds_run(out_dir):
            raise FileExistsError(f'{out_dir} already holds a run; pass --resume to continue it or choose another '
                                  f'--output (nothing there was changed)')
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # what a failed start removes again
    try:
        if _is_main(args):
            check_writable(out_dir)
        return _train(args, out_dir, run_id, resume)
    except BaseException:
        for folder in created:  # innermost first; only folders this run created and left empty
            if _is_main(args) and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _train(args: argparse.Namespace, out_dir: Path, run_id: str,
           resume: Optional[Tuple[Path, Dict[str, Any]]]) -> Dict[str, Any]:
    device = torch.device(args.device)
    _seed_epoch(args.seed, -1, 0)  # model init: identical on every process
    train_set, eval_set = create_train_eval_datasets(args.dataset, args.data_dir, args.train_split,
                                                     args.val_split, args.dataset_download, args.seed)
    data_classes = dataset_num_classes(train_set)
    if args.num_classes and data_classes and args.num_classes < data_classes:
        raise ValueError(f'--num-classes {args.num_classes} is fewer than the {data_classes} classes of the training '
                         f'data; pass --num-classes {data_classes} (or leave it out)')
    num_classes = args.num_classes or data_classes
    if not num_classes:
        raise ValueError('cannot tell the number of classes of this dataset: pass --num-classes')
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
    if resume is not None:
        resume_path, state = resume
        load_train_state(resume_path, state, model, ema, optimizer, scaler, args.model, num_classes)
        start_epoch, num_updates = state['epoch'] + 1, state['num_updates']
        history, best = list(state['history']), state['best']
        _print(args, f'resumed from {resume_path} (epoch {state["epoch"] + 1} done) into {out_dir}')

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
            if not (out_dir / RUN_FILE).is_file():
                branched = resume is not None and resume[0].parent.resolve() != out_dir.resolve()
                write_run_file(out_dir, run_id, args.model, resumed_from=str(resume[0].resolve()) if branched else None)
            state = dict(args=_plain(vars(args)), num_updates=num_updates, history=history, best=best,
                         run_id=run_id, num_classes=num_classes)
            save_train_state(out_dir, epoch, model, ema, optimizer, scaler, state)
            if best['epoch'] == epoch:
                atomic_write(out_dir / 'best.safetensors', lambda p: shutil.copyfile(
                    out_dir / f'{CHECKPOINT_PREFIX}{epoch}.safetensors', p))
            prune_train_states(out_dir, args.checkpoint_hist)
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
