#!/usr/bin/env python
"""Publish a converted weight to the Hugging Face Hub and pin it in the manifest.

    python scripts/publish.py an_resnet50.aog_e120_in1k --dir converted/ --dry-run
    HF_TOKEN=... python scripts/publish.py an_resnet50.aog_e120_in1k --dir converted/

Uploads DIR/<arch.tag>/model.safetensors (its sha256 must equal the manifest's, i.e. scripts/convert_official.py ran
first), a timm-format config.json (so ``timm.create_model('hf-hub:<repo>')`` works after ``import an_zoo``) and the
model card generated from the manifest, in one commit; then records the commit id as the entry's ``revision`` and
marks it published. ``--dry-run`` prints what would be uploaded and changes nothing. Honours HF_ENDPOINT.
"""
import argparse
import json
import sys
import tempfile
import shutil
from pathlib import Path

import timm

import an_zoo  # noqa: F401  (registers the an_* models)
from an_zoo._card import hub_config, model_card
from an_zoo._manifest import manifest_path, update_entry, weight_entry
from an_zoo.hub import hub_settings, verify_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name', help='manifest weight name, arch.tag')
    parser.add_argument('--dir', default='converted', help='folder given to convert_official.py --out')
    parser.add_argument('--dry-run', action='store_true', help='print what would be uploaded, change nothing')
    parser.add_argument('--token', help='Hub token (default: HF_TOKEN / the saved login)')
    args = parser.parse_args()

    entry = weight_entry(args.name)
    if entry is None:
        raise SystemExit(f'{args.name} is not in {manifest_path()}')
    if entry.sha256 is None:
        raise SystemExit(f'{entry.name} has no sha256 in the manifest: run scripts/convert_official.py first')
    weights = Path(args.dir) / entry.name / entry.filename
    verify_file(weights, entry.sha256, entry.size, name=entry.name)

    model = timm.create_model(entry.model, pretrained=False, pretrained_cfg=entry.tag)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        shutil.copyfile(weights, staging / entry.filename)
        (staging / 'config.json').write_text(
            json.dumps(hub_config(entry, model.pretrained_cfg, model.num_features), indent=2) + '\n')
        (staging / 'README.md').write_text(model_card(entry))
        endpoint = hub_settings()['endpoint']
        if args.dry_run:
            print(f'would create {endpoint}/{entry.hf_hub_id} and upload in one commit:')
            for f in sorted(staging.iterdir()):
                print(f'  {f.name:20s} {f.stat().st_size:>12,} bytes')
            print(f'then set {entry.name}: published=true, revision=<commit id> in {manifest_path()}')
            print('--- model card ---\n' + (staging / 'README.md').read_text())
            return 0
        from huggingface_hub import HfApi
        api = HfApi(endpoint=endpoint, token=args.token)
        api.create_repo(entry.hf_hub_id, exist_ok=True)
        commit = api.upload_folder(repo_id=entry.hf_hub_id, folder_path=str(staging),
                                   commit_message=f'an_zoo: publish {entry.name}')
    update_entry(entry.name, published=True, revision=commit.oid)
    print(f'{entry.name}: published to {endpoint}/{entry.hf_hub_id} at revision {commit.oid}; manifest updated')
    return 0


if __name__ == '__main__':
    sys.exit(main())
