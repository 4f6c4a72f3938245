"""The command line of ``python -m an_zoo.train``: its argument parser, the embedded-dataset defaults and timm
train-args YAML recipes (precedence: defaults < embedded-dataset recipe < ``--config`` YAML < command line)."""
import argparse
from typing import Any, Dict, Optional, Sequence

import torch

from .data import EMBEDDED_DATASET

__all__ = ['EMBEDDED_DEFAULTS', 'build_parser', 'parse_args', 'load_recipe']

DESCRIPTION = 'Fine-tune or train an ``an_*`` (or any timm) model: ``python -m an_zoo.train`` / ``scripts/train.py``.'

# The embedded default recipe: digits are 8x8 grey images, so no flips (a flipped 2 is not a 2) and mild crops;
# measured on 2 CPU cores in docs/training.md. Applied only when the dataset is the embedded one.
EMBEDDED_DEFAULTS: Dict[str, Any] = dict(
    model='an_resnet18_bn12', img_size=32, crop_pct=1.0, batch_size=64, epochs=6, opt='sgd', lr=0.1,
    weight_decay=5e-4, sched='cosine', warmup_epochs=1, warmup_lr=0.01, min_lr=1e-4, hflip=0.0,
    scale=(0.75, 1.0), ratio=(0.9, 1.1), color_jitter=0.0, workers=0, interpolation='bilinear',
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. Destination names follow timm's ``train.py`` so its YAML recipes read the same."""
    p = argparse.ArgumentParser(
        prog='python -m an_zoo.train', description=DESCRIPTION,
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
                   help="continue a run: from the newest complete checkpoint in --output (no PATH, or 'latest'), "
                        'in a run folder PATH, or from the checkpoint-<epoch>.pth PATH; the run continues in its '
                        'own folder (an --output holding another run is refused)')
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
