"""AN-aware sync-BN conversion, norm freezing and weight-decay groups on whole models."""
import timm
import torch
import torch.nn as nn

from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm

from an_zoo import (AttentiveBatchNorm2d, attentive_norm_no_weight_decay,
                    convert_sync_batchnorm, freeze_batch_norm_2d)
from an_zoo.layers import SyncBatchNorm, SyncBatchNormAct


def test_sync_batchnorm_conversion_keeps_attention_and_mixture():
    model = timm.create_model('an_resnet18_bn12').eval()
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    synced = convert_sync_batchnorm(model)
    ans = [m for m in synced.modules() if isinstance(m, AttentiveBatchNorm2d)]
    assert len(ans) == 16
    for an in ans:  # both BatchNorms inside AN are synchronised; attention and mixture are kept
        assert isinstance(an.norm, SyncBatchNorm) and isinstance(an.attn.bn, SyncBatchNorm)
        assert isinstance(an.attn.conv, nn.Conv2d) and an.mixture_weight.shape == (an.num_mixtures, an.num_features)
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert set(synced.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(synced(x), expected)
    # torch's and timm's own converters, applied directly, keep every AN layer too: they only reach its BatchNorm
    # children (attention and mixture are kept by construction; torch's SyncBatchNorm then needs CUDA to run)
    for convert in (torch.nn.SyncBatchNorm.convert_sync_batchnorm, timm_convert_sync_batchnorm):
        direct = convert(timm.create_model('an_resnet18_bn12'))
        ans = [m for m in direct.modules() if isinstance(m, AttentiveBatchNorm2d)]
        assert len(ans) == 16
        assert all(isinstance(an.norm, nn.SyncBatchNorm) and isinstance(an.attn.bn, nn.SyncBatchNorm)
                   and an.mixture_weight.shape == (an.num_mixtures, an.num_features) for an in ans)


def test_sync_batchnorm_conversion_keeps_timm_norm_act():
    # float64: random-init AN-MobileNetV2 amplifies float32 rounding differences between kernels to ~1e-3;
    # no dropout, so that train-mode outputs are comparable
    model = timm.create_model('an_mobilenetv2_050', drop_rate=0.0).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    synced = convert_sync_batchnorm(model)
    assert isinstance(synced.bn1, SyncBatchNormAct) and isinstance(synced.bn1.act, nn.ReLU6)
    assert sum(isinstance(m, SyncBatchNormAct) for m in synced.modules()) > 30
    with torch.no_grad():  # no process group: an ordinary BatchNorm(+act)
        torch.testing.assert_close(synced(x), expected)
        torch.testing.assert_close(synced.train()(x), model.train()(x))


def test_freeze_batch_norm_2d():
    model = timm.create_model('an_resnet50').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    an_keys = {k for k in model.state_dict() if '.bn2.' in k}
    frozen = freeze_batch_norm_2d(model).train()
    assert not any(isinstance(m, nn.BatchNorm2d) and m.training for m in frozen.modules())
    assert sum(isinstance(m, AttentiveBatchNorm2d) and m.frozen for m in frozen.modules()) == 16
    assert an_keys <= set(frozen.state_dict())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    out = frozen(x)  # batch 1 in train mode: statistics are frozen, nothing is estimated
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert 'layer1.0.bn2.attn.conv.weight' in trainable and 'layer1.0.conv2.weight' in trainable
    assert not any(n.endswith(('mixture_weight', 'mixture_bias')) for n in trainable)


def test_no_weight_decay_names():
    model = timm.create_model('an_resnet50')
    names = attentive_norm_no_weight_decay(model)
    assert len(names) == 32 and 'layer4.2.bn2.mixture_weight' in names
    assert names <= dict(model.named_parameters()).keys()
    assert model.no_weight_decay() == names


def _round_trip(build, x):
    model = build().eval()
    state = model.state_dict()
    fresh = build().eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_convert_bn_to_an_timm_model():
    from an_zoo import convert_bn_to_an
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=4)
    running = model.layer2[0].bn2.running_var.clone().uniform_(0.5, 2)
    model.layer2[0].bn2.running_var.copy_(running)
    convert_bn_to_an(model, num_mixtures=lambda name, m: 5 if name.startswith('layer1') else 10,
                     include=['layer*.*.bn2'])
    ans = {n: m for n, m in model.named_modules() if isinstance(m, AttentiveBatchNorm2d)}
    assert sorted(ans) == [f'layer{s}.{b}.bn2' for s in range(1, 5) for b in range(2)]
    assert ans['layer1.0.bn2'].num_mixtures == 5 and ans['layer4.1.bn2'].num_mixtures == 10
    torch.testing.assert_close(ans['layer2.0.bn2'].norm.running_var, running)  # statistics kept
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    def build():
        torch.manual_seed(1)
        return convert_bn_to_an(timm.create_model('resnet18', num_classes=4), include=['layer*.*.bn2'])
    _round_trip(build, x)


def test_convert_bn_to_an_torchvision_model_and_norm_act():
    import torchvision
    from an_zoo import AttentiveBatchNormAct2d, convert_bn_to_an
    model = torchvision.models.mobilenet_v2(num_classes=3)
    convert_bn_to_an(model, num_mixtures=5, include=lambda name, m: name.endswith('conv.1.1'))
    assert sum(isinstance(m, AttentiveBatchNorm2d) for m in model.modules()) == 16
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    assert model.features[2].conv[1][1].mixture_weight.grad is not None

    def build():
        torch.manual_seed(1)
        return convert_bn_to_an(torchvision.models.mobilenet_v2(num_classes=3), num_mixtures=5,
                                include=lambda name, m: name.endswith('conv.1.1'))
    _round_trip(build, x)
    # timm's fused BatchNormAct2d keeps its activation
    effnet = convert_bn_to_an(timm.create_model('mobilenetv2_050'), include=['blocks.1.*.bn2'])
    an = effnet.blocks[1][0].bn2
    assert isinstance(an, AttentiveBatchNormAct2d) and isinstance(an.act, nn.ReLU6)
    effnet(x).sum().backward()


def test_convert_bn_to_an_no_match_is_an_error():
    import pytest
    from an_zoo import convert_bn_to_an
    with pytest.raises(ValueError, match=r"matched no BatchNorm2d; candidates: \['bn1'"):
        convert_bn_to_an(timm.create_model('resnet18'), include=['nothing.*'])
