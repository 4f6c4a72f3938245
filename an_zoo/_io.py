"""Small file-system helpers shared by the package: atomic writes, and package data kept equal to the
repository-root copies."""
import os
from pathlib import Path
from typing import Callable, List, Union

__all__ = ['atomic_write', 'atomic_write_text', 'write_package_data']


def atomic_write(path: Union[str, Path], write: Callable[[str], object]) -> Path:
    """Write ``path`` through ``write(tmp_path)`` into a temporary file next to it, then rename it into place, so a
    reader never sees a half-written file and an interrupted write leaves the old one untouched."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda p: Path(p).write_text(text, encoding='utf-8'))


PACKAGE_DIR = Path(__file__).resolve().parent


def write_package_data(path: Union[str, Path], text: str, package: Path = PACKAGE_DIR) -> List[Path]:
    """Write ``path`` atomically; when it is one of the package's data files inside a source checkout, also write the
    repository-root copy of the same name, so the two never differ. Returns the files written."""
    path = Path(path)
    files = [path]
    if path.resolve().parent == Path(package).resolve():
        root_copy = package.parent / path.name
        if root_copy.is_file() and (package.parent / 'pyproject.toml').is_file():
            files.append(root_copy)
    for file in files:
        atomic_write_text(file, text)
    return files
