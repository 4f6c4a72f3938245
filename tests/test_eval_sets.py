"""an_zoo.eval_sets + an_zoo.validate: how each evaluation set is labelled and scored, checked against hand-computed
numbers on tiny generated folders and a stub model whose logits are fixed per image."""
import copy
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
import torch.nn as nn
from PIL import Image
from torchvision.datasets import ImageFolder

import an_zoo.validate as validate_mod
from an_zoo._manifest import weight_entry
from an_zoo.eval_sets import (REAL_SET, RealScorer, ValidationError, folder_labels, get_eval_set, imagenet_synsets,
                              load_real_labels, real_targets)
from an_zoo.validate import main, validate, validate_many

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MODEL = 'an_resnet18_bn1'  # the name validate() is given; the stub below stands in for the network
TEST_TAG = 'test_in1k'
SYNSETS = imagenet_synsets()
A_SYNSETS = ['n01498041', 'n01531178', 'n01534433']  # ImageNet-1k indices 6, 11, 13 (the first of ImageNet-A's)


class FixedLogits(nn.Module):
    """A classifier whose output for an image is ``table[id]``: the images are solid colours that spell their id in
    red + 256 * green, which resizing, cropping and normalising keep."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer('table', table.float())
        self.num_classes = table.shape[1]
        self.pretrained_cfg = dict(input_size=(3, 8, 8), crop_pct=1.0, interpolation='bilinear', mean=MEAN, std=STD,
                                   num_classes=self.num_classes)
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = [x[:, c].mean((1, 2)) * STD[c] + MEAN[c] for c in (0, 1)]
        ids = torch.round(rgb[0] * 255).long() + 256 * torch.round(rgb[1] * 255).long()
        self.images_seen += len(ids)
        return self.table[ids]


def _image(path: Path, image_id: int) -> None:
    """A solid 8 x 12 image spelling ``image_id`` (PNG data, whatever the file name says: PIL reads the content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((8, 12, 3), dtype=np.uint8)
    img[..., 0], img[..., 1] = image_id % 256, image_id // 256
    Image.fromarray(img).save(path, format='PNG')


def _use_stub(monkeypatch, table: torch.Tensor) -> FixedLogits:
    stub = FixedLogits(table)
    monkeypatch.setattr(validate_mod, '_create_model', lambda *args, **kwargs: stub)
    return stub


def _scores(logits, labels):
    """top-1 / top-5 (%) and mean cross-entropy, by hand: rank of the label and log-sum-exp over each row."""
    top1 = top5 = loss = 0.0
    for row, label in zip(logits, labels):
        rank = sum(1 for v in row if v > row[label])  # no ties in the tables below
        top1 += rank == 0
        top5 += rank < 5
        loss += math.log(sum(math.exp(v) for v in row)) - row[label]
    n = len(labels)
    return dict(top1=100 * top1 / n, top5=100 * top5 / n, loss=loss / n)


def _assert_scores(result, expected, num_images):
    assert result['num_images'] == num_images
    assert result['top1'] == pytest.approx(expected['top1'], abs=1e-3)
    assert result['top5'] == pytest.approx(expected['top5'], abs=1e-3)
    if 'loss' in expected:
        assert result['loss'] == pytest.approx(expected['loss'], rel=1e-4)


def _snapshot(*roots: Path) -> dict:
    return {str(p): p.read_bytes() if p.is_file() else None for root in roots for p in sorted(root.rglob('*'))}


OPTS = dict(checkpoint=None, batch_size=5, workers=0, progress=False)


def test_imagenetv2_folders_are_labelled_by_their_index(tmp_path, monkeypatch):
    # 12 classes: sorted folder names are 0, 1, 10, 11, 2, ..., 9; the label must be int(name)
    root = tmp_path / 'v2'
    rows = []
    for k in range(12):
        _image(root / str(k) / 'a.png', k)
        pred = 4 if k == 3 else k  # one mistake; class 3 is then second
        rows.append([10.0 if c == pred else 5.0 if c == k else -float(c) for c in range(12)])
    _use_stub(monkeypatch, torch.tensor(rows))
    result = validate(MODEL, root, eval_set='imagenetv2-matched-frequency', num_classes=12, **OPTS)
    expected = _scores(rows, list(range(12)))
    assert expected['top1'] == pytest.approx(100 * 11 / 12) and expected['top5'] == 100
    _assert_scores(result, expected, 12)
    assert result['eval_set'] == 'imagenetv2-matched-frequency'
    # ImageFolder's numbering (sorted names) gives other labels, and other scores: the test can fail
    numbering = ImageFolder(str(root)).class_to_idx
    assert numbering['10'] == 2
    wrong = _scores(rows, [numbering[str(k)] for k in range(12)])
    assert wrong['top1'] == pytest.approx(100 * 2 / 12) and abs(wrong['loss'] - result['loss']) > 1


def test_imagenet_a_restricts_the_logits_to_its_synsets(tmp_path, monkeypatch):
    root = tmp_path / 'imagenet-a'
    columns = [SYNSETS.index(s) for s in A_SYNSETS]
    assert columns == [6, 11, 13]
    table, labels = [], []
    for label, synset in enumerate(A_SYNSETS):
        for i in range(2):
            _image(root / synset / f'{i}.png', len(table))
            row = [0.0] * 1000
            row[500] = 9.0  # a class outside the set wins the unrestricted argmax
            row[columns[label]] = 3.0 + i  # the right class wins among the set's columns ...
            row[columns[(label + 1) % 3]] = 3.5 if i == 0 else 1.0  # ... except for the first image of each class
            table.append(row)
            labels.append(label)
    _use_stub(monkeypatch, torch.tensor(table))
    result = validate(MODEL, root, eval_set='imagenet-a', **OPTS)
    restricted = [[row[c] for c in columns] for row in table]
    expected = _scores(restricted, labels)
    assert expected['top1'] == 50 and expected['top5'] == 100  # (3 classes: the top-5 holds them all)
    _assert_scores(result, expected, 6)
    assert result['eval_classes'] == 3 and result['num_classes'] == 1000
    # unrestricted, every argmax is class 500: the restriction is what makes these numbers
    assert all(max(range(1000), key=row.__getitem__) == 500 for row in table)
    assert _scores(table, [columns[label] for label in labels])['top1'] == 0


def test_subset_columns_match_timms_imagenet_a_indices(tmp_path):
    info = Path(timm.data.__file__).parent / '_info'
    synsets = (info / 'imagenet_a_synsets.txt').read_text().split()
    indices = [int(i) for i in (info / 'imagenet_a_indices.txt').read_text().split()]
    labels, columns = folder_labels(get_eval_set('imagenet-a'), tmp_path, sorted(synsets), 1000)
    assert columns == indices and labels == {s: i for i, s in enumerate(sorted(synsets))}
    assert SYNSETS == sorted(SYNSETS)  # so sorted synset folders are in ImageNet-1k index order


# ---------------------------------------------------------------------------------------------------------- ReaL
# 8 classes, one val image per class folder; ranking[i] is the model's class order for ILSVRC2012_val_0000000{i+1}
RANKING = [[0, 1, 2, 3, 4, 5, 6, 7], [2, 1, 0, 3, 4, 5, 6, 7], [3, 4, 5, 6, 7, 0, 1, 2], [5, 6, 7, 0, 3, 1, 2, 4],
           [0, 1, 2, 3, 4, 5, 7, 6], [6, 5, 4, 3, 2, 1, 0, 7], [7, 6, 5, 4, 3, 2, 1, 0], [1, 0, 2, 3, 4, 5, 6, 7]]
REAL = [[0], [1, 2], [], [3], [7], [6, 0], [3], [2, 1]]
# ReaL by hand (image 3 has no label): top-1 hits images 1, 2 (2 is one of its two labels), 6, 8; top-5 also 4 and 7
REAL_TOP1, REAL_TOP5 = 100 * 4 / 7, 100 * 6 / 7


@pytest.fixture
def real_folder(tmp_path):
    root = tmp_path / 'val'
    for i in range(8):  # image i+1 in class folder 7-i: the folder labels are not the ReaL labels
        _image(root / f'n0000000{7 - i}' / f'ILSVRC2012_val_{i + 1:08d}.JPEG', i)
    real_json = tmp_path / 'real.json'
    real_json.write_text(json.dumps(REAL))
    logits = [[float(8 - rank.index(c)) for c in range(8)] for rank in RANKING]
    return root, real_json, logits


def test_real_scores_against_the_real_labels_in_the_imagenet_1k_pass(real_folder, monkeypatch):
    root, real_json, logits = real_folder
    stub = _use_stub(monkeypatch, torch.tensor(logits))
    results = validate_many(MODEL, {'imagenet-1k': root, REAL_SET: root}, num_classes=8, real_labels=real_json,
                            **OPTS)
    assert list(results) == ['imagenet-1k', REAL_SET]
    assert stub.images_seen == 8  # one pass over the images gives both
    # ImageFolder order: folder n00000000 holds image 8, ..., folder n00000007 image 1
    by_folder = [logits[7 - k] for k in range(8)]
    _assert_scores(results['imagenet-1k'], _scores(by_folder, list(range(8))), 8)
    real = results[REAL_SET]
    _assert_scores(real, dict(top1=REAL_TOP1, top5=REAL_TOP5), 7)
    assert real['num_images_without_real_labels'] == 1 and real['real_labels'] == 'real.json'
    assert real['eval_set'] == REAL_SET and 'loss' not in real
    # alone, the reassessed set gives the same numbers
    alone = validate(MODEL, root, eval_set=REAL_SET, num_classes=8, real_labels=real_json, **OPTS)
    assert (alone['top1'], alone['top5'], alone['num_images']) == (real['top1'], real['top5'], 7)


def test_real_with_limit_scores_only_those_images(real_folder, tmp_path, monkeypatch):
    root, _, logits = real_folder
    longer = tmp_path / 'real_longer.json'
    longer.write_text(json.dumps(REAL + [[1], [2]]))  # 10 labelled images, 8 in the folder
    _use_stub(monkeypatch, torch.tensor(logits))
    with pytest.raises(ValidationError, match=r'has 8 images but .*real_longer.json covers 10.*--limit N'):
        validate(MODEL, root, eval_set=REAL_SET, num_classes=8, real_labels=longer, **OPTS)
    # the first 3 images in class-then-file order are val images 8, 7, 6: top-1 hits 8 and 6, top-5 all three
    result = validate(MODEL, root, eval_set=REAL_SET, num_classes=8, real_labels=longer, limit=3, **OPTS)
    _assert_scores(result, dict(top1=100 * 2 / 3, top5=100.0), 3)


def test_real_scorer_matches_timms_real_labels_imagenet(tmp_path):
    from timm.data import RealLabelsImagenet
    rng = np.random.default_rng(0)
    labels = [sorted(rng.choice(20, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(60)]
    real_json = tmp_path / 'real.json'
    real_json.write_text(json.dumps(labels))
    names = [f'ILSVRC2012_val_{i + 1:08d}.JPEG' for i in range(60)]
    output = torch.randn(60, 20)
    timm_real = RealLabelsImagenet(names, real_json=str(real_json))
    ours = RealScorer(load_real_labels(real_json))
    for batch in output.split(7):
        timm_real.add_result(batch)
        ours.add_result(batch)
    accuracy = ours.accuracy()
    assert accuracy[1] == pytest.approx(timm_real.get_accuracy(1)) and accuracy[5] == pytest.approx(
        timm_real.get_accuracy(5))
    assert ours.skipped == sum(1 for x in labels if not x)


def test_bundled_real_labels_are_timms():
    labels = load_real_labels()
    assert len(labels) == 50000 and labels[:3] == [[], [970, 795], [230, 231]]


# ------------------------------------------------------------------------------------------------------- errors
def test_bad_folders_are_clear_errors_and_change_nothing(real_folder, tmp_path, monkeypatch):
    root, real_json, logits = real_folder
    _use_stub(monkeypatch, torch.zeros(8, 8))
    v2 = tmp_path / 'v2'
    for k, name in enumerate(['0', '1', '2', 'n01440764']):
        _image(v2 / name / 'a.png', k)
    a = tmp_path / 'a'
    for k, name in enumerate([A_SYNSETS[0], 'cats']):
        _image(a / name / 'a.png', k)
    _image(tmp_path / 'a_ok' / A_SYNSETS[0] / 'a.png', 0)
    renamed = tmp_path / 'renamed'
    for k in range(8):
        _image(renamed / f'n0000000{k}' / f'val_{k}.JPEG', k)
    bad_json = tmp_path / 'bad.json'
    bad_json.write_text('{"ILSVRC2012_val_00000001.JPEG": [1]}')
    before = _snapshot(tmp_path)
    cases = [
        (dict(data_dir=v2, eval_set='imagenetv2-topimages', num_classes=4),
         r"named by the class index, 0 \.\. 3 \(as the ImageNetV2 archives unpack\); unexpected: \['n01440764'\]; "
         r"missing: \['3'\].*Point at the folder that holds the numbered class folders"),
        (dict(data_dir=a, eval_set='imagenet-o', num_classes=1000),
         r"imagenet-o class folders must be ImageNet-1k synsets \(nXXXXXXXX\), found \['cats'\]\. Point at"),
        (dict(data_dir=tmp_path / 'a_ok', eval_set='imagenet-a', num_classes=8),
         r'imagenet-a scores an ImageNet-1k classifier.*has 8 classes: use a 1000-class ImageNet model'),
        (dict(data_dir=renamed, eval_set=REAL_SET, num_classes=8),
         r"ReaL labels are keyed by the ILSVRC-2012 val file names.*8 of 8 images are named otherwise, e\.g\. "
         r"\['val_0\.JPEG'.*valprep\.sh keeps their names"),
        (dict(data_dir=root, eval_set=REAL_SET, num_classes=8),  # timm's labels: 50,000 images
         r"has 8 images but timm's bundled ReaL labels covers 50000.*Point at the complete val folder, or pass "
         r"--limit N"),
        (dict(data_dir=root, eval_set=REAL_SET, num_classes=8, real_labels=bad_json),
         r'bad\.json is not a ReaL labels file: expected a JSON list'),
        (dict(data_dir=root, eval_set=REAL_SET, num_classes=8, real_labels=tmp_path / 'missing.json'),
         r'ReaL labels file not found'),
        (dict(data_dir=root, eval_set='imagenet-1k', num_classes=8, real_labels=real_json),
         r'score imagenet-1k-reassessed: ask for that set'),
        (dict(data_dir=root, eval_set='imagenet-21k', num_classes=8), r"unknown evaluation set 'imagenet-21k'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValidationError, match=message):
            validate(MODEL, **kwargs, **OPTS)
    assert _snapshot(tmp_path) == before
    # 1000 folders named by index are ImageNetV2's: a synset set would number them '0', '1', '10', ...
    with pytest.raises(ValidationError, match=r'are ImageNet class indices.*Use --eval-set imagenetv2-matched'):
        folder_labels(get_eval_set('imagenet-sketch'), tmp_path, sorted(str(i) for i in range(1000)), 1000)
    high = tmp_path / 'high'
    _image(high / 'n0' / 'ILSVRC2012_val_00000009.JPEG', 0)
    with pytest.raises(ValidationError, match=r'ILSVRC2012_val_00000009.JPEG.*beyond the 8 images'):
        real_targets(ImageFolder(str(high)), real_json, limit=1)


# ---------------------------------------------------------------------------------------------- --eval-root CLI
@pytest.fixture(scope='module')
def eval_root(tmp_path_factory):
    """imagenet-1k (1000 synset folders, one ReaL-named image each), imagenetv2-matched-frequency (folders 0..999),
    imagenet-a (3 synsets) and a folder that is no set; the stub's logits and the hand-computed results."""
    tmp_path = tmp_path_factory.mktemp('eval_sets')
    root = tmp_path / 'eval'
    table = torch.zeros(2006, 1000)
    for k in range(1000):  # imagenet-1k: image k (val number k+1) of class k; classes 0..9 predicted as k+1
        _image(root / 'imagenet-1k' / SYNSETS[k] / f'ILSVRC2012_val_{k + 1:08d}.JPEG', k)
        table[k, k + 1 if k < 10 else k] = 10.0
        if k < 10:
            table[k, k] = 5.0 if k < 5 else -1.0  # second for 0..4; below the 998 zeros for 5..9
    for k in range(1000):  # imagenetv2: image 1000+k in folder str(k), all right but class 7 (predicted 8, -1)
        _image(root / 'imagenetv2-matched-frequency' / str(k) / 'a.png', 1000 + k)
        table[1000 + k, 8 if k == 7 else k] = 10.0
        if k == 7:
            table[1000 + k, 7] = -1.0
    for label, synset in enumerate(A_SYNSETS):  # imagenet-a: as in the test above, unrestricted argmax 500
        for i in range(2):
            row = table[2000 + 2 * label + i]
            _image(root / 'imagenet-a' / synset / f'{i}.png', 2000 + 2 * label + i)
            row[500], row[[6, 11, 13][label]] = 9.0, 3.0 + i
            row[[6, 11, 13][(label + 1) % 3]] = 3.5 if i == 0 else 1.0
    (root / 'notes').mkdir()
    real = [[k] for k in range(1000)]
    real[5], real[999] = [5, 6], []  # 5: multi-label, right at top-1 (6 is predicted); 999: not counted
    real_json = tmp_path / 'real.json'
    real_json.write_text(json.dumps(real))

    def ce(values_and_counts, true):  # mean-free cross-entropy of one row: (value, how many) pairs
        return math.log(sum(n * math.exp(v) for v, n in values_and_counts)) - true
    in1k_loss = (990 * ce([(10, 1), (0, 999)], 10) + 5 * ce([(10, 1), (5, 1), (0, 998)], 5)
                 + 5 * ce([(10, 1), (-1, 1), (0, 998)], -1)) / 1000
    v2_loss = (999 * ce([(10, 1), (0, 999)], 10) + ce([(10, 1), (-1, 1), (0, 998)], -1)) / 1000
    # ReaL: 999 labelled; top-1 misses 0..4 and 6..9 (predicted k+1), not 5 (6 is one of its labels); top-5
    # misses 6..9 (their class is below the 998 zeros), not 5
    expected = {
        'imagenet-1k': dict(top1=99.0, top5=99.5, loss=in1k_loss),
        REAL_SET: dict(top1=100 * (999 - 9) / 999, top5=100 * (999 - 4) / 999),
        'imagenetv2-matched-frequency': dict(top1=99.9, top5=99.9, loss=v2_loss),
        'imagenet-a': _scores([[row[c].item() for c in (6, 11, 13)] for row in table[2000:]], [0, 0, 1, 1, 2, 2]),
    }
    return root, table, real_json, expected


def _test_manifest(tmp_path) -> Path:
    """A copy of the manifest with one more (unpublished, 1000-class) entry, which measured imagenet-sketch before."""
    raw = json.loads((REPO / 'weights_manifest.json').read_text())
    entry = copy.deepcopy(raw['weights'][0])
    entry.update(model=MODEL, tag=TEST_TAG, hf_hub_id=f'an-zoo/{MODEL}.{TEST_TAG}', published=False, revision=None,
                 sha256=None, size=None, num_params=None, aliases=[],
                 measured={'imagenet-sketch': {'top1': 12.5, 'top5': 30.0, 'date': '2020-01-01'}})
    raw['weights'].append(entry)
    path = tmp_path / 'weights_manifest.json'
    path.write_text(json.dumps(raw, indent=2) + '\n')
    return path


def test_eval_root_cli_measures_every_set_into_the_manifest(eval_root, tmp_path, monkeypatch, capsys, caplog):
    root, table, real_json, expected = eval_root
    stub = _use_stub(monkeypatch, table)
    manifest = _test_manifest(tmp_path)
    monkeypatch.setenv('AN_ZOO_MANIFEST', str(manifest))
    ckpt = tmp_path / 'weights.bin'
    ckpt.write_bytes(b'stub')
    before = manifest.read_text()
    base = ['--eval-root', str(root), '--checkpoint', str(ckpt), '--batch-size', '250', '--workers', '0',
            '--no-progress', '--update-manifest', f'{MODEL}.{TEST_TAG}']
    # refused before any work: a partial run, a second data folder, --eval-set with --eval-root
    assert main(base + ['--limit', '10']) == 2
    for bad in (['--eval-set', 'imagenet-a'], [str(root)]):
        with pytest.raises(SystemExit):
            main(base + bad)
    assert manifest.read_text() == before and stub.images_seen == 0
    capsys.readouterr()

    caplog.set_level('INFO')
    assert main(base + ['--real-labels', str(real_json)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ['imagenet-1k', REAL_SET, 'imagenetv2-matched-frequency', 'imagenet-a']
    assert stub.images_seen == 1000 + 1000 + 6  # the ReaL score rides along the imagenet-1k pass
    for name, numbers in expected.items():
        _assert_scores(printed[name], numbers, {REAL_SET: 999, 'imagenet-a': 6}.get(name, 1000))
        assert printed[name]['eval_set'] == name
        assert printed[name]['weights_sha256'] == hashlib.sha256(b'stub').hexdigest()
    assert 'imagenet-sketch: no folder' in caplog.text and "ignoring ['notes']" in caplog.text
    # the entry's measured block: the 4 sets added, the earlier imagenet-sketch kept; every other byte unchanged
    entry = weight_entry(f'{MODEL}.{TEST_TAG}', manifest)
    assert entry.measured == {'imagenet-sketch': {'top1': 12.5, 'top5': 30.0, 'date': '2020-01-01'}, **printed}
    assert entry.measured_result('imagenet-a') == printed['imagenet-a']['top1']
    after = manifest.read_text()
    start = before.index(f'"tag": "{TEST_TAG}"')
    start = before.rindex('\n    {\n', 0, start)  # the entry's opening brace: the last one in the list
    assert after[:start] == before[:start] and after.endswith('\n    }\n  ]\n}\n')
    assert json.loads(after)['weights'][:-1] == json.loads(before)['weights'][:-1]


def test_eval_root_without_real_labels_leaves_out_the_real_score(eval_root, tmp_path, monkeypatch, capsys, caplog):
    root, table, _, expected = eval_root
    stub = _use_stub(monkeypatch, table)
    ckpt = tmp_path / 'weights.bin'
    ckpt.write_bytes(b'stub')
    args = ['--eval-root', str(root), '--checkpoint', str(ckpt), '--num-classes', '1000', '--model', MODEL,
            '--batch-size', '250', '--workers', '0', '--no-progress']
    # 1000 val images, timm's ReaL labels cover 50,000: only the automatic ReaL score is left out, with the reason
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ['imagenet-1k', 'imagenetv2-matched-frequency', 'imagenet-a']
    assert f'{REAL_SET} left out' in caplog.text and 'covers 50000' in caplog.text
    _assert_scores(printed['imagenet-1k'], expected['imagenet-1k'], 1000)
    assert stub.images_seen == 2006
    # a root with no set folder at all is an error that says how to lay it out
    assert main(args[:1] + [str(root / 'notes')] + args[2:]) == 2
    assert 'holds none of the evaluation sets: put each one in a sub-folder named after it' in capsys.readouterr().err
