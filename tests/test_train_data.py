"""an_zoo.train's data checks: one class index for the training and held-out ImageFolder splits, a --num-classes
that the data does not fit, and the stop on non-finite loss or running statistics."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import an_zoo.train
from an_zoo.data import create_train_eval_datasets
from an_zoo.train import NonFiniteError, main, nonfinite_report

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = ['--model', 'an_resnet18_bn1', '--img-size', '16', '--batch-size', '4', '--workers', '0', '--no-progress',
        '--warmup-epochs', '0', '--epochs', '1']


def _image_folder(root: Path, splits) -> Path:
    """``splits``: {split: [class, ...]}, two tiny images per class, each class its own colour."""
    for split, classes in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                colour = np.full((8, 8, 3), (ord(name[-1]) * 37 + i) % 256, np.uint8)
                Image.fromarray(colour).save(folder / f'{i}.png')
    return root


def test_held_out_split_lacking_a_class_keeps_the_training_numbering(tmp_path):
    root = _image_folder(tmp_path, {'train': ['cat', 'dog'], 'val': ['dog']})
    with pytest.warns(UserWarning, match=r"val/ has no class folder\(s\) \['cat'\]"):
        train, held_out = create_train_eval_datasets('folder', str(root))
    assert sorted({label for _, label in train.reader.samples}) == [0, 1]
    assert [label for _, label in held_out.reader.samples] == [1, 1]  # dog is 1 in training, not 0


@pytest.mark.parametrize('splits, extra', [
    ({'train': ['cat', 'dog'], 'val': ['cat', 'dog', 'eel']}, 'eel'),
    ({'train': ['dog'], 'val': ['cat', 'dog']}, 'cat'),
])
def test_held_out_class_unknown_to_training_is_refused_by_name(tmp_path, splits, extra):
    root = _image_folder(tmp_path, splits)
    with pytest.raises(ValueError, match=rf"val/ has class folder\(s\) \['{extra}'\] that the training .*train/ lacks"):
        main(TINY + ['--data-dir', str(root), '--output', str(tmp_path / 'run')])
    assert not (tmp_path / 'run').exists()


def test_num_classes_below_the_data_is_refused(tmp_path):
    root = _image_folder(tmp_path, {'train': ['cat', 'dog', 'eel'], 'val': ['cat', 'dog', 'eel']})
    with pytest.raises(ValueError, match='--num-classes 2 is fewer than the 3 classes of the training data'):
        main(TINY + ['--data-dir', str(root), '--num-classes', '2', '--output', str(tmp_path / 'run')])


def test_nonfinite_running_statistics_are_reported_even_with_a_finite_loss():
    model = timm.create_model('an_resnet18_bn1', num_classes=2)
    buffers = an_zoo.train._statistics_buffers(model)
    assert nonfinite_report(torch.tensor(0.5), buffers) is None
    model.layer2[0].bn1.norm.running_var[3] = float('nan')
    model.layer3[0].bn2.running_mean[0] = float('inf')
    report = nonfinite_report(torch.tensor(0.5), buffers)
    assert report == ('the running statistics of layer2.0.bn1.norm (running_var); layer3.0.bn2 (running_mean) '
                      'are NaN / inf')
    assert nonfinite_report(torch.tensor(float('nan')), buffers).startswith('the loss is nan, and the running')


def test_a_nan_batch_stops_training_at_its_step_naming_what_broke(tmp_path, monkeypatch):
    create = an_zoo.train.create_train_eval_datasets

    class Poisoned(torch.utils.data.Dataset):
        """The 6th image read (step 2 of batches of 4, no workers) is NaN."""

        def __init__(self, dataset):
            self.dataset, self.reads = dataset, 0

        transform = property(lambda self: self.dataset.transform,
                             lambda self, value: setattr(self.dataset, 'transform', value))
        classes = property(lambda self: self.dataset.classes)

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            image, label = self.dataset[index]
            self.reads += 1
            return (image * float('nan') if self.reads == 6 else image), label

    monkeypatch.setattr(an_zoo.train, 'create_train_eval_datasets',
                        lambda *args: (lambda train, held_out: (Poisoned(train), held_out))(*create(*args)))
    with pytest.raises(NonFiniteError, match=r'epoch 1 step 2/4 \(after update 2\): the loss is nan, and the running '
                                             r'statistics of bn1 \(running_mean, running_var\); layer1.0.bn1.norm'):
        main(TINY + ['--train-limit', '16', '--eval-limit', '8', '--output', str(tmp_path / 'run')])
    assert not (tmp_path / 'run').exists()  # nothing was saved, so the run folder is not left behind
