"""Mask R-CNN with an Attentive Normalization backbone and AN-over-GroupNorm heads (torchvision detectors).

What the paper's COCO setup looks like with an_zoo and torchvision, run on synthetic data so that it needs no dataset:

* backbone: an AN model from the zoo as a ``features_only`` timm model with an FPN
  (:func:`an_zoo.detection.an_fpn_backbone`),
  its norms frozen for fine-tuning at 2 images per GPU (``FrozenBatchNorm2d`` for BatchNorm, frozen-in-place AN:
  statistics and mixture fixed, attention still per image) and its first stages not trained;
* heads: torchvision's 4-conv box head and mask head with AN over GroupNorm (trained from scratch: no batch
  statistics), K = 10, 10, 20, 20 as the reference's AN-GN box head;
* a few SGD steps (gradient clipping as the reference configs), then an eval forward.

    python examples/detection.py                                   # an_resnet18_bn12, random init, CPU
    python examples/detection.py --model an_resnet50 --pretrained  # ImageNet AN weights (when available)
    python examples/detection.py --model an_mobilenetv2_100 --device cuda --image-size 512

With real data, replace ``synthetic_batch`` by a COCO loader (torchvision's ``references/detection`` scripts take any
``model``).
"""
import argparse
import time

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from an_zoo.detection import an_fpn_backbone, an_gn_box_head, an_gn_mask_head


def synthetic_batch(batch_size, size, num_classes, device, generator):
    """Noisy images with 1-3 filled rectangles each; targets as torchvision's detectors take them."""
    images, targets = [], []
    for _ in range(batch_size):
        image = torch.rand(3, size, size, generator=generator) * 0.2
        count = int(torch.randint(1, 4, (1,), generator=generator))
        boxes, labels, masks = [], [], torch.zeros(count, size, size, dtype=torch.uint8)
        for i in range(count):
            x0, y0 = (torch.rand(2, generator=generator) * size * 0.6).int().tolist()
            w, h = (torch.rand(2, generator=generator) * size * 0.3 + size * 0.1).int().tolist()
            label = int(torch.randint(1, num_classes, (1,), generator=generator))
            image[:, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=generator) * 0.5 + 0.5 * (label % 2)
            masks[i, y0:y0 + h, x0:x0 + w] = 1
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        images.append(image.to(device))
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32, device=device),
                            labels=torch.tensor(labels, device=device), masks=masks.to(device)))
    return images, targets


def build_model(args):
    backbone = an_fpn_backbone(
        args.model, pretrained=args.pretrained, trainable_layers=args.trainable_layers, norm=args.norm,
        out_channels=256)
    return MaskRCNN(
        backbone, num_classes=None, min_size=args.image_size, max_size=args.image_size,
        box_batch_size_per_image=args.rois, rpn_post_nms_top_n_train=4 * args.rois,
        box_head=an_gn_box_head(256, 7, conv_layers=(256,) * 4, fc_layers=(1024,), num_mixtures=(10, 10, 20, 20)),
        box_predictor=FastRCNNPredictor(1024, args.num_classes),
        mask_head=an_gn_mask_head(256, layers=(256,) * 4, num_mixtures=(10, 10, 20, 20)),
        mask_predictor=MaskRCNNPredictor(256, 256, args.num_classes))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='an_resnet18_bn12', help='an_zoo model (any an_resnet*, an_mobilenet*)')
    parser.add_argument('--pretrained', action='store_true', help='load the ImageNet AN weights')
    parser.add_argument('--norm', default='frozen', choices=('frozen', 'eval', 'train'),
                        help='backbone norms: frozen (FrozenBatchNorm2d semantics), eval (statistics frozen, '
                             'affine trained: the reference mmdetection setting), train')
    parser.add_argument('--trainable-layers', type=int, default=3, help='backbone stages trained, from the last')
    parser.add_argument('--num-classes', type=int, default=5, help='classes including background')
    parser.add_argument('--image-size', type=int, default=256)
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--rois', type=int, default=128, help='RoIs sampled per image for the heads (COCO: 512)')
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--lr', type=float, default=0.02 * 2 / 16, help='the 1x schedule lr scaled to the batch')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = build_model(args).to(device)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    print(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, '
          f'{sum(p.numel() for _, p in trainable) / 1e6:.1f} M trained')
    # no weight decay on norm parameters (AN mixtures included) and biases, as the reference's norm-exempt mode
    no_decay = [p for n, p in trainable if p.ndim <= 1 or n.endswith(('mixture_weight', 'mixture_bias'))]
    decay = [p for n, p in trainable if not any(p is q for q in no_decay)]
    optimizer = torch.optim.SGD([dict(params=decay, weight_decay=1e-4), dict(params=no_decay, weight_decay=0.0)],
                                lr=args.lr, momentum=0.9)

    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        images, targets = synthetic_batch(args.batch_size, args.image_size, args.num_classes, device, generator)
        start = time.perf_counter()
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)  # as the reference's detection configs
        optimizer.step()
        parts = ', '.join(f'{k[5:]} {v.item():.3f}' for k, v in losses.items())
        print(f'step {step}: loss {loss.item():.3f} ({parts}), {time.perf_counter() - start:.2f} s')

    model.eval()
    images, _ = synthetic_batch(args.batch_size, args.image_size, args.num_classes, device, generator)
    with torch.no_grad():
        detections = model(images)
    for i, d in enumerate(detections):
        top = d['scores'][:3].tolist()
        print(f'image {i}: {len(d["boxes"])} detections, masks {tuple(d["masks"].shape)}, '
              f'top scores {[round(s, 3) for s in top]}')
    if not args.pretrained:
        print('(random backbone weights: a few steps give few or no confident detections)')


if __name__ == '__main__':
    main()
