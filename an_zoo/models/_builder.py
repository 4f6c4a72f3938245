"""``build_an_model``: timm's ``build_model_with_cfg`` with an_zoo's verified, safe sourcing of pretrained weights.

an_zoo resolves the weight source itself and hands timm only tensors, which timm's own ``load_pretrained`` then
adapts (classifier, first conv, features_only wrapping):
    * Hub weights (``hf_hub_id``) come through :func:`an_zoo.hub.fetch_weights`: pinned revision, local rank 0
      downloads under torchrun, clear offline errors; sha256 and size are checked on the bytes that are loaded.
    * ``file`` / ``local-dir:`` sources are read by :func:`load_checkpoint_file` (official checkpoints pickle apex
      objects, which timm's ``torch.load(weights_only=True)`` refuses) and verified whenever a hash is known: a
      folder that claims a manifest weight is verified against the manifest, whatever its config.json says.
    * Weights not on the Hub yet come from the authors' release (:func:`an_zoo.official.fetch_official`) when the
      manifest names their ``official_source`` and the user has accepted their licence.
"""
import difflib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar

import torch.nn as nn
from timm.models import build_model_with_cfg, list_models, resolve_pretrained_cfg

from .._manifest import WeightEntry, is_plain_filename, is_sha256, load_manifest, weight_entry
from ..hub import WeightsVerificationError, fetch_weights
from ._checkpoint import CheckpointError, load_checkpoint_file

_logger = logging.getLogger(__name__)

__all__ = ['build_an_model']

ModelT = TypeVar('ModelT', bound=nn.Module)

# timm only passes a cfg's ``state_dict`` source on to the filter fn; the real tensors stay out of the cfg, which
# timm deep-copies and keeps on the model.
_DEFERRED = '__an_zoo_deferred_state_dict__'


def _no_weights_error(variant: str, cfg: Dict[str, Any]) -> RuntimeError:
    name = f'{variant}.{cfg["tag"]}' if cfg.get('tag') else variant
    entry = weight_entry(name)
    if entry is not None and not entry.published:
        released = entry.provenance.get('official_url') or entry.provenance['origin_url']
        return RuntimeError(
            f'{name} is not published on the Hugging Face Hub yet. If you have the official checkpoint '
            f'("{entry.provenance.get("official_name", entry.name)}", released at {released}), load it with '
            f'timm.create_model("{variant}", pretrained=True, '
            f'pretrained_cfg_overlay=dict(file="/path/to/checkpoint.pth.tar")).')
    return RuntimeError(
        f'no pretrained weights exist for {name}. Use pretrained=False for random init, or load a checkpoint '
        f'with pretrained_cfg_overlay=dict(file="/path/to/checkpoint").')


def _check_tag(variant: str, pretrained_cfg: Any) -> None:
    """timm's 'Invalid pretrained tag' error, plus the tags that exist and the closest ones."""
    if not isinstance(pretrained_cfg, str) or not pretrained_cfg:
        return
    known = [n.partition('.')[2] for n in list_models(variant, include_tags=True) if '.' in n]
    if pretrained_cfg in known:
        return
    close = difflib.get_close_matches(pretrained_cfg, known, n=3, cutoff=0.5)
    hint = f' Did you mean {" or ".join(f"{variant}.{t}" for t in close)}?' if close else ''
    tags = ', '.join(f'{variant}.{t}' for t in known) if known else 'none (this architecture has no pretrained tags)'
    raise RuntimeError(
        f'Invalid pretrained tag ({pretrained_cfg}) for {variant}.{hint} Known: {tags}. Leave the tag out for '
        f'the default, or list them with timm.list_models("{variant}", include_tags=True).')


def _entry_for(variant: str, cfg: Dict[str, Any]) -> Optional[WeightEntry]:
    """The manifest entry a pretrained cfg refers to (by ``arch.tag`` or by Hub repo id)."""
    entry = weight_entry(f'{variant}.{cfg["tag"]}') if cfg.get('tag') else None
    if entry is None and cfg.get('hf_hub_id'):
        repo_id = cfg['hf_hub_id'].split('@')[0]
        entry = next((e for e in load_manifest() if e.hf_hub_id == repo_id), None)
    return entry


# what a weight file is expected to be: sha256, size (each None when unknown) and the name errors give it
Expected = Tuple[Optional[str], Optional[int], str]
_UNKNOWN: Expected = (None, None, '')


def _local_file_expectation(path: Path, entry: Optional[WeightEntry]) -> Expected:
    """The hash a user-supplied file must have when it claims to be a file whose hash the manifest knows."""
    if entry is not None:
        if path.name == entry.filename and entry.sha256:
            return entry.sha256, entry.size, entry.name
        if path.name == entry.provenance.get('official_file') and entry.provenance.get('official_sha256'):
            return entry.provenance['official_sha256'], None, f'{entry.name} (official file)'
    return _UNKNOWN


def _bundle_error(folder: Path, what: str) -> CheckpointError:
    return CheckpointError(f'{folder / "config.json"}: {what}. The folder is not an intact an_zoo bundle or Hub '
                           f'snapshot: create it again (python -m an_zoo bundle NAME DIR).')


def _bundle_record(folder: Path) -> Tuple[Dict[str, Any], List[str]]:
    """The ``an_zoo.weights`` record of a folder's config.json (validated) and the manifest names it claims."""
    config = folder / 'config.json'
    if not config.is_file():
        return {}, []
    try:
        raw = json.loads(config.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bundle_error(folder, f'cannot be read ({err})') from err
    if not isinstance(raw, dict):
        raise _bundle_error(folder, f'must hold a JSON object, not {type(raw).__name__}')
    block = raw.get('an_zoo', {})
    record = block.get('weights', {}) if isinstance(block, dict) else None
    if not isinstance(record, dict):
        raise _bundle_error(folder, f'"an_zoo" must be an object with a "weights" object, got {block!r}')
    name = record.get('file')
    if name is not None and not is_plain_filename(name):
        raise _bundle_error(folder, f'an_zoo.weights.file must name a file inside the folder, got {name!r}')
    if record.get('sha256') is not None and not is_sha256(record['sha256']):
        raise _bundle_error(folder, f'an_zoo.weights.sha256 must be 64 lowercase hex digits, got '
                                    f'{record["sha256"]!r}')
    size = record.get('size')
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise _bundle_error(folder, f'an_zoo.weights.size must be a positive integer, got {size!r}')
    claims = []
    if isinstance(block.get('manifest_entry'), str):
        claims.append(block['manifest_entry'])
    tag = (raw.get('pretrained_cfg') or {}).get('tag') if isinstance(raw.get('pretrained_cfg'), dict) else None
    if isinstance(raw.get('architecture'), str) and isinstance(tag, str) and tag:
        claims.append(f'{raw["architecture"]}.{tag}')
    return record, claims


def _local_dir_weights(folder: Path, entry: Optional[WeightEntry]) -> Tuple[Path, Expected]:
    """The weight file of a ``local-dir:`` folder (an ``an_zoo bundle`` or a Hub snapshot) and the hash it must
    have: the manifest's whenever the folder claims a manifest weight whose hash is known (its config.json cannot
    opt out), else the sha256 / size its config.json records."""
    record, claims = _bundle_record(folder)
    entries = {e.name: e for e in [entry, *(weight_entry(c) for c in claims)] if e is not None}
    if len(entries) > 1:
        raise _bundle_error(folder, f'it names several manifest weights ({sorted(entries)})')
    entry = next(iter(entries.values()), None)
    name = record.get('file') or next(
        (n for n in ('model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin')
         if (folder / n).is_file()), 'model.safetensors')
    path = folder / name  # a plain file name: inside the folder (symlinks, as in a Hub snapshot, are followed)
    if not path.is_file():
        raise FileNotFoundError(f'no weight file in {folder} (looked for {name})')
    if entry is not None and entry.sha256:
        if record.get('sha256') not in (None, entry.sha256):
            raise WeightsVerificationError(
                f'{folder}: config.json records sha256 {record["sha256"]} for {name}, but it is {entry.name}, whose '
                f'sha256 in the an_zoo manifest is {entry.sha256}. The folder was altered and was not loaded: '
                f'create it again (python -m an_zoo bundle {entry.name} DIR).')
        return path, (entry.sha256, entry.size, f'{entry.name} ({folder})')
    if record.get('sha256'):
        return path, (record['sha256'], record.get('size'), str(folder))
    return path, _UNKNOWN


def _read_pretrained(variant: str, cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Tensors of the weights a resolved pretrained cfg points to, or None to leave the source to timm."""
    if cfg.get('state_dict'):
        return None
    entry = _entry_for(variant, cfg)
    if cfg.get('source') == 'local-dir':
        path, (sha256, size, label) = _local_dir_weights(Path(cfg['file']), entry)
        return load_checkpoint_file(path, sha256, size, name=label)
    if cfg.get('file'):
        path = Path(cfg['file'])
        sha256, size, label = _local_file_expectation(path, entry)
        return load_checkpoint_file(path, sha256, size, name=label)
    if cfg.get('hf_hub_id'):
        if entry is not None and entry.published:
            # hashed below, on the very bytes that are loaded
            return load_checkpoint_file(fetch_weights(entry, verify=False), entry.sha256, entry.size,
                                        name=entry.name)
        repo_id, _, revision = cfg['hf_hub_id'].partition('@')
        _logger.warning(f'{repo_id} is not in the an_zoo weights manifest: its sha256 is unknown and not verified')
        return load_checkpoint_file(fetch_weights(
            repo_id=repo_id, filename=cfg.get('hf_hub_filename') or 'model.safetensors', revision=revision or None))
    if cfg.get('url'):
        return None
    if entry is not None and entry.official_source:
        # not on the Hub yet: the authors' own release, once its licence is accepted (an_zoo.licenses)
        from ..official import load_official
        path, state_dict = load_official(entry)
        cfg.update(source='official', file=str(path))  # recorded on the model: where its weights came from
        return state_dict
    raise _no_weights_error(variant, cfg)


def build_an_model(
        model_cls: Type[ModelT],
        variant: str,
        pretrained: bool = False,
        pretrained_filter_fn: Optional[Callable] = None,
        **kwargs: Any,
) -> ModelT:
    """Build ``model_cls`` for ``variant`` as timm's ``build_model_with_cfg`` does, reading weight files safely."""
    _check_tag(variant, kwargs.get('pretrained_cfg'))
    state_dict = None
    source = None
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
        ).to_dict()
        state_dict = _read_pretrained(variant, cfg)
        if state_dict is not None:
            source = cfg.get('source')
            overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
            # timm would read 'local-dir' / 'hf-hub' sources itself, ahead of a state_dict
            overlay.update(state_dict={_DEFERRED: True}, source=None)
            kwargs['pretrained_cfg_overlay'] = overlay

    def filter_fn(loaded: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        if state_dict is not None:
            loaded = state_dict
        return pretrained_filter_fn(loaded, model) if pretrained_filter_fn is not None else loaded

    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    if state_dict is not None:
        # the model's pretrained_cfg (default_cfg is the same dict) records the source, not the transient marker
        model.pretrained_cfg.pop('state_dict', None)
        if source:
            model.pretrained_cfg['source'] = source
        if source == 'official':
            model.pretrained_cfg['file'] = cfg['file']
    return model
