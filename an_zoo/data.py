"""Datasets for training and evaluation: the embedded offline default and the dispatcher over timm's datasets.

The embedded default is scikit-learn's copy of the UCI handwritten-digits set (1,797 greyscale 8x8 images of the
digits 0-9, written by 43 people). It ships inside the scikit-learn wheel (the ``train`` / ``demo`` extras), so
``python -m an_zoo.train`` works on a machine with no network and no data of its own.
"""
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch.utils.data
from PIL import Image

__all__ = ['DigitsDataset', 'EMBEDDED_DATASET', 'create_train_eval_datasets', 'dataset_num_classes']

EMBEDDED_DATASET = 'digits'


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's handwritten digits as RGB PIL images with a fixed, stratified train / val split.

    Args:
        split: ``'train'`` or ``'val'``.
        transform: Applied to each PIL image (``timm.data.create_loader`` sets it, as for timm's datasets).
        val_fraction: Share of every class held out for ``'val'``.
        seed: Seed of the split (not of training), fixed so that numbers are comparable across runs.
    """

    def __init__(self, split: str = 'train', transform: Optional[Callable] = None, val_fraction: float = 0.2,
                 seed: int = 0) -> None:
        if split not in ('train', 'val'):
            raise ValueError(f"DigitsDataset split must be 'train' or 'val', got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError('the embedded digits dataset ships with scikit-learn: pip install "an_zoo[train]" '
                              '(or pip install scikit-learn), or pass --data-dir with your own ImageFolder') from e
        digits = load_digits()
        rng = np.random.RandomState(seed)
        chosen: List[int] = []
        for label in range(10):
            idx = rng.permutation(np.flatnonzero(digits.target == label))
            n_val = int(round(len(idx) * val_fraction))
            chosen.extend(idx[:n_val] if split == 'val' else idx[n_val:])
        chosen.sort()
        # 0..16 grey levels -> 0..255; RGB so that ImageNet-pretrained 3-channel stems apply unchanged
        self.images = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)
        self.targets = digits.target[chosen].astype(np.int64)
        self.classes = [str(i) for i in range(10)]
        self.transform = transform
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = Image.fromarray(self.images[index], mode='L').convert('RGB')
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def _split_dir(root: Path, names: Tuple[str, ...]) -> Optional[str]:
    return next((name for name in names if (root / name).is_dir()), None)


def create_train_eval_datasets(
        dataset: str = EMBEDDED_DATASET,
        data_dir: Optional[str] = None,
        train_split: str = 'train',
        val_split: str = 'validation',
        download: bool = False,
        seed: int = 0,
) -> Tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """The (train, eval) datasets for ``an_zoo.train``.

    ``dataset='digits'`` is the embedded default. Otherwise ``dataset`` is anything timm's ``create_dataset``
    accepts (``''`` or ``'folder'`` for an ImageFolder tree under ``data_dir``, ``'hfds/<name>'`` for a Hugging Face
    dataset, ``'torch/cifar10'``...). For an ImageFolder root, ``train/`` and ``val/`` or ``validation/`` sub-folders
    are found automatically.
    """
    if dataset == EMBEDDED_DATASET:
        return DigitsDataset('train', seed=seed), DigitsDataset('val', seed=seed)
    from timm.data import create_dataset

    name = '' if dataset in ('', 'folder', 'imagefolder') else dataset
    if not name:
        if data_dir is None:
            raise ValueError('an ImageFolder dataset needs --data-dir (a folder with train/ and val/ class folders)')
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f'--data-dir {root} is not a directory')
        train_split = _split_dir(root, (train_split, 'train')) or train_split
        val_split = _split_dir(root, (val_split, 'validation', 'val')) or val_split
        for split in (train_split, val_split):
            if not (root / split).is_dir():
                raise FileNotFoundError(f'{root} has no {split}/ folder; an ImageFolder root needs train/ and val/ '
                                        f'(or validation/) sub-folders with one folder per class')
    train = create_dataset(name, root=data_dir, split=train_split, is_training=True, download=download, seed=seed)
    evaluation = create_dataset(name, root=data_dir, split=val_split, is_training=False, download=download)
    train_index, eval_index = _class_to_idx(train), _class_to_idx(evaluation)
    if train_index is not None and eval_index is not None and train_index != eval_index:
        # each split numbers its own class folders: one class index, the training split's, for both
        where = (f'{Path(data_dir) / train_split}/', f'{Path(data_dir) / val_split}/') if data_dir else (
            f'split {train_split!r}', f'split {val_split!r}')
        unknown = sorted(set(eval_index) - set(train_index))
        if unknown:
            raise ValueError(f'the held-out {where[1]} has class folder(s) {unknown} that the training {where[0]} '
                             f'lacks, so no label can be given to them; add them to {where[0]} or remove them from '
                             f'{where[1]}')
        absent = sorted(set(train_index) - set(eval_index))
        if absent:
            warnings.warn(f'the held-out {where[1]} has no class folder(s) {absent} of the training {where[0]}; '
                          f'held-out images are labelled with the training split\'s {len(train_index)} classes',
                          stacklevel=2)
        evaluation = create_dataset(name, root=data_dir, split=val_split, is_training=False, download=download,
                                    class_map=train_index)
    return train, evaluation


def _class_to_idx(dataset: torch.utils.data.Dataset) -> Optional[Dict[str, int]]:
    """The class-name index of a timm folder / tar dataset; None for datasets that number classes otherwise."""
    mapping = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    return dict(mapping) if mapping else None


def dataset_num_classes(dataset: torch.utils.data.Dataset) -> Optional[int]:
    """The number of classes a dataset declares (``classes`` or a timm reader's class index); None if unknown."""
    if getattr(dataset, 'classes', None) is not None:
        return len(dataset.classes)
    mapping = _class_to_idx(dataset)
    return len(mapping) if mapping else None
