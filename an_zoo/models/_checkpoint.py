"""Reading checkpoints safely and mapping official Attentive Normalization checkpoints to an_zoo names.

Official training checkpoints pickle, next to the weights, objects of classes from libraries an_zoo does not depend
on (apex's ``LossScaler`` in the optimizer state). They are read with ``torch.load(weights_only=True)``; the foreign
classes are resolved to inert placeholders, so nothing from the file is imported or executed. The foreign classes,
and the sizes the file declares, are found by walking the pickle opcodes first (:mod:`._checkpoint_scan`), for the
zip format and for the legacy (pre-1.6) format PyTorch 1.x could also write.

Mapping onto a model is exact or refused: ambiguous names, dtypes of another kind and shapes are all checked before
any tensor is cast or copied.
"""
import io
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from ..layers import AttentiveBatchNorm2d
from ._checkpoint_scan import CheckpointError, check_tensor_extent, scan_torch_checkpoint

__all__ = ['CheckpointError', 'load_checkpoint_file', 'load_checkpoint_bytes', 'unwrap_state_dict', 'remap_state_dict',
           'OFFICIAL_PREFIXES']

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

def _runs_code(qualified_name: str) -> bool:
    """Whether a pickled global can only be there to run commands or code (see ``_REFUSED_MODULES``)."""
    module, _, name = qualified_name.rpartition('.')
    if module in ('builtins', '__builtin__'):
        return name in _REFUSED_BUILTINS
    return any(module == m or module.startswith(m + '.') for m in _REFUSED_MODULES)


def _unsafe_error(path: str, unsafe: Sequence[str], reason: str) -> CheckpointError:
    return CheckpointError(
        f'cannot read checkpoint {path} safely: it references {list(unsafe)}, which loading with '
        f'weights_only=True refuses ({reason}). Nothing from the file was run. If you trust the file, '
        f'extract its state_dict yourself (torch.load(path, weights_only=False)) and save that alone '
        f'(torch.save(state_dict, ...) or safetensors).')


def _allowed_globals(found: Set[str]) -> Set[str]:
    """The globals torch's ``weights_only`` unpickler allows by default, among ``found``."""
    try:  # torch's own allowlist (private: its location may change between releases)
        from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals
        return set(_get_allowed_globals()) | set(_get_user_allowed_globals())
    except (ImportError, AttributeError):  # then torch's own names and containers are what it allows
        return {g for g in found if g.split('.')[0] == 'torch' or g in ('collections.OrderedDict',)}


def _torch_load_weights_only(data: bytes, source: str) -> Any:
    """Unpickle checked bytes (see :func:`scan_torch_checkpoint`) with ``weights_only=True``."""
    found = scan_torch_checkpoint(data, source)
    unsafe = sorted(found - _allowed_globals(found))
    code = [name for name in unsafe if _runs_code(name)]
    if code:  # refused before torch sees them: no placeholder stands in for a call that runs commands or code
        raise _unsafe_error(source, unsafe, f'{code} can run commands or code; an_zoo never stands in for them')
    try:
        # Classes from other libraries (e.g. apex's loss scaler) become inert placeholders; only tensors are used.
        with torch.serialization.safe_globals([_placeholder(name) for name in unsafe]):
            return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as refused:  # e.g. a call into os / sys, which torch refuses outright
        if not unsafe:
            raise CheckpointError(f'cannot read checkpoint {source}: {refused}') from refused
        reason = next((line for line in str(refused).splitlines() if 'GLOBAL' in line), str(refused)).strip()
        raise _unsafe_error(source, unsafe, reason) from refused


def load_checkpoint_file(path: Union[str, Path], sha256: Optional[str] = None, size: Optional[int] = None,
                         name: str = '') -> Dict[str, torch.Tensor]:
    """Read the state_dict of a ``.safetensors`` file or a torch checkpoint (``.pth``, ``.pth.tar``, ``.bin``).

    The file is read once; when ``sha256`` / ``size`` are given, those same bytes are verified and then
    deserialised, so what was checked is what is loaded. Memory stays bounded by the file: sizes the file declares
    are checked against the bytes it holds before anything is allocated, and expanded tensors are refused.

    Torch pickles (zip or legacy pre-1.6 format) are loaded with ``weights_only=True``; classes the file references
    from other libraries are replaced by inert placeholders, so neither importing nor executing anything from the file
    can happen. References to functions that run commands or code (``os``, ``subprocess``, ``builtins.eval``...)
    are refused.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsVerificationError: the bytes do not match ``sha256`` / ``size`` (nothing was deserialised).
        CheckpointError: the file is truncated, corrupt, declares more than it holds, or holds no state_dict of
            tensors.
    """
    from ..hub import read_verified
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    data = read_verified(path, sha256, size, name=name)
    return load_checkpoint_bytes(data, str(path), safetensors=path.suffix == '.safetensors')


def load_checkpoint_bytes(data: bytes, source: str, safetensors: bool = False) -> Dict[str, torch.Tensor]:
    """The state_dict held in ``data``, the bytes of a checkpoint file named ``source`` (see
    :func:`load_checkpoint_file`)."""
    if not data:
        raise CheckpointError(f'cannot read checkpoint {source}: the file is empty (0 bytes), so truncated or corrupt '
                              '(an interrupted download or copy leaves such a file): download it again')
    if safetensors:
        from safetensors import SafetensorError
        from safetensors.torch import load
        try:  # safetensors checks every tensor's declared extent against the bytes before copying it
            state_dict = load(data)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f'cannot read {source}: not a valid safetensors file ({err}). It may be truncated or corrupt: '
                f'download it again.') from err
        # in name order, as safetensors' load_file gives them (load gives the order of the bytes)
        return unwrap_state_dict({key: state_dict[key] for key in sorted(state_dict)}, source=source)
    try:
        checkpoint = _torch_load_weights_only(data, source)
    except (CheckpointError, OSError, MemoryError):
        raise
    except Exception as err:  # torch's unpickler fails on damaged bytes with IndexError, KeyError, struct.error...
        raise CheckpointError(
            f'cannot read checkpoint {source}: {type(err).__name__}: {err}. The file may be truncated, corrupt or '
            f'not a PyTorch checkpoint: download it again.') from err
    return unwrap_state_dict(checkpoint, source=source)


def unwrap_state_dict(checkpoint: Any, source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The tensors of a training checkpoint container (``{'state_dict': ...}``, ``{'model': ...}`` or bare), each a
    dense CPU tensor within its own storage, keyed by names."""
    state_dict = checkpoint
    if isinstance(checkpoint, Mapping):
        for key in ('state_dict', 'model'):
            if isinstance(checkpoint.get(key), Mapping):
                state_dict = checkpoint[key]
                break
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(f'{source} holds no state_dict (found {type(checkpoint).__name__})')
    _check_entries(state_dict, source)
    return dict(state_dict)


def _check_entries(state_dict: Mapping[Any, Any], source: str) -> None:
    """Every key a non-empty string, every value a dense CPU tensor within its own storage."""
    bad_keys = [k for k in state_dict if not isinstance(k, str) or not k]
    if bad_keys:
        raise CheckpointError(
            f'{source}: the state_dict has {len(bad_keys)} malformed key(s) {[repr(k) for k in bad_keys[:10]]}; '
            f'parameter names are non-empty strings. The file is not a model state_dict: save model.state_dict().')
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(
            f'{source}: the state_dict holds non-tensor entries {non_tensors[:10]}; expected a mapping of names '
            f'to tensors (a model state_dict or a training checkpoint with a "state_dict" entry)')
    for key, value in state_dict.items():
        check_tensor_extent(key, value, source)


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
    _check_entries(state_dict, 'the checkpoint')
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
    given_by: Dict[str, List[str]] = {}  # model key -> the checkpoint keys that map to it
    unmapped: List[str] = []
    for source_key, value in state_dict.items():
        key = _shift_index(renamed[source_key], shift)
        if key in target or (not key.startswith(tuple(ignore)) and is_classifier(key)):
            out[key] = value  # a classifier key the model lacks: e.g. num_classes=0, timm drops the head keys
            given_by.setdefault(key, []).append(source_key)
        elif not key.startswith(tuple(ignore)):
            unmapped.append(source_key)
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    collisions = [f'{key} <- {keys}' for key, keys in given_by.items() if len(keys) > 1]
    if collisions:
        raise CheckpointError(
            f'the checkpoint is ambiguous for {name}: {len(collisions)} model key(s) are each given by more than '
            f'one checkpoint key: {collisions[:20]}{" ..." if len(collisions) > 20 else ""}. The file holds two '
            f'copies of these weights (e.g. with and without a "module." prefix, or under the official and the '
            f'an_zoo name); keep one copy of each and save the state_dict again.')
    missing = [k for k in target if k not in out and not is_classifier(k)]
    if unmapped or missing:
        raise CheckpointError(
            f'the checkpoint does not fit {name}: {len(unmapped)} checkpoint key(s) map to no parameter of the '
            f'model: {unmapped}; {len(missing)} model key(s) are not in the checkpoint: {missing}. '
            f'Check that the checkpoint is for this architecture (and variant), e.g. an AN-ResNet-50 file for '
            f'an_resnet50.')
    _check_dtypes(out, target, model)
    _check_shapes(out, target, model)
    # cast only now, once every shape is known to be the model's (or one timm adapts)
    return {key: value.to(target[key].dtype) if key in target and value.is_floating_point() else value
            for key, value in out.items()}


# what a floating parameter may be loaded from: float8 / integer / bool / complex values would be converted silently
_FLOAT_SOURCES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_dtypes(out: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Refuse tensors of another kind than the model's: floating parameters take float16 / bfloat16 / float32 /
    float64 values, integer buffers (``num_batches_tracked``) integer values."""
    wrong = []
    for key, value in out.items():
        ours = target.get(key)
        if ours is None or value.dtype == ours.dtype:
            continue
        if ours.is_floating_point():
            fits = value.dtype in _FLOAT_SOURCES
        else:
            fits = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        if not fits:
            wrong.append(f'{key}: checkpoint {value.dtype}, model {ours.dtype}')
    if wrong:
        raise _shape_error(model, (
            f'{len(wrong)} tensor(s) have a dtype that does not load into the model\'s: {wrong[:20]}'
            f'{" ..." if len(wrong) > 20 else ""}. Floating parameters load from float16, bfloat16, float32 or '
            f'float64 tensors only, integer buffers from integer tensors; the file is not a weights file of this '
            f'model, or was converted wrongly: convert it again from the original checkpoint.'))


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
