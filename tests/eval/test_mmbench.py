"""MMBench: prompts from the TSV, MMBench's choice extraction and the circular evaluation."""

import pytest
from eval_folders import mmbench, write_answers
from PIL import Image

from cumo_mlx.eval import questions, score
from cumo_mlx.eval.mmbench import infer_choice, infer_letter

CHOICES = {"A": "Cat", "B": "dog", "C": "a bird"}


@pytest.mark.parametrize(
    "answer, letter",
    [
        ("B", "B"),
        ("The answer is (C).", "C"),  # "(X)." wrapping
        ("B. dog", "B"),
        ("A B", None),  # two bare letters, no wrapping, and no option text: unread
        ("I think it is A dog", "B"),  # "A" in over 3 words may be an article: read by option text, "dog"
        ("A dog", "A"),  # 3 words or fewer: "A" is the letter
        ("E", "E"),  # any of A-E, also beyond the options (then wrong)
        ("a cat", "A"),  # option text, case ignored
        ("a cat or a dog", None),  # two options' texts
        ("answer:D", None),  # ":D" must be a word of its own
        ("answer :D", "D"),
    ],
)
def test_infer_choice(answer, letter):
    assert infer_choice(answer, CHOICES) == letter


def test_infer_letter_alone():
    assert infer_letter("It is A dog, B") is None  # "B," is not a bare word; "A" in > 3 words is skipped


def test_mmbench_questions(tmp_path):
    mmbench(tmp_path)
    asked = list(questions("mmbench", tmp_path))
    assert [q.question_id for q in asked] == [0, 1, 2, 1000000, 1000001, 2000000]
    first = asked[0]
    text = "Look closely.\nWhat colour is the square?\nA. red\nB. blue\nC. green"  # options stop at the empty D
    assert first.logged_prompt == text
    assert first.prompt == f"<image>\n{text}\nAnswer with the option's letter from the given choices directly."
    assert isinstance(first.image, Image.Image) and first.image.size == (6, 6)
    assert first.max_new_tokens == 1024 and first.metadata == {"category": "colour", "l2-category": "perception"}
    # hint "nan" is no hint; options stop at the first missing one even when a later one is there
    assert asked[1].logged_prompt == "How many shapes?\nA. one\nB. two"
    assert asked[2].logged_prompt == "Line one\nline two\nWhich is bigger?\nA. cat\nB. dog"  # a quoted multi-line hint


def test_mmbench_circular_score(tmp_path):
    mmbench(tmp_path)
    answers = [
        (0, "", "A"),  # right (A red)
        (1000000, "", "C"),  # rotation 1: right (C red)
        (2000000, "", "The answer is red"),  # rotation 2: no letter; "red" is option B, the answer: right
        (1, "", "B"),  # right ...
        (1000001, "", "B"),  # ... but its rotation is wrong (A): question 1 wrong
        (2, "", "I think it is A dog"),  # "dog" is B: right (no rotations)
    ]
    result = score("mmbench", tmp_path, write_answers(tmp_path / "a.jsonl", answers))
    # questions 0 and 2 right, 1 wrong
    assert result.count == 3
    assert result.metrics == {
        "accuracy": pytest.approx(200 / 3),
        "categories": {"colour": 100.0, "compare": 100.0, "count": 0.0},
        "l2_categories": {"perception": 50.0, "reasoning": 100.0},
    }
    # --limit 3: rows 0, 1 and 2 alone (their rotations come later in the TSV): all right
    assert score("mmbench", tmp_path, tmp_path / "a.jsonl", limit=3).metrics["accuracy"] == 100.0


def test_unanswered_rotation_is_wrong(tmp_path):
    mmbench(tmp_path)
    answers = [(0, "", "A"), (1000000, "", "C"), (1, "", "B"), (1000001, "", "A"), (2, "", "B")]  # 2000000 missing
    assert score("mmbench", tmp_path, write_answers(tmp_path / "a.jsonl", answers)).metrics["categories"]["colour"] == 0.0


def test_mmbench_cn(tmp_path):
    # LLaVA's docs put the CN file in mmbench/ (its script reads mmbench_cn/): both are found
    mmbench(tmp_path, name="mmbench_dev_cn_20231003.tsv")
    first = next(iter(questions("mmbench_cn", tmp_path)))
    assert first.prompt.endswith("\nC. green\n请直接回答选项字母。")
    mmbench(tmp_path, name="mmbench_dev_cn_20231003.tsv", subfolder="mmbench_cn")
    answers = [(0, "", "A"), (1000000, "", "C"), (2000000, "", "B"), (1, "", "B"), (1000001, "", "A"), (2, "", "B")]
    assert score("mmbench_cn", tmp_path, write_answers(tmp_path / "a.jsonl", answers)).metrics["accuracy"] == 100.0
