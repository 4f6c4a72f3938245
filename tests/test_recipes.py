"""recipes/*.yaml: ImageNet training configs (timm train.py argument names) for every weight of the manifest."""
import re
from pathlib import Path

import pytest
import timm
import timm.optim
import yaml

import an_zoo  # noqa: F401  (registers the an_* models)
from an_zoo._manifest import load_manifest, weight_entry

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / 'recipes').glob('*.yaml'))
MANIFEST = REPO / 'weights_manifest.json'

# timm train.py argument dests the an_zoo train script accepts, by value type
_INT = {'num_classes', 'img_size', 'batch_size', 'epochs', 'warmup_epochs', 'cooldown_epochs', 'grad_accum_steps',
        'seed', 'workers', 'log_interval'}
_FLOAT = {'crop_pct', 'opt_eps', 'momentum', 'lr', 'weight_decay', 'warmup_lr', 'min_lr', 'smoothing', 'mixup',
          'cutmix', 'mixup_prob', 'hflip', 'color_jitter', 'reprob', 'drop', 'drop_path', 'model_ema_decay',
          'layer_decay'}
_BOOL = {'pretrained', 'model_ema', 'amp', 'channels_last', 'sync_bn', 'no_norm_weight_decay'}
_STR = {'model', 'interpolation', 'train_interpolation', 'opt', 'sched', 'mixup_mode', 'amp_dtype'}
_PAIR = {'scale', 'ratio'}
_OPTIONAL_STR = {'aa'}
ALLOWED = _INT | _FLOAT | _BOOL | _STR | _PAIR | _OPTIONAL_STR
REQUIRED = {'model', 'num_classes', 'img_size', 'crop_pct', 'interpolation', 'batch_size', 'epochs', 'opt', 'lr',
            'momentum', 'weight_decay', 'sched', 'warmup_epochs', 'smoothing', 'mixup', 'no_norm_weight_decay'}
# fractions: [0, 1]
_UNIT = {'crop_pct', 'momentum', 'smoothing', 'mixup_prob', 'hflip', 'reprob', 'drop', 'drop_path', 'model_ema_decay',
         'layer_decay'}


def _load(path: Path) -> dict:
    recipe = yaml.safe_load(path.read_text())
    assert isinstance(recipe, dict), f'{path.name}: not a mapping'
    return recipe


def _ids(paths):
    return [p.name for p in paths]


def test_every_manifest_weight_has_a_recipe():
    names = {e.name for e in load_manifest(MANIFEST)}
    files = {p.name[:-len('.yaml')] for p in RECIPES}
    assert names - files == set(), f'weights without a recipe (add recipes/ARCH.TAG.yaml): {sorted(names - files)}'
    assert files - names == set(), f'recipes for no manifest weight: {sorted(files - names)}'


@pytest.mark.parametrize('path', RECIPES, ids=_ids(RECIPES))
def test_recipe_keys_and_value_types(path):
    recipe = _load(path)
    assert set(recipe) <= ALLOWED, f'{path.name}: keys the train script does not accept: {set(recipe) - ALLOWED}'
    assert REQUIRED <= set(recipe), f'{path.name}: missing {REQUIRED - set(recipe)}'
    for key, value in recipe.items():
        where = f'{path.name}: {key}: {value!r}'
        if key in _INT:
            assert type(value) is int and value >= 0, where
        elif key in _FLOAT:  # YAML 1.1 reads "4e-05" (no dot) as a string: caught here
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, where
            if key in _UNIT:
                assert value <= 1, where
        elif key in _BOOL:
            assert isinstance(value, bool), where
        elif key in _STR:
            assert isinstance(value, str) and value, where
        elif key in _PAIR:
            assert isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value), where
            assert 0 < value[0] <= value[1], where
        else:
            assert value is None or isinstance(value, str), where
    assert recipe['lr'] > 0 and recipe['batch_size'] > 0 and recipe['epochs'] > recipe.get('warmup_epochs', 0)
    assert recipe['opt'] in timm.optim.list_optimizers(), f'{path.name}: timm has no optimizer {recipe["opt"]!r}'
    assert recipe['sched'] in {'cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly'}
    for key in ('interpolation', 'train_interpolation'):
        assert recipe.get(key, 'bilinear') in {'bilinear', 'bicubic', 'nearest', 'random'}
    assert recipe.get('mixup_mode', 'batch') in {'batch', 'pair', 'elem'}
    assert recipe.get('amp_dtype', 'float16') in {'float16', 'bfloat16'}
    assert recipe.get('min_lr', 0) < recipe['lr'] and recipe.get('warmup_lr', 0) < recipe['lr']


@pytest.mark.parametrize('path', RECIPES, ids=_ids(RECIPES))
def test_recipe_matches_its_manifest_entry(path):
    recipe = _load(path)
    name = path.name[:-len('.yaml')]
    entry = weight_entry(name, MANIFEST)
    assert entry is not None, f'{path.name}: the manifest has no weight {name}'
    model = recipe['model']
    assert model.startswith('an_') and timm.is_model(model), f'{path.name}: {model} is not a registered an_* model'
    assert model == entry.model
    text = entry.provenance['recipe']
    epochs = re.search(r'(\d+) epochs', text)
    assert epochs and recipe['epochs'] == int(epochs.group(1)), f'{path.name}: epochs vs manifest recipe "{text}"'
    smoothing = re.search(r'label smoothing ([\d.]+)', text)
    assert recipe['smoothing'] == (float(smoothing.group(1)) if smoothing else 0.0), text
    mixup = re.search(r'mixup ([\d.]+)', text)
    assert recipe['mixup'] == (float(mixup.group(1)) if mixup else 0.0), text
    if 'cosine' in text:
        assert recipe['sched'] == 'cosine'
    # evaluation preprocessing and head are the weight's pretrained cfg
    assert recipe['num_classes'] == entry.data['num_classes']
    assert recipe['img_size'] == entry.data['input_size'][-1]
    assert recipe['crop_pct'] == entry.data['crop_pct']
    assert recipe['interpolation'] == entry.data['interpolation']


@pytest.mark.parametrize('path', RECIPES, ids=_ids(RECIPES))
def test_recipe_documents_weight_sources_and_command(path):
    lines = path.read_text().splitlines()
    header = '\n'.join(line for line in lines if line.startswith('#'))
    entry = weight_entry(path.name[:-len('.yaml')], MANIFEST)
    assert entry.name in lines[0]
    assert f'Reported top-1: {entry.reported_result()} %' in header
    assert f'torchrun --nproc_per_node 8 -m an_zoo.train --config recipes/{path.name} --data-dir' in header
    assert entry.provenance['origin_url'] in header
    undocumented = [line for line in lines if line and not line.startswith('#') and '#' not in line]
    assert not undocumented, f'{path.name}: values without a source comment: {undocumented}'


@pytest.mark.parametrize('path', RECIPES, ids=_ids(RECIPES))
def test_train_script_reads_recipe(path):
    """The an_zoo train script accepts every key (it refuses unknown ones) and takes the values as given."""
    from an_zoo.train_args import parse_args
    args = parse_args(['--config', str(path), '--data-dir', '/path/to/imagenet', '--dataset', 'folder'])
    for key, value in _load(path).items():
        assert getattr(args, key) == value, f'{path.name}: {key}'
