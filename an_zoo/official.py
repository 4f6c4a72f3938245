"""Official weights from their official source: download, verify, convert, cache.

A manifest weight that is not on the Hugging Face Hub yet can still be loaded with ``pretrained=True`` when its
entry names an ``official_source`` (the Google Drive file or folder the authors released it in) and the user has
accepted its licence (:mod:`an_zoo.licenses`). Then :func:`fetch_official`:

1. downloads the official file(s) with ``gdown`` (Drive's confirmation pages, resumable ``.part`` files renamed into
   place when complete) into the an_zoo cache (:func:`an_zoo.hub.an_zoo_cache_dir`), on local rank 0 only under
   torchrun; ``HF_HUB_OFFLINE`` is honoured (the error names the file to place by hand);
2. checks the archive against the manifest's pinned sha256 when there is one, else against the lock file written at
   the first download (trust on first use; the hashes are printed then); a mismatch is an error that keeps the file;
3. extracts the config and the checkpoint safely, checks that the config describes the expected architecture, loads
   the checkpoint without running pickled code and converts it with the model's ``checkpoint_filter_fn``;
4. writes ``model.safetensors`` (an_zoo names) next to a ``lock.json`` recording every hash, and loads from it; later
   loads verify it against the lock.

:func:`import_official` runs the same steps for a maintainer and writes the Hub-ready folder
(``python -m an_zoo import-official NAME``).
"""
import datetime
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ._io import atomic_write, atomic_write_text
from ._manifest import WeightEntry
from ._official_files import OfficialFileError, check_config, extract_members, read_config
from .hub import (WeightsUnavailableError, WeightsVerificationError, _local_rank_zero_first, an_zoo_cache_dir,
                  hub_settings, sha256_file, verify_file)
from .licenses import require_license

__all__ = ['OfficialSourceError', 'OfficialFileError', 'fetch_official', 'load_official', 'import_official',
           'convert_checkpoint', 'official_cache_dir', 'read_lock', 'verify_cached']

DRIVE_FILE_URL = 'https://drive.google.com/uc?id={id}'
DRIVE_FOLDER_URL = 'https://drive.google.com/drive/folders/{id}'
ARCHIVE_NAME = 'official.zip'
CONVERTED_NAME = 'model.safetensors'
LOCK_NAME = 'lock.json'


class OfficialSourceError(RuntimeError):
    """The official source cannot give this weight (no source, folder without the model, unusable files)."""


def official_cache_dir(entry: WeightEntry) -> Path:
    """Where the official files of ``entry`` and their conversion live: ``<an_zoo cache>/official/<arch.tag>``."""
    return an_zoo_cache_dir() / 'official' / entry.name


def read_lock(entry: WeightEntry) -> Optional[Dict[str, Any]]:
    """The lock file of ``entry``'s official download (hashes recorded at the first download), or None."""
    path = official_cache_dir(entry) / LOCK_NAME
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise WeightsVerificationError(f'{path} is unreadable ({err}); it records the hashes of {entry.name}\'s '
                                       f'official files. Delete the folder {path.parent} to download again.') from err


def _record(path: Path) -> Dict[str, Any]:
    return {'sha256': sha256_file(path), 'size': path.stat().st_size}


def _check(path: Path, expected: Dict[str, Any], name: str, what: str) -> None:
    try:
        verify_file(path, expected.get('sha256'), expected.get('size'), name=name)
    except WeightsVerificationError as err:
        raise WeightsVerificationError(f'{what}: {err}') from err


def _offline_error(entry: WeightEntry, missing: Path, url: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f'{entry.name}: HF_HUB_OFFLINE is set and the official file is not in the an_zoo cache. On a connected '
        f'machine download {url} and place it at {missing} (or run `python -m an_zoo import-official {entry.name} '
        f'--from FILE`), then load again.')


def _gdown():
    try:
        import gdown
    except ImportError as err:
        raise ImportError('downloading official weights from Google Drive needs gdown: pip install "an_zoo[official]" '
                          '(or pip install gdown)') from err
    return gdown


def _cookies() -> Path:
    """gdown's cookie jar, kept in the an_zoo cache rather than in ~/.cache/gdown."""
    return an_zoo_cache_dir() / 'gdown_cookies.txt'


def _download(url: str, target: Path, entry: WeightEntry) -> Path:
    """``url`` -> ``target`` through gdown: a ``.part`` file next to it, resumed if one is there, renamed when
    complete (an interrupted download never leaves a file under the final name)."""
    if target.is_file():
        return target
    if hub_settings()['offline']:
        raise _offline_error(entry, target, url)
    gdown = _gdown()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        gdown.download(url, str(target), quiet=False, resume=True, cookies_file=str(_cookies()))
    except Exception as err:  # gdown raises its own and requests' errors
        raise WeightsUnavailableError(
            f'{entry.name}: downloading the official file {url} failed ({type(err).__name__}: {err}). A partial '
            f'download is kept next to {target} and resumed by the next attempt; or download it by hand and run '
            f'`python -m an_zoo import-official {entry.name} --from FILE`.') from err
    if not target.is_file():
        raise WeightsUnavailableError(f'{entry.name}: gdown finished without writing {target} ({url})')
    return target


def _folder_files(entry: WeightEntry, download_dir: Path) -> Dict[str, Path]:
    """The config and checkpoint of an iVMCL-Release model: its sub-folder of the release's Drive folder."""
    source = entry.official_source
    wanted = (source['config'], source['checkpoint'])
    targets = {name: download_dir / name for name in wanted}
    if all(t.is_file() for t in targets.values()):
        return targets
    url = DRIVE_FOLDER_URL.format(id=source['id'])
    if hub_settings()['offline']:
        missing = next(t for t in targets.values() if not t.is_file())
        raise _offline_error(entry, missing, f'{url} ({source["path"]}*/{missing.name})')
    gdown = _gdown()
    try:
        listing = gdown.download_folder(id=source['id'], skip_download=True, quiet=True, use_cookies=False)
    except Exception as err:
        raise WeightsUnavailableError(f'{entry.name}: listing the official Drive folder {url} failed '
                                      f'({type(err).__name__}: {err})') from err
    by_folder: Dict[str, Dict[str, Any]] = {}
    for item in listing:
        parts = Path(item.path).parts
        if len(parts) >= 2:
            by_folder.setdefault(parts[-2], {})[parts[-1]] = item
    # the release names a model's folder after its config, optionally followed by "-top1-<accuracy>..." (a plain
    # prefix match would also take "aognet_12m_an_imagenet_200e_ls_mixup" for "aognet_12m_an_imagenet")
    prefix = source['path']
    matches = [name for name in by_folder if name == prefix or name.startswith(prefix + '-top1-')]
    if len(matches) != 1:
        raise OfficialSourceError(
            f'{entry.name}: the official folder {url} has {"no" if not matches else len(matches)} sub-folder(s) '
            f'named after {prefix!r}; it holds {sorted(by_folder)}. The release may have moved: load a file you have '
            f'with `python -m an_zoo import-official {entry.name} --from PATH`.')
    files = by_folder[matches[0]]
    absent = [name for name in wanted if name not in files]
    if absent:
        raise OfficialSourceError(f'{entry.name}: {url} sub-folder {matches[0]} has no {absent}; it holds '
                                  f'{sorted(files)}')
    for name, target in targets.items():
        _download(DRIVE_FILE_URL.format(id=files[name].id), target, entry)
    return targets


def _official_files(entry: WeightEntry, folder: Path, source: Optional[Path]) -> Tuple[Dict[str, Path], Path]:
    """``({recorded name: path of a raw official file}, the folder holding the config and checkpoint)``."""
    spec = entry.official_source
    download_dir = folder / 'download'
    if source is not None:  # a file or folder the user has
        source = Path(source).expanduser()
        if source.is_dir():
            return {n: source / n for n in (spec['config'], spec['checkpoint'])}, source
        if not source.is_file():
            raise FileNotFoundError(f'official file not found: {source}')
        if spec.get('archive') == 'zip':
            return {ARCHIVE_NAME: source}, source
        return {spec['checkpoint']: source}, source
    if spec['kind'] == 'gdrive_file':
        archive = _download(DRIVE_FILE_URL.format(id=spec['id']), download_dir / ARCHIVE_NAME, entry)
        return {ARCHIVE_NAME: archive}, archive
    files = _folder_files(entry, download_dir)
    return dict(files), download_dir


def _verify_raw(entry: WeightEntry, raw: Dict[str, Path], lock: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Hash the raw official files (once each); check them against the manifest's pin or the lock (trust on first
    use). A mismatch raises :class:`WeightsVerificationError`; the file is kept."""
    records = {}
    pinned = entry.official_source.get('sha256')
    for name, path in raw.items():
        if not path.is_file():
            raise FileNotFoundError(f'{entry.name}: official file {path} not found')
        record = _record(path)
        if pinned and name == ARCHIVE_NAME:
            expected = {'sha256': pinned, 'size': entry.official_source.get('size')}
            what = f'the official archive of {entry.name} does not match the sha256 pinned in the manifest'
        elif lock and name in lock.get('official_files', {}):
            expected = lock['official_files'][name]
            what = f'the official file {name} of {entry.name} differs from the one recorded at its first download'
        else:
            expected, what = {}, ''
        differs = [k for k in ('sha256', 'size') if expected.get(k) is not None and expected[k] != record[k]]
        if differs:
            raise WeightsVerificationError(
                f'{what}: {path} has {", ".join(f"{k} {record[k]}" for k in differs)}, expected '
                f'{", ".join(f"{k} {expected[k]}" for k in differs)}. The file was kept and not loaded; delete it to '
                f'download again.')
        records[name] = record
    return records


def convert_checkpoint(entry: WeightEntry, checkpoint: Union[str, Path], target: Union[str, Path]) -> Dict[str, Any]:
    """Load the official ``checkpoint`` into ``entry``'s architecture (strict, through the model's
    ``checkpoint_filter_fn``, no pickled code run) and write its state_dict to ``target`` as safetensors, float32
    (the official files mix float16 and float32; float16 -> float32 is exact). Returns sha256, size, num_params."""
    import timm
    from safetensors.torch import save_file
    model = timm.create_model(entry.model, pretrained=True, num_classes=entry.data['num_classes'],
                              pretrained_cfg=entry.tag, pretrained_cfg_overlay=dict(file=str(checkpoint)))
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    atomic_write(target, lambda p: save_file(state, p, metadata={'format': 'pt', 'an_zoo_entry': entry.name}))
    return dict(_record(Path(target)), num_params=sum(p.numel() for p in model.parameters()))


def _build(entry: WeightEntry, folder: Path, source: Optional[Path]) -> Path:
    """Download (or take ``source``), verify, extract, check, convert; write the converted file and the lock."""
    lock = read_lock(entry) if source is None else None
    raw, holder = _official_files(entry, folder, source)
    raw_records = _verify_raw(entry, raw, lock)
    spec = entry.official_source
    wanted = (spec['config'], spec['checkpoint'])
    work = folder / 'extracted'
    if ARCHIVE_NAME in raw:
        members = extract_members(raw[ARCHIVE_NAME], wanted, work)
    elif source is not None and source.is_file():  # a bare checkpoint: no config to check
        members = {spec['checkpoint']: source}
    else:
        members = {name: Path(holder) / name for name in wanted}
    if spec['config'] in members:
        check_config(read_config(members[spec['config']]), spec.get('expect', {}), str(members[spec['config']]),
                     entry.name)
    folder.mkdir(parents=True, exist_ok=True)
    converted = folder / CONVERTED_NAME
    record = convert_checkpoint(entry, members[spec['checkpoint']], converted)
    shutil.rmtree(work, ignore_errors=True)
    lock = {
        'entry': entry.name, 'official_source': spec, 'official_files': raw_records,
        'converted': {'file': CONVERTED_NAME, 'sha256': record['sha256'], 'size': record['size']},
        'num_params': record['num_params'], 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'), 'torch': torch.__version__,
    }
    atomic_write_text(folder / LOCK_NAME, json.dumps(lock, indent=2) + '\n')
    hashes = ', '.join(f'{n} sha256 {r["sha256"]} ({r["size"]:,} bytes)' for n, r in raw_records.items())
    print(f'{entry.name}: official files recorded in {folder / LOCK_NAME}: {hashes}; converted {CONVERTED_NAME} '
          f'sha256 {record["sha256"]} ({record["size"]:,} bytes). Later loads are verified against these.',
          file=sys.stderr)
    return converted


def fetch_official(entry: WeightEntry, source: Optional[Union[str, Path]] = None, verify: bool = True) -> Path:
    """Path of ``entry``'s weights converted from the official release, verified against the lock file.

    Args:
        entry: A manifest entry with an ``official_source``.
        source: Use this official archive / checkpoint / model folder instead of downloading (an existing conversion
            in the cache is then replaced by one from this file).
        verify: Hash a cached conversion against the lock here. :func:`load_official` passes False and verifies
            the bytes it loads instead (one hash, of what is loaded).

    Raises:
        LicenseNotAcceptedError: the licence of the official weights is not accepted (the message says how).
        WeightsUnavailableError: offline or the download failed (the message names the file to place by hand).
        WeightsVerificationError: a file differs from the pinned or recorded hashes (kept, not loaded).
        OfficialFileError / OfficialSourceError: the files are not the official ones of this model.
    """
    if not entry.official_source:
        raise OfficialSourceError(f'{entry.name} has no official source in the weights manifest')
    require_license(entry)
    folder = official_cache_dir(entry)
    source = Path(source) if source is not None else None

    def obtain(local_only: bool) -> Path:
        lock = read_lock(entry)
        converted = folder / CONVERTED_NAME
        if source is None and lock is not None and converted.is_file():
            if verify:
                _check(converted, lock['converted'], entry.name, _converted_differs(entry))
            return converted
        if local_only:  # another rank of this node failed or has not converted
            raise WeightsUnavailableError(f'{entry.name}: local rank 0 did not leave a converted file in {folder}')
        return _build(entry, folder, source)

    return _local_rank_zero_first(obtain)


def _converted_differs(entry: WeightEntry) -> str:
    return (f'the converted weights of {entry.name} differ from those recorded in '
            f'{official_cache_dir(entry) / LOCK_NAME}')


def load_official(entry: WeightEntry) -> Tuple[Path, Dict[str, torch.Tensor]]:
    """``(path, state_dict)`` of ``entry``'s converted official weights (:func:`fetch_official`), read once and
    verified against the lock file on the bytes that are deserialised."""
    from .models._checkpoint import load_checkpoint_file
    path = fetch_official(entry, verify=False)
    expected = (read_lock(entry) or {}).get('converted') or {}
    try:
        return path, load_checkpoint_file(path, expected.get('sha256'), expected.get('size'), name=entry.name)
    except WeightsVerificationError as err:
        raise WeightsVerificationError(f'{_converted_differs(entry)}: {err}') from err


def verify_cached(entry: WeightEntry) -> Optional[str]:
    """Re-hash the cached official files and conversion of ``entry`` against its lock. None if nothing is cached,
    else ``'ok'``; raises :class:`WeightsVerificationError` on a mismatch."""
    lock = read_lock(entry)
    if lock is None:
        return None
    folder = official_cache_dir(entry)
    _check(folder / CONVERTED_NAME, lock['converted'], entry.name, f'{entry.name} (converted official weights)')
    for name, record in lock.get('official_files', {}).items():
        path = folder / 'download' / name
        if path.is_file():
            _check(path, record, entry.name, f'{entry.name} (official file {name})')
    return 'ok'


def import_official(entry: WeightEntry, source: Optional[Union[str, Path]] = None,
                    out_dir: Union[str, Path] = 'converted', update_manifest: bool = True) -> Path:
    """Maintainer path to the Hub: fetch / take, verify and convert the official file like :func:`fetch_official`,
    write the Hub-ready folder ``out_dir/<arch.tag>`` (``model.safetensors``, timm ``config.json``, model card), and
    record the converted file's sha256 / size / num_params and the official archive's sha256 / size in the manifest.
    Returns the folder; ``scripts/publish.py NAME --dir out_dir`` uploads it."""
    import timm

    from ._card import hub_config, model_card
    from ._manifest import update_entry
    converted = fetch_official(entry, source=source)
    lock = read_lock(entry)
    target = Path(out_dir) / entry.name
    if (target / entry.filename).exists():
        raise FileExistsError(f'{target / entry.filename} exists: remove it or choose another --out (nothing was '
                              f'overwritten)')
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(converted, target / entry.filename)
    verify_file(target / entry.filename, lock['converted']['sha256'], lock['converted']['size'], name=entry.name)
    if update_manifest:
        fields: Dict[str, Any] = dict(sha256=lock['converted']['sha256'], size=lock['converted']['size'],
                                      num_params=lock['num_params'])
        archive = lock['official_files'].get(ARCHIVE_NAME)
        if archive is not None and not entry.official_source.get('sha256'):
            fields['official_source'] = dict(entry.official_source, **archive)
        entry = update_entry(entry.name, **fields)
    model = timm.create_model(entry.model, pretrained=False, pretrained_cfg=entry.tag)
    (target / 'config.json').write_text(json.dumps(hub_config(entry, model.pretrained_cfg, model.num_features),
                                                   indent=2) + '\n')
    (target / 'README.md').write_text(model_card(entry))
    print(f'{entry.name}: Hub folder {target} written; publish it with\n'
          f'  HF_TOKEN=... python scripts/publish.py {entry.name} --dir {Path(out_dir)}')
    return target
