"""Typed, validating loader for ``weights_manifest.json``, the single source of truth for every an_zoo weight.

Model files never spell out weight facts by hand: their ``default_cfgs`` come from :func:`pretrained_cfgs`, which
merges each architecture's structural fields (``first_conv``, ``classifier``, ``pool_size``) with the manifest; the
README weights table, hubconf and the Hub model cards are generated from it too. ``AN_ZOO_MANIFEST`` points the
package at another manifest file (used by maintainers' scripts and by the tests).
"""
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ._io import write_package_data

__all__ = ['ManifestError', 'WeightEntry', 'load_manifest', 'pretrained_cfgs', 'weight_entry', 'manifest_path',
           'update_entry', 'is_sha256', 'is_plain_filename', 'is_repo_id', 'CODE_LICENSE']

# the evaluation set a weight's headline number refers to
PRIMARY_EVAL_SET = 'imagenet-1k'

PACKAGED_MANIFEST = Path(__file__).with_name('weights_manifest.json')
CODE_LICENSE = 'apache-2.0'  # license of the an_zoo code; architecture-only cfgs carry it
_TOP_REQUIRED = ('format_version', 'defaults', 'licenses', 'weights')
_DEFAULT_REQUIRED = ('paper_ids', 'input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes')
_ENTRY_REQUIRED = ('model', 'tag', 'published', 'hf_hub_id', 'revision', 'filename', 'sha256', 'size', 'num_params',
                   'license', 'provenance', 'reported', 'measured')
_PUBLISHED_REQUIRED = ('revision', 'sha256', 'size', 'num_params')
_LICENSE_REQUIRED = ('id', 'name', 'terms', 'link', 'source')
_PROVENANCE_REQUIRED = ('origin_url', 'paper_id', 'layout', 'recipe')
_DATA_FIELDS = ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes')
# matched with fullmatch: '$' alone would also accept a value with a trailing newline
_SHA256 = re.compile(r'[0-9a-f]{64}')
_COMMIT = re.compile(r'[0-9a-f]{40}')
# a Hub repo id 'owner/name': letters, digits, '-', '_', '.', neither '--' nor '..', no revision ('@...')
_REPO_PART = re.compile(r'[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?')


def is_sha256(value: Any) -> bool:
    """``value`` is a sha256 as an_zoo records it: exactly 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def is_plain_filename(value: Any) -> bool:
    """``value`` names a file directly inside a folder: no sub-folder, parent or absolute path."""
    return (isinstance(value, str) and value not in ('', '.', '..') and '/' not in value and '\\' not in value
            and '\0' not in value and value.strip() == value)


def is_repo_id(value: Any) -> bool:
    """``value`` is a Hugging Face Hub repo id ``owner/name`` (without a revision)."""
    if not isinstance(value, str) or '--' in value or '..' in value:
        return False
    parts = value.split('/')
    return len(parts) == 2 and all(_REPO_PART.fullmatch(p) for p in parts)


class ManifestError(ValueError):
    """The weights manifest is malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class WeightEntry:
    model: str
    tag: str
    published: bool
    hf_hub_id: str
    revision: Optional[str]
    filename: str
    sha256: Optional[str]
    size: Optional[int]
    num_params: Optional[int]
    license: Dict[str, str]
    provenance: Dict[str, Any]
    reported: Dict[str, Any]
    measured: Dict[str, Any]
    data: Dict[str, Any] = field(default_factory=dict)  # input_size, crop_pct, ... after defaults are applied
    aliases: Tuple[str, ...] = ()  # other architectures (same network under another name) these weights load into
    official_source: Dict[str, Any] = field(default_factory=dict)  # where the authors released the file (if known)

    @property
    def name(self) -> str:
        return f'{self.model}.{self.tag}'

    @property
    def architectures(self) -> Tuple[str, ...]:
        return (self.model,) + self.aliases

    def reported_result(self, eval_set: str = PRIMARY_EVAL_SET, metric: str = 'top1') -> Optional[float]:
        """The published ``metric`` (percent) on ``eval_set``, or None when the release gives none."""
        return self.reported['results'].get(eval_set, {}).get(metric)

    def measured_result(self, eval_set: str = PRIMARY_EVAL_SET, metric: str = 'top1') -> Optional[float]:
        """The ``metric`` an_zoo measured on ``eval_set`` (``python -m an_zoo.validate``), or None."""
        return self.measured.get(eval_set, {}).get(metric)


def manifest_path() -> Path:
    return Path(os.environ.get('AN_ZOO_MANIFEST') or PACKAGED_MANIFEST)


def _require(mapping: Any, keys: Iterable[str], where: str, path: Path) -> None:
    if not isinstance(mapping, Mapping):
        raise ManifestError(f'{path}: {where} must be an object, got {type(mapping).__name__}')
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ManifestError(f'{path}: {where} is missing required field(s) {missing}')


def _check_results(results: Any, where: str, path: Path) -> None:
    """``{eval set: {'top1': %, 'top5': %, ...}}`` over the known evaluation sets."""
    from .eval_sets import EVAL_SETS
    if not isinstance(results, Mapping):
        raise ManifestError(f'{path}: {where} must be an object keyed by evaluation set, got {type(results).__name__}')
    for eval_set, metrics in results.items():
        if eval_set not in EVAL_SETS:
            raise ManifestError(f'{path}: {where} names unknown evaluation set {eval_set!r}; known: {list(EVAL_SETS)}')
        if not isinstance(metrics, Mapping):
            raise ManifestError(f'{path}: {where}.{eval_set} must be an object, got {type(metrics).__name__}')
        for metric in ('top1', 'top5'):
            value = metrics.get(metric)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= 100):
                raise ManifestError(f'{path}: {where}.{eval_set}.{metric} must be a percentage, got {value!r}')


_SOURCE_KINDS = ('gdrive_file', 'gdrive_folder')


def _check_official_source(source: Any, where: str, path: Path, licenses: Mapping[str, Any]) -> None:
    """``{kind, id, [path], archive, config, checkpoint, license, [sha256, size], expect}``: a Drive file (a zip
    archive) or a sub-folder of a Drive folder (named after ``path``) holding ``config`` and ``checkpoint``."""
    _require(source, ('kind', 'id', 'config', 'checkpoint', 'license', 'expect'), where, path)
    if source['kind'] not in _SOURCE_KINDS:
        raise ManifestError(f'{path}: {where}.kind must be one of {_SOURCE_KINDS}, got {source["kind"]!r}')
    for key in ('id', 'config', 'checkpoint'):
        if not isinstance(source[key], str) or not source[key] or '/' in source[key] or source[key] in ('.', '..'):
            raise ManifestError(f'{path}: {where}.{key} must be a plain name, got {source[key]!r}')
    if source['kind'] == 'gdrive_folder' and not isinstance(source.get('path'), str):
        raise ManifestError(f'{path}: {where}.path (the model\'s sub-folder name) is required for a Drive folder')
    if source['kind'] == 'gdrive_file' and source.get('archive') != 'zip':
        raise ManifestError(f'{path}: {where}.archive must be "zip" for a Drive file, got {source.get("archive")!r}')
    if source['license'] not in licenses:
        raise ManifestError(f'{path}: {where}.license names {source["license"]!r}, not defined under "licenses"')
    if source.get('sha256') is not None and not is_sha256(source['sha256']):
        raise ManifestError(f'{path}: {where}.sha256 must be 64 lowercase hex digits, got {source["sha256"]!r}')
    size = source.get('size')
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ManifestError(f'{path}: {where}.size must be a positive integer, got {size!r}')
    if not isinstance(source['expect'], Mapping):
        raise ManifestError(f'{path}: {where}.expect must map config keys to values')


def _check_entry(item: Mapping[str, Any], where: str, path: Path, licenses: Mapping[str, Any]) -> None:
    _require(item, _ENTRY_REQUIRED, where, path)
    if item.get('official_source') is not None:
        _check_official_source(item['official_source'], f'{where}.official_source', path, licenses)
    aliases = item.get('aliases', [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ManifestError(f'{path}: {where}.aliases must be a list of architecture names, got {aliases!r}')
    _require(item['reported'], ('source', 'results'), f'{where}.reported', path)
    _check_results(item['reported']['results'], f'{where}.reported.results', path)
    _check_results(item['measured'], f'{where}.measured', path)
    if item['license'] not in licenses:
        raise ManifestError(f'{path}: {where} names license {item["license"]!r}, not defined under "licenses"')
    _require(item['provenance'], _PROVENANCE_REQUIRED, f'{where}.provenance', path)
    for key in ('model', 'tag'):
        if not isinstance(item[key], str) or not re.fullmatch(r'[A-Za-z0-9_]+', item[key]):
            raise ManifestError(f'{path}: {where}.{key} must be a name of letters, digits and _, got {item[key]!r}')
    if not is_repo_id(item['hf_hub_id']):
        raise ManifestError(f'{path}: {where}.hf_hub_id must be a Hub repo id "owner/name" (letters, digits, -, _, '
                            f'.; no revision: that is "revision"), got {item["hf_hub_id"]!r}')
    if not is_plain_filename(item['filename']):
        raise ManifestError(f'{path}: {where}.filename must be a plain file name (no folder), got '
                            f'{item["filename"]!r}')
    if item['sha256'] is not None and not is_sha256(item['sha256']):
        raise ManifestError(f'{path}: {where}.sha256 must be 64 lowercase hex digits, got {item["sha256"]!r}')
    if item['revision'] is not None and not (isinstance(item['revision'], str)
                                             and _COMMIT.fullmatch(item['revision'])):
        raise ManifestError(f'{path}: {where}.revision must be a full 40-hex commit id, got {item["revision"]!r}')
    for key in ('size', 'num_params'):
        if item[key] is not None and (isinstance(item[key], bool) or not isinstance(item[key], int)
                                      or item[key] <= 0):
            raise ManifestError(f'{path}: {where}.{key} must be a positive integer, got {item[key]!r}')
    if item['published']:
        empty = [k for k in _PUBLISHED_REQUIRED if item[k] is None]
        if empty:
            raise ManifestError(f'{path}: {where} is marked published but has no {empty} '
                                f'(run scripts/convert_official.py and scripts/publish.py)')


def _parse(raw: Dict[str, Any], path: Path) -> Tuple[Dict[str, Any], Tuple[WeightEntry, ...]]:
    _require(raw, _TOP_REQUIRED, 'the top level', path)
    if raw['format_version'] != 1:
        raise ManifestError(f'{path}: unsupported format_version {raw["format_version"]!r} (this an_zoo reads 1)')
    defaults = raw['defaults']
    _require(defaults, _DEFAULT_REQUIRED, '"defaults"', path)
    for key, lic in raw['licenses'].items():
        _require(lic, _LICENSE_REQUIRED, f'licenses.{key}', path)
    entries: List[WeightEntry] = []
    for i, item in enumerate(raw['weights']):
        where = f'weights[{i}] ({item.get("model", "?")}.{item.get("tag", "?")})'
        _check_entry(item, where, path, raw['licenses'])
        entry = WeightEntry(
            model=item['model'], tag=item['tag'], published=bool(item['published']), hf_hub_id=item['hf_hub_id'],
            revision=item['revision'], filename=item['filename'], sha256=item['sha256'], size=item['size'],
            num_params=item['num_params'], license=dict(raw['licenses'][item['license']]),
            provenance=dict(item['provenance']), reported=dict(item['reported']), measured=dict(item['measured']),
            data={k: item.get(k, defaults[k]) for k in _DATA_FIELDS}, aliases=tuple(item.get('aliases', ())),
            official_source=dict(item.get('official_source') or {}),
        )
        taken = {f'{arch}.{e.tag}' for e in entries for arch in e.architectures}
        if any(f'{arch}.{entry.tag}' in taken for arch in entry.architectures):
            raise ManifestError(f'{path}: {where} is listed twice (as an entry or an alias)')
        entries.append(entry)
    return defaults, tuple(entries)


@lru_cache(maxsize=None)
def _load_cached(path: str, mtime_ns: int) -> Tuple[Dict[str, Any], Tuple[WeightEntry, ...]]:
    file = Path(path)
    try:
        raw = json.loads(file.read_text(encoding='utf-8'))
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f'cannot read the weights manifest {file}: {err}') from err
    return _parse(raw, file)


def _load(path: Optional[Path]) -> Tuple[Dict[str, Any], Tuple[WeightEntry, ...]]:
    file = Path(path or manifest_path())
    try:
        mtime = file.stat().st_mtime_ns
    except OSError as err:
        raise ManifestError(f'cannot read the weights manifest {file}: {err}') from err
    return _load_cached(str(file), mtime)


def load_manifest(path: Optional[Path] = None) -> Tuple[WeightEntry, ...]:
    """All weight entries of the manifest, validated."""
    return _load(path)[1]


def weight_entry(name: str, path: Optional[Path] = None) -> Optional[WeightEntry]:
    """The manifest entry for ``'arch.tag'`` (``arch`` may be one of the entry's aliases), or None."""
    arch, _, tag = name.partition('.')
    return next((e for e in load_manifest(path) if e.tag == tag and arch in e.architectures), None)


def pretrained_cfgs(architectures: Mapping[str, Dict[str, Any]], path: Optional[Path] = None) -> Dict[str, Dict]:
    """timm ``default_cfgs`` input (``'arch.tag' -> cfg dict``) for the given architectures.

    Args:
        architectures: Architecture name -> structural cfg fields (``first_conv``, ``classifier``, ``pool_size``...).

    Every architecture gets one cfg per manifest weight (published ones carry ``hf_hub_id``, so timm counts them as
    pretrained), its aliases' weights included; an architecture without weights gets one untagged, weightless cfg so
    that ``timm.create_model`` still knows its preprocessing and head. timm makes the first tag the default: published
    weights come first, then the most accurate (reported ImageNet-1k top-1).
    """
    defaults, entries = _load(path)
    common = dict(
        input_size=tuple(defaults['input_size']), crop_pct=defaults['crop_pct'],
        interpolation=defaults['interpolation'], mean=tuple(defaults['mean']), std=tuple(defaults['std']),
        num_classes=defaults['num_classes'], paper_ids=defaults['paper_ids'], paper_name=defaults.get('paper_name'),
    )
    cfgs: Dict[str, Dict[str, Any]] = {}
    for arch, structural in architectures.items():
        arch_entries = [e for e in entries if arch in e.architectures]
        for entry in sorted(arch_entries, key=lambda e: (not e.published, -(e.reported_result() or 0.0))):
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
                cfg.update(hf_hub_id=entry.hf_hub_id, hf_hub_filename=entry.filename)
            cfgs[f'{arch}.{entry.tag}'] = cfg
        if not arch_entries:
            cfgs[arch] = dict(common, **structural, license=CODE_LICENSE,
                              origin_url='https://github.com/an-zoo/an_zoo',
                              description='architecture only: no pretrained weights')
    return cfgs


def update_entry(name: str, path: Optional[Path] = None, **fields: Any) -> WeightEntry:
    """Set top-level fields of the entry ``'arch.tag'`` (``provenance`` and ``measured``, which is keyed by evaluation
    set, are merged) and rewrite the manifest; the result is validated before anything is written."""
    # resolved: a manifest reached through a symbolic link is rewritten where it lives (an atomic replace of the
    # link would swap out the link itself and leave the real file unchanged)
    file = Path(path or manifest_path()).resolve()
    raw = json.loads(file.read_text(encoding='utf-8'))
    names = [f'{w["model"]}.{w["tag"]}' for w in raw['weights']]
    arch, _, tag = name.partition('.')
    items = [w for w in raw['weights'] if w['tag'] == tag and arch in [w['model'], *w.get('aliases', [])]]
    if not items:
        raise ManifestError(f'{file}: no entry {name!r}; known: {names}')
    for key, value in fields.items():
        if key in ('provenance', 'measured', 'official_source') and isinstance(value, Mapping):
            items[0][key] = {**items[0][key], **value}
        else:
            items[0][key] = value
    _parse(raw, file)  # refuse to write an invalid manifest
    write_package_data(file, json.dumps(raw, indent=2) + '\n')
    return weight_entry(name, file)
