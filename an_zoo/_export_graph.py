"""Inference-graph checks of exported models: an ONNX graph or a :class:`torch.export.ExportedProgram` has no
training-only parts, and in the dynamo ONNX graph every AN layer is folded to one ``Mul`` and one ``Add``."""
import ast
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ['ExportGraphError', 'check_onnx_inference_graph', 'check_exported_program_inference']


class ExportGraphError(RuntimeError):
    """An exported inference graph contains training-only parts, or AN is not in its folded form."""


_RANDOM_OPS = {'RandomNormal', 'RandomNormalLike', 'RandomUniform', 'RandomUniformLike', 'Bernoulli',
               'Multinomial'}
_CONTROL_FLOW_OPS = {'If', 'Loop', 'Scan'}
_REDUCE_OPS = {'ReduceMean', 'ReduceSum', 'ReduceSumSquare', 'ReduceL1', 'ReduceL2', 'ReduceMax', 'ReduceMin',
               'ReduceProd', 'ReduceLogSum', 'ReduceLogSumExp'}


def _load_onnx(model: Any) -> Any:
    import onnx
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(model), load_external_data=False)
    return model


def _constant_values(graph: Any) -> Dict[str, List[int]]:
    """Integer constants of the graph (initializers and Constant nodes) by name: for reading Reduce* axes."""
    from onnx import numpy_helper
    values: Dict[str, List[int]] = {}
    for init in graph.initializer:
        if init.data_type in (6, 7, 9) and len(init.dims) <= 1:  # int32 / int64 / bool vectors
            values[init.name] = [int(v) for v in numpy_helper.to_array(init).reshape(-1)]
    for node in graph.node:
        if node.op_type == 'Constant':
            for attr in node.attribute:
                if attr.name == 'value' and attr.t.data_type in (6, 7, 9):
                    values[node.output[0]] = [int(v) for v in numpy_helper.to_array(attr.t).reshape(-1)]
                elif attr.name in ('value_int', 'value_ints'):
                    values[node.output[0]] = [attr.i] if attr.name == 'value_int' else list(attr.ints)
    return values


def _shapes(graph: Any) -> Dict[str, List[Union[int, str]]]:
    shapes = {}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        if v.type.HasField('tensor_type') and v.type.tensor_type.HasField('shape'):
            shapes[v.name] = [d.dim_value if d.HasField('dim_value') else (d.dim_param or '?')
                              for d in v.type.tensor_type.shape.dim]
    return shapes


def _reduce_axes(node: Any, consts: Dict[str, List[int]], rank: Optional[int]) -> Optional[List[int]]:
    """The axes a Reduce* node reduces over (None: unknown); all axes when it has none."""
    axes = None
    for attr in node.attribute:
        if attr.name == 'axes':
            axes = list(attr.ints)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = consts.get(node.input[1])
        if axes is None:
            return None
    if axes is None:  # no axes: every axis (unless noop_with_empty_axes, which reduces nothing)
        noop = any(a.name == 'noop_with_empty_axes' and a.i for a in node.attribute)
        return [] if noop else (list(range(rank)) if rank else None)
    return [a + rank if a < 0 and rank else a for a in axes]


def _name_scopes(node: Any) -> List[str]:
    for prop in node.metadata_props:
        if prop.key == 'pkg.torch.onnx.name_scopes':
            try:
                return list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return []
    return []


def check_onnx_inference_graph(onnx_model: Any, an_layers: Sequence[str] = (), *, expect_folded: bool = True,
                               dynamic_batch: Optional[bool] = None) -> Dict[str, Any]:
    """Verify that an ONNX graph (a ``ModelProto`` or a path) is a pure inference graph; raise
    :class:`ExportGraphError` listing every violation, else return a summary.

    Checked on the whole graph: one input; no BatchNormalization in training mode (``training_mode=1`` or the extra
    running-statistics outputs); no reduction over the batch axis (batch statistics exist only in training; the AN
    attention statistic reduces over H, W); no Dropout / random ops; no If / Loop / Scan (no branches); the batch
    axis of the input and outputs is symbolic when ``dynamic_batch`` is True (static when False).

    With ``expect_folded`` (graphs of the dynamo exporter, whose nodes carry their PyTorch module scope), for every
    AN layer named in ``an_layers``: no BatchNormalization of a full-size tensor inside the layer (that of the (N, K)
    attention logits is the attention's own), and the path from the layer's input to its output over full-size
    (N, C, H, W) tensors is exactly one ``Mul`` and one ``Add``, i.e. ``x * a + b`` (the reference form
    ``(x - mean) * rstd * gamma + beta`` has three or four full-size ops, or a BatchNormalization).
    """
    import onnx
    model = _load_onnx(onnx_model)
    try:  # fills in the value shapes the TorchScript exporter leaves out (ranks, for the reduction check)
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is a help, not a requirement
        pass
    graph = model.graph
    consts = _constant_values(graph)
    shapes = _shapes(graph)
    problems: List[str] = []
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1:
        problems.append(f'graph has {len(inputs)} inputs ({[i.name for i in inputs]}), expected the image only')
    if dynamic_batch is not None:
        for v in list(inputs) + list(graph.output):
            dim0 = shapes.get(v.name, ['?'])[0]
            if dynamic_batch and not isinstance(dim0, str):
                problems.append(f'{v.name}: batch axis is static ({dim0}), expected a dynamic axis')
            if not dynamic_batch and isinstance(dim0, str):
                problems.append(f'{v.name}: batch axis is dynamic ({dim0!r}), expected static')
    counts: Dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        where = f'{node.op_type} node {node.name!r}'
        if node.op_type == 'BatchNormalization':
            training = any(a.name == 'training_mode' and a.i for a in node.attribute)
            if training or len([o for o in node.output if o]) > 1:
                problems.append(f'{where} is in training mode (batch statistics / running-statistics outputs)')
        elif node.op_type == 'Dropout':  # inference Dropout (no training_mode input, or a false one) is the identity
            mode = node.input[2] if len(node.input) > 2 else ''
            if mode and consts.get(mode, [1]) != [0]:
                problems.append(f'{where}: dropout in training mode (or a non-constant training_mode)')
        elif node.op_type in _RANDOM_OPS:
            problems.append(f'{where}: random op in an inference graph')
        elif node.op_type in _CONTROL_FLOW_OPS:
            problems.append(f'{where}: control flow (a branch) in the inference graph')
        elif node.op_type in _REDUCE_OPS:
            rank = len(shapes[node.input[0]]) if node.input[0] in shapes else None
            axes = _reduce_axes(node, consts, rank)
            if axes is None and (rank is None or rank > 1):  # (a rank-1 input is a shape vector, not data)
                problems.append(f'{where}: cannot resolve its reduction axes')
            elif axes is None:
                pass
            elif 0 in axes and (rank or 0) > 1:
                problems.append(f'{where} reduces over the batch axis (batch statistics: training only)')
    folded: Dict[str, List[str]] = {}
    if expect_folded and an_layers:
        folded, fold_problems = _check_folded(graph, an_layers, shapes)
        problems += fold_problems
    if problems:
        raise ExportGraphError('exported ONNX graph is not a folded inference graph:\n  ' + '\n  '.join(problems))
    return {'nodes': sum(counts.values()), 'op_counts': dict(sorted(counts.items())), 'an_layers': len(an_layers),
            'folded': bool(expect_folded and an_layers)}


def _full_size(shape: Optional[List[Union[int, str]]]) -> bool:
    return shape is not None and len(shape) == 4 and not (shape[2] == 1 and shape[3] == 1)


def _check_folded(graph: Any, an_layers: Sequence[str],
                  shapes: Dict[str, List[Union[int, str]]]) -> Tuple[Dict[str, List[str]], List[str]]:
    """For each AN layer: the full-size ops between its input and its output (must be exactly Mul, Add)."""
    problems: List[str] = []
    scoped: Dict[str, List[Any]] = {name: [] for name in an_layers}
    for node in graph.node:
        scopes = _name_scopes(node)
        for name in an_layers:
            # nodes of the layer (its norm / attn children included), not of the activation / dropout children of
            # AttentiveBatchNormAct2d, which follow the normalization
            if name in scopes and not any(s in (f'{name}.act', f'{name}.drop') for s in scopes):
                scoped[name].append(node)
    if not any(scoped.values()):
        return {}, ['no node carries a PyTorch module scope (pkg.torch.onnx.name_scopes): cannot locate the AN '
                    'layers; export with the dynamo exporter']
    producer = {o: n for n in graph.node for o in n.output}
    folded: Dict[str, List[str]] = {}
    for name, nodes in scoped.items():
        if not nodes:
            problems.append(f'AN layer {name}: no nodes in the graph')
            continue
        inside = {id(n) for n in nodes}
        produced = {o for n in nodes for o in n.output}
        # (a BatchNormalization of the (N, K) attention logits is the attention's own, in inference mode)
        bns = [n.name for n in nodes if n.op_type == 'BatchNormalization'
               and (n.input[0] not in shapes or _full_size(shapes[n.input[0]]))]
        if bns:
            problems.append(f'AN layer {name}: BatchNormalization of a full-size tensor inside the layer ({bns}): '
                            f'not folded')
        consumers_outside = {i for n in graph.node if id(n) not in inside for i in n.input}
        outputs = [o for o in produced if _full_size(shapes.get(o))
                   and (o in consumers_outside or o in {v.name for v in graph.output})]
        if len(outputs) != 1:
            problems.append(f'AN layer {name}: {len(outputs)} full-size outputs, expected 1')
            continue
        path, stack, seen = [], [outputs[0]], set()
        while stack:  # walk back over full-size tensors produced inside the layer
            tensor = stack.pop()
            node = producer.get(tensor)
            if node is None or id(node) not in inside or id(node) in seen:
                continue
            seen.add(id(node))
            path.append(node.op_type)
            stack += [i for i in node.input if _full_size(shapes.get(i))]
        folded[name] = sorted(path)
        if sorted(path) != ['Add', 'Mul']:
            problems.append(f'AN layer {name}: the input-to-output path is {sorted(path)}, expected one Mul and one '
                            f'Add (x * a + b)')
    return folded, problems


_TRAINING_ONLY_TARGETS = ('_native_batch_norm_legit.default', '_native_batch_norm_legit_functional', 'bernoulli',
                          'rand', 'normal')
_DROPOUT_TARGETS = ('aten.dropout.default', 'aten.native_dropout.default', 'aten.feature_dropout.default',
                    'aten.alpha_dropout.default')


def check_exported_program_inference(program: 'torch.export.ExportedProgram') -> Dict[str, Any]:
    """Verify that a :class:`torch.export.ExportedProgram` is a pure inference graph; raise :class:`ExportGraphError`
    listing every violation, else return a summary.

    No buffer is mutated (running-statistics updates happen only in training), no BatchNorm runs with batch
    statistics (``aten.batch_norm(training=True)``, ``_native_batch_norm_legit`` with training), no dropout / random
    op, and no reduction over the batch axis (``sum`` / ``mean`` / ``var`` / ``var_mean`` over dim 0).
    """
    problems: List[str] = []
    signature = program.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    # the default (training) IR keeps in-place ops: running_mean.lerp_(...), num_batches_tracked.add_(1)
    buffers = dict(signature.inputs_to_buffers)
    for node in program.graph.nodes:
        if node.op == 'call_function' and node.args and getattr(node.args[0], 'name', None) in buffers:
            schema = getattr(node.target, '_schema', None)
            if schema is not None and schema.arguments and schema.arguments[0].alias_info is not None and \
                    schema.arguments[0].alias_info.is_write:
                mutated.add(buffers[node.args[0].name])
    if any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in program.graph.nodes):
        # mutations inside nested graphs (e.g. a torch.no_grad() block: wrap_with_set_grad_enabled): functionalize
        # (only then; it takes seconds on a large model) and read the buffers it writes back
        mutated |= set(program.run_decompositions({}).graph_signature.buffers_to_mutate.values())
    if mutated:
        problems.append(f'buffers mutated by the graph (training-only running-statistics updates): '
                        f'{sorted(mutated)[:6]}')
    reductions = ('sum.dim_IntList', 'mean.dim', 'var.correction', 'var_mean.correction', 'var.dim', 'std.correction')
    counts: Dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op != 'call_function':
            continue
        target = str(node.target)
        counts[target] = counts.get(target, 0) + 1
        if target.endswith('batch_norm.default') and 'legit' not in target:  # (native_)batch_norm: by its flag
            if len(node.args) > 5 and node.args[5]:
                problems.append(f'{node.name}: {target} with training=True (batch statistics)')
        elif target in _DROPOUT_TARGETS:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get('train', True)
            if train is not False:  # dropout(p, train=False) is the identity
                problems.append(f'{node.name}: {target} in training mode')
        elif any(t in target for t in _TRAINING_ONLY_TARGETS):
            if 'no_training' not in target:
                problems.append(f'{node.name}: training-only op {target}')
        elif any(target.endswith(r) for r in reductions):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim')
            rank = len(node.args[0].meta['val'].shape) if 'val' in getattr(node.args[0], 'meta', {}) else None
            dims = list(range(rank or 0)) if dims is None else [d % rank if rank else d for d in dims]
            if 0 in dims and (rank or 0) > 1:
                problems.append(f'{node.name}: {target} over the batch axis (batch statistics: training only)')
    if problems:
        raise ExportGraphError('exported program is not an inference graph:\n  ' + '\n  '.join(problems))
    return {'nodes': sum(counts.values())}
