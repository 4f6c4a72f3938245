#!/usr/bin/env python
"""Export an an_zoo model to ONNX (eval-mode inference graph, AN folded to ``x * a + b``), then check the file in
onnxruntime (CPU) against PyTorch on another batch size (dynamic batch axis) and print the measured max difference.

    python scripts/export.py an_resnet50 --checkpoint resnet50_an.pth.tar --output an_resnet50.onnx
    python scripts/export.py an_resnet50.aog_e120_in1k --pretrained --output an_resnet50.onnx --img-size 224
    python scripts/export.py an_mobilenetv2_100 --checkpoint w.safetensors --output m.onnx --no-dynamic-batch

``--checkpoint`` takes an official checkpoint (legacy / refactored layout) or an an_zoo ``.safetensors`` file. Without
``--checkpoint`` / ``--pretrained`` the random init is exported (a warning says so). Needs onnx, onnxruntime and
onnxscript: ``pip install "an_zoo[export]"``. Exit status 0: written and checked; 1: the check failed (the file is
kept, for inspection); 2: usage / loading errors.
"""
import argparse
import logging
import sys
from pathlib import Path

import timm

import an_zoo  # noqa: F401  (registers the models)
from an_zoo.export import (DEFAULT_OPSET, EXPORTERS, TOLERANCES, ExportCheckError, ExportGraphError, export_onnx)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', help='an_zoo model name (arch or arch.tag), e.g. an_resnet50')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--checkpoint', type=Path, help='weights file (official checkpoint or .safetensors)')
    weights.add_argument('--pretrained', action='store_true', help="the tag's published weights (Hugging Face Hub)")
    parser.add_argument('--output', '-o', type=Path, required=True, help='ONNX file to write')
    parser.add_argument('--img-size', type=int, default=None,
                        help="square input size (default: the model's pretrained_cfg input size)")
    parser.add_argument('--num-classes', type=int, default=None, help='classifier size (default: the model\'s)')
    parser.add_argument('--opset', type=int, default=None,
                        help=f'ONNX opset (default {DEFAULT_OPSET["dynamo"]}; {DEFAULT_OPSET["torchscript"]} for '
                             f'--exporter torchscript)')
    parser.add_argument('--exporter', choices=EXPORTERS, default='dynamo',
                        help='dynamo (default: folded AN graph) or torchscript (legacy, deprecated by PyTorch: '
                             'reference AN graph, not folded)')
    parser.add_argument('--no-dynamic-batch', action='store_true', help='fix the batch axis to --batch-size')
    parser.add_argument('--batch-size', type=int, default=2, help='batch size the graph is traced with (default 2)')
    parser.add_argument('--no-check', action='store_true', help='skip the onnxruntime self-check')
    parser.add_argument('--rtol', type=float, default=TOLERANCES['float32'].rtol,
                        help='check tolerance, relative to max|PyTorch output| (default %(default)g)')
    parser.add_argument('--atol', type=float, default=TOLERANCES['float32'].atol,
                        help='check tolerance, absolute (default %(default)g)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')

    kwargs = {}
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            print(f'error: checkpoint file not found: {args.checkpoint}', file=sys.stderr)
            return 2
        kwargs['pretrained_cfg_overlay'] = dict(file=str(args.checkpoint))
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained or args.checkpoint is not None, **kwargs)
    except Exception as err:  # noqa: BLE001 - unknown model, unreadable checkpoint, unpublished weights
        print(f'error: cannot create {args.model}: {type(err).__name__}: {err}', file=sys.stderr)
        return 2
    if not (args.pretrained or args.checkpoint):
        print(f'warning: {args.model}: no weights given (--checkpoint / --pretrained): exporting a random init',
              file=sys.stderr)
    model.eval()
    input_size = model.pretrained_cfg.get('input_size', (3, 224, 224))
    if args.img_size:
        input_size = (input_size[0], args.img_size, args.img_size)
    dynamic = not args.no_dynamic_batch
    try:
        result = export_onnx(model, args.output, input_size=input_size, dynamic_batch=dynamic, opset=args.opset,
                             exporter=args.exporter, check=not args.no_check, rtol=args.rtol, atol=args.atol,
                             batch_size=args.batch_size)
    except (ExportCheckError, ExportGraphError) as err:
        print(f'FAILED: {err}', file=sys.stderr)
        return 1
    except ImportError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    size = args.output.stat().st_size
    print(f'wrote {args.output} ({size / 2**20:.1f} MiB): {args.model}, input {tuple(input_size)}, '
          f'{args.exporter} exporter, opset {result.opset}, batch axis '
          f'{"dynamic" if dynamic else f"fixed at {args.batch_size}"}'
          + (f', {result.graph["an_layers"]} AN layers folded to x * a + b' if result.graph.get('folded') else ''))
    if result.max_abs_diff is None:
        print('self-check skipped (--no-check)')
    else:
        print(f'self-check: onnxruntime (CPU) vs PyTorch at batch {result.check_batch_size}: max abs diff '
              f'{result.max_abs_diff:.3e} <= tolerance {result.tolerance:.3e} (max|ref| {result.ref_max:.3g})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
