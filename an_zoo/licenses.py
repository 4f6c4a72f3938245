"""Accepting the licence of the official weights, once per licence, as gated Hugging Face models do it.

The official Attentive Normalization weights are released for research and non-commercial use only. an_zoo
downloads them from their official source only after the user has accepted that licence, in one of three ways:

    AN_ZOO_ACCEPT_LICENSE=aognet-v2,ivmcl-release            # environment (this process and its children)
    an_zoo.accept_license('aognet-v2')                       # API: remembered in the an_zoo cache
    python -m an_zoo download an_resnet50 --accept-license   # CLI: remembered in the an_zoo cache

The keys are those of the weights manifest's ``licenses`` block (:func:`known_licenses`).
"""
import json
import os
from typing import Dict, List

from ._io import atomic_write_text
from ._manifest import WeightEntry, load_manifest
from .hub import an_zoo_cache_dir

__all__ = ['LicenseNotAcceptedError', 'accept_license', 'accepted_licenses', 'require_license', 'known_licenses']

ENV_VAR = 'AN_ZOO_ACCEPT_LICENSE'
_FILE = 'accepted_licenses.json'


class LicenseNotAcceptedError(PermissionError):
    """The weights' licence has not been accepted; the message names it, links it and says how to accept it."""


def known_licenses() -> Dict[str, Dict[str, str]]:
    """The licences of the weights manifest, by key."""
    return {e.official_source['license']: e.license for e in load_manifest() if e.official_source}


def _remembered() -> Dict[str, str]:
    path = an_zoo_cache_dir() / _FILE
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise RuntimeError(f'cannot read the accepted licences {path}: {err}. Fix or delete the file, then accept '
                           f'again.') from err
    return {str(k): str(v) for k, v in data.get('accepted', {}).items()} if isinstance(data, dict) else {}


def accepted_licenses() -> List[str]:
    """Keys of the licences accepted through ``AN_ZOO_ACCEPT_LICENSE`` or remembered in the an_zoo cache."""
    from_env = [k.strip() for k in os.environ.get(ENV_VAR, '').split(',') if k.strip()]
    return sorted(set(from_env) | set(_remembered()))


def accept_license(key: str) -> None:
    """Accept the licence ``key`` (e.g. ``'aognet-v2'``) and remember it in the an_zoo cache."""
    from datetime import datetime, timezone
    licenses = known_licenses()
    if key not in licenses:
        raise ValueError(f'unknown licence {key!r}; the weights manifest knows {sorted(licenses)}')
    accepted = _remembered()
    accepted[key] = datetime.now(timezone.utc).isoformat(timespec='seconds')
    path = an_zoo_cache_dir() / _FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({'accepted': accepted}, indent=2) + '\n')


def require_license(entry: WeightEntry) -> None:
    """Raise :class:`LicenseNotAcceptedError` unless the licence of ``entry``'s official weights is accepted."""
    key = entry.official_source['license']
    if key in accepted_licenses():
        return
    lic = entry.license
    raise LicenseNotAcceptedError(
        f'{entry.name} is not on the Hugging Face Hub; its official weights are under the {lic["name"]} '
        f'({lic["terms"]}: {lic["link"]}). Read it, then accept it once to let an_zoo download them from the official '
        f'source: set {ENV_VAR}={key}, or call an_zoo.accept_license("{key}"), or run '
        f'`python -m an_zoo download {entry.name} --accept-license`. If you have the official file, load it with '
        f'timm.create_model("{entry.model}", pretrained=True, pretrained_cfg_overlay=dict(file="/path/to/file")).')
