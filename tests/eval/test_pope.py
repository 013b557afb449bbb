"""POPE: the first-sentence yes/no rule and the per-split metrics with their averages."""

import random

import pytest
from eval_folders import SHORT, pope, write_answers

from cumo_mlx.eval import score
from cumo_mlx.eval.pope import says_yes


@pytest.mark.parametrize(
    "text, yes",
    [
        ("Yes, there is a dog.", True),
        ("No.", False),
        ("There is not a cat", False),
        ("NO", True),  # only "No", "no" and "not" count
        ("Not at all", True),
        ("I do not see one. Yes", False),  # the first sentence decides
        ("Yes. There is no cat.", True),
        ("no, it is not", False),  # commas are dropped before the split
        ("Nope.", True),
    ],
)
def test_says_yes(text, yes):
    assert says_yes(text) is yes


# Questions 1-3 adversarial (labels yes, no, no), 4-6 popular (yes, yes, no), 7-8 random (yes, no).
ANSWERS = {
    1: "Yes, there is a dog.",  # yes, label yes: TP
    2: "No.",  # no, label no: TN
    3: "Yes",  # yes, label no: FP
    4: "NO",  # yes, label yes: TP
    5: "I do not see one. Yes",  # no, label yes: FN
    6: "Nope.",  # yes, label no: FP
    7: "no, it is not",  # no, label yes: FN
    8: "Not at all",  # yes, label no: FP
}


def _answers(order):
    return [(qid, f"Is there a thing {(qid - 1) % 3 if qid <= 6 else qid - 7}?\n{SHORT}", ANSWERS[qid]) for qid in order]


def test_pope_score(tmp_path):
    pope(tmp_path)
    result = score("pope", tmp_path, write_answers(tmp_path / "a.jsonl", _answers(range(1, 9))))
    splits = result.metrics["categories"]
    # adversarial TP 1, TN 1, FP 1, FN 0: accuracy 2/3, precision 1/2, recall 1, F1 2/3, yes 2/3
    assert splits["adversarial"] == pytest.approx(
        {"accuracy": 200 / 3, "precision": 50, "recall": 100, "f1": 200 / 3, "yes_ratio": 200 / 3, "count": 3}
    )
    # popular TP 1, FN 1, FP 1: accuracy 1/3, precision 1/2, recall 1/2, F1 1/2, yes 2/3
    assert splits["popular"] == pytest.approx(
        {"accuracy": 100 / 3, "precision": 50, "recall": 50, "f1": 50, "yes_ratio": 200 / 3, "count": 3}
    )
    # random FN 1, FP 1: accuracy 0, precision 0/1, recall 0/1, F1 0 (no precision + recall to divide), yes 1/2
    assert splits["random"] == pytest.approx({"accuracy": 0, "precision": 0, "recall": 0, "f1": 0, "yes_ratio": 50, "count": 2})
    # the averages over the three splits
    assert result.count == 8
    assert {k: v for k, v in result.metrics.items() if k != "categories"} == pytest.approx(
        {
            "accuracy": 100 * (2 / 3 + 1 / 3 + 0) / 3,
            "precision": 100 * (1 / 2 + 1 / 2 + 0) / 3,
            "recall": 100 * (1 + 1 / 2 + 0) / 3,
            "f1": 100 * (2 / 3 + 1 / 2 + 0) / 3,  # 38.9
            "yes_ratio": 100 * (2 / 3 + 2 / 3 + 1 / 2) / 3,
        }
    )


def test_pope_pairs_answers_with_labels_by_question(tmp_path):
    pope(tmp_path)
    order = list(range(1, 9))
    random.Random(0).shuffle(order)
    in_order = score("pope", tmp_path, write_answers(tmp_path / "a.jsonl", _answers(range(1, 9))))
    shuffled = score("pope", tmp_path, write_answers(tmp_path / "b.jsonl", _answers(order)))
    assert shuffled.metrics == in_order.metrics


def test_pope_scores_the_splits_answered(tmp_path):
    pope(tmp_path)
    result = score("pope", tmp_path, write_answers(tmp_path / "a.jsonl", _answers([1, 2, 3])))
    assert list(result.metrics["categories"]) == ["adversarial"]
    assert result.metrics["accuracy"] == pytest.approx(200 / 3) and result.count == 3
