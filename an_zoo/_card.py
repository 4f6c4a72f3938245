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


def _model_index(entry: WeightEntry) -> str:
    """HF ``model-index``: one result per evaluation set with reported and / or measured top-1 / top-5."""
    from .eval_sets import EVAL_SETS
    results = []
    for eval_set in EVAL_SETS.values():
        metrics = [f'      - type: {metric}\n        value: {value}\n        name: {metric} accuracy ({kind})'
                   for kind, block in (('reported', entry.reported['results']), ('measured', entry.measured))
                   for metric in ('top1', 'top5')
                   if (value := block.get(eval_set.name, {}).get(metric)) is not None]
        if metrics:
            results.append('  - task:\n      type: image-classification\n'
                           f'    dataset:\n      name: {eval_set.description}\n      type: {eval_set.name}\n'
                           '    metrics:\n' + '\n'.join(metrics))
    if not results:
        return ''
    return f'model-index:\n- name: {entry.name}\n  results:\n' + '\n'.join(results)


def _results_table(entry: WeightEntry) -> str:
    """Markdown table of the reported and measured top-1 / top-5 per evaluation set."""
    from .eval_sets import EVAL_SETS
    rows = ['| evaluation set | reported top-1 / top-5 (%) | as published | measured top-1 / top-5 (%) |',
            '|---|---|---|---|']
    for name in EVAL_SETS:
        reported = entry.reported['results'].get(name, {})
        measured = entry.measured.get(name, {})
        if not reported and not measured:
            continue
        rep = f'{reported.get("top1")} / {reported.get("top5")}' if reported else '—'
        mea = f'{measured.get("top1")} / {measured.get("top5")}' if measured else 'not yet measured'
        rows.append(f'| {name} | {rep} | {reported.get("as_published", "—")} | {mea} |')
    return '\n'.join(rows) + f'\n\nReported: {entry.reported["source"]}.'


def model_card(entry: WeightEntry) -> str:
    """The Hub model card: YAML metadata (library_name timm, license, tags, datasets, arxiv, model-index) + text."""
    lic = entry.license
    model_index = _model_index(entry)
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
        lines.append(model_index)
    aliases = (f' The same weights load into {", ".join(f"`{a}`" for a in entry.aliases)}.' if entry.aliases else '')
    lines += [
        '---', '', f'# {entry.name}', '',
        f'Attentive Normalization {entry.model} ([arXiv:1908.01259](https://arxiv.org/abs/1908.01259)), '
        f'{prov.get("recipe", "")}. Weights converted from the official release ({prov["origin_url"]}, '
        f'{prov["layout"]} layout, "{prov.get("official_name", entry.name)}") by an_zoo.{aliases}', '',
        '## Usage', '', '```python', 'import timm, an_zoo', f'model = timm.create_model("{entry.name}", pretrained=True)',
        '```', '', '## Facts', '',
        f'- parameters: {entry.num_params:,}' if entry.num_params else '- parameters: (not yet converted)',
        f'- input: {entry.data["input_size"]}, crop_pct {entry.data["crop_pct"]}, {entry.data["interpolation"]}, '
        f'mean {entry.data["mean"]}, std {entry.data["std"]}',
        f'- file: `{entry.filename}`, sha256 `{entry.sha256}`, {entry.size} bytes'
        + (f', Hub revision `{entry.revision}`' if entry.revision else ''),
        f'- official file: {prov.get("official_file")} (sha256 {prov.get("official_sha256")}), released at '
        f'{prov.get("official_url")}', '',
        '## Results', '', _results_table(entry), '',
        '## Export and precision status', '',
        _export_status(entry.model), '',
        '## License', '',
        f'{lic["name"]}: {lic["terms"]} ({lic["link"]}). Source: {lic["source"]}.', '',
    ]
    return '\n'.join(lines)


def _export_status(model: str) -> str:
    """The model's row of the measured export / precision matrix (``export_status.json``, generated by
    ``scripts/export_matrix.py``), or a line saying it is not yet measured."""
    from ._export_status import load_export_status, render_model_status
    return render_model_status(load_export_status(), model)
