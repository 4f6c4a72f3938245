"""``build_an_model``: timm's ``build_model_with_cfg`` with an_zoo's safe reading of pretrained weight files.

timm reads a ``pretrained_cfg`` ``file`` with ``torch.load(weights_only=True)``, which refuses official AN
checkpoints (they pickle apex objects). Here such a file is read by :func:`load_checkpoint_file` first, and the
tensors are handed to timm's own ``load_pretrained`` (head / first-conv adaptation, features_only wrapping, ...).
"""
from typing import Any, Callable, Dict, Optional, Type, TypeVar

import torch.nn as nn
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg

from .._manifest import weight_entry
from ._checkpoint import load_checkpoint_file

__all__ = ['build_an_model']

ModelT = TypeVar('ModelT', bound=nn.Module)

# timm only passes a cfg's ``state_dict`` source on to the filter fn; the real tensors stay out of the cfg, which
# timm deep-copies and keeps on the model.
_DEFERRED = '__an_zoo_deferred_state_dict__'


def _no_weights_error(variant: str, cfg: Dict[str, Any]) -> RuntimeError:
    name = f'{variant}.{cfg["tag"]}' if cfg.get('tag') else variant
    entry = weight_entry(name)
    if entry is not None and not entry.published:
        return RuntimeError(
            f'{name} is not published on the Hugging Face Hub yet. If you have the official checkpoint '
            f'({entry.provenance["origin_url"]}), load it with timm.create_model("{variant}", pretrained=True, '
            f'pretrained_cfg_overlay=dict(file="/path/to/checkpoint.pth.tar")).')
    return RuntimeError(
        f'no pretrained weights exist for {name}. Use pretrained=False for random init, or load a checkpoint '
        f'with pretrained_cfg_overlay=dict(file="/path/to/checkpoint").')


def build_an_model(
        model_cls: Type[ModelT],
        variant: str,
        pretrained: bool = False,
        pretrained_filter_fn: Optional[Callable] = None,
        **kwargs: Any,
) -> ModelT:
    """Build ``model_cls`` for ``variant`` as timm's ``build_model_with_cfg`` does, reading weight files safely."""
    state_dict = None
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
        ).to_dict()
        if cfg.get('file') and not cfg.get('state_dict') and cfg.get('source') != 'local-dir':
            state_dict = load_checkpoint_file(cfg['file'])
            overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
            overlay['state_dict'] = {_DEFERRED: True}
            kwargs['pretrained_cfg_overlay'] = overlay
        elif not (cfg.get('state_dict') or cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url')):
            raise _no_weights_error(variant, cfg)

    def filter_fn(source: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        if state_dict is not None:
            source = state_dict
        return pretrained_filter_fn(source, model) if pretrained_filter_fn is not None else source

    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    if state_dict is not None:
        # the model's pretrained_cfg (default_cfg is the same dict) records the 'file', not the transient marker
        model.pretrained_cfg.pop('state_dict', None)
    return model
