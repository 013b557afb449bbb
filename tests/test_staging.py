"""`cumo_mlx.staging.staged_directory`: a directory's files appear all at once or not at all.

Whole directories (new, replaced with `replace`, refused without), merged files (`last` moved last,
`stale` files removed, other files kept), an exception in the block leaving the target as it was,
and the folders of dead processes cleared by the next write. (Killed writers and full disks:
tests/test_faults.py.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cumo_mlx import staging
from cumo_mlx.staging import staged_directory


def files(directory: Path) -> dict:
    return {p.name: p.read_text() for p in directory.iterdir()} if directory.exists() else {}


def test_whole_directory_appears_complete(tmp_path):
    target = tmp_path / "out"
    with staged_directory(target) as staged:
        assert staged.parent == tmp_path and not target.exists()
        (staged / "a.txt").write_text("a")
        (staged / "config.json").write_text("{}")
    assert files(target) == {"a.txt": "a", "config.json": "{}"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("existing", [False, True])
def test_an_exception_leaves_the_target_as_it_was(tmp_path, existing):
    target = tmp_path / "out"
    if existing:
        target.mkdir()
        (target / "old.txt").write_text("old")
    before = files(target)
    with pytest.raises(OSError):
        with staged_directory(target, replace=True) as staged:
            (staged / "a.txt").write_text("a")
            raise OSError("No space left on device")
    assert files(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])


def test_an_existing_target_is_replaced_only_when_asked(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with staged_directory(target) as staged:
            (staged / "new.txt").write_text("new")
    assert files(target) == {"old.txt": "old"}
    with staged_directory(target, replace=True) as staged:
        (staged / "new.txt").write_text("new")
    assert files(target) == {"new.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_merge_keeps_other_files_removes_stale_ones_and_moves_last_last(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    for name in ("notes.txt", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"):
        (target / name).write_text("old")
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: moved.append(Path(dst).name) or real_replace(src, dst))
    with staged_directory(target, merge=True, last="config.json", stale=["model*.safetensors"]) as staged:
        assert staged.parent == target
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (staged / name).write_text("new")
    assert files(target) == {"notes.txt": "old", "config.json": "new", "model.safetensors": "new", "tokenizer.json": "new"}
    assert sorted(moved[:-1]) == ["model.safetensors", "tokenizer.json"] and moved[-1] == "config.json"


def test_the_folders_of_dead_processes_are_cleared(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # gone: its pid names no process
    target = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{child.pid}-0000"
    alive = tmp_path / f".out.tmp-{os.getpid()}-1111"  # a write still under way, in this process
    other = tmp_path / f".other.tmp-{child.pid}-2222"  # another target's
    for folder in (dead, alive, other):
        folder.mkdir()
    (tmp_path / f".out.tmp-{child.pid}-3333.previous").write_text("a replaced file, set aside")
    with staged_directory(target) as staged:
        (staged / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name, other.name])


def test_a_failed_swap_puts_the_previous_target_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".out.tmp-") and not Path(src).name.endswith(".previous") and Path(dst) == target:
            raise OSError("the disk went away")
        return real_rename(src, dst)

    monkeypatch.setattr(staging.os, "rename", rename)
    with pytest.raises(OSError, match="went away"):
        with staged_directory(target, replace=True) as staged:
            (staged / "new.txt").write_text("new")
    assert files(target) == {"old.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
