"""ScienceQA: the official parsing of option letters, accuracy and IMG accuracy."""

import pytest
from eval_folders import scienceqa, write_answers

from cumo_mlx.errors import CuMoError
from cumo_mlx.eval import questions, score
from cumo_mlx.eval.scienceqa import parse_option


@pytest.mark.parametrize(
    "text, letter",
    [
        ("A", "A"),
        ("E", "E"),
        ("B. dog", "B"),
        ("B.dog", None),  # "X. " needs the space
        ("b", None),
        ("AB", None),
        ("The answer is C.", "C"),
        ("So. The answer is Cx", "C"),  # the pattern's final "." is any character
        ("The answer is C", None),  # ... but one must follow
        ("The answer is A. The answer is B.", None),  # said twice: unparsed
        ("The answer is A. No, the answer is B.", "A"),  # the pattern is case-sensitive
        ("the answer is B.", None),
        ("F", None),
    ],
)
def test_parse_option(text, letter):
    assert parse_option(text) == letter


def test_scienceqa_score(tmp_path):
    scienceqa(tmp_path)
    prompts = {q.question_id: q.logged_prompt for q in questions("scienceqa", tmp_path)}
    answers = [
        ("1", prompts["1"], "B"),  # answer 1 (B): right, image
        ("2", prompts["2"], "A. x"),  # answer 0 (A): right, no image
        ("3", prompts["3"], "Because of q. The answer is D."),  # answer 3 (D): right, image
        ("4", prompts["4"], "E"),  # only 2 choices: wrong, no image
        # "5" (image) unanswered: wrong
    ]
    result = score("scienceqa", tmp_path, write_answers(tmp_path / "a.jsonl", answers))
    # 3 of the 5 test problems; with an image (1, 3, 5): 2 of 3. Problem 6 is not in the test split.
    assert result.count == 5
    assert result.metrics == pytest.approx({"accuracy": 60.0, "img_accuracy": 200 / 3})
    # --limit 2: problems 1 and 2, both right, one with an image
    assert score("scienceqa", tmp_path, tmp_path / "a.jsonl", limit=2).metrics == {"accuracy": 100.0, "img_accuracy": 100.0}


def test_scienceqa_answer_outside_the_test_split(tmp_path):
    scienceqa(tmp_path)
    with pytest.raises(CuMoError, match="question '6', which is not a scienceqa question"):
        score("scienceqa", tmp_path, write_answers(tmp_path / "a.jsonl", [("6", "p", "A")]))
