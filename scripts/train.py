#!/usr/bin/env python
"""Fine-tune or train an an_zoo (or any timm) model; see ``python -m an_zoo.train --help``.

    python scripts/train.py                                   # embedded digits default, offline
    torchrun --nproc_per_node 8 scripts/train.py --config recipes/an_resnet50.aog_e120_in1k.yaml --data-dir /imagenet
"""
from an_zoo.train import main

if __name__ == '__main__':
    main()
