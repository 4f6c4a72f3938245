"""an_zoo.train_state through the training CLI: run identity (a resume continues its own run and never writes into
another run's folder), damaged or wrong --resume files, fallback to the newest complete state, and failed starts."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from an_zoo.train import main
from an_zoo.train_state import RUN_FILE, TrainStateError, list_train_states, read_run_id

pytestmark = pytest.mark.usefixtures('one_thread')

# 2 steps of 32 digits (16 px) per epoch, 32 held-out images
TINY = ['--model', 'an_resnet18_bn1', '--img-size', '16', '--train-limit', '64', '--eval-limit', '32',
        '--batch-size', '32', '--workers', '0', '--no-progress', '--warmup-epochs', '0']


def _files(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Two independent runs, trained once: 'two' (2 epochs) and 'one' (1 epoch)."""
    root = tmp_path_factory.mktemp('runs')
    main(TINY + ['--epochs', '2', '--output', str(root / 'two')])
    main(TINY + ['--epochs', '1', '--output', str(root / 'one')])
    return root


@pytest.fixture
def run_b(runs, tmp_path):
    return Path(shutil.copytree(runs / 'two', tmp_path / 'runB'))


@pytest.fixture
def run_a(runs, tmp_path):
    return Path(shutil.copytree(runs / 'one', tmp_path / 'runA'))


def test_every_state_records_its_run(run_b):
    run_id = read_run_id(run_b)
    assert run_id and json.loads((run_b / RUN_FILE).read_text())['model'] == 'an_resnet18_bn1'
    for path in list_train_states(run_b):
        assert torch.load(path, weights_only=True)['run_id'] == run_id


def test_resume_into_another_runs_folder_is_refused_and_changes_nothing(run_a, run_b):
    before_a, before_b = _files(run_a), _files(run_b)
    with pytest.raises(FileExistsError, match=r'holds another run.*Nothing was changed.*drop --output'):
        main(TINY + ['--epochs', '2', '--resume', str(run_a / 'checkpoint-0.pth'), '--output', str(run_b)])
    assert _files(run_a) == before_a and _files(run_b) == before_b
    # without --output the run continues in its own folder, under its own id
    main(TINY + ['--epochs', '2', '--resume', str(run_a / 'checkpoint-0.pth')])
    assert [p.name for p in list_train_states(run_a)] == ['checkpoint-0.pth', 'checkpoint-1.pth']
    assert [row['epoch'] for row in json.loads((run_a / 'log.json').read_text())] == [0, 1]
    assert torch.load(run_a / 'checkpoint-1.pth', weights_only=True)['run_id'] == read_run_id(run_a)
    assert _files(run_b) == before_b


def test_resume_branches_into_a_new_folder_and_never_rewinds_a_run(run_b, tmp_path):
    before = _files(run_b)
    with pytest.raises(FileExistsError, match=r'newer training states \(checkpoint-1.pth\)'):
        main(TINY + ['--epochs', '2', '--resume', str(run_b / 'checkpoint-0.pth')])
    branch = tmp_path / 'branch'
    main(TINY + ['--epochs', '2', '--resume', str(run_b / 'checkpoint-0.pth'), '--output', str(branch)])
    record = json.loads((branch / RUN_FILE).read_text())
    assert record['run_id'] != read_run_id(run_b) and record['resumed_from'].endswith('checkpoint-0.pth')
    assert [row['epoch'] for row in json.loads((branch / 'log.json').read_text())] == [0, 1]
    assert _files(run_b) == before
    # the branch is a run of its own now: run B's state may not be resumed into it
    with pytest.raises(FileExistsError, match='holds another run'):
        main(TINY + ['--epochs', '2', '--resume', str(run_b / 'checkpoint-0.pth'), '--output', str(branch)])


@pytest.mark.parametrize('damage, message', [
    ('truncate', r'checkpoint-1.pth: not a readable training state, the file is damaged, truncated'),
    ('empty', r'checkpoint-1.pth: the file is empty \(0 bytes'),
    ('weights', r'checkpoint-1.safetensors is damaged or truncated'),
    ('no-weights', r'checkpoint-1.pth: its model weights .*checkpoint-1.safetensors is missing'),
])
def test_damaged_state_is_named_and_a_run_folder_falls_back(run_b, damage, message):
    target = run_b / ('checkpoint-1.pth' if damage in ('truncate', 'empty') else 'checkpoint-1.safetensors')
    data = target.read_bytes()
    if damage == 'no-weights':
        target.unlink()
    else:
        target.write_bytes(b'' if damage == 'empty' else data[:len(data) // 2])
    with pytest.raises(TrainStateError, match=message):
        main(TINY + ['--epochs', '2', '--resume', str(run_b / 'checkpoint-1.pth')])
    # a run folder (or --resume latest) continues from the newest complete state, with a warning naming the file
    with pytest.warns(UserWarning, match=f'(?s)skipped newer training state.*{message}'):
        result = main(TINY + ['--epochs', '2', '--resume', 'latest', '--output', str(run_b)])
    assert result['runs'][0]['final']['count'] == 32
    assert torch.load(run_b / 'checkpoint-1.pth', weights_only=True)['epoch'] == 1  # epoch 1 trained again


def test_weights_files_are_not_training_states(run_b):
    with pytest.raises(TrainStateError, match=r'best.safetensors: this file holds model weights only.*'
                                              r'--initial-checkpoint'):
        main(TINY + ['--epochs', '2', '--resume', str(run_b / 'best.safetensors')])
    with pytest.raises(TrainStateError, match=r'model weights only.*pass .*checkpoint-1.pth'):
        main(TINY + ['--epochs', '2', '--resume', str(run_b / 'checkpoint-1.safetensors')])


def test_no_complete_state_and_other_class_count_are_refused(run_b):
    with pytest.raises(TrainStateError, match='trained with 10 classes, this run has 12'):
        main(TINY + ['--epochs', '3', '--num-classes', '12', '--resume', str(run_b)])
    # a state written before the class count was recorded: the weights file is named instead of a raw error
    state = torch.load(run_b / 'checkpoint-1.pth', weights_only=True)
    del state['num_classes']
    torch.save(state, run_b / 'checkpoint-1.pth')
    with pytest.raises(TrainStateError, match=r'checkpoint-1.safetensors does not fit this an_resnet18_bn1 with 12'):
        main(TINY + ['--epochs', '3', '--num-classes', '12', '--resume', str(run_b)])
    for path in run_b.glob('checkpoint-*.pth'):
        path.write_bytes(b'')
    with pytest.raises(TrainStateError, match=r'no complete checkpoint-<epoch>.pth'):
        main(TINY + ['--epochs', '3', '--resume', str(run_b)])


def test_failed_start_leaves_no_folder_and_unwritable_output_is_found_first(tmp_path, monkeypatch):
    out = tmp_path / 'new' / 'run'
    with pytest.raises(ValueError, match='--num-classes 5 is fewer than the 10 classes'):
        main(TINY + ['--epochs', '1', '--num-classes', '5', '--output', str(out)])
    assert not (tmp_path / 'new').exists()
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')

    def no_data(*args, **kwargs):
        raise AssertionError('the data was loaded before the --output check')

    monkeypatch.setattr('an_zoo.train.create_train_eval_datasets', no_data)
    with pytest.raises(PermissionError, match=r'--output .*file/run is not a writable folder'):
        main(TINY + ['--epochs', '1', '--output', str(blocker / 'run')])
