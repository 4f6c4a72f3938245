"""Generated blocks in markdown pages: ``<!-- name:start -->`` ... ``<!-- name:end -->`` regions that scripts
rewrite (model and weights tables, the export matrix) and tests compare with what the code generates."""
from pathlib import Path
from typing import Optional, Union

__all__ = ['read_block', 'replace_block', 'write_block']


def _markers(name: str):
    return f'<!-- {name}:start -->', f'<!-- {name}:end -->'


def read_block(text: str, name: str) -> Optional[str]:
    """The content between the block's markers (without the surrounding newlines), or None if there is no block."""
    start, end = _markers(name)
    head, found, rest = text.partition(start)
    if not found or end not in rest:
        return None
    return rest.partition(end)[0].strip('\n')


def replace_block(text: str, name: str, content: str, where: str = 'the page') -> str:
    """``text`` with the block's content replaced; a page without the block is an error (never a silent no-op)."""
    start, end = _markers(name)
    if read_block(text, name) is None:
        raise ValueError(f'{where} has no {start} ... {end} block; add the two markers where the content belongs')
    head, _, rest = text.partition(start)
    return f'{head}{start}\n{content}\n{end}{rest.partition(end)[2]}'


def write_block(path: Union[str, Path], name: str, content: str) -> bool:
    """Replace the block in the file ``path`` (atomically); True if the file changed."""
    from ._io import atomic_write_text
    path = Path(path)
    text = path.read_text(encoding='utf-8')
    updated = replace_block(text, name, content, where=str(path))
    if updated != text:
        atomic_write_text(path, updated)
    return updated != text
