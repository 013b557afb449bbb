"""MME: ground truth by subtask, image and question; the yes/no reading; acc, acc+ and the sums."""

import pytest
from eval_folders import SHORT, mme, write_answers

from cumo_mlx.errors import DataError
from cumo_mlx.eval import score
from cumo_mlx.eval.mme import yes_or_no


@pytest.mark.parametrize(
    "text, read",
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("No, there is none.", "no"),
        ("Sure, yes", "other"),
        ("nope", "no"),
        ("", "other"),
        ("YES.", "yes"),
    ],
)
def test_yes_or_no(text, read):
    assert yes_or_no(text) == read


ANSWERS = [
    ("existence/000001.png", "Is there a dog in this image?", "Yes"),  # truth Yes: right
    ("existence/000001.png", "Is there a cat in this image?", "No, there is no cat."),  # No: right
    ("existence/000002.png", "Is there a car in this image?", "yes"),  # Yes: right
    ("existence/000002.png", "Is there a bus in this image?", "Yes"),  # No (two spaces in its file): wrong
    ("artwork/10002.png", "Is it by X?", "Sure, yes"),  # Yes, but read as neither: wrong
    ("artwork/10002.png", "Is it by Y?", "no"),  # No: right
    ("code_reasoning/0001.png", "Will it print 3?", "No"),  # No: right
    ("code_reasoning/0001.png", "Will it print 4?", "Yes"),  # Yes: right
]


def test_mme_score(tmp_path):
    mme(tmp_path)
    path = write_answers(tmp_path / "a.jsonl", [(qid, f"{q}\n{SHORT}", text) for qid, q, text in ANSWERS])
    result = score("mme", tmp_path, path)
    # existence: 3 of 4 answers (75) and 1 of 2 images with both right (50): 125
    # artwork: 1 of 2 (50), no image (0): 50; code_reasoning: 2 of 2 (100) and 1 of 1 (100): 200
    assert result.count == 8
    assert result.metrics == {
        "perception": 175.0,
        "cognition": 200.0,
        "categories": {"existence": 125.0, "artwork": 50.0, "code_reasoning": 200.0},
        "acc": {"existence": 75.0, "artwork": 50.0, "code_reasoning": 100.0},
        "acc_plus": {"existence": 50.0, "artwork": 0.0, "code_reasoning": 100.0},
    }


def test_mme_prompt_with_the_instruction_already(tmp_path):
    mme(tmp_path)
    path = write_answers(tmp_path / "a.jsonl", [("artwork/10002.png", "Is it by X? Please answer yes or no.", "Yes")])
    assert score("mme", tmp_path, path).metrics["categories"] == {"artwork": 200.0}


def test_mme_answer_without_ground_truth(tmp_path):
    mme(tmp_path)
    path = write_answers(tmp_path / "a.jsonl", [("artwork/10002.png", "Is it by Z?", "Yes")])
    with pytest.raises(DataError, match="has no ground truth in MME_Benchmark_release_version"):
        score("mme", tmp_path, path)
