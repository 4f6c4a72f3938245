"""an_zoo.validate: accuracy / loss on an ImageFolder, its results JSON and the manifest's "measured" block."""
import copy
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from an_zoo._card import model_card
from an_zoo._manifest import ManifestError, load_manifest, weight_entry
from an_zoo.validate import ValidationError, main, record_measurement, validate

REPO = Path(__file__).resolve().parents[1]
MODEL = 'an_resnet18_bn1'
# sorted() order (n02, n1, n10) differs from natural order (n1, n02, n10) and from creation order below: a loader
# that numbers classes any other way than sorted folder names gets other labels, and so another loss
CLASSES = ['n1', 'n10', 'n02']
TEST_TAG = 'test_in3'
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the manifest defaults


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """3 classes x 4 PNG images (64 px), a 3-class model and its weights as an an_zoo safetensors file."""
    from safetensors.torch import save_file
    tmp = tmp_path_factory.mktemp('validate')
    root = tmp / 'data'
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 256, (64, 64 + 8 * i, 3), dtype=np.uint8)  # non-square: resize keeps the ratio
            img[:, :, c] = np.uint8(255 - 30 * i)
            Image.fromarray(img).save(root / name / f'{i:02d}.png')
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=3).eval()
    with torch.no_grad():  # a random init has near-uniform outputs: spread the logits so the loss tells labels apart
        model.fc.weight.mul_(300.0)
    ckpt = tmp / 'model.safetensors'
    save_file(model.state_dict(), str(ckpt))
    return root, ckpt, model


def _manual(model, root, size, crop_pct, interpolation, limit=None, label_order=None):
    """top-1, top-5 (%), mean cross-entropy over the folder, computed without an_zoo.validate or timm.data."""
    folders = sorted(os.listdir(root))
    labels = {name: i for i, name in enumerate(label_order or folders)}
    items = [(root / c / f, labels[c]) for c in folders for f in sorted(os.listdir(root / c))][:limit]
    mode = {'bilinear': transforms.InterpolationMode.BILINEAR, 'bicubic': transforms.InterpolationMode.BICUBIC}
    transform = transforms.Compose([
        transforms.Resize(math.floor(size / crop_pct), interpolation=mode[interpolation]),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    x = torch.stack([transform(Image.open(path).convert('RGB')) for path, _ in items])
    y = torch.tensor([label for _, label in items])
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return dict(top1=100.0 * (logits.argmax(1) == y).float().mean().item(),
                top5=100.0 * (top5 == y[:, None]).any(1).float().mean().item(),
                loss=F.cross_entropy(logits, y).item(), num_images=len(items))


def _assert_matches(result, expected):
    assert result['num_images'] == expected['num_images']
    assert result['top1'] == pytest.approx(expected['top1'], abs=1e-3)
    assert result['top5'] == pytest.approx(expected['top5'], abs=1e-3)
    assert result['loss'] == pytest.approx(expected['loss'], rel=1e-4, abs=1e-4)


def _test_manifest(tmp_path) -> Path:
    """A copy of the manifest with one more (unpublished) entry: MODEL.TEST_TAG, 3 classes, 64 px, bicubic, 0.9."""
    raw = json.loads((REPO / 'weights_manifest.json').read_text())
    entry = copy.deepcopy(raw['weights'][0])
    entry.update(model=MODEL, tag=TEST_TAG, hf_hub_id=f'an-zoo/{MODEL}.{TEST_TAG}', published=False, revision=None,
                 sha256=None, size=None, num_params=None, measured={}, num_classes=3, input_size=[3, 64, 64],
                 crop_pct=0.9, interpolation='bicubic')
    raw['weights'].append(entry)
    path = tmp_path / 'weights_manifest.json'
    path.write_text(json.dumps(raw, indent=2) + '\n')
    return path


def _check_measured_block(manifest: Path, result: dict, monkeypatch) -> None:
    """The loader accepts the written manifest (the result under its evaluation set); README table and model card
    render the measurement."""
    entry = weight_entry(f'{MODEL}.{TEST_TAG}', manifest)
    assert entry.measured == {'imagenet-1k': result}
    assert entry.measured_result() == result['top1']
    packaged = {e.name: e.measured for e in load_manifest(REPO / 'weights_manifest.json')}
    assert {e.name: e.measured for e in load_manifest(manifest) if e.name != entry.name} == packaged
    spec = importlib.util.spec_from_file_location('model_table', REPO / 'scripts' / 'model_table.py')
    model_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_table)
    monkeypatch.setenv('AN_ZOO_MANIFEST', str(manifest))
    row = next(line for line in model_table.weights_table().splitlines() if f'{MODEL}.{TEST_TAG}' in line)
    assert f'{result["top1"]} ({result["date"]}, {result["hardware"]})' in row
    assert 'top1 accuracy (measured)' in model_card(entry)


def test_validate_matches_manual_computation(folder):
    root, ckpt, model = folder
    result = validate(MODEL, root, checkpoint=ckpt, num_classes=3, img_size=64, batch_size=5, workers=0,
                      progress=False)  # batches of 5, 5, 2: the averages must weight by batch size
    expected = _manual(model, root, 64, 0.875, 'bilinear')
    _assert_matches(result, expected)
    # the check can fail: another class numbering gives another loss
    natural = _manual(model, root, 64, 0.875, 'bilinear', label_order=['n1', 'n02', 'n10'])
    assert abs(natural['loss'] - expected['loss']) > 1e-2
    assert result['img_size'] == 64 and result['crop_pct'] == 0.875 and result['interpolation'] == 'bilinear'
    assert result['dataset'] == 'data' and result['num_classes'] == 3 and result['amp'] is False
    assert result['eval_set'] == 'imagenet-1k'  # the default: today's labelling (sorted synset-like folders)
    assert result['weights'] == 'model.safetensors'
    assert result['weights_sha256'] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert result['torch'] == torch.__version__ and result['timm'] == timm.__version__ and result['an_zoo']
    assert result['date'] and result['hardware']
    json.dumps(result)  # the manifest stores it as JSON


def test_validate_limit_takes_the_first_images(folder):
    root, ckpt, model = folder
    result = validate(MODEL, root, checkpoint=ckpt, num_classes=3, img_size=64, batch_size=4, workers=0,
                      limit=5, dataset_name='toy', progress=False)
    _assert_matches(result, _manual(model, root, 64, 0.875, 'bilinear', limit=5))
    assert result['dataset'] == 'toy'


def test_class_count_mismatch_is_a_clear_error(folder):
    root, ckpt, _ = folder
    with pytest.raises(ValidationError, match=r'3 class folders but an_resnet18_bn1 has 4 classes.*'
                                              r'--num-classes 3'):
        validate(MODEL, root, checkpoint=ckpt, num_classes=4, workers=0, progress=False)
    with pytest.raises(ValidationError, match=r'has 1000 classes.*1000 synset sub-folders'):
        validate(MODEL, root, checkpoint=ckpt, workers=0, progress=False)


def test_update_manifest_in_process(folder, tmp_path, monkeypatch):
    root, ckpt, model = folder
    manifest = _test_manifest(tmp_path)
    monkeypatch.setenv('AN_ZOO_MANIFEST', str(manifest))
    before = manifest.read_text()
    base = [str(root), '--checkpoint', str(ckpt), '--num-classes', '3', '--workers', '0', '--no-progress']
    # refused before any work: unknown entry, another architecture, no weights, a partial run
    assert main(base + ['--update-manifest', f'{MODEL}.nope']) == 2
    assert main(base + ['--update-manifest', f'{MODEL}.{TEST_TAG}', '--model', 'an_resnet34_bn1']) == 2
    assert main([str(root), '--update-manifest', f'{MODEL}.{TEST_TAG}', '--workers', '0']) == 2
    assert main(base + ['--update-manifest', f'{MODEL}.{TEST_TAG}', '--limit', '3']) == 2
    assert manifest.read_text() == before
    out = tmp_path / 'result.json'
    # (this process registered the packaged manifest's tags, so the preprocessing is given explicitly)
    assert main(base + ['--img-size', '64', '--crop-pct', '0.9', '--interpolation', 'bicubic',
                        '--results-json', str(out), '--update-manifest', f'{MODEL}.{TEST_TAG}']) == 0
    result = json.loads(out.read_text())
    _assert_matches(result, _manual(model, root, 64, 0.9, 'bicubic'))
    _check_measured_block(manifest, result, monkeypatch)


def test_cli_subprocess_results_json_and_manifest(folder, tmp_path, monkeypatch):
    root, ckpt, model = folder
    manifest = _test_manifest(tmp_path)
    out = tmp_path / 'out' / 'result.json'
    env = dict(os.environ, AN_ZOO_MANIFEST=str(manifest), PYTHONPATH=str(REPO), HF_HUB_OFFLINE='1',
               OMP_NUM_THREADS='1')
    # the model name comes from the manifest entry, and so does the preprocessing (64 px, crop 0.9, bicubic)
    proc = subprocess.run(
        [sys.executable, '-m', 'an_zoo.validate', str(root), '--checkpoint', str(ckpt), '--batch-size', '5',
         '--workers', '0', '--results-json', str(out), '--update-manifest', f'{MODEL}.{TEST_TAG}'],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    assert result['model'] == f'{MODEL}.{TEST_TAG}'
    assert (result['img_size'], result['crop_pct'], result['interpolation']) == (64, 0.9, 'bicubic')
    _assert_matches(result, _manual(model, root, 64, 0.9, 'bicubic'))
    _check_measured_block(manifest, result, monkeypatch)


def test_record_measurement_is_keyed_by_eval_set(tmp_path):
    manifest = _test_manifest(tmp_path)
    name = f'{MODEL}.{TEST_TAG}'
    # a result without eval_set (written before the evaluation sets existed) is an imagenet-1k one
    record_measurement(name, {'top1': 70.0, 'top5': 89.0}, manifest)
    record_measurement(name, {'top1': 3.5, 'top5': 20.0, 'eval_set': 'imagenet-a'}, manifest)
    record_measurement(name, {'imagenetv2-topimages': {'top1': 75.0, 'top5': 92.0, 'eval_set': 'imagenetv2-topimages'}},
                       manifest)
    record_measurement(name, {'top1': 71.0, 'top5': 90.0, 'eval_set': 'imagenet-1k'}, manifest)  # replaces that set
    entry = weight_entry(name, manifest)
    assert entry.measured == {'imagenet-1k': {'top1': 71.0, 'top5': 90.0, 'eval_set': 'imagenet-1k'},
                              'imagenet-a': {'top1': 3.5, 'top5': 20.0, 'eval_set': 'imagenet-a'},
                              'imagenetv2-topimages': {'top1': 75.0, 'top5': 92.0, 'eval_set': 'imagenetv2-topimages'}}
    before = manifest.read_text()
    with pytest.raises(ManifestError, match="unknown evaluation set 'imagenet-21k'"):
        record_measurement(name, {'top1': 1.0, 'top5': 2.0, 'eval_set': 'imagenet-21k'}, manifest)
    assert manifest.read_text() == before
