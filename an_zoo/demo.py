"""Offline demo: build an AN model, load a local checkpoint through timm, classify real photos.

    python -m an_zoo.demo                                      # random weights, written and reloaded locally
    python -m an_zoo.demo --checkpoint resnet50_an.pth.tar     # an official AN-ResNet-50 checkpoint you have

The photos are the two sample images that ship inside scikit-learn (``pip install "an_zoo[demo]"``); no network
access is needed. With random weights the predicted classes mean nothing: the demo shows the loading and
preprocessing path. With an official checkpoint the predictions are the real model's.
"""
import argparse
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import an_zoo  # noqa: F401  (registers the an_* models)


def sample_images() -> List[Tuple[str, Image.Image]]:
    """The photos bundled with scikit-learn (a Chinese temple and a flower)."""
    try:
        from sklearn.datasets import load_sample_image
    except ImportError as err:
        raise SystemExit('the demo photos come with scikit-learn: pip install "an_zoo[demo]"') from err
    return [(name, Image.fromarray(load_sample_image(name))) for name in ('china.jpg', 'flower.jpg')]


def features_model(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The ``features_only`` variant of ``model`` with its weights. The classifier (named by the model's
    ``pretrained_cfg``) and head layers after the last feature stage (e.g. MobileNet's ``conv_head``) have no place in
    it; every weight the feature net does have must come from ``model``."""
    features = timm.create_model(name, features_only=True)
    classifier = model.pretrained_cfg.get('classifier') or ()
    prefixes = tuple(f'{c}.' for c in ((classifier,) if isinstance(classifier, str) else classifier))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    missing = features.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise RuntimeError(f'the features_only {name} has weights the classifier model lacks: {missing[:5]}')
    return features


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='an_resnet50', help='an_* model name (default: an_resnet50)')
    parser.add_argument('--checkpoint', help='official or an_zoo checkpoint (.pth/.pth.tar/.safetensors)')
    parser.add_argument('--image', action='append', help='image file(s) to classify instead of the samples')
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            # stand-in for a downloaded checkpoint: random weights written to a local file
            checkpoint = str(Path(tmp) / f'{args.model}.safetensors')
            save_file(timm.create_model(args.model).state_dict(), checkpoint)
            print(f'no --checkpoint given: wrote random {args.model} weights to a local file (predictions are '
                  f'meaningless; pass --checkpoint with an official file for real ones)')
        start = time.perf_counter()
        model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint)).eval()
        print(f'loaded {args.model} from {checkpoint} in {time.perf_counter() - start:.2f}s: '
              f'{sum(p.numel() for p in model.parameters()):,} parameters, '
              f'{sum(isinstance(m, an_zoo.AttentiveBatchNorm2d) for m in model.modules())} AN layers')

    config = resolve_data_config(model=model)
    transform = create_transform(**config)
    print(f'preprocessing from the pretrained_cfg: {config}')
    images = [(p, Image.open(p).convert('RGB')) for p in args.image] if args.image else sample_images()
    batch = torch.stack([transform(image) for _, image in images])
    info = ImageNetInfo()
    with torch.no_grad():
        probs = model(batch).softmax(dim=-1)
        features = features_model(model, args.model)
        pyramid = features.eval()(batch)
    for (name, image), p in zip(images, probs):
        top = p.topk(3)
        labels = ', '.join(f'{info.index_to_description(int(i))} ({float(v):.1%})' for v, i in zip(*top))
        print(f'{name} ({image.width}x{image.height}): {labels}')
    print('features_only pyramid: ' + ', '.join(f'{tuple(f.shape[1:])}' for f in pyramid))


if __name__ == '__main__':
    main()
