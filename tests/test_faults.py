"""Faults: conversions and training runs killed (SIGKILL) at many moments, and full disks.

A killed conversion leaves DST as it was (absent, or the previous model with --force) or complete;
a killed training run leaves checkpoints that `--resume` continues to the very same result as an
uninterrupted run, and never an adapter directory that loads with partial weights. A full disk (a
real small tmpfs when this machine lets us mount one, else writers patched to fail as MLX and Python
do: RuntimeError "[write] Unable to write", OSError ENOSPC) gives one error line, exit 2, and leaves
the previous output or checkpoint intact.

Killed at: a hook in the child SIGKILLs itself at a chosen point (shards written but no index,
before the model card, before the rename into place; mid-checkpoint, before a checkpoint's rename,
mid-pruning of an old checkpoint, mid-line of metrics.jsonl, before the adapter config's rename), or
the parent SIGKILLs it at a seeded random time once it has started. The children run
concurrently (their start-up, importing MLX and transformers, is most of their time).
(Killed right after a checkpoint appears: tests/test_train.py; mid-write of a conversion, new and
--force: tests/test_convert.py.)
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cumo_mlx
import mlx.core as mx
import numpy as np
import pytest
from cli_util import assert_one_error_line, run_cli
from cumo_mlx.cli.main import main as cli_main
from cumo_mlx.convert import convert as convert_module
from test_security import original_checkpoint, original_state  # noqa: F401  (fixture)
from tiny_data import instruct_samples, write_dataset, write_images

TIMING = ("seconds", "tokens_per_second", "peak_memory_gb")
CONCURRENT = 8

# Runs `cumo-mlx ARGV` and SIGKILLs itself at MOMENT; touches READY once started.
CHILD = textwrap.dedent(
    """
    import json, os, shutil, signal, sys
    from pathlib import Path
    from cumo_mlx.train import trainer  # (before mlx: cumo_mlx loads the BLAS MLX then uses)
    import mlx.core as mx
    from cumo_mlx.convert import convert as c
    from cumo_mlx import staging
    from cumo_mlx.cli.main import main

    moment, ready, *argv = sys.argv[1:]

    def kill(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, before=None, after=None):
        original, calls = getattr(owner, name), [0]
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if before and before(calls[0], *args):
                kill()
            result = original(*args, **kwargs)
            if after and after(calls[0], *args):
                kill()
            return result
        setattr(owner, name, wrapped)

    def half_deleted(path):
        Path(path, "trainable.safetensors").unlink()
        return True

    def torn_line(trainer_, record):
        with open(trainer_.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record)[:25])
        return True

    name = lambda path: Path(path).name
    hooks = {
        "convert-before-index": lambda: wrap(c.ShardWriter, "finish", before=lambda n, *a: True),
        "convert-before-card": lambda: wrap(c, "model_card", before=lambda n, *a: True),
        "convert-before-rename": lambda: wrap(staging, "_rename_directory", before=lambda n, *a: True),
        "train-mid-checkpoint": lambda: wrap(mx, "save_safetensors", after=lambda n, *a: n == 3),
        "train-before-checkpoint-rename": lambda: wrap(
            os, "rename", before=lambda n, src, dst: name(src).startswith(".step-0000004.tmp-")),
        "train-mid-pruning": lambda: wrap(
            shutil, "rmtree", before=lambda n, path, *a: name(path) == "step-0000002" and half_deleted(path)),
        "train-torn-metrics": lambda: wrap(
            trainer.Trainer, "log_step", before=lambda n, self, record: record["step"] == 5 and torn_line(self, record)),
        "train-before-adapter-config-rename": lambda: wrap(
            os, "replace", before=lambda n, src, dst: name(dst) == "adapter_config.json"),
    }
    hooks.get(moment, lambda: None)()
    Path(ready).touch()
    sys.exit(main(argv))
    """
)


def run_killed(jobs: dict, window: float) -> dict:
    """Run each job {key: (moment, argv)} in a child; children with a `random-SEED` moment are killed
    by us at a seeded random time in [0, window) s after they start. {key: return code}."""
    pending, running, codes = list(jobs.items()), {}, {}
    deadline = time.time() + 300
    while pending or running:
        while pending and len(running) < CONCURRENT:
            key, (moment, argv) = pending.pop(0)
            ready = Path(argv[argv.index("--ready") + 1]) if "--ready" in argv else None
            argv = [a for i, a in enumerate(argv) if a != "--ready" and (i == 0 or argv[i - 1] != "--ready")]
            process = subprocess.Popen(
                [sys.executable, "-c", CHILD, moment, str(ready), *map(str, argv)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            delay = random.Random(moment).uniform(0, window) if moment.startswith("random") else None
            running[key] = (process, ready, delay, None)
        for key, (process, ready, delay, started) in list(running.items()):
            if process.poll() is not None:
                codes[key] = process.returncode
                del running[key]
            elif delay is not None and started is None and ready.exists():
                running[key] = (process, ready, delay, time.time())
            elif started is not None and time.time() > started + delay:
                process.send_signal(signal.SIGKILL)
        assert time.time() < deadline, "children did not end"
        time.sleep(0.01)
    return codes


def files(directory: Path) -> dict:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Conversion killed
# ---------------------------------------------------------------------------------------------


# (moment, over an existing DST with --force)
CONVERT_MOMENTS = [
    ("convert-before-index", False),
    ("convert-before-card", True),
    ("convert-before-rename", True),
    ("random-1", True),
    ("random-2", False),
]


def test_killed_conversions_leave_the_previous_output_or_a_complete_one(tmp_path, original_state, tiny_mlx_model_dir):  # noqa: F811
    src = original_checkpoint(tmp_path / "src", original_state, tiny_mlx_model_dir)
    complete = files(Path(convert_module.convert(str(src), str(tmp_path / "reference"), progress=False).path))
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("a previous conversion")
    jobs = {}
    for moment, force in CONVERT_MOMENTS:
        dst = tmp_path / f"{moment}-{force}" / "mlx"
        if force:
            shutil.copytree(old, dst)
        jobs[(moment, force)] = (moment, ["convert", "--hf-path", src, "--mlx-path", dst, "--no-progress",
                                          "--ready", tmp_path / f"ready-{moment}-{force}"] + (["--force"] if force else []))  # fmt: skip
    codes = run_killed(jobs, window=0.5)
    killed = 0
    for (moment, force), code in codes.items():
        dst = tmp_path / f"{moment}-{force}" / "mlx"
        found = files(dst)
        killed += code == -signal.SIGKILL
        if code == 0 or found.keys() == complete.keys():  # finished before the kill: complete and loadable
            assert {k: v for k, v in found.items() if k != "README.md"} == {k: v for k, v in complete.items() if k != "README.md"}
            assert cumo_mlx.load(dst)[0] is not None
        else:
            assert code == -signal.SIGKILL, (moment, force, code)
            assert found == (files(old) if force else {}), (moment, force, sorted(found))
        # The next conversion to the same place completes and clears the dead one's temporary directory.
        convert_module.convert(str(src), str(dst), progress=False, force=True)
        assert sorted(p.name for p in dst.parent.iterdir()) == ["mlx"]
        assert {k: v for k, v in files(dst).items() if k != "README.md"} == {k: v for k, v in complete.items() if k != "README.md"}
    assert killed >= 3  # every hook fired (the random moments may come after the end)


# ---------------------------------------------------------------------------------------------
# Training killed
# ---------------------------------------------------------------------------------------------


TRAIN_MOMENTS = [
    "train-mid-checkpoint",
    "train-before-checkpoint-rename",
    "train-mid-pruning",
    "train-torn-metrics",
    "train-before-adapter-config-rename",
    "random-11",
]


@pytest.fixture(scope="module")
def train_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-train")
    names = write_images(root / "images")
    return root, write_dataset(root, instruct_samples(names))


def train_args(model, data, images, out, iters: int = 6) -> list:
    return ["train", "--model", str(model), "--data", str(data), "--image-folder", str(images), "--output", str(out),
            "--iters", str(iters), "--save-every", "2", "--keep-checkpoints", "1", "--batch-size", "2", "--lora-rank", "2",
            "--lora-dropout", "0", "--learning-rate", "1e-3", "--no-progress"]  # fmt: skip


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def metrics(out: Path) -> list:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_killed_training_resumes_to_the_same_result(tmp_path, train_work, tiny_mlx_model_dir):
    root, data = train_work
    assert cli_main(train_args(tiny_mlx_model_dir, data, root / "images", tmp_path / "whole")) == 0
    whole = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    jobs = {
        moment: (moment, [*train_args(tiny_mlx_model_dir, data, root / "images", tmp_path / moment), "--ready", tmp_path / f"ready-{moment}"])
        for moment in TRAIN_MOMENTS
    }
    codes = run_killed(jobs, window=1.0)
    assert all(codes[m] == -signal.SIGKILL for m in TRAIN_MOMENTS if not m.startswith("random")), codes  # every hook fired
    for moment, code in codes.items():
        out = tmp_path / moment
        if code != 0:
            assert code == -signal.SIGKILL, (moment, code)
            if (out / "adapter_config.json").exists():  # the last rename was done: the adapters are complete
                assert same_weights(whole, mx.load(str(out / "adapters.safetensors"))), moment
            usable = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())
            if usable:  # the one --resume takes is whole
                assert mx.load(str(usable[-1] / "trainable.safetensors")) and mx.load(str(usable[-1] / "optimizer.safetensors"))
            assert cli_main([*train_args(tiny_mlx_model_dir, data, root / "images", out), "--resume"]) == 0, moment
        assert same_weights(whole, mx.load(str(out / "adapters.safetensors"))), moment
        assert metrics(out) == metrics(tmp_path / "whole"), moment
        assert not list(out.rglob(".*.tmp-*")), moment  # a killed run's temporaries are cleared by the next


# ---------------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def mlx_write_failure(path, *args, **kwargs):
    """What MLX does on a full disk: the file is begun, then a RuntimeError."""
    Path(path).write_bytes(b"\0" * 8)
    raise RuntimeError("[write] Unable to write 8 bytes to file.")


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB tmpfs (smaller than the tiny model), or a skip where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-writer tests cover the same paths")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_conversion_on_a_really_full_disk(small_disk, tmp_path, original_state, tiny_mlx_model_dir):  # noqa: F811
    src = original_checkpoint(tmp_path / "src", original_state, tiny_mlx_model_dir)
    code, _, err = run_cli("convert", "--hf-path", src, "--mlx-path", small_disk / "mlx", "--no-progress")
    assert "No space left on device" in assert_one_error_line(code, err)
    assert list(small_disk.iterdir()) == []


def test_upcycle_on_a_really_full_disk(small_disk, tmp_path):
    from tiny_models import tiny_config, write_mlx_model

    dense = write_mlx_model(tmp_path / "dense", tiny_config(clip_smoe=False, connector="mlp2x_gelu"))
    code, _, err = run_cli("upcycle", "--model", dense, "--mlx-path", small_disk / "moe")
    assert "cannot write the model" in assert_one_error_line(code, err)
    assert [p.name for p in small_disk.iterdir()] == ["moe"] and list((small_disk / "moe").iterdir()) == []


def test_conversion_disk_full_keeps_the_previous_output(tmp_path, original_state, tiny_mlx_model_dir, monkeypatch):  # noqa: F811
    src = original_checkpoint(tmp_path / "src", original_state, tiny_mlx_model_dir)
    dst = tmp_path / "out" / "mlx"
    convert_module.convert(str(src), str(dst), progress=False)
    before = files(dst)
    monkeypatch.setattr(convert_module.ShardWriter, "write", no_space)
    code, _, err = run_cli("convert", "--hf-path", src, "--mlx-path", dst, "--force", "--no-progress")
    assert "No space left on device (free some disk space)" in assert_one_error_line(code, err)
    assert files(dst) == before and sorted(p.name for p in dst.parent.iterdir()) == ["mlx"]


@pytest.mark.parametrize("command", ["upcycle", "fuse"])
def test_model_writers_disk_full_keep_the_previous_output(tmp_path, train_work, tiny_mlx_model_dir, monkeypatch, command):
    from mlx_lm import utils as mlx_lm_utils
    from tiny_models import tiny_config, write_mlx_model

    root, data = train_work
    if command == "upcycle":
        dense = write_mlx_model(tmp_path / "dense", tiny_config(clip_smoe=False, connector="mlp2x_gelu"))
        args = ["upcycle", "--model", dense, "--mlx-path", tmp_path / "out"]
    else:
        assert cli_main(train_args(tiny_mlx_model_dir, data, root / "images", tmp_path / "adapters", iters=1)) == 0
        args = ["fuse", "--model", tiny_mlx_model_dir, "--adapter-path", tmp_path / "adapters", "--mlx-path", tmp_path / "out"]
    assert run_cli(*args)[0] == 0
    before = files(tmp_path / "out")
    for failure in (mlx_write_failure, no_space):
        monkeypatch.setattr(mlx_lm_utils.mx, "save_safetensors", failure)
        code, _, err = run_cli(*args, "--force")  # over the previous output, as the user asked
        assert f"cannot write the model to {tmp_path / 'out'}" in assert_one_error_line(code, err)
        assert files(tmp_path / "out") == before  # no temporary folder left either
        monkeypatch.undo()
    assert cumo_mlx.load(tmp_path / "out")[0] is not None


def test_training_disk_full_keeps_the_last_checkpoint_resumable(tmp_path, train_work, tiny_mlx_model_dir, monkeypatch):
    root, data = train_work
    args = train_args(tiny_mlx_model_dir, data, root / "images", tmp_path / "out")
    assert cli_main(train_args(tiny_mlx_model_dir, data, root / "images", tmp_path / "whole")) == 0
    real_save = mx.save_safetensors
    saved = []

    def fail_on_the_second_checkpoint(path, *a, **k):
        saved.append(path)
        if len(saved) > 2:  # the first checkpoint holds two files
            mlx_write_failure(path)
        return real_save(path, *a, **k)

    monkeypatch.setattr(mx, "save_safetensors", fail_on_the_second_checkpoint)
    code, _, err = run_cli(*args)
    checkpoint = tmp_path / "out" / "checkpoints" / "step-0000002"
    line = assert_one_error_line(code, err)
    assert "cannot write the checkpoint" in line and f"--resume continues from {checkpoint}" in line
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step-0000002"]  # no temporary left
    monkeypatch.undo()
    assert cli_main([*args, "--resume"]) == 0
    assert same_weights(*(mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("whole", "out")))


@pytest.mark.parametrize("where", ["metrics", "adapters"])
def test_training_disk_full_while_writing_metrics_or_adapters(tmp_path, train_work, tiny_mlx_model_dir, monkeypatch, where):
    root, data = train_work
    args = train_args(tiny_mlx_model_dir, data, root / "images", tmp_path / "out")
    if where == "metrics":
        real_open = open

        def full_metrics(path, mode="r", *a, **k):
            if str(path).endswith("metrics.jsonl") and "a" in mode:
                no_space()
            return real_open(path, mode, *a, **k)

        monkeypatch.setattr("builtins.open", full_metrics)
        fragment = "No space left on device"
    else:
        real_save = mx.save_safetensors
        monkeypatch.setattr(mx, "save_safetensors", lambda path, *a, **k: mlx_write_failure(path) if "adapters" in str(path) else real_save(path, *a, **k))
        fragment = "cannot write"
    code, _, err = run_cli(*args)
    assert fragment in assert_one_error_line(code, err)
    assert not (tmp_path / "out" / "adapters.safetensors").exists() and not (tmp_path / "out" / "adapter_config.json").exists()


def test_resume_from_a_damaged_checkpoint_is_one_error_line(tmp_path, train_work, tiny_mlx_model_dir):
    root, data = train_work
    args = train_args(tiny_mlx_model_dir, data, root / "images", tmp_path / "out")
    assert cli_main(args) == 0
    latest = max((tmp_path / "out" / "checkpoints").glob("step-*"))
    weights = latest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_cli(*args, "--resume")
    assert "is damaged" in assert_one_error_line(code, err)
