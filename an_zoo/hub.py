"""Verified weight downloads from the Hugging Face Hub (and verified local folders).

Every published weight in ``weights_manifest.json`` pins a Hub repo, a commit (``revision``), a file, its sha256
and its size. :func:`fetch_weights` downloads through ``huggingface_hub`` (its cache, ``HF_HOME`` /
``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``) and checks size and sha256 BEFORE anything is loaded; a
mismatch is an error naming the file and both hashes, and the file is neither loaded nor deleted. Loading hashes the
bytes it deserialises (:func:`read_verified`: one read), so the verified file is the loaded one. Environment
variables are read at call time, so setting them after ``import an_zoo`` works.
"""
import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ._manifest import WeightEntry

__all__ = ['WeightsVerificationError', 'WeightsUnavailableError', 'sha256_file', 'verify_file', 'read_verified',
           'fetch_weights', 'hub_settings', 'an_zoo_cache_dir']

_CHUNK = 1 << 20


class WeightsVerificationError(RuntimeError):
    """A weight file does not match the size / sha256 the manifest records for it."""


class WeightsUnavailableError(RuntimeError):
    """Weights cannot be obtained (offline with nothing cached, unknown repo or revision, network error)."""


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _size_error(path: Path, label: str, actual: int, size: int, name: str) -> WeightsVerificationError:
    return WeightsVerificationError(
        f'{path}{label} has {actual} bytes, expected {size}: the file is truncated or corrupt and was not loaded. '
        f'Delete it and download again (python -m an_zoo download {name or "<model>"}).')


def _hash_error(path: Path, label: str, actual: str, sha256: str, name: str) -> WeightsVerificationError:
    return WeightsVerificationError(
        f'sha256 mismatch{label}: {path} has sha256 {actual}, expected {sha256}. The file was not loaded. '
        f'Delete it and download again (python -m an_zoo download {name or "<model>"}).')


def verify_file(path: Union[str, Path], sha256: Optional[str], size: Optional[int] = None, name: str = '') -> Path:
    """Check ``path`` against the expected size and sha256 (each skipped when None); return the path.

    To load a file, use :func:`read_verified` (or ``load_checkpoint_file(path, sha256, size)``) instead: it checks
    the very bytes that are then deserialised.

    Raises:
        WeightsVerificationError: naming the file, what was expected and what was found. The file is left in
            place (it may be the user's) and must not be loaded.
    """
    path = Path(path)
    label = f' for {name}' if name else ''
    if size is not None and path.stat().st_size != size:
        raise _size_error(path, label, path.stat().st_size, size, name)
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise _hash_error(path, label, actual, sha256, name)
    return path


def read_verified(path: Union[str, Path], sha256: Optional[str] = None, size: Optional[int] = None,
                  name: str = '') -> bytes:
    """The bytes of ``path``, read once and checked against the expected size and sha256 (each skipped when None):
    the caller deserialises exactly the bytes that were verified, whatever happens to the file meanwhile.

    Raises:
        WeightsVerificationError: as :func:`verify_file`; the file is left in place.
    """
    path = Path(path)
    label = f' for {name}' if name else ''
    with open(path, 'rb') as file:
        on_disk = os.fstat(file.fileno()).st_size
        if size is not None and on_disk != size:  # before reading: a wrong file may be huge
            raise _size_error(path, label, on_disk, size, name)
        data = file.read()
    if size is not None and len(data) != size:  # changed while it was read
        raise _size_error(path, label, len(data), size, name)
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            raise _hash_error(path, label, actual, sha256, name)
    return data


def hub_settings() -> Dict[str, Any]:
    """The huggingface_hub settings in force now (read from the environment at call time)."""
    from huggingface_hub import constants
    env = os.environ
    offline = env.get('HF_HUB_OFFLINE', '').strip().upper() in {'1', 'ON', 'YES', 'TRUE'}
    if 'HF_HUB_CACHE' in env:
        cache_dir = env['HF_HUB_CACHE']
    elif 'HF_HOME' in env:
        cache_dir = os.path.join(env['HF_HOME'], 'hub')
    else:
        cache_dir = constants.HF_HUB_CACHE
    endpoint = env.get('HF_ENDPOINT', constants.ENDPOINT).rstrip('/')
    return dict(offline=offline or bool(getattr(constants, 'HF_HUB_OFFLINE', False)), cache_dir=cache_dir,
                endpoint=endpoint)


def an_zoo_cache_dir() -> Path:
    """an_zoo's own cache (official-source downloads, their lock files, accepted licences): ``AN_ZOO_CACHE``, else
    ``an_zoo/`` next to the Hugging Face cache (``HF_HOME``, default ``~/.cache/huggingface``); read at call time."""
    if os.environ.get('AN_ZOO_CACHE'):
        return Path(os.environ['AN_ZOO_CACHE']).expanduser()
    from huggingface_hub import constants
    return Path(os.environ.get('HF_HOME') or constants.HF_HOME).expanduser() / 'an_zoo'


def _local_rank_zero_first(fn):
    """Run ``fn`` on local rank 0 first and on the other ranks after a barrier (they then hit the cache)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn(local_only=False)
    local_rank = int(os.environ.get('LOCAL_RANK', dist.get_rank()))
    result = error = None
    if local_rank == 0:
        try:
            result = fn(local_only=False)
        except Exception as err:  # the others must still pass the barrier
            error = err
    dist.barrier()
    if error is not None:
        raise error
    return result if local_rank == 0 else fn(local_only=True)


def fetch_weights(
        entry: Optional[WeightEntry] = None,
        *,
        repo_id: Optional[str] = None,
        filename: str = 'model.safetensors',
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        verify: bool = True,
) -> Path:
    """Path of a verified local copy of a weight file, downloaded into the Hugging Face cache if needed.

    Args:
        entry: A manifest entry (repo, pinned revision, file, sha256, size). Alternatively ``repo_id`` /
            ``filename`` / ``revision`` for a repo outside the manifest (then nothing is known to verify against).
        cache_dir: Overrides ``HF_HUB_CACHE`` / ``HF_HOME``.
        verify: Hash the file against ``entry`` here. A caller that loads it passes False and verifies the bytes it
            loads instead (``load_checkpoint_file(path, entry.sha256, entry.size)``), so the file is read once.

    Under ``torch.distributed`` only local rank 0 downloads; the other ranks wait and read the cache.

    Raises:
        WeightsUnavailableError: offline with nothing cached, repo / revision / file not found, network failure.
        WeightsVerificationError: the file does not match the manifest (never loaded).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    from . import __version__

    if entry is not None:
        repo_id, filename, revision = entry.hf_hub_id, entry.filename, entry.revision
    if repo_id is None:
        raise ValueError('fetch_weights needs a manifest entry or a repo_id')
    settings = hub_settings()
    cache_dir = str(cache_dir or settings['cache_dir'])
    name = entry.name if entry is not None else repo_id

    def download(local_only: bool) -> str:
        return hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, endpoint=settings['endpoint'],
            local_files_only=local_only or settings['offline'], library_name='an_zoo', library_version=__version__)

    try:
        path = _local_rank_zero_first(download)
    except LocalEntryNotFoundError as err:  # first: it subclasses EntryNotFoundError in huggingface_hub 2.x
        how = ('HF_HUB_OFFLINE is set' if settings['offline'] else f'{settings["endpoint"]} could not be reached')
        fill = (f'run `python -m an_zoo download {name}` with the same HF_HOME (or `python -m an_zoo bundle {name} '
                f'DIR` and copy DIR)' if entry is not None else
                f'download it into the same cache (huggingface_hub.hf_hub_download("{repo_id}", "{filename}", '
                f'revision={revision!r}))')
        raise WeightsUnavailableError(
            f'{name}: {how} and {filename} (repo {repo_id}, revision {revision or "main"}) is not in the cache '
            f'{cache_dir}. On a connected machine {fill}, or load a local file: '
            f'timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file="/path/to/model.safetensors")).'
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise WeightsUnavailableError(
            f'{name}: {filename} at revision {revision or "main"} of {repo_id} is not on {settings["endpoint"]} '
            f'({type(err).__name__}). Check the repo id and revision, or load a local file with '
            f'pretrained_cfg_overlay=dict(file=...).') from err
    if entry is not None and verify:
        verify_file(path, entry.sha256, entry.size, name=name)
    return Path(path)
