"""GQA: LLaVA's conversion of answers and the official accuracy over the balanced questions."""

import pytest
from eval_folders import gqa, write_answers

from cumo_mlx.errors import CuMoError
from cumo_mlx.eval import score
from cumo_mlx.eval.gqa import prediction


def test_prediction_drops_trailing_periods_and_case():
    assert prediction("Yes..") == "yes"
    assert prediction("A.M. Table") == "a.m. table"


def test_gqa_score(tmp_path):
    gqa(tmp_path)
    answers = [
        ("q1", "q1?", "Yes.."),  # "yes": right (verify, attr)
        ("q2", "q2?", "Table"),  # "table": right (query, obj)
        ("q3", "q3?", "left side"),  # wrong (choose, rel)
        ("q4", "q4?", "no"),  # not balanced: not scored
        # q5 (query, attr) unanswered: wrong
    ]
    result = score("gqa", tmp_path, write_answers(tmp_path / "a.jsonl", answers))
    # balanced q1, q2, q3, q5: 2 of 4 right; binary (verify/choose) q1, q3: 1 of 2; open (query) q2, q5: 1 of 2
    assert result.count == 4
    assert result.metrics == {
        "accuracy": 50.0,
        "binary": 50.0,
        "open": 50.0,
        "categories": {"attribute": 50.0, "object": 100.0, "relation": 0.0},  # q1+q5, q2, q3
        "structural": {"choose": 0.0, "query": 50.0, "verify": 100.0},
    }
    # --limit 2: the question file's first two questions, q1 and q2, both right
    assert score("gqa", tmp_path, tmp_path / "a.jsonl", limit=2).metrics["accuracy"] == 100.0


def test_gqa_answers_of_another_task(tmp_path):
    gqa(tmp_path)
    path = write_answers(tmp_path / "a.jsonl", [(1, "Is there a dog?", "yes")])
    with pytest.raises(CuMoError, match="question 1, which is not a gqa question"):
        score("gqa", tmp_path, path)
