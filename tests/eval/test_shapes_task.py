"""The shapes task: the demo's one-word answer rules, as a scored benchmark."""

import json

import pytest
from eval_folders import SHAPES_RECORDS, shapes, write_answers

from cumo_mlx.eval import questions, score
from cumo_mlx.eval.shapes import is_correct, normalise_answer
from cumo_mlx.shapes import write_dataset


@pytest.mark.parametrize(
    "text, word",
    [("Circle.", "circle"), (" 3", "three"), ("Two shapes", "two"), ("Colour", "color"), ("", ""), ('"red"', "red"), ("4", "4")],
)
def test_normalise_answer(text, word):
    assert normalise_answer(text) == word


def test_shapes_score(tmp_path):
    shapes(tmp_path)
    answers = [
        ("0-0", "What shape is this?", "Circle."),  # circle: right
        ("1-0", "How many shapes are there?", "3"),  # three: right
        ("1-1", "What colour is the star?", "Red star"),  # the first word, red: right
        # 2-0 (count) unanswered: wrong
    ]
    result = score("shapes", tmp_path, write_answers(tmp_path / "a.jsonl", answers))
    assert result.to_json() == {
        "task": "shapes",
        "count": 4,
        "metrics": {"accuracy": 75.0, "categories": {"shape": 100.0, "count": 50.0, "colour": 100.0}},
    }
    assert is_correct("Three.", "three") and not is_correct("two", "three")


def test_shapes_reads_the_data_command_output(tmp_path):
    write_dataset(tmp_path, 3, seed=0)
    records = json.loads((tmp_path / "questions.json").read_text())
    asked = list(questions("shapes", tmp_path))
    assert [q.question_id for q in asked] == [r["id"] for r in records]
    first = asked[0]
    assert first.prompt == f"<image>\n{records[0]['question']}" and first.image == tmp_path / records[0]["image"]
    assert first.image.exists() and first.max_new_tokens == 8 and first.metadata == {"type": records[0]["type"]}
    assert len(SHAPES_RECORDS) == 4
