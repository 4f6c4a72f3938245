"""Training state on disk for ``an_zoo.train``: per-epoch training states (save, read, list, prune, load), the run
identity that ties them to their run folder, and which state and folder ``--resume`` continues.

A run folder holds ``run.json`` (its run id), one ``checkpoint-E.pth`` per kept epoch (optimizer, scaler, counters,
history, run id; ``weights_only``-loadable) next to ``checkpoint-E.safetensors`` (model weights) and, with EMA,
``checkpoint-E.ema.safetensors``. The ``.pth`` is written last, so its presence marks a complete state.
"""
import json
import tempfile
import uuid
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import __version__
from ._io import atomic_write, atomic_write_text

__all__ = [
    'CHECKPOINT_PREFIX', 'RUN_FILE', 'RESUME_LATEST', 'TrainStateError', 'new_run_id', 'read_run_id',
    'write_run_file', 'holds_run', 'check_writable', 'save_train_state', 'list_train_states', 'prune_train_states',
    'read_train_state', 'resolve_resume', 'resume_run_dir', 'load_train_state',
]

CHECKPOINT_PREFIX = 'checkpoint-'
RUN_FILE = 'run.json'
RESUME_LATEST = ('auto', 'latest')  # --resume with no path, or --resume latest: the newest state in --output
# what a run writes into its folder: any of them means the folder holds a run
_RUN_ARTEFACTS = (RUN_FILE, 'log.json', 'summary.csv', 'best.safetensors', f'{CHECKPOINT_PREFIX}*.pth',
                  f'{CHECKPOINT_PREFIX}*.safetensors')
_STATE_KEYS = ('epoch', 'args', 'optimizer', 'num_updates', 'history', 'best')


class TrainStateError(ValueError):
    """A training state that cannot be resumed from; the message names the file, the problem and what to do."""


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, '_orig_mod', model)  # torch.compile
    return getattr(model, 'module', model)  # DDP


# ---------------------------------------------------------------------------------------------- run identity

def new_run_id() -> str:
    """A fresh, random run id."""
    return uuid.uuid4().hex


def read_run_id(run_dir: Path) -> Optional[str]:
    """The run id recorded in ``run_dir/run.json``; None if there is none (a new folder, or a run from before run
    ids were recorded)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())['run_id'])
    except (ValueError, KeyError, TypeError) as err:
        raise TrainStateError(f'{path} is damaged ({err!r}); it records which run the folder holds. Restore it, '
                              f'or move the folder\'s files elsewhere to start over') from err


def write_run_file(run_dir: Path, run_id: str, model: str, resumed_from: Optional[str] = None) -> Path:
    record: Dict[str, Any] = dict(run_id=run_id, model=model, created=datetime.now().isoformat(timespec='seconds'))
    if resumed_from:
        record['resumed_from'] = resumed_from
    return atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(record, indent=1) + '\n')


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a training run: its run file, a state, weights or logs."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(next(run_dir.glob(pattern), None) is not None for pattern in _RUN_ARTEFACTS)


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and write a scratch file into it, so an unusable ``--output`` is reported before
    any training, not when the first epoch ends."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix='.write-test-'):
            pass
    except OSError as err:
        raise PermissionError(f'--output {run_dir} is not a writable folder ({err.strerror or err}); choose another '
                              f'--output') from err


# -------------------------------------------------------------------------------------------- save / list / prune

def save_train_state(out_dir: Path, epoch: int, model: nn.Module, ema: Optional[nn.Module],
                     optimizer: torch.optim.Optimizer, scaler: Optional[Any], state: Dict[str, Any]) -> Path:
    """Write ``checkpoint-E.safetensors`` (model weights; ``.ema.safetensors`` for the EMA model), then
    ``checkpoint-E.pth`` with ``state`` plus the epoch, optimizer and scaler state. Each file is written
    atomically and the ``.pth`` last, so its presence marks a complete state. Returns the ``.pth`` path."""
    from safetensors.torch import save_file

    stem = Path(out_dir) / f'{CHECKPOINT_PREFIX}{epoch}'
    meta = {'epoch': str(epoch), 'model': state['args']['model'], 'an_zoo': __version__}
    if state.get('run_id'):
        meta['run_id'] = state['run_id']

    def weights(m: nn.Module) -> Dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in _unwrap(m).state_dict().items()}

    atomic_write(stem.with_suffix('.safetensors'), lambda p: save_file(weights(model), p, metadata=meta))
    if ema is not None:
        atomic_write(stem.with_name(f'{stem.name}.ema.safetensors'),
                     lambda p: save_file(weights(ema.module), p, metadata=meta))
    payload = dict(state, epoch=epoch, optimizer=optimizer.state_dict(),
                   scaler=scaler.state_dict() if scaler is not None else None)
    atomic_write(stem.with_suffix('.pth'), lambda p: torch.save(payload, p))
    return stem.with_suffix('.pth')


def _epoch_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):].split('.')[0])


def list_train_states(out_dir: Path) -> List[Path]:
    """The ``checkpoint-E.pth`` training states in ``out_dir``, oldest first (:func:`read_train_state` tells whether
    one is complete: readable, with its weights)."""
    found = [p for p in Path(out_dir).glob(f'{CHECKPOINT_PREFIX}*.pth')
             if p.name[len(CHECKPOINT_PREFIX):-len('.pth')].isdigit()]
    return sorted(found, key=_epoch_of)


def prune_train_states(out_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` states (and their weights); ``keep <= 0`` keeps all."""
    for old in list_train_states(out_dir)[:-keep] if keep > 0 else []:
        for path in (old, old.with_suffix('.safetensors'), old.with_name(f'{old.stem}.ema.safetensors')):
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------- read

def _check_weights_file(path: Path, what: str) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise TrainStateError(f'{what} {path} is missing')
    try:
        with safe_open(str(path), 'pt'):  # parses the header and checks the file covers every tensor
            pass
    except Exception as err:  # safetensors raises its own SafetensorError
        raise TrainStateError(f'{what} {path} is damaged or truncated ({err})') from err


def read_train_state(path: Path) -> Dict[str, Any]:
    """Load and check the training state ``path`` (a ``checkpoint-E.pth``) and that its weights file is complete;
    any problem is a :class:`TrainStateError` naming the file."""
    path = Path(path)
    if path.suffix == '.safetensors':
        stem = path.name.split('.')[0]
        state_file = path.with_name(f'{stem}.pth')
        hint = (f'pass {state_file}' if stem.startswith(CHECKPOINT_PREFIX) and state_file.is_file()
                else f'pass a {CHECKPOINT_PREFIX}<epoch>.pth of the run, or its run folder {path.parent}')
        raise TrainStateError(f'--resume {path}: this file holds model weights only, not a training state (optimizer, '
                              f'epoch, history); {hint}. To start a new run from these weights, use '
                              f'--initial-checkpoint {path}')
    if path.stat().st_size == 0:
        raise TrainStateError(f'--resume {path}: the file is empty (0 bytes; its write was interrupted). Pass the run '
                              f'folder {path.parent} to continue from its newest complete state')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # a truncated zip, a pickle with objects, not a torch file at all...
        raise TrainStateError(f'--resume {path}: not a readable training state, the file is damaged, truncated or of '
                              f'another kind ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}). '
                              f'Pass the run folder {path.parent} to continue from its newest complete state') from err
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise TrainStateError(f'--resume {path}: not an an_zoo training state (no {", ".join(missing)}); pass a '
                              f'{CHECKPOINT_PREFIX}<epoch>.pth written by python -m an_zoo.train')
    _check_weights_file(path.with_suffix('.safetensors'), f'--resume {path}: its model weights')
    return state


def resolve_resume(resume: str, out_dir: Optional[Path]) -> Tuple[Path, Dict[str, Any]]:
    """The training state ``--resume`` names and its content: a ``checkpoint-E.pth`` file as given, or the newest
    complete state of a run folder (``auto`` / ``latest``: of ``--output``). In a run folder, newer states that are
    damaged are skipped with a warning."""
    target = out_dir if resume in RESUME_LATEST else Path(resume)
    if target is None:
        raise TrainStateError(f'--resume {resume} needs --output (the run folder to continue), or pass the run '
                              f'folder or a {CHECKPOINT_PREFIX}<epoch>.pth to --resume')
    if target.is_file():
        return target, read_train_state(target)
    if not target.is_dir():
        raise FileNotFoundError(f'--resume {target}: no such training state or run folder')
    skipped: List[str] = []
    for path in reversed(list_train_states(target)):
        try:
            state = read_train_state(path)
        except TrainStateError as err:
            skipped.append(str(err))
            continue
        if skipped:
            warnings.warn(f'--resume {target}: skipped newer training state(s) that cannot be used, continuing from '
                          f'{path.name}; the skipped epochs are trained again and their files replaced:\n  '
                          + '\n  '.join(skipped), stacklevel=2)
        return path, state
    raise TrainStateError(f'--resume {target}: no complete {CHECKPOINT_PREFIX}<epoch>.pth (with its .safetensors) '
                          f'in this folder' + (':\n  ' + '\n  '.join(skipped) if skipped else '')
                          + '\nStart a new run with another --output, or without --resume in an empty folder')


def _same_dir(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def resume_run_dir(path: Path, state: Dict[str, Any], output: Optional[Path]) -> Tuple[Path, str]:
    """The folder a run resumed from the state ``path`` writes to, and its run id.

    By default, and with ``--output`` naming the same folder, the run continues in the state's own folder under
    its own id. Another ``--output`` must hold no run: the run then continues there as a new run (a new id).
    Refused, with what to do: an ``--output`` holding another run, a state whose folder records another run, and
    resuming an older state into a folder with newer complete states (they would be overwritten)."""
    path = Path(path)
    own, run_id = path.parent, state.get('run_id')
    if output is not None and not _same_dir(output, own):
        if holds_run(output):
            folder_id = read_run_id(output)
            raise FileExistsError(
                f'--output {output} holds another run ({f"run id {folder_id}" if folder_id else "its own files"}), '
                f'but {path} belongs to the run in {own}. Nothing was changed. To continue that run, drop --output '
                f'(or pass --output {own}); to branch from this state as a new run, pass an --output that does not '
                f'exist yet; to continue the run in {output}, pass --resume {output}')
        return Path(output), new_run_id()
    folder_id = read_run_id(own)
    if run_id and folder_id and run_id != folder_id:
        raise FileExistsError(f'{path} belongs to run {run_id}, but its folder {own} records run {folder_id} (was '
                              f'the file copied there?). Nothing was changed. Resume it into a new folder with '
                              f'--output NEW, or resume that folder\'s own run with --resume {own}')
    newer = [p.name for p in list_train_states(own) if _epoch_of(p) > state['epoch'] and _is_complete(p)]
    if newer:
        raise FileExistsError(f'{own} has newer training states ({", ".join(newer)}) than {path.name}; continuing '
                              f'from it here would overwrite them. Nothing was changed. Continue the newest with '
                              f'--resume {own}, or branch from {path.name} into a new folder with --output NEW')
    return own, run_id or folder_id or new_run_id()


def _is_complete(path: Path) -> bool:
    try:
        read_train_state(path)
    except TrainStateError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------- load

def load_train_state(path: Path, state: Dict[str, Any], model: nn.Module, ema: Optional[nn.Module],
                     optimizer: torch.optim.Optimizer, scaler: Optional[Any], model_name: str,
                     num_classes: int) -> None:
    """Load the weights, EMA weights, optimizer and scaler of the training state ``path`` (``state``: its content,
    from :func:`read_train_state`) into a freshly built run; a state of another model or class count is refused."""
    from safetensors.torch import load_file

    path = Path(path)
    trained = state['args'].get('model')
    if trained != model_name:
        raise TrainStateError(f'{path} is a checkpoint of {trained}, not of --model {model_name}; pass --model '
                              f'{trained} to continue it')
    trained_classes = state.get('num_classes')
    if trained_classes is not None and trained_classes != num_classes:
        raise TrainStateError(f'{path} was trained with {trained_classes} classes, this run has {num_classes} '
                              f'(--num-classes or the dataset differ); resume with the same data and --num-classes')

    def load_weights(module: nn.Module, file: Path, what: str) -> None:
        _check_weights_file(file, f'{path}: its {what}')
        try:
            module.load_state_dict(load_file(str(file)))
        except RuntimeError as err:  # shapes or names differ: another class count or architecture
            raise TrainStateError(f'{file} does not fit this {model_name} with {num_classes} classes '
                                  f'({str(err).splitlines()[-1].strip()}); resume with the --model, --num-classes '
                                  f'and data of the run') from err

    load_weights(_unwrap(model), path.with_suffix('.safetensors'), 'model weights')
    if ema is not None:
        ema_path = path.with_name(f'{path.stem}.ema.safetensors')
        if not ema_path.is_file():
            raise TrainStateError(f'--model-ema is on but {ema_path} is missing (was the run started without '
                                  f'--model-ema?)')
        load_weights(ema.module, ema_path, 'EMA weights')
    try:
        optimizer.load_state_dict(state['optimizer'])
    except (ValueError, KeyError) as err:
        raise TrainStateError(f'{path}: its optimizer state does not fit this run ({err}); resume with the '
                              f'optimizer, --freeze-groups and weight-decay settings of the run') from err
    if scaler is not None and state.get('scaler'):
        scaler.load_state_dict(state['scaler'])
