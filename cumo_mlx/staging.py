"""Writing a directory all-or-nothing: stage its files in a temporary folder, move them into place last.

Everything that writes a model goes through `staged_directory` (loader.save, the converter, the
training checkpoints, the LoRA adapters), so a full disk, an exception or a killed process never
leaves a half-written output where a previous one was.
"""

import errno
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Union


@contextmanager
def staged_directory(
    target: Union[str, Path],
    *,
    merge: bool = False,
    replace: bool = False,
    last: str = "config.json",
    stale: Iterable[str] = (),
) -> Iterator[Path]:
    """Yield an empty temporary folder to write `target`'s files in; move them into place when the
    block ends without an exception.

    Two ways into place:
    - whole (default): the folder, beside `target`, is renamed to `target`, so `target` is at every
      moment either as it was or complete. An existing `target` is moved aside first and deleted
      once the new one is in place when `replace`; without it, FileExistsError and nothing changes.
    - merge=True: `target` (created if needed) keeps its other files; the folder is inside it and
      each staged entry replaces its namesake (os.replace: atomic per file), `last` after all the
      others, so a directory holding `last` is complete. Files matching the `stale` globs that were
      not staged (shards of a bigger model written there before) are deleted just before.

    On an exception in the block (a full disk, KeyboardInterrupt) the folder is deleted and
    `target` is as it was. A killed process leaves its folder, `.{target name}.tmp-{pid}-{random}`;
    the next staged_directory for the same target deletes it once that process is gone.
    """
    target = Path(target).absolute()
    home = target if merge else target.parent
    home.mkdir(parents=True, exist_ok=True)
    _remove_dead_stages(home, target.name)
    stage = home / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir()  # (not mkdtemp: a folder renamed to `target` keeps the umask's permissions, not 0700)
    try:
        yield stage
        if merge:
            _merge_files(stage, target, last, stale)
        else:
            _rename_directory(stage, target, replace)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # (renamed away on success: nothing left to delete)


def _rename_directory(stage: Path, target: Path, replace: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        os.rename(stage, target)
        return
    if not replace:
        raise FileExistsError(errno.EEXIST, "appeared while it was being written", str(target))
    previous = stage.with_name(stage.name + ".previous")  # (a stage name: cleared if we are killed now)
    os.rename(target, previous)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(previous, target)
        raise
    _delete(previous)


def _merge_files(stage: Path, target: Path, last: str, stale: Iterable[str]) -> None:
    names = sorted((path.name for path in stage.iterdir()), key=lambda name: name == last)
    for pattern in stale:
        for path in target.glob(pattern):
            if path.name not in names and path.is_file():
                path.unlink()
    for name in names:
        os.replace(stage / name, target / name)


def _remove_dead_stages(home: Path, name: str) -> None:
    """Folders staged for `name` in `home` by processes that are gone (killed, crashed)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp-(\d+)-.+")
    for path in home.iterdir():
        match = pattern.fullmatch(path.name)
        if match and not _alive(int(match.group(1))):
            _delete(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (PermissionError), or no pid we may ask about
        pass
    return True


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
