"""Paths a user gives: files safe to read, folders a path must stay inside, outputs safe to write.

Every command checks its inputs and outputs here, where they enter, so each rule holds everywhere:
- a file to read is a regular file of bounded size: a FIFO or /dev/stdin would block the read
  forever, a directory or an empty path gets a message that names it;
- a path that must stay inside a folder is judged by its real path (symlinks resolved), not its text;
- an output never replaces an existing one without --force, nor any of the command's inputs.
"""

import os
import stat
from pathlib import Path
from typing import Optional, Union

from .errors import CuMoError

PathLike = Union[str, Path]


def regular_file(path: PathLike, what: str, max_bytes: Optional[int] = None, error: type = CuMoError) -> Path:
    """`path` if it is a regular file of at most `max_bytes`; else `error` naming it as `what` ("image").

    os.stat, not open: opening a FIFO blocks until a writer comes.
    """
    name = str(path)
    if not name.strip():
        raise error(f"the {what} path is empty", f"give the path of the {what}")
    try:
        info = os.stat(name)
    except (OSError, ValueError) as e:  # missing, no permission, a NUL byte, a name too long
        raise error(f"cannot read the {what} {name}: {getattr(e, 'strerror', None) or e}", "check the path") from None
    if stat.S_ISDIR(info.st_mode):
        article = "an" if what[0] in "aeiou" else "a"
        raise error(f"{name} is a directory, not {article} {what}", f"give the {what}'s file")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"cannot read the {what} {name}: it is a pipe, device or socket, not a regular file", "give a file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise error(
            f"the {what} {name} is {info.st_size >> 20} MB, over the {max_bytes >> 20} MB limit", f"give a smaller {what}"
        )
    return Path(name)


def inside(folder: PathLike, name: PathLike) -> Optional[Path]:
    """The real path of `name` (relative names taken in `folder`) if it lies inside `folder`, else None.

    Real paths on both sides: a symlink in the folder that points out of it is outside.
    Raises ValueError for a name with a NUL byte.
    """
    root = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(root, name))  # an absolute name replaces the root
    return Path(real) if os.path.commonpath([root, real]) == root else None


def check_output(path: PathLike, *inputs: PathLike, force: bool = False, option: str = "--out") -> None:
    """Refuse to write `path` over one of the command's `inputs` (same real path), or over an existing
    non-empty file or folder without `force`."""
    real = os.path.realpath(path)
    for source in inputs:
        if real == os.path.realpath(source):
            raise CuMoError(f"{option} {path} would overwrite {source}, an input of this command", f"choose another {option}")
    if force or not os.path.lexists(path):
        return
    try:
        empty = os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
    except OSError:  # a folder we may not list: it may hold files
        empty = False
    if empty:
        return  # an empty folder holds nothing to lose
    raise CuMoError(f"{option} {path} already exists", f"choose another {option}, or pass --force to write over it")
