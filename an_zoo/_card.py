"""Hub artefacts generated from a manifest entry: timm-format ``config.json`` and the model card (``README.md``)."""
import json
from typing import Any, Dict, Optional

from ._manifest import WeightEntry

__all__ = ['hub_config', 'model_card']

# pretrained_cfg fields worth shipping with the weights (all are timm PretrainedCfg fields)
_CFG_FIELDS = ('tag', 'input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std', 'num_classes',
               'pool_size', 'first_conv', 'classifier', 'license', 'description', 'origin_url', 'paper_name',
               'paper_ids', 'notes')


def hub_config(entry: WeightEntry, pretrained_cfg: Dict[str, Any], num_features: int,
               sha256: Optional[str] = None, size: Optional[int] = None) -> Dict[str, Any]:
    """timm's Hub ``config.json`` (so ``timm.create_model('hf-hub:<repo>')`` / ``'local-dir:<folder>'`` work after
    ``import an_zoo``), plus an ``an_zoo`` block with the weight file's hash that an_zoo verifies before loading."""
    cfg = {k: pretrained_cfg[k] for k in _CFG_FIELDS if pretrained_cfg.get(k) is not None}
    cfg['tag'] = entry.tag
    return {
        'architecture': entry.model,
        'num_classes': entry.data['num_classes'],
        'num_features': num_features,
        'pretrained_cfg': json.loads(json.dumps(cfg)),  # tuples -> lists, as timm writes them
        'an_zoo': {
            'manifest_entry': entry.name,
            'weights': {'file': entry.filename, 'sha256': sha256 or entry.sha256, 'size': size or entry.size},
        },
    }


def model_card(entry: WeightEntry) -> str:
    """The Hub model card: YAML metadata (library_name timm, license, tags, datasets, arxiv, model-index) + text."""
    lic = entry.license
    top1 = entry.reported.get('top1')
    metrics = [f'      - type: top1\n        value: {top1}\n        name: top-1 accuracy (reported)'] if top1 else []
    measured = entry.measured
    if measured.get('top1') is not None:
        metrics.append(f'      - type: top1\n        value: {measured["top1"]}\n        name: top-1 accuracy (measured)')
    model_index = ''
    if metrics:
        model_index = (
            'model-index:\n'
            f'- name: {entry.name}\n'
            '  results:\n'
            '  - task:\n      type: image-classification\n'
            f'    dataset:\n      name: ImageNet-1k (val)\n      type: {entry.reported.get("dataset", "imagenet-1k")}\n'
            '    metrics:\n' + '\n'.join(metrics) + '\n')
    license_yaml = f'license: {lic["id"]}\n'
    if lic['id'] == 'other':
        license_yaml += f'license_name: {lic["name"].lower().replace(" ", "-")}\nlicense_link: {lic["link"]}\n'
    prov = entry.provenance
    lines = [
        '---', 'library_name: timm', license_yaml.rstrip('\n'),
        'tags:', '- image-classification', '- timm', '- an_zoo', '- attentive-normalization',
        'datasets:', '- imagenet-1k', f'arxiv: {prov["paper_id"].split(":")[-1]}', 'pipeline_tag: image-classification',
    ]
    if model_index:
        lines.append(model_index.rstrip('\n'))
    lines += [
        '---', '', f'# {entry.name}', '',
        f'Attentive Normalization {entry.model} ([arXiv:1908.01259](https://arxiv.org/abs/1908.01259)), '
        f'{prov.get("recipe", "")}. Weights converted from the official release ({prov["origin_url"]}, '
        f'{prov["layout"]} layout) by an_zoo.', '',
        '## Usage', '', '```python', 'import timm, an_zoo', f'model = timm.create_model("{entry.name}", pretrained=True)',
        '```', '', '## Facts', '',
        f'- parameters: {entry.num_params:,}' if entry.num_params else '- parameters: (not yet converted)',
        f'- input: {entry.data["input_size"]}, crop_pct {entry.data["crop_pct"]}, {entry.data["interpolation"]}, '
        f'mean {entry.data["mean"]}, std {entry.data["std"]}',
        f'- file: `{entry.filename}`, sha256 `{entry.sha256}`, {entry.size} bytes'
        + (f', Hub revision `{entry.revision}`' if entry.revision else ''),
        f'- reported top-1: {top1} ({entry.reported.get("source", "")})',
        f'- measured: {json.dumps(measured) if measured else "not yet measured"}',
        f'- official file: {prov.get("official_file")} (sha256 {prov.get("official_sha256")})', '',
        '## License', '',
        f'{lic["name"]}: {lic["terms"]} ({lic["link"]}). Source: {lic["source"]}.', '',
    ]
    return '\n'.join(lines)
