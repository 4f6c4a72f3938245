"""Reading the files of the official releases as data: safe archive extraction and training configs.

An official AOGNet-v2 download is a zip archive of one folder holding ``config.yaml`` (the yacs config the model was
trained with) and ``model_best.pth.tar``; an iVMCL-Release model folder holds its mmcv config ``<name>.py`` and the
checkpoint. Nothing in them is executed: archive members are checked before anything is written (no absolute path,
no ``..``, no link, bounded sizes), YAML is read with ``yaml.safe_load`` and an mmcv ``.py`` config is parsed with
:mod:`ast` and evaluated only as literals and ``dict(...)`` calls.
"""
import ast
import operator
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Mapping, Optional, Sequence, Union

__all__ = ['OfficialFileError', 'extract_members', 'read_config', 'check_config']

# an official archive holds one model (a few hundred MB at most); anything far beyond is not one
MAX_MEMBER_BYTES = 4 << 30
MAX_MEMBERS = 64


class OfficialFileError(ValueError):
    """An official archive or config is unusable or describes another model; the message says what and why."""


def _member_problem(info: zipfile.ZipInfo) -> Optional[str]:
    name = info.filename
    path = PurePosixPath(name)
    if name.startswith(('/', '\\')) or (len(name) > 1 and name[1] == ':') or path.is_absolute():
        return 'an absolute path'
    if '..' in path.parts or '\\' in name:
        return 'a path that leaves the archive folder'
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return 'a symbolic link'
    if info.file_size > MAX_MEMBER_BYTES:
        return f'{info.file_size} bytes, more than the {MAX_MEMBER_BYTES} an official file can have'
    return None


def extract_members(archive: Union[str, Path], wanted: Sequence[str], out_dir: Union[str, Path]) -> Dict[str, Path]:
    """Extract the members whose base names are ``wanted`` (each must occur exactly once, at any folder depth) from
    the zip ``archive`` into ``out_dir``; returns ``{wanted name: extracted path}``.

    Every member of the archive is checked first (absolute paths, ``..``, links, sizes, member count): a bad one is an
    error and nothing is written. Extracted files get plain names inside ``out_dir`` (the archive's folders are not
    recreated), and the bytes written are bounded by the sizes the archive declares.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise OfficialFileError(f'{archive} is not a readable zip archive ({err}): it may be truncated or not the '
                                f'official file. Delete it and download again.') from err
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise OfficialFileError(f'{archive} has {len(infos)} members; an official archive has a few. Not used.')
        for info in infos:
            problem = _member_problem(info)
            if problem:
                raise OfficialFileError(f'{archive}: member {info.filename!r} is {problem}; the archive was not '
                                        f'extracted. It is not an official file: delete it.')
        found: Dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            base = PurePosixPath(info.filename).name
            if base in wanted and not info.is_dir():
                if base in found:
                    raise OfficialFileError(f'{archive} holds {base} twice ({found[base].filename}, {info.filename})')
                found[base] = info
        missing = [w for w in wanted if w not in found]
        if missing:
            raise OfficialFileError(f'{archive} has no {missing}; it holds {[i.filename for i in infos]}. It is not '
                                    f'the official archive of this model.')
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for base, info in found.items():
            target = out_dir / base
            with zf.open(info) as src, open(target, 'wb') as dst:
                written = 0
                for chunk in iter(lambda: src.read(1 << 20), b''):
                    written += len(chunk)
                    if written > info.file_size:  # a member inflating beyond its declared size
                        raise OfficialFileError(f'{archive}: {info.filename} inflates beyond its declared size')
                    dst.write(chunk)
            paths[base] = target
    return paths


_BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _literal(node: ast.AST, names: Mapping[str, Any], where: str) -> Any:
    """Value of an mmcv config expression built from literals, containers, ``dict(...)``, names defined earlier in
    the file and arithmetic on numbers; anything else is refused (the file is data, never run)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_literal(e, names, where) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k, names, where): _literal(v, names, where) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict' and not node.args:
        return {kw.arg: _literal(kw.value, names, where) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Name) and node.id in ('True', 'False', 'None'):
        return {'True': True, 'False': False, 'None': None}[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, names, where)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        left, right = _literal(node.left, names, where), _literal(node.right, names, where)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            return _BIN_OPS[type(node.op)](left, right)
    raise OfficialFileError(f'{where}, line {getattr(node, "lineno", "?")}: {ast.dump(node)[:80]} is not plain data; '
                            f'an_zoo reads configs as data only and does not run them')


def _read_mmcv_config(path: Path) -> Dict[str, Any]:
    try:
        tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as err:
        raise OfficialFileError(f'{path} is not a readable mmcv config: {err}') from err
    values: Dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            value = _literal(node.value, values, str(path))
            for target in node.targets:
                values[target.id] = value
        elif not isinstance(node, ast.Expr) or not isinstance(node.value, ast.Constant):  # docstrings are fine
            raise OfficialFileError(f'{path}, line {node.lineno}: only NAME = value assignments are read; the file '
                                    f'is data for an_zoo, not code to run')
    return values


def read_config(path: Union[str, Path]) -> Dict[str, Any]:
    """The training config of an official model: ``.yaml`` (AOGNet-v2, yacs) or ``.py`` (iVMCL-Release, mmcv), as
    nested plain data."""
    path = Path(path)
    if path.suffix == '.py':
        return _read_mmcv_config(path)
    import yaml
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8'))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise OfficialFileError(f'{path} is not a readable YAML config: {err}') from err
    if not isinstance(data, dict):
        raise OfficialFileError(f'{path} does not hold a config mapping (found {type(data).__name__})')
    return data


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split('.'):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def check_config(config: Mapping[str, Any], expected: Mapping[str, Any], source: str, model: str) -> None:
    """Refuse a config that does not describe the expected architecture: every ``expected`` dotted key must hold the
    expected value; the error lists each difference with both values."""
    problems = []
    for key, want in expected.items():
        try:
            have = _lookup(config, key)
        except KeyError:
            problems.append(f'{key}: missing (expected {want!r})')
            continue
        if not _same(have, want):
            problems.append(f'{key}: {have!r} (expected {want!r})')
    if problems:
        raise OfficialFileError(f'{source} does not describe {model}: {"; ".join(problems)}. The file belongs to another '
                                f'model: check the download (nothing was converted).')
