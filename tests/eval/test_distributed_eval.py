"""`mlx.launch --backend ring -n 2 cumo-mlx eval ...` on localhost: each rank answers its share, rank 0
merges and scores; the answers file and the score are a one-process run's."""

import json
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import eval_folders
import pytest
from cli_util import run_cli

LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
CUMO_MLX = shutil.which("cumo-mlx", path=str(Path(sys.executable).parent)) or shutil.which("cumo-mlx")
pytestmark = pytest.mark.skipif(LAUNCH is None or CUMO_MLX is None, reason="mlx.launch or cumo-mlx is not installed")


def free_ports() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free ports")


def records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "answer_id"} for line in path.read_text().splitlines()]


def launch(*argv) -> str:
    """stdout of `cumo-mlx ARGV` on 2 ranks (both ranks' lines, rank 0 alone prints)."""
    command = [LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(free_ports()), CUMO_MLX, *map(str, argv)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-ranks")
    eval_folders.pope(root)  # 8 questions: 4 per rank
    argv = ["eval", "--task", "pope", "--model", "demo", "--data-dir", root, "--batch-size", "3", "--json"]
    code, out, err = run_cli(*argv, "--output", root / "one.jsonl")
    assert code == 0, err
    return root, argv, json.loads(out.strip().splitlines()[-1])


def test_two_ranks_answer_and_score_like_one_process(one_process):
    root, argv, result = one_process
    out = launch(*argv, "--output", root / "two.jsonl")
    assert json.loads(out.strip().splitlines()[-1]) == result
    assert records(root / "two.jsonl") == records(root / "one.jsonl")
    assert not list(root.glob("two.rank*"))  # the part files are merged away


def test_two_ranks_resume_a_cut_one_process_run(one_process):
    """The 3 answers kept, the 5 left shared by the ranks; a half-written line is repaired first."""
    root, argv, result = one_process
    lines = (root / "one.jsonl").read_text().splitlines()
    cut = root / "cut.jsonl"
    cut.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    out = launch(*argv, "--output", cut, "--resume")
    assert json.loads(out.strip().splitlines()[-1]) == result
    assert cut.read_text().splitlines()[:3] == lines[:3] and records(cut) == records(root / "one.jsonl")
