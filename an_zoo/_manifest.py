"""Typed loader for ``weights_manifest.json``, the single source of truth for every an_zoo weight.

Model files never spell out weight facts by hand: their ``default_cfgs`` come from :func:`pretrained_cfgs`, which
merges each architecture's structural fields (``first_conv``, ``classifier``, ``pool_size``) with the manifest.
"""
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

__all__ = ['ManifestError', 'WeightEntry', 'load_manifest', 'pretrained_cfgs', 'MANIFEST_PATH', 'CODE_LICENSE']

MANIFEST_PATH = Path(__file__).with_name('weights_manifest.json')
CODE_LICENSE = 'apache-2.0'  # license of the an_zoo code; architecture-only cfgs carry it
_ENTRY_REQUIRED = ('model', 'tag', 'published', 'license', 'provenance', 'reported', 'measured')
_DEFAULT_REQUIRED = ('hub_org', 'paper_ids', 'input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes')


class ManifestError(ValueError):
    """The weights manifest is malformed; the message names the entry and the field."""


@dataclass(frozen=True)
class WeightEntry:
    model: str
    tag: str
    published: bool
    license: Dict[str, str]
    provenance: Dict[str, Any]
    reported: Dict[str, Any]
    measured: Dict[str, Any]
    data: Dict[str, Any] = field(default_factory=dict)  # input_size, crop_pct, ... after defaults are applied
    hf_hub_id: Optional[str] = None

    @property
    def name(self) -> str:
        return f'{self.model}.{self.tag}'


def _require(mapping: Mapping[str, Any], keys: Iterable[str], where: str, path: Path) -> None:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ManifestError(f'{path}: {where} is missing required field(s) {missing}')


def _parse(raw: Dict[str, Any], path: Path) -> Tuple[WeightEntry, ...]:
    _require(raw, ('format_version', 'defaults', 'licenses', 'weights'), 'the top level', path)
    if raw['format_version'] != 1:
        raise ManifestError(f'{path}: unsupported format_version {raw["format_version"]!r} (this an_zoo reads 1)')
    defaults = raw['defaults']
    _require(defaults, _DEFAULT_REQUIRED, '"defaults"', path)
    entries: List[WeightEntry] = []
    seen = set()
    for i, item in enumerate(raw['weights']):
        where = f'weights[{i}] ({item.get("model", "?")}.{item.get("tag", "?")})'
        _require(item, _ENTRY_REQUIRED, where, path)
        license_key = item['license']
        if license_key not in raw['licenses']:
            raise ManifestError(f'{path}: {where} names license {license_key!r}, not defined under "licenses"')
        _require(item['provenance'], ('origin_url',), f'{where}.provenance', path)
        data = {k: item.get(k, defaults.get(k)) for k in
                ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes')}
        entry = WeightEntry(
            model=item['model'],
            tag=item['tag'],
            published=bool(item['published']),
            license=dict(raw['licenses'][license_key]),
            provenance=dict(item['provenance']),
            reported=dict(item['reported']),
            measured=dict(item['measured']),
            data=data,
            hf_hub_id=item.get('hf_hub_id') or f'{defaults["hub_org"]}/{item["model"]}.{item["tag"]}',
        )
        if entry.name in seen:
            raise ManifestError(f'{path}: {where} is listed twice')
        seen.add(entry.name)
        entries.append(entry)
    return tuple(entries)


@lru_cache(maxsize=None)
def _load_cached(path: str) -> Tuple[Dict[str, Any], Tuple[WeightEntry, ...]]:
    file = Path(path)
    try:
        raw = json.loads(file.read_text(encoding='utf-8'))
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f'cannot read the weights manifest {file}: {err}') from err
    return raw['defaults'], _parse(raw, file)


def load_manifest(path: Optional[Path] = None) -> Tuple[WeightEntry, ...]:
    """All weight entries of the manifest, validated."""
    return _load_cached(str(path or MANIFEST_PATH))[1]


def pretrained_cfgs(architectures: Mapping[str, Dict[str, Any]], path: Optional[Path] = None) -> Dict[str, Dict]:
    """timm ``default_cfgs`` input (``'arch.tag' -> cfg dict``) for the given architectures.

    Args:
        architectures: Architecture name -> structural cfg fields (``first_conv``, ``classifier``, ``pool_size``...).

    Every architecture gets one cfg per manifest weight; an architecture without weights gets a single untagged,
    weightless cfg so that ``timm.create_model`` still knows its preprocessing and head.
    """
    defaults, entries = _load_cached(str(path or MANIFEST_PATH))
    common = dict(
        input_size=tuple(defaults['input_size']), crop_pct=defaults['crop_pct'],
        interpolation=defaults['interpolation'], mean=tuple(defaults['mean']), std=tuple(defaults['std']),
        num_classes=defaults['num_classes'], paper_ids=defaults['paper_ids'], paper_name=defaults.get('paper_name'),
    )
    cfgs: Dict[str, Dict[str, Any]] = {}
    for arch, structural in architectures.items():
        arch_entries = [e for e in entries if e.model == arch]
        for entry in arch_entries:
            cfg = dict(common, **structural)
            cfg.update(
                input_size=tuple(entry.data['input_size']), crop_pct=entry.data['crop_pct'],
                interpolation=entry.data['interpolation'], mean=tuple(entry.data['mean']),
                std=tuple(entry.data['std']), num_classes=entry.data['num_classes'],
                license=entry.license['id'],
                origin_url=entry.provenance['origin_url'],
                description=entry.provenance.get('recipe'),
                notes=(f'weights license: {entry.license["name"]}, {entry.license["terms"]} '
                       f'({entry.license["link"]})',),
            )
            if entry.published:
                cfg['hf_hub_id'] = entry.hf_hub_id
            cfgs[entry.name] = cfg
        if not arch_entries:
            cfgs[arch] = dict(common, **structural, license=CODE_LICENSE,
                              origin_url='https://github.com/an-zoo/an_zoo',
                              description='architecture only: no pretrained weights')
    return cfgs


def weight_entry(name: str, path: Optional[Path] = None) -> Optional[WeightEntry]:
    """The manifest entry for ``'arch.tag'``, or None."""
    for entry in load_manifest(path):
        if entry.name == name:
            return entry
    return None
