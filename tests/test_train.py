"""an_zoo.train: recipes and defaults, a short real run with its artefacts, exact resume after a kill, torchrun DDP,
frozen groups, and the embedded dataset."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import an_zoo
from an_zoo.data import DigitsDataset
from an_zoo.train import bn_twin_name, freeze_groups, load_recipe, main, parse_args
from an_zoo.train_state import list_train_states

REPO = Path(__file__).resolve().parents[1]
# small and quick: 16 px digits, 4 steps of 32 images per epoch
TINY = ['--img-size', '16', '--train-limit', '128', '--eval-limit', '64', '--batch-size', '32', '--workers', '0',
        '--no-progress', '--warmup-epochs', '0']


def _env():
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('PYTEST_XDIST_WORKER', None)
    return env


def test_digits_dataset_split_is_fixed_stratified_and_disjoint():
    train, val = DigitsDataset('train'), DigitsDataset('val')
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert sorted(set(val.targets.tolist())) == list(range(10))
    image, label = train[0]
    assert image.mode == 'RGB' and image.size == (8, 8) and 0 <= label < 10
    train_rows = {row.tobytes() for row in train.images}
    assert sum(row.tobytes() in train_rows for row in val.images) < 10  # the set has a few duplicate images
    with pytest.raises(ValueError, match="'train' or 'val'"):
        DigitsDataset('test')


def test_defaults_recipe_and_command_line_precedence(tmp_path):
    args = parse_args([])
    assert args.dataset == 'digits' and args.model == 'an_resnet18_bn12' and args.hflip == 0.0
    assert parse_args(['--data-dir', str(tmp_path)]).dataset == 'folder'  # a folder, not the embedded digits
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('model: an_resnet50\nlr: 0.4\nsmoothing: 0.1\nno_norm_weight_decay: false\n')
    args = parse_args(['--config', str(recipe), '--dataset', 'folder', '--lr', '0.2'])
    assert (args.model, args.lr, args.smoothing, args.no_norm_weight_decay, args.hflip) == (
        'an_resnet50', 0.2, 0.1, False, 0.5)
    recipe.write_text('model: an_resnet50\nlearning_rate: 0.4\n')
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\]"):
        load_recipe(str(recipe))


def test_every_shipped_recipe_parses(tmp_path):
    recipes = sorted((REPO / 'recipes').glob('*.yaml'))
    assert recipes, 'recipes/ is empty'
    for recipe in recipes:
        args = parse_args(['--config', str(recipe), '--data-dir', str(tmp_path)])
        assert timm.is_model(args.model) and args.dataset == 'folder', recipe.name


def test_bn_twin_names():
    assert bn_twin_name('an_resnet18_bn12') == 'resnet18'
    assert bn_twin_name('an_mobilenetv2_100') == 'mobilenetv2_100'
    assert bn_twin_name('an_resnext50_32x4d') == 'resnext50_32x4d'
    with pytest.raises(ValueError, match='not an an_'):
        bn_twin_name('resnet18')


def test_short_run_writes_checkpoints_logs_plot_and_compares_with_bn(tmp_path, capsys):
    out = tmp_path / 'run'
    result = main(TINY + ['--model', 'an_resnet18_bn1', '--epochs', '2', '--output', str(out), '--model-ema',
                          '--model-ema-decay', '0.5', '--grad-accum-steps', '2', '--mixup', '0.2',
                          '--smoothing', '0.1', '--compare-bn', '--checkpoint-hist', '1'])
    an_run, bn_run = result['runs']
    assert (an_run['model'], bn_run['model']) == ('an_resnet18_bn1', 'resnet18')
    assert 0 <= an_run['final']['top1'] <= 100 and an_run['final']['count'] == 64
    printed = capsys.readouterr().out
    assert '| an_resnet18_bn1 |' in printed and '| resnet18 |' in printed  # the side-by-side table

    assert [p.name for p in list_train_states(out)] == ['checkpoint-1.pth']  # --checkpoint-hist 1 pruned epoch 0
    weights = load_file(str(out / 'checkpoint-1.safetensors'))
    assert 'layer1.0.bn1.mixture_weight' in weights and (out / 'checkpoint-1.ema.safetensors').is_file()
    state = torch.load(out / 'checkpoint-1.pth', weights_only=True)  # no pickled objects
    assert state['epoch'] == 1 and state['optimizer']['state'] and state['num_updates'] == 4  # 2 x (4 steps / 2)
    log = json.loads((out / 'log.json').read_text())
    assert [row['epoch'] for row in log] == [0, 1] and 'ema_top1' in log[0]['eval']
    assert (out / 'summary.csv').read_text().count('\n') == 3
    assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # the best weights load like any checkpoint, through timm (num_classes in the overlay keeps the trained head)
    model = timm.create_model('an_resnet18_bn1', num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(
        file=str(out / 'best.safetensors'), num_classes=10))
    assert torch.equal(model.fc.weight, load_file(str(out / 'best.safetensors'))['fc.weight'])
    assert Path(bn_run['out_dir']).name == 'run-bn-twin'


def test_an_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / 'run'
    main(TINY + ['--model', 'an_resnet18_bn1', '--epochs', '1', '--output', str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match='pass --resume'):
        main(TINY + ['--model', 'an_resnet18_bn1', '--epochs', '1', '--output', str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match='checkpoint of an_resnet18_bn1, not of --model resnet18'):
        main(TINY + ['--model', 'resnet18', '--epochs', '2', '--output', str(out), '--resume'])


@pytest.mark.slow
def test_resume_after_a_kill_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    common = [sys.executable, '-m', 'an_zoo.train', *TINY, '--model', 'an_resnet18_bn12', '--epochs', '2',
              '--log-interval', '1']
    subprocess.run(common + ['--output', str(tmp_path / 'straight')], check=True, env=_env(), timeout=300,
                   capture_output=True)

    killed = tmp_path / 'killed'
    proc = subprocess.Popen(common + ['--output', str(killed)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=_env())
    try:
        for line in proc.stdout:
            if line.startswith('train: epoch 2/2 step 2/'):  # epoch 1 is checkpointed, epoch 2 half done
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in list_train_states(killed)] == ['checkpoint-0.pth'], 'the kill did not land mid-epoch 2'

    resumed = subprocess.run(common + ['--output', str(killed), '--resume'], env=_env(), timeout=300,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resumed from' in resumed.stdout
    straight = load_file(str(tmp_path / 'straight' / 'checkpoint-1.safetensors'))
    again = load_file(str(killed / 'checkpoint-1.safetensors'))
    assert straight.keys() == again.keys()
    for key in straight:  # bit-exact: the resumed epoch saw the same batches, augmentations and updates
        assert torch.equal(straight[key], again[key]), key
    log = json.loads((killed / 'log.json').read_text())
    assert [row['epoch'] for row in log] == [0, 1]


@pytest.mark.slow
def test_torchrun_two_processes_with_sync_bn(tmp_path):
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'an_zoo.train',
           *TINY, '--model', 'an_resnet18_bn12', '--epochs', '1', '--sync-bn', '--output', str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '2 process(es) on cpu' in result.stdout
    assert result.stdout.count('epoch 1/1:') == 1  # rank 0 reports and saves
    log = json.loads((out / 'log.json').read_text())
    assert log[0]['eval']['count'] == 64  # the held-out set is split exactly, every image counted once
    weights = load_file(str(out / 'checkpoint-0.safetensors'))
    # the sync-BN layers are saved under the original names: the checkpoint loads into the plain model
    timm.create_model('an_resnet18_bn12', num_classes=10).load_state_dict(weights)


def test_freeze_groups_freezes_parameters_and_norms_in_place():
    model = timm.create_model('an_resnet18_bn12', num_classes=3)
    names = freeze_groups(model, 2)  # stem + layer1
    assert 'conv1' in names and any(n.startswith('layer1') for n in names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(('conv1', 'layer1')))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith('layer2'))
    assert model.layer1[0].bn1.frozen and not model.layer2[0].bn1.frozen
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith('layer1')}
    model.train()(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # running stats kept
    with pytest.raises(ValueError, match='only'):
        freeze_groups(timm.create_model('an_resnet18_bn12'), 99)


def test_update_entry_through_the_packaged_symlink_changes_the_real_manifest(tmp_path):
    real = tmp_path / 'weights_manifest.json'
    real.write_text((REPO / 'weights_manifest.json').read_text())
    link = tmp_path / 'link.json'
    link.symlink_to(real)
    an_zoo._manifest.update_entry('an_resnet50.aog_e120_in1k', link, measured={'imagenet-1k': {'top1': 1.0}})
    assert link.is_symlink()
    assert json.loads(real.read_text())['weights'][0]['measured']['imagenet-1k']['top1'] == 1.0
