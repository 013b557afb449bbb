"""The demo CuMo shipped in the package: it loads offline, answers through the CLI, and its recipe trains."""

import json
import subprocess
import sys
from pathlib import Path

import cumo_mlx
import pytest
from cli_util import run_cli
from cumo_mlx.loader import DEMO_PATH
from cumo_mlx.shapes import SHAPES, write_dataset
from evaluation import accuracy_by_type
from recipe import FULL, evaluate
from vision_pretraining import TARGETS

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from cumo_mlx.cli.main import entry_point; entry_point()"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_demo_is_shipped_small_and_float16():
    config = json.loads((DEMO_PATH / "config.json").read_text())
    assert config["clip_smoe"] and config["mm_projector_type"] == "smoe_mlp" and config["num_experts"] == 4
    weights = list(DEMO_PATH.glob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) < 10 << 20
    for name in ("README.md", "evaluation.json", "routes.json", "heatmap.png", "tokenizer.json"):
        assert (DEMO_PATH / name).is_file(), name
    model, _ = cumo_mlx.load("demo", dtype="float16")
    from mlx.utils import tree_flatten

    assert {str(v.dtype) for _, v in tree_flatten(model.parameters())} == {"mlx.core.float16"}


def test_every_expert_gets_a_tenth_of_the_routes():
    """The balance loss at work: on the held-out set each expert of each MoE layer got >= 10% of the routes."""
    routes = json.loads((DEMO_PATH / "routes.json").read_text())
    assert len(routes["layers"]) >= 3  # CLIP layers and the connector
    assert routes["min_share"]["share"] >= 0.10, routes["min_share"]


# The recipe's own evaluation of the shipped weights, recomputed: on the CPU backend (float32) it gives the
# shipped answers exactly (the same 411 right, the same first 20 wrong), so the floor has no tolerance.
def test_heldout_accuracy_holds_the_shipped_figures(tmp_path):
    """No question type loses a right answer of the 499 held-out questions against evaluation.json (82.4%)."""
    shipped = json.loads((DEMO_PATH / "evaluation.json").read_text())["accuracy"]
    assert shipped["overall"]["total"] >= 499, shipped["overall"]
    write_dataset(tmp_path, FULL["heldout_images"], seed=1, progress=False)  # the recipe's held-out set
    measured = evaluate(DEMO_PATH, tmp_path, FULL["heldout_questions"])["accuracy"]
    assert measured.keys() == shipped.keys(), measured
    for kind, row in shipped.items():
        assert measured[kind]["total"] == row["total"] and measured[kind]["correct"] >= row["correct"], (kind, measured)


def test_model_card_quotes_the_evaluation():
    evaluation = json.loads((DEMO_PATH / "evaluation.json").read_text())["accuracy"]
    card = (DEMO_PATH / "README.md").read_text()
    for kind, row in evaluation.items():
        assert f"| {kind} | {row['correct']}/{row['total']} |" in card


def test_readme_command_answers_with_a_shape():
    """The README's first command, as a user types it: a one-word shape answer on stdout, stats on stderr."""
    done = cli("generate", "--model", "demo", "--image", "examples/shapes.png", "--prompt", "What shape is this?")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in SHAPES and "tokens-per-sec" in done.stderr


def test_bundled_examples_are_answered():
    examples = json.loads((ROOT / "examples" / "examples.json").read_text())
    model, processor = cumo_mlx.load("demo")
    answers = [
        cumo_mlx.generate(model, processor, e["question"], ROOT / "examples" / e["image"], temp=0.0, max_tokens=4).strip()
        for e in examples
    ]
    right = sum(a == e["answer"] for a, e in zip(answers, examples))
    assert right >= 0.9 * len(examples), list(zip(answers, examples))


def test_forty_new_questions_through_the_cli(tmp_path):
    """40 questions from a seed the demo never saw, one `cumo-mlx generate --json` each (click's runner)."""
    write_dataset(tmp_path, 40, seed=123, progress=False)
    questions = json.loads((tmp_path / "questions.json").read_text())[:40]
    predictions = []
    for q in questions:
        code, out, err = run_cli("generate", "--model", "demo", "--image", tmp_path / q["image"], "--prompt", q["question"],
                                 "--temp", 0, "--max-tokens", 4, "--json")  # fmt: skip
        assert code == 0, err
        predictions.append(json.loads(out)["text"])
    table = accuracy_by_type(questions, predictions)
    assert table["overall"]["accuracy"] >= 0.9, table


@pytest.mark.parametrize("stage", ["pretrain", "pft", "sft"])
def test_recipe_smoke_loss_falls(recipe_run, stage):
    records = [json.loads(line) for line in (recipe_run / stage / "metrics.jsonl").read_text().splitlines()]
    first, last = records[:3], records[-3:]
    mean = lambda rs: sum(r["loss"] for r in rs) / len(rs)  # noqa: E731
    assert len(records) >= 24 and mean(last) < mean(first), [round(r["loss"], 3) for r in records]


def test_recipe_smoke_writes_every_step(recipe_run):
    recipe = json.loads((recipe_run / "recipe.json").read_text())
    assert set(recipe["seconds"]) >= {"data", "init", "vision", "pretrain", "pft", "upcycle", "sft", "evaluate", "experts"}
    config = json.loads((recipe_run / "sft" / "config.json").read_text())
    assert config["clip_smoe"] and config["mm_projector_type"] == "smoe_mlp"
    evaluation = json.loads((recipe_run / "evaluation.json").read_text())
    assert evaluation["accuracy"]["overall"]["total"] > 0
    assert (recipe_run / "heatmap.png").stat().st_size > 0
    vision = json.loads((recipe_run / "vision.json").read_text())["heldout_patch_accuracy"]
    assert set(vision) == {name for name, _ in TARGETS} and all(0 <= v <= 1 for v in vision.values())


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> Path:
    """The demo recipe end to end in --quick mode (a few dozen steps of each stage, tiny data)."""
    work = tmp_path_factory.mktemp("recipe")
    done = subprocess.run([sys.executable, str(ROOT / "demo_recipe" / "recipe.py"), "--quick", "--work", str(work)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work
