"""The ImageNet evaluation sets the official AN release reports on, and how each one is scored.

The iVMCL-Release tables give top-1 / top-5 of every model on eight sets; the weights manifest keeps them under these
names (``reported.results`` / ``measured``) and :mod:`an_zoo.validate` measures the same sets where a user has them:

================================  ======================================================================================
``imagenet-1k``                   ILSVRC-2012 val, 50,000 images in 1000 synset folders
``imagenet-1k-reassessed``        the same images scored against the ReaL labels ("Are we done with ImageNet?") as
                                  timm's ``RealLabelsImagenet`` scores them: an image counts as correct when any of
                                  its top-k predictions is one of its ReaL labels; images without one are not counted
``imagenetv2-matched-frequency``  ImageNetV2 (10,000 images each); its class folders are named ``0`` ... ``999``,
``imagenetv2-threshold0.7``       the ImageNet-1k class index, so the label is ``int(folder)`` (sorted folder names
``imagenetv2-topimages``          would number them ``0, 1, 10, 100, ...``)
``imagenet-sketch``               ImageNet-Sketch, 1000 synset folders
``imagenet-a``                    ImageNet-A, 200 synset folders: the logits are restricted to those 200 classes (in
                                  ImageNet-1k index order) and the label is the folder's position among them
``imagenet-o``                    ImageNet-O, scored as the release scores it: classification over its 200 synset
                                  folders with the logits restricted to them (it is an out-of-distribution set, so
                                  these accuracies are near chance by design)
================================  ======================================================================================

:func:`open_eval_folder` reads a set's ImageFolder with its labelling and checks it against the model (class
count, folder names, the 1000-class head subsets need); :func:`real_targets` and :class:`RealScorer` give the ReaL
score; :func:`find_eval_sets` finds the sets under one root folder (``DIR/<set name>``).
"""
import json
import logging
import os
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from torchvision.datasets import ImageFolder

if TYPE_CHECKING:
    import torch

__all__ = ['ValidationError', 'EvalSet', 'EVAL_SETS', 'REAL_SET', 'get_eval_set', 'imagenet_synsets', 'find_eval_sets',
           'folder_labels', 'EvalFolder', 'open_eval_folder', 'load_real_labels', 'real_targets', 'RealScorer']

_logger = logging.getLogger(__name__)

REAL_SET = 'imagenet-1k-reassessed'
_SYNSET = re.compile(r'^n\d{8}$')
_REAL_FILE = re.compile(r'^ILSVRC2012_val_(\d{8})\.JPEG$')


class ValidationError(ValueError):
    """The evaluation cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class EvalSet:
    name: str
    description: str
    folder_labels: str  # 'synset': sorted synset folders; 'index': folders named by the ImageNet-1k class index
    real_labels: bool = False  # scored against the ReaL labels instead of the folder labels
    class_subset: bool = False  # a subset of the 1000 classes: logits restricted to the synsets present


EVAL_SETS: Dict[str, EvalSet] = {s.name: s for s in (
    EvalSet('imagenet-1k', 'ImageNet-1k val (ILSVRC-2012)', 'synset'),
    EvalSet(REAL_SET, 'ImageNet-1k val scored with the ReaL labels', 'synset', real_labels=True),
    EvalSet('imagenetv2-matched-frequency', 'ImageNetV2 MatchedFrequency', 'index'),
    EvalSet('imagenetv2-threshold0.7', 'ImageNetV2 Threshold0.7', 'index'),
    EvalSet('imagenetv2-topimages', 'ImageNetV2 TopImages', 'index'),
    EvalSet('imagenet-sketch', 'ImageNet-Sketch', 'synset'),
    EvalSet('imagenet-a', 'ImageNet-A (200 classes)', 'synset', class_subset=True),
    EvalSet('imagenet-o', 'ImageNet-O (200 classes, out-of-distribution images)', 'synset', class_subset=True),
)}


def get_eval_set(name: str) -> EvalSet:
    """The evaluation set ``name``; an unknown name is a :class:`ValidationError` listing the known ones."""
    try:
        return EVAL_SETS[name]
    except KeyError:
        raise ValidationError(f'unknown evaluation set {name!r}; known: {", ".join(EVAL_SETS)}') from None


def imagenet_synsets() -> List[str]:
    """The 1000 ImageNet-1k synsets in class-index order, which is sorted order (timm's copy)."""
    from timm.data import ImageNetInfo
    return list(ImageNetInfo().label_names())


def find_eval_sets(root: Path) -> Dict[str, Path]:
    """The sets found as ``root/<set name>``; ``imagenet-1k-reassessed`` scores ``root/imagenet-1k`` unless it has a
    folder of its own. Absent sets are logged and left out."""
    if not root.is_dir():
        raise ValidationError(f'--eval-root {root}: no such folder')
    folders: Dict[str, Path] = {}
    for name in EVAL_SETS:
        folder = root / ('imagenet-1k' if name == REAL_SET and not (root / name).is_dir() else name)
        if folder.is_dir():
            folders[name] = folder
        else:
            _logger.info(f'{name}: no folder {folder}, skipped')
    others = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name not in EVAL_SETS)
    if others:
        _logger.warning(f'{root}: ignoring {others}, not evaluation set names ({", ".join(EVAL_SETS)})')
    if not folders:
        raise ValidationError(f'{root} holds none of the evaluation sets: put each one in a sub-folder named after '
                              f'it ({", ".join(n for n in EVAL_SETS if n != REAL_SET)})')
    return folders


def folder_labels(eval_set: EvalSet, root: Path, classes: Sequence[str], num_classes: Optional[int],
                  model: str = 'the model') -> Tuple[Dict[str, int], Optional[List[int]]]:
    """The label of each class folder of ``eval_set`` and, for class-subset sets, the logit columns kept.

    Synset folders are numbered in sorted order (ImageNet-1k index order for the 1000 synsets); index-named folders
    get ``int(name)``; a subset set's folder is labelled by its position among the sorted folders, and the columns are
    the folders' ImageNet-1k indices, so the restricted logits line up with those labels. ``num_classes`` is the
    model's (None: not checked).
    """
    if eval_set.class_subset:
        index = {s: i for i, s in enumerate(imagenet_synsets())}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ValidationError(
                f'{root}: {eval_set.name} class folders must be ImageNet-1k synsets (nXXXXXXXX), found '
                f'{unknown[:5]}. Point at the folder that holds the {eval_set.name} synset folders, without other '
                f'folders in it.')
        if num_classes is not None and num_classes != 1000:
            raise ValidationError(
                f'{eval_set.name} scores an ImageNet-1k classifier (its logits restricted to the set\'s synsets), but '
                f'{model} has {num_classes} classes: use a 1000-class ImageNet model.')
        return {c: i for i, c in enumerate(classes)}, [index[c] for c in classes]
    if num_classes is not None or eval_set.folder_labels == 'index':  # int(name) needs the names checked
        _check_full_set(eval_set, root, classes, num_classes or 1000, model)
    if eval_set.folder_labels == 'index':
        return {c: int(c) for c in classes}, None
    return {c: i for i, c in enumerate(classes)}, None


def _check_full_set(eval_set: EvalSet, root: Path, classes: Sequence[str], num_classes: int, model: str) -> None:
    """Refuse class folders that do not mean the ``num_classes`` classes of the model as ``eval_set`` numbers them."""
    if eval_set.folder_labels == 'index':
        expected = {str(i) for i in range(num_classes)}
        unexpected, missing = sorted(set(classes) - expected), sorted(expected - set(classes), key=int)
        if unexpected or missing:
            raise ValidationError(
                f'{root}: {eval_set.name} class folders must be named by the class index, 0 .. {num_classes - 1} '
                f'(as the ImageNetV2 archives unpack)' + (f'; unexpected: {unexpected[:5]}' if unexpected else '')
                + (f'; missing: {missing[:5]} ({len(missing)} in all)' if missing else '')
                + '. Point at the folder that holds the numbered class folders; for synset folders use '
                  '--eval-set imagenet-1k.')
        return
    if len(classes) != num_classes:
        hint = ('For ImageNet-1k, point at the validation folder with the 1000 synset sub-folders (val images sorted '
                'into class folders, e.g. with valprep.sh), not at its parent or a flat folder of images.'
                if num_classes == 1000 else
                f'Pass --num-classes {len(classes)} with a checkpoint trained for those classes, or point at a '
                f'folder with {num_classes} class sub-folders.')
        raise ValidationError(f'{root} has {len(classes)} class folders but {model} has {num_classes} classes: '
                              f'accuracy would be meaningless. {hint}')
    if num_classes == 1000 and all(c.isdigit() for c in classes):
        # sorted() would put '10' before '2': such folders are ImageNetV2's, whose label is int(name)
        raise ValidationError(f'{root}: class folders named 0 .. 999 are ImageNet class indices (the ImageNetV2 '
                              f'layout), which {eval_set.name} would number in sorted-name order. Use --eval-set '
                              f'imagenetv2-matched-frequency (or another imagenetv2-* set).')
    if num_classes == 1000 and not all(_SYNSET.match(c) for c in classes):
        _logger.warning(f'{root}: 1000 class folders that are not all ImageNet synset ids (nXXXXXXXX): classes are '
                        f'numbered in sorted folder-name order, which matches ImageNet-1k only for synset folders')


class _Folder(ImageFolder):
    """An ImageFolder whose class numbering is given (torchvision numbers folders in sorted name order)."""

    def __init__(self, root: str, class_to_idx: Dict[str, int]) -> None:
        self._labels = dict(class_to_idx)
        super().__init__(root)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        return sorted(self._labels), dict(self._labels)


@dataclass
class EvalFolder:
    """An evaluation set's images, labelled as the set says."""
    eval_set: EvalSet
    dataset: ImageFolder  # (image, label), in class-then-file order (sorted folder names)
    columns: Optional[List[int]] = None  # ImageNet-1k logit columns kept (class-subset sets), None: all


def open_eval_folder(eval_set: EvalSet, root: Union[str, Path], num_classes: Optional[int],
                     model: str = 'the model') -> EvalFolder:
    """The ImageFolder ``root`` as ``eval_set``, checked against a ``num_classes`` model (None: unchecked)."""
    root = Path(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())  # as torchvision lists them
    if not classes:
        raise ValidationError(f'{root} has no class sub-folders: {eval_set.name} expects an ImageFolder (one '
                              f'sub-folder of images per class)')
    labels, columns = folder_labels(eval_set, root, classes, num_classes, model)
    try:
        dataset = _Folder(str(root), labels)
    except (FileNotFoundError, RuntimeError) as err:
        raise ValidationError(f'{root} is not a usable ImageFolder (one sub-folder of images per class): {err}') \
            from err
    return EvalFolder(eval_set, dataset, columns)


def load_real_labels(real_json: Optional[Union[str, Path]] = None) -> List[List[int]]:
    """The ReaL label lists, entry ``i`` for ``ILSVRC2012_val_{i + 1:08d}.JPEG``: ``real_json`` (the format of the
    reassessed-imagenet repository's ``real.json``) or the copy timm ships and ``RealLabelsImagenet`` reads."""
    if real_json is None:
        return json.loads(pkgutil.get_data('timm.data', '_info/imagenet_real_labels.json').decode('utf-8'))
    try:
        labels = json.loads(Path(real_json).read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValidationError(f'cannot read the ReaL labels {real_json}: {err}') from err
    if not isinstance(labels, list) or not all(isinstance(x, list) and all(isinstance(i, int) for i in x)
                                               for x in labels):
        raise ValidationError(f'{real_json} is not a ReaL labels file: expected a JSON list with one list of class '
                              f'indices per val image (as real.json of google-research/reassessed-imagenet)')
    return labels


def real_targets(dataset: ImageFolder, real_json: Optional[Union[str, Path]] = None,
                 limit: Optional[int] = None) -> List[List[int]]:
    """The ReaL labels of the images of ``dataset`` scored (the first ``limit``, or all), found by their ILSVRC-2012
    val file names, from ``real_json`` or timm's copy (:func:`load_real_labels`)."""
    labels, root = load_real_labels(real_json), dataset.root
    source = real_json or "timm's bundled ReaL labels"
    names = [os.path.basename(path) for path, _ in dataset.samples][:limit]
    bad = [n for n in names if not _REAL_FILE.match(n)]
    if bad:
        raise ValidationError(
            f'{root}: the ReaL labels are keyed by the ILSVRC-2012 val file names (ILSVRC2012_val_00000001.JPEG ...), '
            f'but {len(bad)} of {len(names)} images are named otherwise, e.g. {bad[:3]}. Point at the original val '
            f'images sorted into synset folders (valprep.sh keeps their names).')
    if limit is None and len(names) != len(labels):
        raise ValidationError(
            f'{root} has {len(names)} images but {source} covers {len(labels)}: the reassessed score is defined on '
            f'the whole val set. Point at the complete val folder, or pass --limit N for a partial check.')
    if len(set(names)) != len(names):
        raise ValidationError(f'{root}: some val file names occur in more than one class folder; keep one copy each')
    numbers = [int(_REAL_FILE.match(n).group(1)) for n in names]
    beyond = [n for n, i in zip(names, numbers) if not 1 <= i <= len(labels)]
    if beyond:
        raise ValidationError(f'{root}: {beyond[:3]} are beyond the {len(labels)} images {source} covers')
    return [labels[i - 1] for i in numbers]


class RealScorer:
    """timm's ``RealLabelsImagenet`` scoring, for any run of val images (timm's class insists on all 50,000): an
    image is correct at k when any of its top-k predictions is one of its ReaL labels; images without one are skipped.

    Fed the model outputs batch by batch, in the order of ``targets`` (one unshuffled pass, one process).
    """

    def __init__(self, targets: Sequence[Sequence[int]], topk: Tuple[int, ...] = (1, 5)) -> None:
        self.targets, self.topk = targets, topk
        self.hits = dict.fromkeys(topk, 0)
        self.count = self.skipped = self._next = 0

    def add_result(self, output: 'torch.Tensor') -> None:
        maxk = min(max(self.topk), output.shape[1])
        for pred in output.topk(maxk, 1, True, True).indices.tolist():
            labels = self.targets[self._next]
            self._next += 1
            if not labels:
                self.skipped += 1
                continue
            self.count += 1
            for k in self.topk:
                self.hits[k] += any(p in labels for p in pred[:k])

    def accuracy(self) -> Dict[int, float]:
        """Top-k accuracy (%) over the images with ReaL labels; a :class:`ValidationError` when there are none."""
        if not self.count:
            raise ValidationError(f'none of the {self.skipped} images scored has a ReaL label: no reassessed score')
        return {k: 100.0 * hits / self.count for k, hits in self.hits.items()}
