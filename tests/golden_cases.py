"""The golden reference cases in ``tests/golden/``: checkpoints in the official layouts, rebuilt from small recipes,
with the outputs the official code produced for them.

A checkpoint is not stored as a file. Each case keeps a recipe (``<case>.recipe.json``: key order, per-parameter
shape / mean / std / dtype and a case seed) and its buffers verbatim (``<case>.buffers.safetensors``: running
statistics and ``num_batches_tracked``). Every parameter is a seeded draw from numpy's legacy ``RandomState``
stream (frozen, so version-stable)::

    seed  = first 4 bytes (big endian) of sha256(f"{case_seed}:{key}")
    value = RandomState(seed).standard_normal(numel) * std + mean   (float64 -> float16 -> stored dtype)

The rebuilt state dict is checked against the digest recorded in ``cases.json`` before it is written in the case's
container (the AOGNet-v2 training checkpoint, or a plain ``{'state_dict': ...}``).
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from safetensors.torch import load_file

GOLDEN_DIR = Path(__file__).resolve().parent / 'golden'
DTYPES = {'float16': torch.float16, 'float32': torch.float32, 'int64': torch.int64}
RECIPE_FORMAT = 1


def load_cases(golden_dir: Path = GOLDEN_DIR) -> List[dict]:
    """Every case of ``cases.json``."""
    return json.loads((golden_dir / 'cases.json').read_text())['cases']


def case(name: str, golden_dir: Path = GOLDEN_DIR) -> dict:
    found = {c['name']: c for c in load_cases(golden_dir)}
    if name not in found:
        raise KeyError(f'unknown golden case {name!r}; known: {sorted(found)}')
    return found[name]


def expected_outputs(name: str, golden_dir: Path = GOLDEN_DIR) -> Dict[str, torch.Tensor]:
    """The inputs and the official code's logits (``input_eval``, ``logits_eval``, ``input_train``, ...)."""
    return load_file(str(golden_dir / case(name, golden_dir)['expected']['file']))


def _draw(case_seed: int, key: str, spec: dict) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(f'{case_seed}:{key}'.encode()).digest()[:4], 'big')
    shape = spec['shape']
    numel = int(np.prod(shape)) if shape else 1
    values = np.random.RandomState(seed).standard_normal(numel) * float(spec['std']) + float(spec['mean'])
    return torch.from_numpy(values.astype(np.float16).reshape(shape).copy()).to(DTYPES[spec['dtype']])


def state_dict_digest(state_dict: Dict[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype name, shape as JSON, raw bytes) of every entry, in order."""
    dtype_names = {v: k for k, v in DTYPES.items()}
    digest = hashlib.sha256()
    for key, value in state_dict.items():
        t = value.detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(dtype_names[t.dtype].encode())
        digest.update(json.dumps(list(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return digest.hexdigest()


def official_state_dict(name: str, golden_dir: Path = GOLDEN_DIR) -> 'OrderedDict[str, torch.Tensor]':
    """The case's checkpoint state dict (official keys, order and dtypes), checked against the recorded digest."""
    checkpoint = case(name, golden_dir)['checkpoint']
    recipe = json.loads((golden_dir / checkpoint['recipe']).read_text())
    if recipe.get('format_version') != RECIPE_FORMAT:
        raise ValueError(f'{checkpoint["recipe"]}: recipe format {recipe.get("format_version")}, '
                         f'this reader knows {RECIPE_FORMAT}')
    buffers = load_file(str(golden_dir / checkpoint['buffers']))
    params = {p['key']: p for p in recipe['params']}
    state_dict: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    for key in recipe['keys']:
        if key in params:
            state_dict[key] = _draw(int(recipe['case_seed']), key, params[key])
        elif key in buffers:
            state_dict[key] = buffers[key].clone()
        else:
            raise KeyError(f'{name}: {key} is neither a drawn parameter nor a stored buffer')
    digest = state_dict_digest(state_dict)
    if digest != checkpoint['state_dict_digest']:
        raise RuntimeError(f'{name}: rebuilt state dict digest {digest[:12]} differs from the recorded '
                           f'{checkpoint["state_dict_digest"][:12]} (recipe or buffers changed, or the RNG stream)')
    return state_dict


def _container(spec: dict, state_dict: Dict[str, torch.Tensor]) -> dict:
    if spec['kind'] == 'state_dict_only':
        return {'state_dict': state_dict}
    if spec['kind'] == 'legacy_main_fp16':
        # the AOGNet-v2 training checkpoint: epoch, arch, weights, best top-1 and the mixed-precision optimizer's
        # state reduced to plain Python values
        extra = spec['extra']
        optimizer = {
            'dynamic_loss_scale': False, 'overflow': False, 'first_closure_call_this_step': True,
            'optimizer_state_dict': {'state': {}, 'param_groups': [{
                'lr': 0.0, 'momentum': 0.9, 'dampening': 0, 'weight_decay': 0.0001, 'nesterov': False,
                'params': list(range(extra['n_model_params']))}]},
            'fp32_from_fp16': [],
        }
        return {'epoch': extra['epoch'], 'arch': extra['arch'], 'state_dict': state_dict,
                'best_prec1': extra['best_prec1'], 'optimizer': optimizer}
    raise ValueError(f'unknown checkpoint container {spec["kind"]!r}')


def materialize(name: str, out_dir: Path, golden_dir: Path = GOLDEN_DIR) -> Path:
    """Write the case's checkpoint as ``out_dir/<file_name>`` and return its path."""
    checkpoint = case(name, golden_dir)['checkpoint']
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / checkpoint['file_name']
    torch.save(_container(checkpoint['container'], official_state_dict(name, golden_dir)), path)
    return path
