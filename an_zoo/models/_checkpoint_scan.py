"""Bounded reading of torch checkpoint files: what a file's pickles declare is checked against the file's own size
before torch materialises anything, and the globals they reference are listed, all without unpickling.

A torch checkpoint is a pickle plus raw storage bytes (in a zip archive since PyTorch 1.6, appended to the pickles
in the legacy format). Unpickling it with ``weights_only=True`` runs no code from the file, but still allocates what
the file declares: a storage's size (the legacy format allocates it before reading a byte), a zip record's
uncompressed size, or ``bytearray(n)``. Those declarations are read here from the pickle opcodes and refused when
they exceed the bytes the file holds, so no file makes the reader allocate much more than its own size.
"""
import io
import pickletools
import struct
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, List, Set, Tuple

import torch

__all__ = ['CheckpointError', 'ZIP_MAGIC', 'scan_torch_checkpoint', 'check_tensor_extent']

ZIP_MAGIC = b'PK\x03\x04'  # torch.save's default format since PyTorch 1.6 is a zip archive
# The legacy (pre-1.6) format: pickles of the magic number, the protocol version and sys info, the main pickle,
# the storage keys, then the raw storage bytes (not a pickle; never scanned).
_LEGACY_PICKLES = 5
_MAX_LINE = 1 << 20  # text opcodes (GLOBAL's module / name lines) are short; a longer line means a corrupt file
# Builtins the weights_only unpickler may call whose result's size is an argument: ``bytearray(3_000_000_000)``
_SIZED_CALLS = {'builtins.bytearray', 'builtins.bytes'}
_MAX_ELEMENT_SIZE = 16  # complex128: the widest element a storage type may name


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message says what and how to proceed."""


class _BoundedReader:
    """A binary stream whose reads are clamped to the bytes left in it, so a corrupt length field in the pickle can
    neither make the scan read past the file nor allocate more memory than the file holds."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self._size = size

    def read(self, n: int = -1) -> bytes:
        left = max(self._size - self._file.tell(), 0)
        return self._file.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._file.readline(_MAX_LINE)

    def tell(self) -> int:
        return self._file.tell()


@dataclass(frozen=True)
class _Global:
    """A global (``'module.name'``) on the simulated stack."""
    name: str


_MARK = object()  # the pickle MARK on the simulated stack
_TUPLE_N = {'TUPLE1': 1, 'TUPLE2': 2, 'TUPLE3': 3}


def _corrupt(source: str, err: Exception, what: str) -> CheckpointError:
    return CheckpointError(
        f'cannot read checkpoint {source}: its {what} cannot be parsed ({type(err).__name__}: {err}). The file may '
        f'be truncated or corrupt: download it again.')


def _too_big(source: str, what: str, declared: int, limit: int) -> CheckpointError:
    return CheckpointError(
        f'cannot read checkpoint {source}: {what} declares {declared:,} bytes, more than the {limit:,} bytes the '
        f'file holds, so reading it would allocate memory the file cannot fill; nothing was loaded from it. The file '
        f'is truncated, corrupt or crafted: download it again, or use another copy.')


def _check_call(fn: Any, args: Any, limit: int, source: str) -> None:
    """Refuse a pickled ``bytearray(n)`` / ``bytes(n)`` that would allocate more than the file holds (or whose
    size is computed at load time, so cannot be checked before)."""
    if not (isinstance(fn, _Global) and fn.name in _SIZED_CALLS):
        return
    first = args[0] if isinstance(args, tuple) and args else b''
    if isinstance(first, (str, bytes, bytearray)):
        return  # a copy of data the file holds
    if isinstance(first, int) and not isinstance(first, bool) and first <= limit:
        return
    declared = first if isinstance(first, int) else -1
    if declared < 0:
        raise CheckpointError(
            f'cannot read checkpoint {source}: its pickle calls {fn.name} with a size computed while loading, which '
            f'cannot be checked before it allocates. A checkpoint saved by torch never does this: the file is '
            f'corrupt or crafted, and nothing was loaded from it.')
    raise _too_big(source, f'its pickle calls {fn.name}({declared}), which', declared, limit)


def _walk_pickle(stream: Any, limit: int, source: str) -> Tuple[Set[str], List[Any]]:
    """The globals one pickle references (``'module.name'``, as torch's unpickler looks them up) and its persistent
    ids (storage references), found by walking its opcodes up to its STOP without executing any.

    GLOBAL carries its names; STACK_GLOBAL (protocol 4+) takes them from the stack, so the values pushed (directly
    or through the memo) are tracked on a simulated stack: literals, tuples and globals as themselves, ``None`` for
    every object only unpickling would build. Sized builtin calls are checked against ``limit`` on the way.
    """
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING  # the Python 2 renames torch's unpickler applies

    found: Set[str] = set()
    persistent_ids: List[Any] = []
    stack: List[Any] = []
    memo: Dict[Any, Any] = {}

    def pop() -> Any:
        return stack.pop() if stack else None  # a malformed pickle may underflow; torch will refuse it

    def pop_to_mark() -> List[Any]:
        items = []
        while stack:
            item = stack.pop()
            if item is _MARK:
                break
            items.append(item)
        return items[::-1]

    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name == 'GLOBAL':
            module, _, attr = arg.partition(' ')
            module, attr = NAME_MAPPING.get((module, attr), (IMPORT_MAPPING.get(module, module), attr))
            found.add(f'{module}.{attr}')
            stack.append(_Global(f'{module}.{attr}'))
        elif name == 'STACK_GLOBAL':
            attr, module = pop(), pop()
            if isinstance(module, str) and isinstance(attr, str):
                found.add(f'{module}.{attr}')
                stack.append(_Global(f'{module}.{attr}'))
            else:  # names computed at load time; torch's unpickler refuses them, no placeholder could apply
                stack.append(None)
        elif name == 'MEMOIZE':
            memo[len(memo)] = stack[-1] if stack else None
        elif name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
            memo[arg] = stack[-1] if stack else None
        elif name in ('GET', 'BINGET', 'LONG_BINGET'):
            stack.append(memo.get(arg))
        elif name == 'MARK':
            stack.append(_MARK)
        elif name == 'TUPLE':
            stack.append(tuple(pop_to_mark()))
        elif name == 'EMPTY_TUPLE':
            stack.append(())
        elif name in _TUPLE_N:
            stack.append(tuple([pop() for _ in range(_TUPLE_N[name])][::-1]))
        elif name in ('REDUCE', 'NEWOBJ'):
            args, fn = pop(), pop()
            _check_call(fn, args, limit, source)
            stack.append(None)
        elif name == 'NEWOBJ_EX':
            _, args, fn = pop(), pop(), pop()
            _check_call(fn, args, limit, source)
            stack.append(None)
        elif name == 'BINPERSID':
            persistent_ids.append(pop())
            stack.append(None)
        else:  # any other opcode: pop what it consumes (down to the MARK for DICT, SETITEMS...), push its result
            before = op.stack_before
            if pickletools.markobject in before:
                pop_to_mark()
                before = before[:before.index(pickletools.markobject)]
            for _ in before:
                pop()
            # literals (ints, strings, bytes) are pushed as themselves: their size is bounded by the file
            value = arg if arg is not None and len(op.stack_after) == 1 else None
            stack.extend([value] * len(op.stack_after))
    return found, persistent_ids


def _element_size(storage_type: Any) -> int:
    """Bytes per element of a pickled storage type (``torch.FloatStorage``, ``torch.UntypedStorage``...)."""
    if isinstance(storage_type, _Global) and storage_type.name.startswith('torch.'):
        cls = getattr(torch, storage_type.name[len('torch.'):], None)
        if cls is torch.UntypedStorage:
            return 1
        with warnings.catch_warnings():  # the typed storage classes are deprecated, but name the dtype
            warnings.simplefilter('ignore')
            dtype = getattr(cls, 'dtype', None)
        if isinstance(dtype, torch.dtype):
            return dtype.itemsize
    return _MAX_ELEMENT_SIZE  # unknown: torch refuses it; assume the widest so the bound stays an upper bound


def _declared_storages(persistent_ids: List[Any], source: str) -> Dict[str, int]:
    """Storage key -> declared bytes, from ``('storage', type, key, location, numel, ...)`` persistent ids."""
    storages: Dict[str, int] = {}
    for pid in persistent_ids:
        if not (isinstance(pid, tuple) and pid and pid[0] in ('storage', b'storage')):
            continue
        numel = pid[4] if len(pid) >= 5 else None
        key = pid[2] if len(pid) >= 3 else None
        if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise CheckpointError(
                f'cannot read checkpoint {source}: it references a storage without a plain key and size ({pid!r}). '
                f'The file may be truncated or corrupt: download it again.')
        storages[key] = max(storages.get(key, 0), numel * _element_size(pid[1]))
    return storages


def _scan_zip(data: bytes, source: str) -> Set[str]:
    limit = len(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            # a compressed record would be inflated to its declared size: the records must fit in the file itself
            total = sum(info.file_size for info in infos)
            if total > limit:
                raise _too_big(source, 'its zip archive', total, limit)
            pickles = [info for info in infos if info.filename.endswith('data.pkl')
                       and info.filename.count('/') == 1]
            if len(pickles) != 1:
                raise CheckpointError(
                    f'cannot read checkpoint {source}: its zip archive holds {len(pickles)} data.pkl records, not '
                    f'one. The file may be truncated, corrupt or not a PyTorch checkpoint: download it again.')
            prefix = pickles[0].filename[:-len('data.pkl')]
            records = {info.filename[len(prefix) + len('data/'):]: info.file_size for info in infos
                       if info.filename.startswith(prefix + 'data/')}
            main = archive.read(pickles[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as err:
        raise _corrupt(source, err, 'zip archive') from err
    try:
        found, persistent_ids = _walk_pickle(_BoundedReader(io.BytesIO(main), len(main)), limit, source)
    except (ValueError, EOFError, IndexError, KeyError, struct.error, OverflowError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise _corrupt(source, err, 'pickle') from err
    for key, declared in _declared_storages(persistent_ids, source).items():
        if declared > records.get(key, 0):
            raise _too_big(source, f'storage {key!r} (its zip record has {records.get(key, 0):,} bytes)',
                           declared, records.get(key, 0))
    return found


def _scan_legacy(data: bytes, source: str) -> Set[str]:
    from torch.serialization import MAGIC_NUMBER

    limit = len(data)
    found: Set[str] = set()
    persistent_ids: List[Any] = []
    stream = io.BytesIO(data)
    reader = _BoundedReader(stream, limit)
    try:
        if MAGIC_NUMBER not in [arg for _, arg, _ in pickletools.genops(reader)]:
            raise CheckpointError(
                f'cannot read checkpoint {source}: it is neither a zip nor a legacy torch.save file (no magic '
                f'number). The file may be truncated, corrupt or not a PyTorch checkpoint: download it again.')
        stream.seek(0)
        for _ in range(_LEGACY_PICKLES):
            names, ids = _walk_pickle(reader, limit, source)
            found |= names
            persistent_ids += ids
    except (ValueError, EOFError, IndexError, KeyError, struct.error, OverflowError) as err:
        if isinstance(err, CheckpointError):
            raise
        # pickletools: 'pickle exhausted before seeing STOP', 'expected N bytes ... but only M remain', ...
        raise _corrupt(source, err, 'legacy (pre-1.6) torch.save pickles') from err
    # the legacy reader allocates every storage at its declared size before reading its bytes from the file
    total = sum(_declared_storages(persistent_ids, source).values())
    if total > limit:
        raise _too_big(source, 'its storages', total, limit)
    return found


def scan_torch_checkpoint(data: bytes, source: str) -> Set[str]:
    """The globals a torch checkpoint's pickles reference, after checking that nothing the file declares (storage
    sizes, zip records, sized builtin calls) exceeds the bytes it holds. Nothing is unpickled, imported or run.

    Raises:
        CheckpointError: the file is no torch checkpoint, is truncated or corrupt, or declares more than it holds.
    """
    if data[:len(ZIP_MAGIC)] == ZIP_MAGIC:
        return _scan_zip(data, source)
    return _scan_legacy(data, source)


def check_tensor_extent(key: str, value: torch.Tensor, source: str) -> None:
    """Refuse a tensor that is not a dense CPU array backed by its own storage's bytes: e.g. a 2-byte storage
    expanded (stride 0) to (40000, 20000), which any copy or cast would materialise at full size."""
    if value.layout != torch.strided or value.is_nested or value.is_quantized or value.device.type != 'cpu':
        raise CheckpointError(
            f'{source}: {key} is a {value.layout} / {value.device.type} tensor; a state_dict holds dense CPU '
            f'tensors. Save the model\'s state_dict (model.state_dict()) and load that file.')
    needed = value.numel() * value.element_size()
    held = value.untyped_storage().nbytes()
    if needed > held:
        raise CheckpointError(
            f'{source}: {key} has shape {list(value.shape)} ({needed:,} bytes) but its storage holds only {held:,} '
            f'bytes (strides {list(value.stride())}: an expanded or overlapping view). Loading it would allocate '
            f'memory the file does not hold, so it was refused. Save dense tensors (tensor.contiguous()).')
