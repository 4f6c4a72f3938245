#!/usr/bin/env python
"""Convert an official AN checkpoint (legacy or refactored layout) into an an_zoo safetensors file.

    python scripts/convert_official.py resnet50_an.pth.tar --model an_resnet50.aog_e120_in1k --out converted/

Loads SRC through the model's checkpoint_filter_fn (strict: every tensor mapped), writes OUT/model.safetensors in
timm naming (float32), reloads it strictly and checks that its outputs equal those of the source checkpoint (eval
and train mode, bit-exact), then records sha256, size, parameter count and the official file's name and sha256 in
the model's weights_manifest.json entry. Nothing is published: see scripts/publish.py.
"""
import argparse
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import an_zoo  # noqa: F401  (registers the an_* models)
from an_zoo._manifest import manifest_path, update_entry, weight_entry
from an_zoo.hub import sha256_file


def _outputs(model: torch.nn.Module) -> dict:
    generator = torch.Generator().manual_seed(0)
    size = model.pretrained_cfg['input_size']
    x = torch.randn(4, *size, generator=generator)
    with torch.no_grad():
        outputs = {'eval': model.eval()(x[:2])}
        torch.manual_seed(0)  # the same dropout masks for both models
        outputs['train'] = model.train()(x)
    return outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='official checkpoint (.pth / .pth.tar)')
    parser.add_argument('--model', required=True, help='manifest weight name, arch.tag')
    parser.add_argument('--out', default='converted', help='output folder (default: ./converted/<arch.tag>)')
    args = parser.parse_args()

    entry = weight_entry(args.model)
    if entry is None:
        raise SystemExit(f'{args.model} is not in {manifest_path()}: add its entry first')
    src = Path(args.src)
    out_dir = Path(args.out) / entry.name
    target = out_dir / entry.filename
    if target.exists():
        raise SystemExit(f'{target} exists: remove it or choose another --out (nothing was overwritten)')

    source_model = timm.create_model(entry.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(src)))
    state_dict = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
                  for k, v in source_model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(target), metadata={'format': 'pt', 'an_zoo_entry': entry.name})

    converted = timm.create_model(entry.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(target)))
    expected, actual = _outputs(source_model), _outputs(converted)
    for mode in expected:
        if not torch.equal(expected[mode], actual[mode]):
            target.unlink()
            raise SystemExit(f'converted weights differ from the source in {mode} mode; nothing was recorded')

    sha256, size = sha256_file(target), target.stat().st_size
    num_params = sum(p.numel() for p in converted.parameters())
    update_entry(entry.name, sha256=sha256, size=size, num_params=num_params,
                 provenance=dict(official_file=src.name, official_sha256=sha256_file(src)))
    print(f'{entry.name}: wrote {target} ({size:,} bytes, sha256 {sha256}, {num_params:,} parameters); outputs equal '
          f'the source checkpoint in eval and train mode; manifest {manifest_path()} updated')
    return 0


if __name__ == '__main__':
    sys.exit(main())
