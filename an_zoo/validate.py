"""Measure top-1 / top-5 accuracy and loss of an an_zoo model on an ImageFolder (e.g. the ImageNet-1k val set).

    python -m an_zoo.validate /data/imagenet/val --model an_resnet50 --checkpoint resnet50_an.pth.tar
    python -m an_zoo.validate /data/imagenet/val --model an_resnet50.aog_e120_in1k --pretrained
    python -m an_zoo.validate /data/imagenet/val --checkpoint resnet50_an.pth.tar \\
        --update-manifest an_resnet50.aog_e120_in1k      # write the "measured" block of that manifest entry

The folder holds one sub-folder per class (ImageNet: the 1000 synset folders, e.g. prepared with valprep.sh); classes
are numbered in sorted folder-name order, which for ImageNet synsets is the standard 1000-class index order. Images
are preprocessed as the model's ``pretrained_cfg`` says (resize to ``img_size / crop_pct``, center crop, mean / std),
unless ``--img-size`` / ``--crop-pct`` / ``--interpolation`` override it.

The result (printed as JSON, optionally written with ``--results-json``) is exactly the dict the weights manifest's
``measured`` field takes: ``--update-manifest ARCH.TAG`` merges it into that entry of ``weights_manifest.json`` (or the
file ``AN_ZOO_MANIFEST`` names), validated before it is written.
"""
import argparse
import datetime
import json
import logging
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hub import sha256_file

__all__ = ['ValidationError', 'evaluate', 'validate', 'record_measurement', 'main']

_logger = logging.getLogger(__name__)

_AMP_DTYPES = {'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16, 'float16': torch.float16, 'fp16': torch.float16}
_SYNSET = re.compile(r'^n\d{8}$')
_GENERIC_SPLIT_NAMES = {'val', 'validation', 'test', 'eval'}


class ValidationError(ValueError):
    """The validation run cannot be done as asked; the message says why and what to do."""


def _hardware(device: torch.device) -> str:
    """A short description of what ran the model: the GPU name, or the CPU model."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'mps':
        return 'Apple MPS'
    name = ''
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or 'unknown'
    return f'{name} (CPU, {torch.get_num_threads()} threads)'


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


def _check_class_count(root: Path, classes: List[str], model: str, net_classes: Optional[int],
                       warn: bool = True) -> None:
    """Refuse a folder whose class count differs from the model's (labels would not mean the model's classes)."""
    if net_classes is None:
        return
    if len(classes) != net_classes:
        hint = ('For ImageNet-1k, point at the validation folder with the 1000 synset sub-folders (val images sorted '
                'into class folders, e.g. with valprep.sh), not at its parent or a flat folder of images.'
                if net_classes == 1000 else
                f'Pass --num-classes {len(classes)} with a checkpoint trained for those classes, or point at a '
                f'folder with {net_classes} class sub-folders.')
        raise ValidationError(
            f'{root} has {len(classes)} class folders but {model} has {net_classes} classes: accuracy would be '
            f'meaningless. {hint}')
    if warn and net_classes == 1000 and not all(_SYNSET.match(c) for c in classes):
        _logger.warning(f'{root}: 1000 class folders that are not all ImageNet synset ids (nXXXXXXXX): classes are '
                        f'numbered in sorted folder-name order, which matches ImageNet-1k only for synset folders')


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
) -> Dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 (%) of ``model`` (put in eval mode) over ``loader``.

    Sums (not averages of averages) are accumulated, in float64; with ``distributed`` they are all-reduced, so
    with disjoint shards per process every image counts exactly once. Returns ``loss``, ``top1``, ``top5``,
    ``count``.
    """
    from timm.utils import accuracy
    from tqdm import tqdm

    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, target in tqdm(loader, desc=desc, disable=not progress, file=sys.stderr, leave=False):
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        output = output.float()
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
        dataset_name: Optional[str] = None,
        progress: bool = True,
) -> Dict[str, Any]:
    """Evaluate ``model`` on the ImageFolder ``data_dir`` with its ``pretrained_cfg`` preprocessing.

    Args:
        model: timm model name, ``an_resnet50`` or ``an_resnet50.aog_e120_in1k`` (the tag picks the preprocessing and,
            with ``pretrained``, the weights).
        data_dir: ImageFolder root (one sub-folder per class, numbered in sorted name order); a folder holding
            ``train/`` and ``val/`` means its ``val/``.
        pretrained: load the tag's published weights (Hugging Face Hub, verified).
        checkpoint: load this file instead: an official checkpoint (legacy / refactored layout) or an an_zoo
            ``.safetensors`` file, via ``pretrained_cfg_overlay=dict(file=...)``.
        num_classes: classifier size (default: the pretrained cfg's, 1000 for the ImageNet weights); must equal the
            folder's class count.
        img_size, crop_pct, interpolation: override the pretrained cfg's preprocessing.
        amp: ``'bfloat16'`` / ``'float16'`` autocast (``True`` means bfloat16); off by default.
        device: ``'cuda'``, ``'cpu'``, ... (default: CUDA when available).
        limit: evaluate only the first ``limit`` images (in class-then-file order) for a quick check.
        dataset_name: recorded as ``dataset`` (default: the folder name, with its parent for ``val``-like names).

    Returns:
        The ``measured`` dict of the weights manifest: ``top1``, ``top5`` (percent), ``loss`` (mean cross-entropy),
        ``num_images``, ``dataset``, preprocessing (``img_size``, ``crop_pct``, ``interpolation``), ``model``,
        ``weights`` and ``weights_sha256`` (the source), ``date``, ``hardware``, versions and run settings.

    Raises:
        ValidationError: the folder's class count differs from the model's, bad options, weights that do not load.
    """
    import timm
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    import an_zoo

    root = _resolve_root(data_dir)
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

    try:
        dataset = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as err:
        raise ValidationError(f'{root} is not a usable ImageFolder (one sub-folder of images per class): {err}') \
            from err

    _check_class_count(root, dataset.classes, model, _expected_classes(model, num_classes), warn=False)
    net = _create_model(model, pretrained, checkpoint, num_classes)
    net_classes = getattr(net, 'num_classes', None)
    _check_class_count(root, dataset.classes, model, net_classes)

    overrides = {k: v for k, v in dict(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation).items()
                 if v is not None}
    data_config = resolve_data_config(overrides, model=net)
    dataset.transform = create_transform(**data_config, is_training=False)
    subset: torch.utils.data.Dataset = dataset
    if limit is not None and limit < len(dataset):
        subset = torch.utils.data.Subset(dataset, range(limit))
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=dev.type == 'cuda',
        drop_last=False)

    net = net.to(dev).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    start = datetime.datetime.now()
    metrics = evaluate(net, loader, dev, amp_dtype=amp_dtype, channels_last=channels_last, progress=progress,
                       desc=f'validate {model}')
    num_images = metrics['count']
    seconds = (datetime.datetime.now() - start).total_seconds()

    cfg = net.pretrained_cfg
    arch = model.split('.')[0]
    size = data_config['input_size'][1:]
    result: Dict[str, Any] = {
        'top1': round(metrics['top1'], 3),
        'top5': round(metrics['top5'], 3),
        'loss': round(metrics['loss'], 5),
        'dataset': dataset_name or _dataset_name(root),
        'num_images': num_images,
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
        'hardware': _hardware(dev),
        'amp': str(amp_dtype).replace('torch.', '') if amp_dtype is not None else False,
        'channels_last': channels_last,
        'batch_size': batch_size,
        'torch': torch.__version__,
        'timm': timm.__version__,
        'an_zoo': an_zoo.__version__,
    }
    if pretrained and result['weights_sha256'] is None:
        from ._manifest import weight_entry
        entry = weight_entry(result['model'])
        result['weights_sha256'] = entry.sha256 if entry is not None else None
    _logger.info(f'{result["model"]}: top-1 {result["top1"]:.3f} top-5 {result["top5"]:.3f} loss {result["loss"]:.4f} '
                 f'on {num_images} images in {seconds:.1f} s')
    return result


def record_measurement(name: str, measured: Dict[str, Any], path: Optional[Union[str, Path]] = None) -> Any:
    """Merge ``measured`` into the ``measured`` field of manifest entry ``'arch.tag'`` (validated before writing).

    ``path`` defaults to ``AN_ZOO_MANIFEST`` or the packaged manifest (``update_entry`` follows its symlink and writes
    the real file). Returns the updated :class:`~an_zoo._manifest.WeightEntry`.
    """
    from ._manifest import update_entry
    return update_entry(name, path=path, measured=dict(measured))


def _check_manifest_target(name: str, model: Optional[str], args: argparse.Namespace) -> str:
    """Fail before a long run if ``--update-manifest`` cannot be honoured; returns the model name to build."""
    from ._manifest import manifest_path, weight_entry
    file = Path(manifest_path()).resolve()
    entry = weight_entry(name, file)
    if entry is None:
        raise ValidationError(f'--update-manifest {name}: no such entry in {file} (names are ARCH.TAG, see '
                              f'python -m an_zoo list)')
    if model is not None and model.split('.')[0] != entry.model:
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
    parser.add_argument('data', metavar='DIR', nargs='?', help='ImageFolder root (e.g. /data/imagenet/val)')
    parser.add_argument('--data-dir', dest='data_dir', metavar='DIR', help='same as the positional DIR')
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
    parser.add_argument('--limit', type=int, help='only the first N images (quick check)')
    parser.add_argument('--dataset-name', help='recorded as "dataset" (default: the folder name)')
    parser.add_argument('--results-json', metavar='PATH', help='also write the result to this JSON file')
    parser.add_argument('--update-manifest', metavar='ARCH.TAG',
                        help='write the result as the "measured" block of this weights manifest entry '
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
    if data_dir is None:
        parser.error('give the ImageFolder root: DIR or --data-dir DIR')
    if args.data_dir and args.data and args.data_dir != args.data:
        parser.error(f'two data folders given: {args.data} and --data-dir {args.data_dir}')
    try:
        model = args.model
        if args.update_manifest:
            model = _check_manifest_target(args.update_manifest, model, args)
        if model is None:
            parser.error('--model is required (or --update-manifest ARCH.TAG)')
        result = validate(
            model, data_dir, pretrained=args.pretrained, checkpoint=args.checkpoint, num_classes=args.num_classes,
            img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation,
            batch_size=args.batch_size, workers=args.workers, amp=args.amp, channels_last=args.channels_last,
            device=args.device, limit=args.limit, dataset_name=args.dataset_name, progress=not args.no_progress)
        if args.results_json:
            out = Path(args.results_json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + '\n', encoding='utf-8')
        if args.update_manifest:
            file = Path(manifest_path()).resolve()
            entry = record_measurement(args.update_manifest, result, file)
            _logger.info(f'{entry.name}: measured block written to {file}; regenerate the README tables with '
                         f'python scripts/model_table.py --write')
    except (ValidationError, ManifestError, CheckpointError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
