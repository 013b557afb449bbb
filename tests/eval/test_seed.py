"""SEED-Bench: exact answer letters, per question type, image and video."""

import pytest
from eval_folders import seed, write_answers

from cumo_mlx.errors import CuMoError
from cumo_mlx.eval import score


def test_seed_score(tmp_path):
    seed(tmp_path)
    answers = [
        (101, "Q101", "A"),  # right (Scene Understanding, image)
        (102, "Q102", "B."),  # answer B, but only the bare letter counts: wrong (Scene Understanding, image)
        (103, "Q103", "C"),  # right (Instance Identity, image)
        (201, "Q201", "D"),  # right (Action Recognition, video)
        # 104 (Instance Identity, image) unanswered: wrong
    ]
    result = score("seed", tmp_path, write_answers(tmp_path / "a.jsonl", answers))
    # 3 of 5; image 101, 102, 103, 104: 2 of 4; video 201: 1 of 1
    assert result.count == 5
    assert result.metrics == {
        "accuracy": 60.0,
        "image_accuracy": 50.0,
        "video_accuracy": 100.0,
        "categories": {"Scene Understanding": 50.0, "Instance Identity": 50.0, "Action Recognition": 100.0},
    }


def test_seed_ids_as_strings_and_unknown_ids(tmp_path):
    seed(tmp_path)
    as_strings = score("seed", tmp_path, write_answers(tmp_path / "a.jsonl", [("101", "Q101", "A")]))
    assert as_strings.metrics["categories"]["Scene Understanding"] == 50.0
    with pytest.raises(CuMoError, match="question 999, which is not a seed question"):
        score("seed", tmp_path, write_answers(tmp_path / "b.jsonl", [(999, "Q", "A")]))
