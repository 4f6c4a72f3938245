"""``build_an_model``: timm's ``build_model_with_cfg`` with an_zoo's verified, safe sourcing of pretrained weights.

an_zoo resolves the weight source itself and hands timm only tensors, which timm's own ``load_pretrained`` then
adapts (classifier, first conv, features_only wrapping):
    * Hub weights (``hf_hub_id``) come through :func:`an_zoo.hub.fetch_weights`: pinned revision, sha256 and size
      checked before loading, local rank 0 downloads under torchrun, clear offline errors.
    * ``file`` / ``local-dir:`` sources are read by :func:`load_checkpoint_file` (official checkpoints pickle apex
      objects, which timm's ``torch.load(weights_only=True)`` refuses) and verified whenever a hash is known.
    * Weights not on the Hub yet come from the authors' release (:func:`an_zoo.official.fetch_official`) when the
      manifest names their ``official_source`` and the user has accepted their licence.
"""
import difflib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Type, TypeVar

import torch.nn as nn
from timm.models import build_model_with_cfg, list_models, resolve_pretrained_cfg

from .._manifest import WeightEntry, load_manifest, weight_entry
from ..hub import fetch_weights, verify_file
from ._checkpoint import load_checkpoint_file

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


def _verified_local_file(path: Path, entry: Optional[WeightEntry]) -> Path:
    """Verify a user-supplied file when it claims to be a file whose hash the manifest knows."""
    if entry is not None:
        if path.name == entry.filename and entry.sha256:
            verify_file(path, entry.sha256, entry.size, name=entry.name)
        elif path.name == entry.provenance.get('official_file') and entry.provenance.get('official_sha256'):
            verify_file(path, entry.provenance['official_sha256'], name=f'{entry.name} (official file)')
    return path


def _local_dir_weights(folder: Path) -> Path:
    """The weight file of a ``local-dir:`` folder (an ``an_zoo bundle`` or a Hub snapshot), verified against the
    sha256 / size its config.json records."""
    config = folder / 'config.json'
    record = {}
    if config.is_file():
        record = json.loads(config.read_text()).get('an_zoo', {}).get('weights', {})
    name = record.get('file') or next(
        (n for n in ('model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin')
         if (folder / n).is_file()), 'model.safetensors')
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f'no weight file in {folder} (looked for {name})')
    if record.get('sha256'):
        verify_file(path, record['sha256'], record.get('size'), name=str(folder))
    return path


def _read_pretrained(variant: str, cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Tensors of the weights a resolved pretrained cfg points to, or None to leave the source to timm."""
    if cfg.get('state_dict'):
        return None
    entry = _entry_for(variant, cfg)
    if cfg.get('source') == 'local-dir':
        return load_checkpoint_file(_local_dir_weights(Path(cfg['file'])))
    if cfg.get('file'):
        return load_checkpoint_file(_verified_local_file(Path(cfg['file']), entry))
    if cfg.get('hf_hub_id'):
        if entry is not None and entry.published:
            return load_checkpoint_file(fetch_weights(entry))
        repo_id, _, revision = cfg['hf_hub_id'].partition('@')
        _logger.warning(f'{repo_id} is not in the an_zoo weights manifest: its sha256 is unknown and not verified')
        return load_checkpoint_file(fetch_weights(
            repo_id=repo_id, filename=cfg.get('hf_hub_filename') or 'model.safetensors', revision=revision or None))
    if cfg.get('url'):
        return None
    if entry is not None and entry.official_source:
        # not on the Hub yet: the authors' own release, once its licence is accepted (an_zoo.licenses)
        from ..official import fetch_official
        path = fetch_official(entry)
        cfg.update(source='official', file=str(path))  # recorded on the model: where its weights came from
        return load_checkpoint_file(path)
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
