"""Small file-system helpers shared by the package: atomic writes."""
import os
from pathlib import Path
from typing import Callable, Union

__all__ = ['atomic_write', 'atomic_write_text']


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
