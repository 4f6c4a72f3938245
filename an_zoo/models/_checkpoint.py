"""Reading checkpoints safely and mapping official Attentive Normalization checkpoints to an_zoo names.

Official training checkpoints pickle, next to the weights, objects of classes from libraries an_zoo does not depend
on (apex's ``LossScaler`` in the optimizer state). They are read with ``torch.load(weights_only=True)``; the foreign
classes are resolved to inert placeholders, so nothing from the file is imported or executed. The foreign classes are
found by torch for the zip format and, for the legacy (pre-1.6) format PyTorch 1.x could also write, by walking the
pickle opcodes here.
"""
import os
import pickle
import pickletools
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from ..layers import AttentiveBatchNorm2d

__all__ = ['CheckpointError', 'load_checkpoint_file', 'unwrap_state_dict', 'remap_state_dict', 'OFFICIAL_PREFIXES']

# DistributedDataParallel ('module.') around apex's FP16Model ('network.'), in the order they must be stripped
OFFICIAL_PREFIXES = ('module.network.', 'module.', 'network.')

# Renames shared by every family: the AN layer and its attention branch in the legacy / refactored releases
AN_RENAMES: Tuple[Tuple[str, str], ...] = (
    (r'\.AttnBN2d(\d)\.', r'.bn\1.'),                                   # refactored: layerX.Y.AttnBN2d2 -> bn2
    (r'\.(?:attention_weights|attn_weights)\.attention\.0\.', '.attn.conv.'),
    (r'\.(?:attention_weights|attn_weights)\.attention\.1\.', '.attn.bn.'),
)
_AN_OWN_NAMES = {
    'weight_': 'mixture_weight',
    'bias_': 'mixture_bias',
    'running_mean': 'norm.running_mean',
    'running_var': 'norm.running_var',
    'num_batches_tracked': 'norm.num_batches_tracked',
}


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message says what and how to proceed."""


class _ForeignObject:
    """Inert stand-in for an object of a class the checkpoint references but an_zoo does not trust or import.

    It only records the arguments and state the pickle hands it; no code from the file is run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f'<foreign object {self._foreign_name} (not loaded)>'


def _placeholder(qualified_name: str) -> Tuple[type, str]:
    module, _, name = qualified_name.rpartition('.')
    cls = type(name, (_ForeignObject,), {'__module__': module, '_foreign_name': qualified_name})
    return cls, qualified_name


# Globals a pickle only references to run commands or code. Torch refuses the modules it blocks (os, sys, posix, nt)
# itself, with its own message; these others it would accept once allowlisted, so they never get a placeholder.
# Protocol 2 pickles name subprocess by its Python 2 name, commands.
_REFUSED_MODULES = ('subprocess', 'commands', 'popen2', 'pty', 'runpy', 'importlib', 'ctypes', 'code', 'codeop',
                    'pickle', '_pickle', 'marshal', 'socket', 'multiprocessing', 'webbrowser')
_REFUSED_BUILTINS = {'eval', 'exec', 'execfile', 'compile', '__import__', 'open', 'file', 'input', 'raw_input',
                     'breakpoint', 'getattr', 'setattr', 'delattr', 'globals', 'locals', 'vars', 'exit', 'quit'}

_ZIP_MAGIC = b'PK\x03\x04'  # torch.save's default format since PyTorch 1.6 is a zip archive
# The legacy (pre-1.6) format: pickles of the magic number, the protocol version and sys info, the main pickle,
# the storage keys, then the raw storage bytes (not a pickle; never scanned).
_LEGACY_PICKLES = 5
_MAX_LINE = 1 << 20  # text opcodes (GLOBAL's module / name lines) are short; a longer line means a corrupt file


def _runs_code(qualified_name: str) -> bool:
    """Whether a pickled global can only be there to run commands or code (see ``_REFUSED_MODULES``)."""
    module, _, name = qualified_name.rpartition('.')
    if module in ('builtins', '__builtin__'):
        return name in _REFUSED_BUILTINS
    return any(module == m or module.startswith(m + '.') for m in _REFUSED_MODULES)


class _BoundedReader:
    """A binary file whose reads are clamped to the bytes left in it, so a corrupt length field in the pickle can
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


_MARK = object()  # the pickle MARK on the simulated stack
_STRING_OPS = {'STRING', 'BINSTRING', 'SHORT_BINSTRING', 'UNICODE', 'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8'}


def _pickle_globals(stream: Any) -> Set[str]:
    """The globals one pickle references (``'module.name'``, as torch's unpickler looks them up), found by walking
    its opcodes up to its STOP without executing any.

    GLOBAL carries its names; STACK_GLOBAL (protocol 4+) takes them from the stack, so the strings pushed (directly
    or through the memo) are tracked on a simulated stack that holds ``None`` for every other object.
    """
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING  # the Python 2 renames torch's unpickler applies

    found: Set[str] = set()
    stack: List[Any] = []
    memo: Dict[Any, Any] = {}

    def pop() -> Any:
        return stack.pop() if stack else None  # a malformed pickle may underflow; torch will refuse it

    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name == 'GLOBAL':
            module, _, attr = arg.partition(' ')
            module, attr = NAME_MAPPING.get((module, attr), (IMPORT_MAPPING.get(module, module), attr))
            found.add(f'{module}.{attr}')
            stack.append(None)
        elif name == 'STACK_GLOBAL':
            attr, module = pop(), pop()
            if isinstance(module, str) and isinstance(attr, str):
                found.add(f'{module}.{attr}')
            # else: names computed at load time; torch's unpickler refuses them, no placeholder could apply
            stack.append(None)
        elif name == 'MEMOIZE':
            memo[len(memo)] = stack[-1] if stack else None
        elif name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
            memo[arg] = stack[-1] if stack else None
        elif name in ('GET', 'BINGET', 'LONG_BINGET'):
            stack.append(memo.get(arg))
        elif name == 'MARK':
            stack.append(_MARK)
        else:  # any other opcode: pop what it consumes (down to the MARK for TUPLE, SETITEMS...), push its result
            before = op.stack_before
            if pickletools.markobject in before:
                while stack and stack.pop() is not _MARK:
                    pass
                before = before[:before.index(pickletools.markobject)]
            for _ in before:
                pop()
            pushed = arg if name in _STRING_OPS and isinstance(arg, str) else None
            stack.extend([pushed] * len(op.stack_after))
    return found


def _legacy_globals(path: Path) -> Set[str]:
    """The globals the pickles of a legacy (pre-1.6, non-zip) ``torch.save`` file reference, found by walking their
    opcodes only: nothing is unpickled, imported or run, and nothing past the end of the file is read.

    Raises:
        CheckpointError: the file is no legacy torch file, or is truncated or corrupt.
    """
    from torch.serialization import MAGIC_NUMBER

    found: Set[str] = set()
    try:
        with open(path, 'rb') as file:
            reader = _BoundedReader(file, os.fstat(file.fileno()).st_size)
            if MAGIC_NUMBER not in [arg for _, arg, _ in pickletools.genops(reader)]:
                raise CheckpointError(
                    f'cannot read checkpoint {path}: it is neither a zip nor a legacy torch.save file (no magic '
                    f'number). The file may be truncated, corrupt or not a PyTorch checkpoint: download it again.')
            file.seek(0)
            for _ in range(_LEGACY_PICKLES):
                found |= _pickle_globals(reader)
    except (ValueError, EOFError, IndexError, KeyError, struct.error, OverflowError) as err:
        # pickletools: 'pickle exhausted before seeing STOP', 'expected N bytes ... but only M remain', ...
        raise CheckpointError(
            f'cannot read checkpoint {path}: its legacy (pre-1.6) torch.save pickles cannot be parsed '
            f'({type(err).__name__}: {err}). The file may be truncated or corrupt: download it again.') from err
    return found


def _unsafe_globals(path: Path) -> List[str]:
    """The globals of a torch checkpoint that torch's ``weights_only`` unpickler does not allow by default."""
    with open(path, 'rb') as file:
        is_zip = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    if is_zip:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    # torch's function reads only the zip format; the legacy one is scanned here in the same way
    found = _legacy_globals(path)
    try:  # torch's own allowlist (private: its location may change between releases)
        from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals
        allowed = set(_get_allowed_globals()) | set(_get_user_allowed_globals())
    except (ImportError, AttributeError):  # then torch's own names and containers are what it allows
        allowed = {g for g in found if g.split('.')[0] == 'torch' or g in ('collections.OrderedDict',)}
    return sorted(found - allowed)


def _unsafe_error(path: Path, unsafe: Sequence[str], reason: str) -> CheckpointError:
    return CheckpointError(
        f'cannot read checkpoint {path} safely: it references {list(unsafe)}, which loading with '
        f'weights_only=True refuses ({reason}). Nothing from the file was run. If you trust the file, '
        f'extract its state_dict yourself (torch.load(path, weights_only=False)) and save that alone '
        f'(torch.save(state_dict, ...) or safetensors).')


def _torch_load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise CheckpointError(f'cannot read checkpoint {path}: {err}') from err
        code = [name for name in unsafe if _runs_code(name)]
        if code:  # refused before torch sees them: no placeholder stands in for a call that runs commands or code
            raise _unsafe_error(path, unsafe, f'{code} can run commands or code; an_zoo never stands in for them')
        # Classes from other libraries (e.g. apex's loss scaler) become inert placeholders; only tensors are used.
        try:
            with torch.serialization.safe_globals([_placeholder(name) for name in unsafe]):
                return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as refused:  # e.g. a call into os / sys, which torch refuses outright
            reason = next((line for line in str(refused).splitlines() if 'GLOBAL' in line), str(refused)).strip()
            raise _unsafe_error(path, unsafe, reason) from refused


def load_checkpoint_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read the state_dict of a ``.safetensors`` file or a torch checkpoint (``.pth``, ``.pth.tar``, ``.bin``).

    Torch pickles (zip or legacy pre-1.6 format) are loaded with ``weights_only=True``; classes the file references
    from other libraries are replaced by inert placeholders, so neither importing nor executing anything from the file
    can happen. References to functions that run commands or code (``os``, ``subprocess``, ``builtins.eval``...)
    are refused.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated, corrupt, or holds no state_dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f'cannot read {path}: not a valid safetensors file ({err}). It may be truncated or corrupt: '
                f'download it again.') from err
    try:
        checkpoint = _torch_load_weights_only(path)
    except (CheckpointError, OSError, MemoryError):
        raise
    except Exception as err:  # torch's unpickler fails on damaged bytes with IndexError, KeyError, struct.error...
        raise CheckpointError(
            f'cannot read checkpoint {path}: {type(err).__name__}: {err}. The file may be truncated, corrupt or '
            f'not a PyTorch checkpoint: download it again.') from err
    return unwrap_state_dict(checkpoint, source=str(path))


def unwrap_state_dict(checkpoint: Any, source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The tensors of a training checkpoint container (``{'state_dict': ...}``, ``{'model': ...}`` or bare)."""
    state_dict = checkpoint
    if isinstance(checkpoint, Mapping):
        for key in ('state_dict', 'model'):
            if isinstance(checkpoint.get(key), Mapping):
                state_dict = checkpoint[key]
                break
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(f'{source} holds no state_dict (found {type(checkpoint).__name__})')
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(
            f'{source}: the state_dict holds non-tensor entries {non_tensors[:10]}; expected a mapping of names '
            f'to tensors (a model state_dict or a training checkpoint with a "state_dict" entry)')
    return dict(state_dict)


def _strip_prefix(key: str, prefixes: Sequence[str]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _an_module_paths(model: nn.Module) -> set:
    return {name for name, module in model.named_modules() if isinstance(module, AttentiveBatchNorm2d)}


def _rename_an_own(key: str, an_paths: set) -> str:
    module_path, _, leaf = key.rpartition('.')
    if module_path in an_paths and leaf in _AN_OWN_NAMES:
        return f'{module_path}.{_AN_OWN_NAMES[leaf]}'
    return key


def _shortcuts_missing_pool(keys: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> set:
    """Shortcuts written without a leading pool (``downsample.0`` = conv) where ours has one (``downsample.1``):
    the refactored ResNetV1d's stride-1 layer1 shortcut."""
    prefixes = set()
    for key, value in keys.items():
        match = re.match(r'^(.*\.downsample\.)0\.weight$', key)
        if match and value.dim() == 4:
            prefix = match.group(1)
            ours = target.get(f'{prefix}1.weight')
            if f'{prefix}0.weight' not in target and ours is not None and ours.dim() == 4:
                prefixes.add(prefix)
    return prefixes


def _shift_index(key: str, prefixes: set) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition('.')
            return f'{prefix}{int(index) + 1}.{rest}'
    return key


def remap_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        renames: Sequence[Tuple[str, str]] = (),
        prefixes: Sequence[str] = OFFICIAL_PREFIXES,
        rename_fn: Optional[Callable[[str], str]] = None,
        ignore: Sequence[str] = (),
) -> Dict[str, torch.Tensor]:
    """Map an official (legacy or refactored) or an_zoo state_dict onto ``model``'s names, exactly or not at all.

    Args:
        state_dict: Source tensors.
        model: The target model; its state_dict keys and its AN layers drive the mapping.
        renames: Family-specific ``(regex, replacement)`` pairs applied, in order, after the prefix is stripped and
            before the AN renames.
        prefixes: Wrapper prefixes to strip (first match only).
        rename_fn: Family-specific renaming that needs more than a regex, applied before ``renames``.
        ignore: Prefixes of (renamed) checkpoint keys the model does not have by design and that are dropped,
            e.g. the head of a features-only model.

    Returns:
        A state_dict with ``model``'s names, every floating tensor cast to the dtype of the model tensor it loads
        into (official files mix float16 and float32).

    Raises:
        CheckpointError: listing every source key that maps to nothing and every model key nothing maps to
            (the classifier is exempt: timm drops or re-initialises it when ``num_classes`` differs).
    """
    target = model.state_dict()
    an_paths = _an_module_paths(model)
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier') or ''
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    classifiers = tuple(c for c in classifiers if c)

    def is_classifier(key: str) -> bool:
        return any(key.startswith(c + '.') for c in classifiers)

    renamed = {}
    for source_key, value in state_dict.items():
        key = _strip_prefix(source_key, prefixes)
        if rename_fn is not None:
            key = rename_fn(key)
        for pattern, replacement in tuple(renames) + AN_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[source_key] = _rename_an_own(key, an_paths)
    shift = _shortcuts_missing_pool({k: state_dict[s] for s, k in renamed.items()}, target)

    out: Dict[str, torch.Tensor] = {}
    unmapped: List[str] = []
    for source_key, value in state_dict.items():
        key = _shift_index(renamed[source_key], shift)
        if key in target:
            if value.is_floating_point():
                value = value.to(target[key].dtype)
            out[key] = value
        elif key.startswith(tuple(ignore)):
            continue
        elif is_classifier(key):
            out[key] = value  # e.g. a model built with num_classes=0: timm drops the head keys
        else:
            unmapped.append(source_key)
    missing = [k for k in target if k not in out and not is_classifier(k)]
    if unmapped or missing:
        name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
        raise CheckpointError(
            f'the checkpoint does not fit {name}: {len(unmapped)} checkpoint key(s) map to no parameter of the '
            f'model: {unmapped}; {len(missing)} model key(s) are not in the checkpoint: {missing}. '
            f'Check that the checkpoint is for this architecture (and variant), e.g. an AN-ResNet-50 file for '
            f'an_resnet50.')
    _check_shapes(out, target, model)
    return out


def _shape_error(model: nn.Module, what: str) -> CheckpointError:
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    return CheckpointError(f'the checkpoint does not fit {name}: {what}')


def _check_shapes(out: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Refuse tensors whose shape differs from the model's, with what to do, leaving to timm what it adapts: the
    first conv of a model built with another ``in_chans`` and the classifier of one built with another
    ``num_classes`` than the pretrained cfg's."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    first_convs = cfg.get('first_conv') or ()
    first_convs = (first_convs,) if isinstance(first_convs, str) else tuple(first_convs)
    classifiers = cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    pretrained_in_chans = (cfg.get('input_size') or (3,))[0]
    head_dropped = getattr(model, 'num_classes', None) != cfg.get('num_classes')  # timm drops the classifier
    mismatched = []
    for key, ours in target.items():  # in the model's order: the first conv first
        value = out.get(key)
        if value is None or ours.shape == value.shape:
            continue
        if key in {f'{c}.weight' for c in first_convs} and value.dim() == 4 and value.shape[0] == ours.shape[0]:
            if value.shape[1] == pretrained_in_chans:
                continue  # timm adapts it to the model's in_chans
            raise _shape_error(model, (
                f'its first conv {key} takes {value.shape[1]} input channel(s) (shape {list(value.shape)}), the '
                f'model {ours.shape[1]} (shape {list(ours.shape)}). Create the model with in_chans='
                f'{value.shape[1]}, the number of channels the checkpoint was trained with.'))
        head = next((c for c in classifiers if key.startswith(c + '.')), None)
        if head is not None:
            if head_dropped:
                continue  # timm re-initialises the classifier
            raise _shape_error(model, (
                f'its classifier {head} has {value.shape[0]} outputs ({key}: {list(value.shape)}), the model '
                f'{ours.shape[0]} ({list(ours.shape)}). To load the checkpoint with its classifier pass '
                f'num_classes={value.shape[0]} and pretrained_cfg_overlay=dict(..., num_classes={value.shape[0]}); '
                f'to fine-tune a new classifier pass another num_classes.'))
        mismatched.append(f'{key}: checkpoint {list(value.shape)}, model {list(ours.shape)}')
    if mismatched:
        raise _shape_error(model, (
            f'{len(mismatched)} tensor(s) have another shape in the checkpoint than in the model: '
            f'{mismatched[:20]}{" ..." if len(mismatched) > 20 else ""}. The checkpoint is for another variant of '
            f'the architecture (width, depth or number of mixtures): create the model it was trained with.'))
