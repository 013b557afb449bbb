"""`mlx.launch --backend ring -n 2 cumo-mlx eval ...` on localhost: each rank answers its share, rank 0
merges and scores; the answers file and the score are a one-process run's."""

import json
from pathlib import Path

import eval_folders
import pytest
from cli_util import LAUNCH, installed, launch_two_ranks, run_cli

CUMO_MLX = installed("cumo-mlx")
pytestmark = pytest.mark.skipif(LAUNCH is None or CUMO_MLX is None, reason="mlx.launch or cumo-mlx is not installed")


def records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "answer_id"} for line in path.read_text().splitlines()]


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
    out = launch_two_ranks(CUMO_MLX, *argv, "--output", root / "two.jsonl")  # rank 0 alone prints
    assert json.loads(out.strip().splitlines()[-1]) == result
    assert records(root / "two.jsonl") == records(root / "one.jsonl")
    assert not list(root.glob("two.rank*"))  # the part files are merged away


def test_two_ranks_resume_a_cut_one_process_run(one_process):
    """The 3 answers kept, the 5 left shared by the ranks; a half-written line is repaired first."""
    root, argv, result = one_process
    lines = (root / "one.jsonl").read_text().splitlines()
    cut = root / "cut.jsonl"
    cut.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    out = launch_two_ranks(CUMO_MLX, *argv, "--output", cut, "--resume")
    assert json.loads(out.strip().splitlines()[-1]) == result
    assert cut.read_text().splitlines()[:3] == lines[:3] and records(cut) == records(root / "one.jsonl")
