"""Measure top-1 / top-5 accuracy and loss of an an_zoo model on the ImageNet evaluation sets (:mod:`an_zoo.eval_sets`).

    python -m an_zoo.validate /data/imagenet/val --model an_resnet50 --checkpoint resnet50_an.pth.tar
    python -m an_zoo.validate /data/imagenet-a --eval-set imagenet-a --model an_resnet50.aog_e120_in1k --pretrained
    python -m an_zoo.validate --eval-root /data/eval --checkpoint resnet50_an.pth.tar \\
        --update-manifest an_resnet50.aog_e120_in1k      # every set under /data/eval -> the entry's "measured" block

A single folder is one evaluation set (``--eval-set``, default ``imagenet-1k``), one sub-folder per class: synset
folders numbered in sorted order (the standard 1000-class index order), ImageNetV2's index-named folders labelled
``int(name)``, ImageNet-A / -O scored on the logits of their synsets only; ``imagenet-1k-reassessed`` scores the
ImageNet-1k val images against the ReaL labels (timm's copy, or ``--real-labels real.json``). ``--eval-root DIR``
evaluates every set found as ``DIR/<set name>``, and the reassessed score from ``DIR/imagenet-1k`` in the same pass.
Images are preprocessed as the model's ``pretrained_cfg`` says (resize to ``img_size / crop_pct``, center crop,
mean / std), unless ``--img-size`` / ``--crop-pct`` / ``--interpolation`` override it.

The result (printed as JSON, optionally written with ``--results-json``) is what the weights manifest's ``measured``
block holds per evaluation set: ``--update-manifest ARCH.TAG`` merges each measured set into that entry of
``weights_manifest.json`` (or the file ``AN_ZOO_MANIFEST`` names), validated before it is written.
"""
import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .eval_sets import (EVAL_SETS, REAL_SET, RealScorer, ValidationError, find_eval_sets, get_eval_set,
                        open_eval_folder, real_targets)
from ._env import device_name
from .hub import sha256_file

__all__ = ['ValidationError', 'evaluate', 'validate', 'validate_many', 'record_measurement', 'main']

_logger = logging.getLogger(__name__)

_AMP_DTYPES = {'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16, 'float16': torch.float16, 'fp16': torch.float16}
_GENERIC_SPLIT_NAMES = {'val', 'validation', 'test', 'eval'}


def _resolve_root(data_dir: Union[str, Path]) -> Path:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValidationError(f'data folder not found: {root} (expected an ImageFolder: one sub-folder per class)')
    if (root / 'val').is_dir() and (root / 'train').is_dir():
        _logger.info(f'{root} holds train/ and val/: validating on {root / "val"}')
        root = root / 'val'
    return root


def _dataset_name(root: Path) -> str:
    if root.name.lower() in _GENERIC_SPLIT_NAMES and root.parent.name:
        return f'{root.parent.name}/{root.name}'
    return root.name


def _amp_dtype(amp: Union[None, bool, str]) -> Optional[torch.dtype]:
    if amp in (None, False, '', 'none', 'off'):
        return None
    if amp is True:
        return torch.bfloat16
    if amp not in _AMP_DTYPES:
        raise ValidationError(f'--amp takes one of {sorted(_AMP_DTYPES)}, got {amp!r}')
    return _AMP_DTYPES[amp]


def _pretrained_cfg(model: str) -> Any:
    """timm's pretrained cfg for ``arch`` / ``arch.tag``, or None when timm does not know the name."""
    from timm.models import get_pretrained_cfg
    try:
        return get_pretrained_cfg(model)
    except RuntimeError:  # unknown tag
        return None


def _expected_classes(model: str, num_classes: Optional[int]) -> Optional[int]:
    if num_classes is not None:
        return num_classes
    cfg = _pretrained_cfg(model)
    return cfg.num_classes if cfg is not None else None


def _create_model(model_name: str, pretrained: bool, checkpoint: Optional[Path],
                  num_classes: Optional[int]) -> nn.Module:
    import timm

    import an_zoo  # noqa: F401  (registers the an_* models)

    if not timm.is_model(model_name.split('.')[0]):
        raise ValidationError(f'unknown model {model_name!r}; an_zoo models: {", ".join(timm.list_models("an_*"))}')
    if '.' in model_name and _pretrained_cfg(model_name) is None:
        known = ', '.join(timm.models.get_arch_pretrained_cfgs(model_name.split('.')[0])) or 'none'
        raise ValidationError(f'unknown weight tag {model_name!r}; known: {known}')
    kwargs: Dict[str, Any] = {}
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if checkpoint is not None:
        # the file's classifier is the model's: tell timm the source has num_classes outputs, so it keeps the head
        overlay: Dict[str, Any] = dict(file=str(checkpoint))
        if num_classes is not None:
            overlay['num_classes'] = num_classes
        kwargs['pretrained_cfg_overlay'] = overlay
    elif pretrained and num_classes is not None:
        cfg = _pretrained_cfg(model_name)
        cfg_classes = cfg.num_classes if cfg is not None else None
        if cfg_classes is not None and cfg_classes != num_classes:
            raise ValidationError(
                f'--num-classes {num_classes} differs from the {cfg_classes} classes of the pretrained weights of '
                f'{model_name}: timm would replace the classifier with a random one. Validate a {num_classes}-class '
                f'model with --checkpoint FILE (weights trained for those classes).')
    try:
        return timm.create_model(model_name, pretrained=pretrained or checkpoint is not None, **kwargs)
    except RuntimeError as err:
        source = checkpoint or 'the pretrained weights'
        hint = (' If the file\'s classifier has another number of outputs, pass --num-classes N to match it.'
                if 'size mismatch' in str(err) else '')
        raise ValidationError(f'cannot load {source} into {model_name}: {err}{hint}') from err


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Iterable,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        progress: bool = False,
        desc: str = 'eval',
        distributed: bool = False,
        columns: Optional[Sequence[int]] = None,
        real: Optional[RealScorer] = None,
) -> Dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 (%) of ``model`` (put in eval mode) over ``loader``.

    Sums (not averages of averages) are accumulated, in float64; with ``distributed`` they are all-reduced, so
    with disjoint shards per process every image counts exactly once. Returns ``loss``, ``top1``, ``top5``,
    ``count``. ``columns`` restricts the logits to those classes before scoring (ImageNet-A / -O: the targets index
    into them); ``real`` is fed every batch's logits, in loader order (ReaL scoring; read it afterwards).
    """
    from timm.utils import accuracy
    from tqdm import tqdm

    if real is not None and distributed:
        raise ValueError('ReaL scoring follows the loader order of a single process; it cannot use distributed shards')
    model.eval()
    keep = torch.as_tensor(columns, dtype=torch.long, device=device) if columns is not None else None
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, target in tqdm(loader, desc=desc, disable=not progress, file=sys.stderr, leave=False):
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        output = output.float()
        if keep is not None:
            output = output.index_select(1, keep)
        if real is not None:
            real.add_result(output)
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        n = images.shape[0]
        totals += torch.tensor([F.cross_entropy(output, target, reduction='sum').item(),
                                acc1.item() * n / 100, acc5.item() * n / 100, n], dtype=torch.float64)
    if distributed:
        reduced = totals.to(device)
        torch.distributed.all_reduce(reduced)
        totals = reduced.cpu()
    count = max(float(totals[3]), 1.0)
    return dict(loss=float(totals[0]) / count, top1=100 * float(totals[1]) / count,
                top5=100 * float(totals[2]) / count, count=int(totals[3]))


def validate(
        model: str,
        data_dir: Union[str, Path],
        *,
        eval_set: str = 'imagenet-1k',
        real_labels: Optional[Union[str, Path]] = None,
        dataset_name: Optional[str] = None,
        **kwargs: Any,
) -> Dict[str, Any]:
    """Evaluate ``model`` on the ImageFolder ``data_dir`` as the evaluation set ``eval_set`` (:mod:`an_zoo.eval_sets`).

    Args:
        model: timm model name, ``an_resnet50`` or ``an_resnet50.aog_e120_in1k`` (the tag picks the preprocessing and,
            with ``pretrained``, the weights).
        data_dir: ImageFolder root (one sub-folder per class, labelled as ``eval_set`` says); a folder holding
            ``train/`` and ``val/`` means its ``val/``.
        eval_set: ``imagenet-1k`` (default), ``imagenet-1k-reassessed`` (ReaL labels), ``imagenetv2-*``,
            ``imagenet-sketch``, ``imagenet-a``, ``imagenet-o``.
        real_labels: a ``real.json`` for ``imagenet-1k-reassessed`` (default: timm's bundled copy).
        dataset_name: recorded as ``dataset`` (default: the folder name, with its parent for ``val``-like names).
        **kwargs: the options of :func:`validate_many` (weights, preprocessing, batch size, ``limit``, ...).

    Returns:
        The manifest's ``measured`` record of that set: ``top1``, ``top5`` (percent), ``loss`` (mean cross-entropy;
        none for ReaL, a multi-label score), ``eval_set``, ``num_images``, ``dataset``, preprocessing, ``model``,
        ``weights`` and ``weights_sha256``, ``date``, ``hardware``, versions and run settings.

    Raises:
        ValidationError: a folder not laid out as ``eval_set`` or not matching the model, bad options or weights.
    """
    result = validate_many(model, {eval_set: data_dir}, real_labels=real_labels, **kwargs)[eval_set]
    if dataset_name:
        result['dataset'] = dataset_name
    return result


def validate_many(
        model: str,
        folders: Mapping[str, Union[str, Path]],
        *,
        pretrained: bool = False,
        checkpoint: Optional[Union[str, Path]] = None,
        num_classes: Optional[int] = None,
        img_size: Optional[int] = None,
        crop_pct: Optional[float] = None,
        interpolation: Optional[str] = None,
        batch_size: int = 64,
        workers: int = 4,
        amp: Union[None, bool, str] = None,
        channels_last: bool = False,
        device: Optional[str] = None,
        limit: Optional[int] = None,
        real_labels: Optional[Union[str, Path]] = None,
        optional: Collection[str] = (),
        progress: bool = True,
) -> Dict[str, Dict[str, Any]]:
    """Evaluate ``model`` (built once) on several evaluation sets: ``{eval set name: ImageFolder root}``.

    ``imagenet-1k-reassessed`` given the same folder as ``imagenet-1k`` is scored in the same pass over its images.
    All folders are checked before the first image is evaluated.

    Args:
        pretrained: load the tag's published weights (Hugging Face Hub, verified).
        checkpoint: load this file instead: an official checkpoint (legacy / refactored layout) or an an_zoo
            ``.safetensors`` file, via ``pretrained_cfg_overlay=dict(file=...)``.
        num_classes: classifier size (default: the pretrained cfg's, 1000 for the ImageNet weights); must match the
            folders (every class of a full set; ImageNet-A / -O need 1000).
        img_size, crop_pct, interpolation: override the pretrained cfg's preprocessing.
        amp: ``'bfloat16'`` / ``'float16'`` autocast (``True`` means bfloat16); off by default.
        device: ``'cuda'``, ``'cpu'``, ... (default: CUDA when available).
        limit: evaluate only the first ``limit`` images of each set (in class-then-file order) for a quick check.
        real_labels: a ``real.json`` for ``imagenet-1k-reassessed`` (default: timm's bundled copy).
        optional: ``{'imagenet-1k-reassessed'}`` leaves the ReaL score out, with a warning, when the ReaL labels
            cannot score the folder (other file names, a partial val set), instead of failing the run.

    Returns:
        ``{eval set name: result}``, each as :func:`validate` describes it, in the order of ``folders``.
    """
    import timm
    from timm.data import create_transform, resolve_data_config

    import an_zoo

    sets = {name: get_eval_set(name) for name in folders}
    roots = {name: _resolve_root(folder) for name, folder in folders.items()}
    if real_labels is not None and REAL_SET not in sets:
        raise ValidationError(f'ReaL labels ({real_labels}) score {REAL_SET}: ask for that set '
                              f'(--eval-set {REAL_SET}, or --eval-root)')
    if real_labels is not None and not Path(real_labels).is_file():
        raise ValidationError(f'ReaL labels file not found: {real_labels}')
    checkpoint = Path(checkpoint).expanduser() if checkpoint is not None else None
    if checkpoint is not None and not checkpoint.is_file():
        raise ValidationError(f'checkpoint file not found: {checkpoint}')
    if pretrained and checkpoint is not None:
        raise ValidationError('give either pretrained=True (published weights) or a checkpoint file, not both')
    if checkpoint is None and not pretrained:
        _logger.warning(f'{model}: no weights given (pretrained=False, no checkpoint): measuring a random init')
    if limit is not None and limit <= 0:
        raise ValidationError(f'limit must be a positive number of images, got {limit}')
    amp_dtype = _amp_dtype(amp)
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))

    # one run over the val images gives both imagenet-1k and its ReaL score
    shared = REAL_SET in sets and roots.get('imagenet-1k') == roots[REAL_SET]
    passes = [name for name in sets if not (shared and name == REAL_SET)]
    expected = _expected_classes(model, num_classes)
    opened = {name: open_eval_folder(sets[name], roots[name], expected, model) for name in passes}  # before weights
    real: Dict[str, List[List[int]]] = {}  # pass -> ReaL labels of its images
    for name in passes:
        if name == REAL_SET or (shared and name == 'imagenet-1k'):
            try:
                real[name] = real_targets(opened[name].dataset, real_labels, limit)
            except ValidationError as err:
                if REAL_SET not in optional:
                    raise
                _logger.warning(f'{REAL_SET} left out: {err}')
    passes = [name for name in passes if name != REAL_SET or name in real]
    net = _create_model(model, pretrained, checkpoint, num_classes)
    net_classes = getattr(net, 'num_classes', None)
    if net_classes != expected:  # checked again against the classifier built
        opened = {name: open_eval_folder(sets[name], roots[name], net_classes, model) for name in passes}

    overrides = {k: v for k, v in dict(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation).items()
                 if v is not None}
    data_config = resolve_data_config(overrides, model=net)
    transform = create_transform(**data_config, is_training=False)
    net = net.to(dev).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    cfg = net.pretrained_cfg
    arch = model.split('.')[0]
    size = data_config['input_size'][1:]
    common: Dict[str, Any] = {  # what every set's record shares: model, weights, preprocessing, run
        'num_classes': net_classes,
        'img_size': size[0] if size[0] == size[1] else list(size),
        'crop_pct': data_config['crop_pct'],
        'crop_mode': data_config.get('crop_mode', 'center'),
        'interpolation': data_config['interpolation'],
        'model': f'{arch}.{cfg["tag"]}' if cfg.get('tag') else arch,
        'weights': (checkpoint.name if checkpoint is not None else
                    (cfg.get('hf_hub_id') or 'pretrained') if pretrained else 'random init'),
        'weights_sha256': sha256_file(checkpoint) if checkpoint is not None else None,
        'date': datetime.date.today().isoformat(),
        'hardware': device_name(dev),
        'amp': str(amp_dtype).replace('torch.', '') if amp_dtype is not None else False,
        'channels_last': channels_last, 'batch_size': batch_size,
        'torch': torch.__version__, 'timm': timm.__version__, 'an_zoo': an_zoo.__version__,
    }
    if pretrained and common['weights_sha256'] is None:
        from ._manifest import weight_entry
        entry = weight_entry(common['model'])
        common['weights_sha256'] = entry.sha256 if entry is not None else None

    results: Dict[str, Dict[str, Any]] = {}
    for name in passes:
        folder = opened[name]
        folder.dataset.transform = transform
        subset: torch.utils.data.Dataset = folder.dataset
        if limit is not None and limit < len(subset):
            subset = torch.utils.data.Subset(subset, range(limit))
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             pin_memory=dev.type == 'cuda', drop_last=False)
        scorer = RealScorer(real[name]) if name in real else None
        start = datetime.datetime.now()
        metrics = evaluate(net, loader, dev, amp_dtype=amp_dtype, channels_last=channels_last, progress=progress,
                           desc=f'{name} {model}', columns=folder.columns, real=scorer)
        seconds = (datetime.datetime.now() - start).total_seconds()
        dataset = _dataset_name(roots[name])
        if name != REAL_SET:
            results[name] = {'top1': round(metrics['top1'], 3), 'top5': round(metrics['top5'], 3),
                             'loss': round(metrics['loss'], 5), 'eval_set': name, 'dataset': dataset,
                             'num_images': metrics['count'], **common}
            if folder.columns is not None:
                results[name]['eval_classes'] = len(folder.columns)  # the classes the logits are restricted to
        if scorer is not None:
            acc = scorer.accuracy()
            results[REAL_SET] = {'top1': round(acc[1], 3), 'top5': round(acc[5], 3), 'eval_set': REAL_SET,
                                 'dataset': dataset, 'num_images': scorer.count,
                                 'num_images_without_real_labels': scorer.skipped,
                                 'real_labels': Path(real_labels).name if real_labels else 'timm', **common}
        for done in ([] if name == REAL_SET else [name]) + ([REAL_SET] if scorer is not None else []):
            r = results[done]
            _logger.info(f'{r["model"]} on {done}: top-1 {r["top1"]:.3f} top-5 {r["top5"]:.3f} on '
                         f'{r["num_images"]} images ({seconds:.1f} s)')
    return {name: results[name] for name in folders if name in results}


def record_measurement(name: str, measured: Dict[str, Any], path: Optional[Union[str, Path]] = None) -> Any:
    """Merge results into the ``measured`` block of manifest entry ``'arch.tag'``, keyed by evaluation set: one
    :func:`validate` result (under its ``eval_set``; ``imagenet-1k`` for one without) or :func:`validate_many`'s
    ``{eval set: result}``. Other sets' measurements stay; the manifest is validated before writing.

    ``path`` defaults to ``AN_ZOO_MANIFEST`` or the packaged manifest (``update_entry`` follows its symlink and writes
    the real file). Returns the updated :class:`~an_zoo._manifest.WeightEntry`.
    """
    from ._manifest import PRIMARY_EVAL_SET, update_entry
    by_set = {measured.get('eval_set', PRIMARY_EVAL_SET): measured} if 'top1' in measured else measured
    return update_entry(name, path=path, measured={k: dict(v) for k, v in by_set.items()})


def _check_manifest_target(name: str, model: Optional[str], args: argparse.Namespace) -> str:
    """Fail before a long run if ``--update-manifest`` cannot be honoured; returns the model name to build."""
    from ._manifest import manifest_path, weight_entry
    file = Path(manifest_path()).resolve()
    entry = weight_entry(name, file)
    if entry is None:
        raise ValidationError(f'--update-manifest {name}: no such entry in {file} (names are ARCH.TAG, see '
                              f'python -m an_zoo list)')
    if model is not None and model.split('.')[0] not in entry.architectures:
        raise ValidationError(f'--update-manifest {name} is a weight of {entry.model}, but --model is {model}')
    if model is not None and '.' in model and model != name:
        raise ValidationError(f'--model {model} names another weight than --update-manifest {name}')
    if model is None or '.' not in model:
        # the entry's own pretrained cfg (preprocessing), unless this process's registry does not know the tag
        model = name if _pretrained_cfg(name) is not None else entry.model
    if not args.pretrained and args.checkpoint is None:
        raise ValidationError('--update-manifest needs the weights to measure: --pretrained or --checkpoint FILE')
    if args.limit is not None:
        raise ValidationError('--update-manifest records full-dataset results; drop --limit')
    expected = entry.data['num_classes']
    if args.num_classes is not None and args.num_classes != expected:
        raise ValidationError(f'--update-manifest {name}: the entry has {expected} classes, --num-classes is '
                              f'{args.num_classes}')
    for key, value in (('img_size', args.img_size), ('crop_pct', args.crop_pct),
                       ('interpolation', args.interpolation)):
        if value is not None:
            _logger.warning(f'--{key.replace("_", "-")} {value} overrides the preprocessing of {name}; the measured '
                            f'block records it')
    return model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m an_zoo.validate', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('data', metavar='DIR', nargs='?', help='ImageFolder root of one set (e.g. /data/imagenet/val)')
    parser.add_argument('--data-dir', dest='data_dir', metavar='DIR', help='same as the positional DIR')
    parser.add_argument('--eval-set', choices=list(EVAL_SETS), metavar='SET',
                        help=f'how DIR is labelled and scored: {", ".join(EVAL_SETS)} (default: imagenet-1k)')
    parser.add_argument('--eval-root', metavar='DIR', help='evaluate every set found as DIR/<set name> instead')
    parser.add_argument('--real-labels', metavar='FILE', help='real.json for imagenet-1k-reassessed (default: '
                                                              'timm\'s bundled ReaL labels)')
    parser.add_argument('--model', '-m', help='an_* model, optionally with a tag (an_resnet50.aog_e120_in1k); '
                                              'defaults to the --update-manifest entry')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true', help='published weights of the model tag (Hub)')
    weights.add_argument('--checkpoint', metavar='FILE', help='official checkpoint or an_zoo .safetensors file')
    parser.add_argument('--num-classes', type=int, help='classifier size (default: the pretrained cfg\'s)')
    parser.add_argument('--img-size', type=int, help='override the pretrained cfg input size')
    parser.add_argument('--crop-pct', type=float, help='override the pretrained cfg center-crop fraction')
    parser.add_argument('--interpolation', help='override the pretrained cfg resize interpolation')
    parser.add_argument('--batch-size', '-b', type=int, default=64)
    parser.add_argument('--workers', '-j', type=int, default=min(8, os.cpu_count() or 1), help='data loader workers')
    parser.add_argument('--amp', nargs='?', const='bfloat16', choices=sorted(_AMP_DTYPES),
                        help='autocast dtype (--amp alone: bfloat16); default: off (float32)')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--device', help='cuda, cpu, cuda:1, ... (default: cuda when available)')
    parser.add_argument('--limit', type=int, help='only the first N images of each set (quick check)')
    parser.add_argument('--dataset-name', help='recorded as "dataset" (default: the folder name)')
    parser.add_argument('--results-json', metavar='PATH', help='also write the result to this JSON file')
    parser.add_argument('--update-manifest', metavar='ARCH.TAG',
                        help='write each measured set into the "measured" block of this weights manifest entry '
                             '(the file AN_ZOO_MANIFEST names, else the packaged weights_manifest.json)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    from ._manifest import ManifestError, manifest_path
    from .models._checkpoint import CheckpointError
    data_dir = args.data_dir or args.data
    if args.data_dir and args.data and args.data_dir != args.data:
        parser.error(f'two data folders given: {args.data} and --data-dir {args.data_dir}')
    if (data_dir is None) == (args.eval_root is None):
        parser.error('give one set\'s ImageFolder root (DIR or --data-dir DIR, with --eval-set) or --eval-root DIR')
    if args.eval_root and (args.eval_set or args.dataset_name):
        parser.error('--eval-set / --dataset-name describe a single folder; --eval-root names each set by its folder')
    eval_set = args.eval_set or 'imagenet-1k'
    if args.real_labels and data_dir and eval_set != REAL_SET:
        parser.error(f'--real-labels FILE scores {REAL_SET}: add --eval-set {REAL_SET}, or use --eval-root')
    options = dict(pretrained=args.pretrained, checkpoint=args.checkpoint, num_classes=args.num_classes,
                   img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation,
                   batch_size=args.batch_size, workers=args.workers, amp=args.amp, channels_last=args.channels_last,
                   device=args.device, limit=args.limit, real_labels=args.real_labels, progress=not args.no_progress)
    try:
        model = args.model
        if args.update_manifest:
            model = _check_manifest_target(args.update_manifest, model, args)
        if model is None:
            parser.error('--model is required (or --update-manifest ARCH.TAG)')
        if args.eval_root:
            folders = find_eval_sets(Path(args.eval_root).expanduser())
            # the ReaL score comes along on its own: a val folder it cannot score (other file names, a partial set)
            # only loses it, unless --real-labels asked for it
            optional = () if args.real_labels else (REAL_SET,)
            output = measured = validate_many(model, folders, optional=optional, **options)
        else:
            output = validate(model, data_dir, eval_set=eval_set, dataset_name=args.dataset_name, **options)
            measured = {eval_set: output}
        if args.results_json:
            out = Path(args.results_json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(output, indent=2) + '\n', encoding='utf-8')
        if args.update_manifest:
            file = Path(manifest_path()).resolve()
            entry = record_measurement(args.update_manifest, measured, file)
            _logger.info(f'{entry.name}: measured {", ".join(measured)} written to {file}; regenerate the docs '
                         f'tables with python scripts/model_table.py --write')
    except (ValidationError, ManifestError, CheckpointError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(json.dumps(output, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
