#!/usr/bin/env python
"""Top-1 / top-5 / loss of an an_zoo model on an ImageFolder; see ``python -m an_zoo.validate --help``.

    python scripts/validate.py /data/imagenet/val --checkpoint resnet50_an.pth.tar \\
        --update-manifest an_resnet50.aog_e120_in1k
"""
import sys

from an_zoo.validate import main

if __name__ == '__main__':
    sys.exit(main())
