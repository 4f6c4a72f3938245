"""timm's model contract, for every registered an_* model (small inputs: 64 px, batch 2)."""
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2

from an_zoo import AttentiveBatchNorm2d
from helpers import COMPILE_DEPTH, GRAPH_MODELS, MODELS, SAME_GRAPH_AS, calibrated
from an_zoo._manifest import load_manifest

IMG = 64
# Reference counts (the official releases) where published; the others pin what this code builds.
PARAM_COUNTS = {
    'an_aognet_12m': 12_373_355,
    'an_aognet_40m': 40_388_880,
    'an_resnet18': 11_789_592,
    'an_resnet18_bn1': 11_789_592,
    'an_resnet18_bn12': 11_889_672,
    'an_resnet34': 21_996_060,
    'an_resnet34_bn1': 21_996_060,
    'an_resnet34_bn12': 22_194_448,
    'an_resnet50': 25_755_420,
    'an_resnet50_bn3': 26_349_084,
    'an_resnet50_all': 26_947_472,
    'an_resnet50d': 25_774_652,
    'an_resnet101': 45_000_644,
    'an_resnet101d': 45_019_876,
    'an_resnet152': 60_852_252,
    'an_resnext50_32x4d': 25_425_180,
    'an_resnext101_32x8d': 90_593_732,
    'an_resnext101_64x4d': 85_257_668,
    'an_densenet121': 8_342_288,
    'an_mobilenetv2_050': 2_049_512,
    'an_mobilenetv2_075': 2_754_464,
    'an_mobilenetv2_100': 3_672_760,
    'an_mobilenetv2_140': 6_323_296,
    'an_mobilenetv3_large_100': 4_104_480,
    'an_mobilenetv3_small_100': 2_138_864,
}
STANDARD_CFG_FIELDS = ('num_classes', 'input_size', 'pool_size', 'crop_pct', 'interpolation', 'mean', 'std',
                       'first_conv', 'classifier', 'license', 'paper_ids', 'origin_url')


def _input(batch=2, chans=3, size=IMG):
    return torch.randn(batch, chans, size, size)


def test_registered():
    assert set(SAME_GRAPH_AS) | set(SAME_GRAPH_AS.values()) <= set(MODELS)  # the transform tests' selection is real
    assert set(PARAM_COUNTS) <= set(MODELS), 'every model above must be registered by `import an_zoo`'
    # every manifest weight is a timm tag; only published ones count as pretrained
    manifest = load_manifest()
    assert {e.name for e in manifest} <= set(timm.list_models('an_*', include_tags=True))
    assert set(timm.list_pretrained('an_*')) == {e.name for e in manifest if e.published}


@pytest.mark.parametrize('name', MODELS)
def test_parameter_count(name):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    assert any(isinstance(m, AttentiveBatchNorm2d) for m in model.modules())


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_and_head(name):
    model = timm.create_model(name, num_classes=7)
    x = _input()
    out = model(x)
    assert out.shape == (2, 7)
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without gradient: {no_grad}'

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features and features.shape[-1] == IMG // 32
        pre_logits = model.forward_head(features, pre_logits=True)
        hidden = getattr(model, 'head_hidden_size', model.num_features)
        assert pre_logits.shape == (2, hidden)
        torch.testing.assert_close(model.forward_head(features), model(x))
        assert model.get_classifier() is model.get_submodule(model.pretrained_cfg['classifier'])
        model.reset_classifier(0)
        assert model(x).shape == (2, hidden)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)


@pytest.mark.parametrize('name', MODELS)
def test_meta_device(name):
    # as timm's BatchNorm models: built without memory, then run for shapes (FLOP counters, accelerate's init)
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=5)
    x = torch.empty(2, 3, IMG, IMG, device='meta')
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 5)


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_cfg(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    missing = [f for f in STANDARD_CFG_FIELDS if cfg.get(f) is None]
    assert not missing, f'pretrained_cfg lacks {missing}'
    assert cfg['paper_ids'] == 'arXiv:1908.01259'
    keys = set(model.state_dict())
    assert f'{cfg["first_conv"]}.weight' in keys
    assert f'{cfg["classifier"]}.weight' in keys
    with torch.no_grad():
        assert model.eval().forward_features(torch.randn(1, *cfg['input_size'])).shape[-2:] == cfg['pool_size']


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_equal(name):
    x = _input()
    model = calibrated(timm.create_model(name), x)  # uncalibrated eval-mode statistics can overflow (see helpers)
    with torch.no_grad():
        expected = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize('name', MODELS)
def test_features_only_and_intermediates(name):
    x = _input()
    model = calibrated(timm.create_model(name), x)
    features = timm.create_model(name, features_only=True).eval()
    keys = features.state_dict().keys()
    features.load_state_dict({k: v for k, v in model.state_dict().items() if k in keys})
    with torch.no_grad():
        feats = features(x)
        _, intermediates = model.forward_intermediates(x)
    info = features.feature_info
    assert info.reduction() == [2, 4, 8, 16, 32]
    assert [f.shape[1] for f in feats] == info.channels()
    assert [IMG // f.shape[-1] for f in feats] == info.reduction()
    for a, b in zip(feats, intermediates):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', MODELS)
def test_fx_feature_extraction(name):
    # timm's FX path: AN layers are registered leaves, so tracing never enters their input checks
    x = _input()
    model = calibrated(timm.create_model(name, features_only=True, feature_cls='fx'), x)
    hooks = timm.create_model(name, features_only=True).eval()
    hooks.load_state_dict({k.removeprefix('graph_module.'): v for k, v in model.state_dict().items()})
    with torch.no_grad():
        for a, b in zip(model(x), hooks(x)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', GRAPH_MODELS)
def test_torchscript(name):
    # TorchScript runs the reference AN code, eager the fast one: compared in float64, so that the check is about
    # the graph, not about float32 rounding amplified by a deep random network
    x = _input(size=32).double()  # float64 convolutions are slow on CPU: a small input
    model = calibrated(timm.create_model(name).double(), x)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize('name', GRAPH_MODELS)
def test_compile_fullgraph(name):
    # dynamo's tracing time grows with the number of layers: the many-layer families are compiled with fewer repeats
    # of the same layer types (every block kind and both norms still in the graph); the export matrix
    # (scripts/export_matrix.py, export_status.json) compiles every full model
    model = timm.create_model(name, **COMPILE_DEPTH.get(name, {}))
    x = _input()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    compiled(x).mean().backward()  # training graph, no breaks
    # the inference graph against eager in float64: eager and compiled code may round differently (e.g. eager CPU
    # takes the instance moments from BatchNorm's kernels, compiled graphs from sums), and a deep random network
    # amplifies float32 rounding far past float32 tolerances; in float64 any difference left is in the graph
    model.eval().double()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x.double()), model(x.double()))




@pytest.mark.parametrize('name', MODELS)
def test_channels_last(name):
    # float64: the check is about memory-format handling, not about float32 summation order (AN's attention
    # statistic mean * rsqrt(var + 1e-3) of a tiny map amplifies it through a deep random network)
    x = _input(size=32).double()  # float64 convolutions are slow on CPU: a small input
    model = calibrated(timm.create_model(name).double(), x)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize('name', ['an_resnet18_bn12', 'an_resnet50d', 'an_mobilenetv2_100',
                                  'an_mobilenetv3_small_100'])
@pytest.mark.parametrize('in_chans,num_classes', [(1, 5), (4, 0), (3, 1000)])
def test_pretrained_adaptation(name, in_chans, num_classes, tmp_path):
    source = timm.create_model(name)
    path = tmp_path / 'weights.safetensors'
    save_file(source.state_dict(), str(path))
    model = timm.create_model(name, pretrained=True, in_chans=in_chans, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert 'state_dict' not in model.pretrained_cfg and model.pretrained_cfg['file'] == str(path)
    first_conv = model.pretrained_cfg['first_conv'] + '.weight'
    head = model.pretrained_cfg['classifier'] + '.'
    src, dst = source.state_dict(), model.state_dict()
    for key, value in dst.items():
        if key == first_conv or key.startswith(head):
            continue
        torch.testing.assert_close(value, src[key], msg=key)
    assert dst[first_conv].shape[1] == in_chans
    if in_chans == 1:
        torch.testing.assert_close(dst[first_conv], src[first_conv].sum(dim=1, keepdim=True))
    if num_classes == 1000:
        torch.testing.assert_close(dst[head + 'weight'], src[head + 'weight'])
    out = model.eval()(torch.randn(2, in_chans, IMG, IMG))
    assert out.shape == (2, num_classes or getattr(model, 'head_hidden_size', model.num_features))


def test_no_weight_decay_on_mixture():
    model = timm.create_model('an_resnet18_bn1')
    groups = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4).param_groups
    no_decay = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    decay = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    ans = [m for m in model.modules() if isinstance(m, AttentiveBatchNorm2d)]
    assert ans
    for an in ans:
        assert id(an.mixture_weight) in no_decay and id(an.mixture_bias) in no_decay
        assert id(an.attn.conv.weight) in decay


def test_zero_init_last_and_an_placement():
    bn1 = timm.create_model('an_resnet18_bn1')
    bn12 = timm.create_model('an_resnet18_bn12')
    block = bn12.layer1[0]
    assert isinstance(block.bn1, AttentiveBatchNorm2d) and isinstance(block.bn2, AttentiveBatchNorm2d)
    assert not block.bn2.mixture_weight.any() and not block.bn2.mixture_bias.any()  # zero-gamma on the last AN
    assert isinstance(bn1.layer1[0].bn1, AttentiveBatchNorm2d) and type(bn1.layer1[0].bn2) is nn.BatchNorm2d
    assert not bn1.layer1[0].bn2.weight.any()
    r50 = timm.create_model('an_resnet50')
    for stage, k in zip((r50.layer1, r50.layer2, r50.layer3, r50.layer4), (10, 10, 20, 20)):
        for block in stage:
            assert isinstance(block.bn2, AttentiveBatchNorm2d) and block.bn2.num_mixtures == k
            assert type(block.bn1) is nn.BatchNorm2d and type(block.bn3) is nn.BatchNorm2d
            assert not block.bn3.weight.any()
    d = timm.create_model('an_resnet50d')
    assert isinstance(d.maxpool, nn.MaxPool2d) and d.maxpool.kernel_size == 2 and d.maxpool.stride == 2
    assert [m.out_channels for m in d.conv1 if isinstance(m, nn.Conv2d)] == [32, 32, 64]
    assert isinstance(d.layer2[0].downsample[0], nn.AvgPool2d)


@pytest.mark.parametrize('name', MODELS)
def test_meta_device_autocast(name):
    # test_meta_device under CPU autocast: meta tensors have no autocast, and AN must not ask for it there
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=5, **COMPILE_DEPTH.get(name, {}))
    x = torch.empty(2, 3, IMG, IMG, device='meta')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(x).sum().backward()
        with torch.no_grad():
            assert model.eval()(x).shape == (2, 5)
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters())


@pytest.mark.parametrize('name', MODELS)
def test_accelerate_init_empty_weights(name):
    # the big-model loading recipe: parameters on meta (buffers too), to_empty, then the real state dict
    from accelerate import init_empty_weights
    kwargs = COMPILE_DEPTH.get(name, {})
    x = _input(size=32)
    reference = calibrated(timm.create_model(name, num_classes=5, **kwargs), x)
    with init_empty_weights(include_buffers=True):
        model = timm.create_model(name, num_classes=5, **kwargs)
    assert all(t.is_meta for t in model.state_dict().values())
    model = model.to_empty(device='cpu')
    model.load_state_dict(reference.state_dict())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
