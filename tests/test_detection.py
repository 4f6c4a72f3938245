"""AN backbones in torchvision Faster / Mask R-CNN, frozen AN for small-batch fine-tuning, AN over GroupNorm."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from an_zoo import AttentiveBatchNorm2d, AttentiveGroupNorm
from an_zoo.detection import ANBackboneWithFPN, an_fpn_backbone, an_gn_box_head, an_gn_mask_head

SIZE = 128
FPN = 64  # FPN / head channels (torchvision's 256, smaller to keep the tests fast)
SMALL = dict(min_size=SIZE, max_size=SIZE, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
             box_batch_size_per_image=64, box_score_thresh=0.0)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """``model name -> checkpoint file`` standing in for ImageNet weights: mixture weights off the zero init of the
    last norm of each residual branch (which would leave those branches without gradient) and running statistics
    estimated on random images, so that frozen statistics normalize as pretrained ones do."""
    folder = tmp_path_factory.mktemp('pretrained')
    files = {}
    for name in ('an_resnet18_bn12', 'an_mobilenetv2_050'):
        torch.manual_seed(1)
        model = timm.create_model(name).train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
            if isinstance(m, AttentiveBatchNorm2d):
                m.reset_parameters()
        with torch.no_grad():
            for _ in range(2):
                model(torch.rand(8, 3, SIZE, SIZE))
        files[name] = folder / f'{name}.pth'
        torch.save(model.state_dict(), files[name])
    return files


def _backbone(pretrained, name, **kwargs):
    """``an_fpn_backbone`` loading the stand-in pretrained weights through timm (features_only)."""
    return an_fpn_backbone(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained[name])),
                           out_channels=FPN, **kwargs)


def _images_and_targets(n=2, masks=True):
    images = [torch.rand(3, SIZE, SIZE) for _ in range(n)]
    targets = []
    for i in range(n):
        boxes = torch.tensor([[10., 20., 60., 90.], [50. + i, 40., 120., 110. - i]])
        target = dict(boxes=boxes, labels=torch.tensor([1, 2]))
        if masks:
            target['masks'] = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                target['masks'][j, y0:y1, x0:x1] = 1
        targets.append(target)
    return images, targets


def _mask_rcnn(pretrained, model_name='an_resnet18_bn12', **backbone_kwargs):
    """Mask R-CNN with an AN backbone and AN-GN box and mask heads (3 classes)."""
    backbone = _backbone(pretrained, model_name, **backbone_kwargs)
    return MaskRCNN(
        backbone, num_classes=None,
        box_head=an_gn_box_head(FPN, 7, conv_layers=(FPN,) * 4, fc_layers=(128,), num_groups=16),
        box_predictor=FastRCNNPredictor(128, 3),
        mask_head=an_gn_mask_head(FPN, layers=(FPN, FPN), num_mixtures=(5, 10), num_groups=16),
        mask_predictor=MaskRCNNPredictor(FPN, FPN, 3), **SMALL)


def _train_step(model, images, targets, lr=0.01):
    """One SGD step (momentum, weight decay, gradient clipping as the reference's detection configs) over every
    parameter (torchvision's reference scripts pass the trainable ones); returns (losses, state before, after)."""
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    losses = model(images, targets)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    optimizer.step()
    return losses, before, model.state_dict()


def _check_step(model, losses, before, after):
    assert losses and all(math.isfinite(v.item()) for v in losses.values()), losses
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    frozen = set(params) - trainable
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # every parameter that got a gradient was updated (a few get none: e.g. the coarsest FPN level when no anchor
    # there is sampled on 128 px images), and only trainable ones were
    with_grad = {n for n in trainable if params[n].grad is not None and params[n].grad.abs().sum() > 0}
    assert with_grad and with_grad <= changed <= trainable, (sorted(with_grad - changed)[:5],
                                                             sorted(changed - trainable)[:5])
    assert len(with_grad) > 0.9 * len(trainable), sorted(trainable - with_grad)
    # frozen parameters and every buffer (running statistics, FrozenBatchNorm2d's) are untouched
    assert not changed & frozen
    buffers = {n for n, _ in model.named_buffers()}
    assert buffers and not changed & buffers
    return trainable, frozen


def _check_detections(model, images, masks):
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert isinstance(detections, list) and len(detections) == len(images)
    assert sum(len(d['boxes']) for d in detections) > 0  # score threshold 0: the heads' outputs come through
    for d in detections:
        n = len(d['boxes'])
        assert d['boxes'].shape == (n, 4) and d['labels'].shape == (n,) and d['scores'].shape == (n,)
        assert torch.isfinite(d['boxes']).all() and torch.isfinite(d['scores']).all()
        assert ((d['labels'] >= 1) & (d['labels'] <= 2)).all()
        if masks:
            assert d['masks'].shape == (n, 1, SIZE, SIZE)
            assert ((d['masks'] >= 0) & (d['masks'] <= 1)).all()
        else:
            assert 'masks' not in d


# ---------------------------------------------------------------------------------------------------------------
# the backbone


def test_fpn_backbone_outputs_and_resnet_trainable_layers():
    backbone = an_fpn_backbone('an_resnet18_bn12', out_channels=FPN)
    assert isinstance(backbone, ANBackboneWithFPN) and backbone.out_channels == FPN
    out = backbone.eval()(torch.randn(2, 3, SIZE, SIZE))
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert [v.shape[-1] for v in out.values()] == [SIZE // 4, SIZE // 8, SIZE // 16, SIZE // 32, SIZE // 64]
    assert all(v.shape[:2] == (2, FPN) for v in out.values())
    # torchvision's rule: trainable_layers=3 trains layer2..layer4; 0 trains nothing; 5 trains the stem too
    for layers, prefixes in ((3, ('layer2', 'layer3', 'layer4')), (0, ()),
                             (5, ('conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4'))):
        body = an_fpn_backbone('an_resnet18_bn12', trainable_layers=layers, out_channels=FPN).body
        trainable = {n for n, p in body.named_parameters() if p.requires_grad}
        expected = {n for n, p in body.named_parameters() if n.startswith(prefixes)
                    and not n.endswith(('mixture_weight', 'mixture_bias', 'attn.bn.weight', 'attn.bn.bias'))}
        assert trainable == expected, layers
    # returned_layers picks the levels; the FPN takes their channels
    backbone = an_fpn_backbone('an_resnet18_bn12', returned_layers=(2, 4), out_channels=FPN)
    assert [b[0].in_channels for b in backbone.fpn.inner_blocks] == [128, 512]
    assert list(backbone(torch.randn(1, 3, SIZE, SIZE))) == ['0', '1', 'pool']
    with pytest.raises(ValueError, match='trainable_layers'):
        an_fpn_backbone('an_resnet18_bn12', trainable_layers=6)
    with pytest.raises(ValueError, match='norm'):
        an_fpn_backbone('an_resnet18_bn12', norm='sync')
    with pytest.raises(ValueError, match='increasing'):
        an_fpn_backbone('an_resnet18_bn12', returned_layers=(3, 2))


def test_fpn_backbone_mobilenet_stages_follow_feature_info():
    # an_mobilenetv2 feature levels: blocks.0, blocks.1, blocks.2, blocks.4, blocks.6 -> the last 2 stages are
    # blocks.3..blocks.4 and blocks.5..blocks.6
    backbone = an_fpn_backbone('an_mobilenetv2_050', trainable_layers=2, out_channels=FPN, norm='train')
    body = backbone.body
    trainable = {n for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in body.named_parameters() if n.startswith(('blocks.3.', 'blocks.4.', 'blocks.5.',
                                                                                'blocks.6.'))}
    backbone.train()  # norms of the frozen stages keep their statistics, the trained stages' norms train
    norms = {n: m for n, m in body.named_modules() if isinstance(m, (nn.BatchNorm2d, AttentiveBatchNorm2d))}
    assert not norms['bn1'].training and not norms['blocks.2.0.bn2'].training
    assert not norms['blocks.2.0.bn2'].norm.training and not norms['blocks.2.0.bn2'].attn.bn.training
    assert norms['blocks.3.0.bn2'].training and norms['blocks.6.0.bn1'].training
    out = backbone(torch.randn(2, 3, SIZE, SIZE))
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert an_fpn_backbone('an_mobilenetv3_large_100', trainable_layers=5, out_channels=FPN).body.feature_info \
        .channels() == [24, 40, 112, 960]


# ---------------------------------------------------------------------------------------------------------------
# frozen AN: torchvision's FrozenBatchNorm2d semantics


def test_frozen_backbone_semantics(pretrained):
    backbone = _backbone(pretrained, 'an_resnet18_bn12', trainable_layers=5)
    body = backbone.body
    ans = [m for m in body.modules() if isinstance(m, AttentiveBatchNorm2d)]
    assert len(ans) == 16 and all(m.frozen for m in ans)
    batch_norms = [n for n, m in body.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and all(n.endswith(('.norm', '.attn.bn')) for n in batch_norms)  # only those inside AN
    assert isinstance(body.bn1, FrozenBatchNorm2d)  # plain BatchNorm -> FrozenBatchNorm2d
    for an in ans:  # statistics and mixture frozen, the attention conv trains
        assert not an.mixture_weight.requires_grad and not an.mixture_bias.requires_grad
        assert not any(p.requires_grad for p in an.attn.bn.parameters()) and an.attn.conv.weight.requires_grad
    # move the frozen statistics away from anything a batch would reproduce
    for an in ans:
        an.norm.running_mean.add_(0.1 * torch.randn_like(an.norm.running_mean) * an.norm.running_var.sqrt())
        an.norm.running_var.mul_(torch.empty_like(an.norm.running_var).uniform_(0.8, 1.25))
        an.attn.bn.running_mean.add_(0.1 * torch.randn_like(an.attn.bn.running_mean))
    x = torch.rand(3, 3, SIZE, SIZE)
    backbone.train()
    assert not any(m.training for an in ans for m in (an.norm, an.attn.bn))
    layer = body.layer2[0].bn1
    seen = {}
    # clones: an in-place ReLU follows the layer
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0].clone(), out=out.clone()))
    out_train = backbone(x)
    handle.remove()
    # the frozen layer in train mode computes the eval-mode formula: running statistics, per-instance attention
    x_in = seen['x']
    lam = layer.attn(x_in)  # its BatchNorm_K is in eval mode
    assert not torch.allclose(lam[0], lam[1], atol=1e-3) and not torch.allclose(lam[1], lam[2], atol=1e-3)
    x_hat = (x_in - layer.norm.running_mean[:, None, None]) * torch.rsqrt(layer.norm.running_var[:, None, None] + 1e-5)
    expected = x_hat * (lam @ layer.mixture_weight)[:, :, None, None] + (lam @ layer.mixture_bias)[:, :, None, None]
    torch.testing.assert_close(seen['out'], expected, rtol=1e-4, atol=1e-4)
    # no batch statistics anywhere: train == eval, each sample independent of the others, batch size 1 works
    with torch.no_grad():
        out_eval = backbone.eval()(x)
        backbone.train()
        out_single = backbone(x[1:2])
    for key in out_train:
        # float32 rounding differs (batch 1 runs other conv kernels; without autograd AN takes its folded eval
        # form), so the tolerance scales with the outputs; a batch statistic would move them by O(scale)
        scale = out_eval[key].abs().max().item()
        torch.testing.assert_close(out_train[key], out_eval[key], rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(out_single[key], out_eval[key][1:2], rtol=1e-4, atol=1e-4 * scale)
    # an optimizer step over all parameters (momentum, weight decay) changes the attention conv, nothing frozen
    before = {k: v.clone() for k, v in body.state_dict().items()}
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sum(v.square().mean() for v in backbone(x).values()).backward()
    optimizer.step()
    after = body.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert 'layer2.0.bn1.attn.conv.weight' in changed and 'layer2.0.conv1.weight' in changed
    frozen_state = {k for k in before if '.bn' in k and '.attn.conv.' not in k or k.startswith('bn1.')}
    assert frozen_state and not changed & frozen_state, sorted(changed & frozen_state)[:5]
    assert any(k.endswith('mixture_weight') for k in frozen_state)
    assert any(k.endswith('norm.running_var') for k in frozen_state)


def test_unfrozen_backbone_needs_a_batch_and_eval_mode_keeps_statistics(pretrained):
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match='batch size > 1'):  # plain AN: the attention normalizes over the batch
        an_fpn_backbone('an_resnet18_bn12', norm='train', out_channels=FPN).train()(x)
    # norm='eval' (the reference's mmdetection setting): statistics held, mixture and affine parameters train
    backbone = _backbone(pretrained, 'an_resnet18_bn12', norm='eval', trainable_layers=5).train()
    body = backbone.body
    assert type(body.bn1) is nn.BatchNorm2d and not body.bn1.training and not body.layer1[0].bn1.training
    assert body.layer3[0].bn1.mixture_weight.requires_grad and body.bn1.weight.requires_grad
    buffers = {k: v.clone() for k, v in body.named_buffers()}
    sum(v.sum() for v in backbone(x).values()).backward()  # batch 1 in train mode
    assert body.layer3[0].bn1.mixture_weight.grad.abs().sum() > 0
    assert all(torch.equal(v, buffers[k]) for k, v in body.named_buffers())


# ---------------------------------------------------------------------------------------------------------------
# AN over GroupNorm


def _an_gn_by_hand(layer, x, groups, attn_norm):
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, -1)
    x_hat = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-5))
    x_hat = x_hat.reshape(n, c, h, w)
    flat = x.reshape(n, c, -1)
    s = flat.mean(-1) / torch.sqrt(flat.var(-1, unbiased=True) + 1e-3)  # pre-norm x, unbiased variance
    z = s @ layer.attn.conv.weight.reshape(layer.num_mixtures, c).T
    if attn_norm == 'group':  # one group: normalize the K logits of each sample, then the affine
        z = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + 1e-5)
        z = z * layer.attn.norm.weight + layer.attn.norm.bias
    else:
        z = z + layer.attn.conv.bias
    lam = ((z + 3) / 6).clamp(0, 1)
    return x_hat * (lam @ layer.mixture_weight)[:, :, None, None] + (lam @ layer.mixture_bias)[:, :, None, None]


@pytest.mark.parametrize('attn_norm', ['group', 'none'])
def test_attentive_group_norm_matches_formula_float64(attn_norm):
    layer = AttentiveGroupNorm(32, num_mixtures=6, num_groups=4, attn_norm=attn_norm).double().train()
    with torch.no_grad():  # move every parameter off its init so that each one matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(3, 32, 5, 7, dtype=torch.float64) * 2 + 0.5
    out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _an_gn_by_hand(layer, x, 4, attn_norm), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.eval()(x), out, rtol=0, atol=0)  # no train / eval difference
    if attn_norm == 'group':
        assert [n for n, _ in layer.named_parameters()] == [
            'mixture_weight', 'mixture_bias', 'attn.conv.weight', 'attn.norm.weight', 'attn.norm.bias']
        assert not list(layer.buffers()) and not any(isinstance(m, nn.BatchNorm2d) for m in layer.modules())
        assert sum(p.numel() for p in layer.parameters()) == 3 * 6 * 32 + 2 * 6
    else:
        assert layer.attn.conv.bias is not None and isinstance(layer.attn.norm, nn.Identity)


def test_attentive_group_norm_batch_one_training_and_gradients():
    torch.manual_seed(0)
    layer = AttentiveGroupNorm(16, num_mixtures=4, num_groups=8).train()
    init = AttentiveGroupNorm(16, num_mixtures=4, num_groups=8)
    assert abs(init.mixture_weight.mean().item() - 1) < 0.1 and init.attn.norm.weight.eq(1).all()
    x = torch.randn(3, 16, 6, 6) * 3 + 1
    out = layer(x)
    for i in range(3):  # per sample: batch size 1 in train mode gives the sample's output from the batch
        torch.testing.assert_close(layer(x[i:i + 1]), out[i:i + 1])
    xs = x[:1].clone().requires_grad_()
    layer(xs).square().sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()), grads
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0
    # a 1x1 map (variance of one value: 0, as AN-BN) and an empty batch (heads with no RoIs) stay finite
    assert torch.isfinite(layer(torch.randn(2, 16, 1, 1))).all()
    assert layer(torch.randn(0, 16, 14, 14)).shape == (0, 16, 14, 14)
    # as a torchvision norm_layer
    block = Conv2dNormActivation(8, 32, norm_layer=AttentiveGroupNorm.norm_layer(num_mixtures=5, num_groups=16))
    assert isinstance(block[1], AttentiveGroupNorm) and block[1].num_mixtures == 5 and block[0].bias is None
    assert block(torch.randn(1, 8, 7, 7)).shape == (1, 32, 7, 7)


# ---------------------------------------------------------------------------------------------------------------
# the detectors


def test_faster_rcnn_mobilenet_backbone_train_step_and_eval(pretrained):
    torch.manual_seed(0)
    backbone = _backbone(pretrained, 'an_mobilenetv2_050')
    model = FasterRCNN(backbone, num_classes=3, **SMALL)
    images, targets = _images_and_targets(masks=False)
    losses, before, after = _train_step(model, images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    trainable, frozen = _check_step(model, losses, before, after)
    assert any(n.endswith('mixture_weight') for n in frozen)
    assert 'backbone.body.blocks.6.0.bn2.attn.conv.weight' in trainable
    assert not any(n.startswith('backbone.body.blocks.1.') for n in trainable)  # trainable_layers=3
    _check_detections(model, images, masks=False)


def test_mask_rcnn_an_backbone_and_an_gn_heads_train_step_and_eval(pretrained):
    torch.manual_seed(0)
    model = _mask_rcnn(pretrained)
    heads = {n: m for n, m in model.named_modules() if isinstance(m, AttentiveGroupNorm)}
    assert len(heads) == 6 and [m.num_mixtures for m in heads.values()] == [10, 10, 20, 20, 5, 10]
    images, targets = _images_and_targets()
    losses, before, after = _train_step(model, images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}
    trainable, frozen = _check_step(model, losses, before, after)
    for name in heads:  # every AN-GN parameter of both heads was trained
        assert {f'{name}.{p}' for p in ('mixture_weight', 'mixture_bias', 'attn.conv.weight', 'attn.norm.weight',
                                        'attn.norm.bias')} <= trainable
    assert 'backbone.body.layer4.1.bn2.mixture_weight' in frozen
    assert 'backbone.body.layer4.1.bn2.attn.conv.weight' in trainable
    _check_detections(model, images, masks=True)
    # frozen backbone norms: fine-tuning works with a single image per batch too
    losses, before, after = _train_step(model, images[:1], targets[:1])
    _check_step(model, losses, before, after)


def test_an_gn_heads_learn_from_scratch_at_batch_two(pretrained):
    """AN-GN box and mask heads, randomly initialised, fit a fixed batch of 2 images within a few steps (backbone,
    FPN and RPN fixed, so that the proposals stay put)."""
    torch.manual_seed(0)
    model = _mask_rcnn(pretrained, trainable_layers=0).train()
    model.backbone.requires_grad_(False)
    model.rpn.requires_grad_(False)
    images, targets = _images_and_targets()
    optimizer = torch.optim.SGD(model.roi_heads.parameters(), lr=0.02, momentum=0.9)
    head_losses = []
    for _ in range(8):
        losses = model(images, targets)
        head_losses.append(sum(losses[k].item() for k in ('loss_classifier', 'loss_box_reg', 'loss_mask')))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        # AN's mixture sums K hard-sigmoid-weighted affines (scale about K / 2 at init, as the reference's), so the
        # first gradients are large; the reference configs clip gradients too
        nn.utils.clip_grad_norm_(model.roi_heads.parameters(), 10.0)
        optimizer.step()
    assert all(math.isfinite(v) for v in head_losses)
    assert min(head_losses[-3:]) < 0.5 * head_losses[0], head_losses
    gate = model.roi_heads.box_head[0][1]
    rois = torch.randn(5, FPN, 7, 7)
    lam = gate.attn(rois)
    assert lam.shape == (5, 10) and not torch.allclose(lam[0], lam[1])  # per-RoI mixture weights
