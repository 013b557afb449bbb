"""vqav2 and mmvet (files for outside graders) and custom (answers only)."""

import json

import pytest
from eval_folders import mmvet, png, vqav2, write_answers, write_jsonl

from cumo_mlx.errors import CuMoError
from cumo_mlx.eval import questions, score, write_upload


def test_vqav2_upload(tmp_path):
    vqav2(tmp_path)
    answers = write_answers(tmp_path / "a.jsonl", [(1, "Question 1?", "Two dogs."), (2, "Question 2?", "Yes")])
    result = score("vqav2", tmp_path, answers)
    assert result.to_json() == {"task": "vqav2", "count": 2, "metrics": {}}
    upload = write_upload("vqav2", tmp_path, answers, tmp_path / "upload.json")
    # every test2015 question, answers normalised as on EvalAI, "" where test-dev has none
    assert json.loads(upload.read_text()) == [
        {"question_id": 1, "answer": "2 dogs"},
        {"question_id": 2, "answer": "yes"},
        {"question_id": 3, "answer": ""},
    ]
    with pytest.raises(CuMoError, match="question 7, which is not a vqav2 question"):
        write_upload("vqav2", tmp_path, write_answers(tmp_path / "b.jsonl", [(7, "p", "t")]), tmp_path / "y.json")


def test_mmvet_upload(tmp_path):
    mmvet(tmp_path)
    answers = write_answers(tmp_path / "a.jsonl", [(0, "Explain 0.", "A cat."), (1, "Explain 1.", "Two.")])
    upload = write_upload("mmvet", tmp_path, answers, tmp_path / "results.json")
    assert json.loads(upload.read_text()) == {"v1_0": "A cat.", "v1_1": "Two."}
    with pytest.raises(CuMoError, match="task pope has no upload file"):
        write_upload("pope", tmp_path, answers, tmp_path / "x.json")
    with pytest.raises(CuMoError, match="question 7, which is not a mmvet question"):
        write_upload("mmvet", tmp_path, write_answers(tmp_path / "b.jsonl", [(7, "p", "t")]), tmp_path / "y.json")


def test_custom_question_file(tmp_path):
    lines = [
        {"question_id": "a", "image": "001.png", "text": "Describe it."},  # in images/ (LLaVA-Bench's layout)
        {"question_id": "b", "image": "sub/002.png", "text": "And this?"},  # beside the question file
        {"question_id": "c", "text": "No image here."},
    ]
    path = write_jsonl(tmp_path / "bench" / "my_questions.jsonl", lines)
    png(tmp_path / "bench/images/001.png")
    png(tmp_path / "bench/sub/002.png")
    asked = list(questions("custom", path))
    assert [q.image for q in asked] == [tmp_path / "bench/images/001.png", tmp_path / "bench/sub/002.png", None]
    assert [q.prompt for q in asked] == ["<image>\nDescribe it.", "<image>\nAnd this?", "No image here."]
    assert {q.max_new_tokens for q in asked} == {1024}
    # a folder holding questions.jsonl works too
    write_jsonl(tmp_path / "bench" / "questions.jsonl", lines[2:])
    assert [q.question_id for q in questions("custom", tmp_path / "bench")] == ["c"]
    answers = write_answers(tmp_path / "a.jsonl", [("c", "No image here.", "ok")])
    assert score("custom", path, answers).to_json() == {"task": "custom", "count": 1, "metrics": {}}
