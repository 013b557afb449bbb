"""The demo recipe's bundled examples writer and its scoring of one-word answers."""

import json
from pathlib import Path

import evaluation
import examples
import numpy as np
from PIL import Image

from cumo_mlx import shapes


def test_scoring_by_type():
    records = [
        {"type": "count", "answer": "three"},
        {"type": "count", "answer": "two"},
        {"type": "shape", "answer": "star"},
    ]
    table = evaluation.accuracy_by_type(records, ["3", "Two.", " circle"])
    assert table["count"] == {"correct": 2, "total": 2, "accuracy": 1.0}
    assert table["shape"]["accuracy"] == 0.0
    assert table["overall"]["correct"] == 2 and table["overall"]["total"] == 3


def test_bundled_examples_are_reproducible(tmp_path):
    bundled = Path(__file__).resolve().parents[2] / "examples"
    records = examples.write_examples(tmp_path)
    assert json.loads((bundled / "examples.json").read_text()) == records
    for name in examples.EXAMPLES:
        assert np.array_equal(np.asarray(Image.open(bundled / name)), np.asarray(Image.open(tmp_path / name))), name
        assert (bundled / name).stat().st_size < 32 * 1024
    assert {r["answer"] for r in records if r["image"] == "shapes.png" and r["type"] == "shape"} == {"triangle"}
    assert {r["type"] for r in records} == set(shapes.QUESTION_TYPES)
