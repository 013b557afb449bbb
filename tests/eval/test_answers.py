"""The answers file: written line by line, read strictly, resumed after a cut; the answering loop."""

import json

import pytest
from eval_folders import SHAPES_RECORDS, shapes, write_jsonl

from cumo_mlx.errors import CuMoError
from cumo_mlx.eval import AnswersWriter, Question, read_answers, remaining, resume_answers, run_task, score


def _question(question_id, prompt="Q?"):
    return Question(question_id, f"<image>\n{prompt}", None, 8, logged_prompt=prompt)


def test_writer_writes_llava_lines_one_by_one(tmp_path):
    path = tmp_path / "out" / "answers.jsonl"
    with AnswersWriter(path, "shapes", "demo") as writer:
        writer.write(_question("a"), "circle")
        # flushed at once: a reader sees the line while the writer is open
        assert json.loads(path.read_text().splitlines()[0])["text"] == "circle"
        writer.write(_question(7, "Other?"), "two")
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert set(first) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert (first["question_id"], first["prompt"], first["model_id"], first["metadata"]) == (
        "a",
        "Q?",
        "demo",
        {"task": "shapes"},
    )
    assert second["question_id"] == 7 and first["answer_id"] != second["answer_id"]
    assert [r["text"] for r in read_answers(path, "shapes")] == ["circle", "two"]


def test_resume_drops_a_half_written_last_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    with AnswersWriter(path, "shapes", "m") as writer:
        writer.write(_question("a"), "x")
        writer.write(_question("b"), "y")
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"question_id": "c", "pro')  # killed while writing c
    with pytest.raises(CuMoError, match="half-written line .*--resume"):
        read_answers(path, "shapes")
    assert resume_answers(path, "shapes") == {("a", "Q?"): 1, ("b", "Q?"): 1}
    assert path.read_bytes() == whole


def test_resume_keeps_a_whole_last_line_without_newline(tmp_path):
    path = tmp_path / "answers.jsonl"
    line = json.dumps({"question_id": 1, "prompt": "p", "text": "t"})
    path.write_text(line)  # killed between the record and its newline
    assert resume_answers(path, "pope") == {(1, "p"): 1}
    assert path.read_text() == line + "\n"
    assert resume_answers(tmp_path / "absent.jsonl", "pope") == {}


def test_remaining_counts_repeated_keys():
    # TextVQA and MME repeat question ids; the key (id, prompt) tells questions apart, a Counter repeats.
    asked = [_question("img", "A?"), _question("img", "B?"), _question("img", "A?"), _question("img2", "A?")]
    done = {("img", "A?"): 1, ("img", "B?"): 1}
    assert [q.key for q in remaining(asked, done)] == [("img", "A?"), ("img2", "A?")]


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2 is not JSON"),
        ('["a list"]', "line 2 is not an answer record"),
        ('{"question_id": 1, "prompt": "p"}', "line 2 is not an answer record"),
        ('{"question_id": true, "prompt": "p", "text": "t"}', "line 2 is not an answer record"),
        (
            '{"question_id": 1, "prompt": "p", "text": "t", "metadata": {"task": "pope"}}',
            "holds answers for task pope, not shapes",
        ),
    ],
)
def test_bad_answers_files_are_one_line_errors(tmp_path, line, message):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"question_id": 0, "prompt": "p", "text": "t"}) + "\n" + line + "\n")
    for read in (read_answers, resume_answers):
        with pytest.raises(CuMoError, match=message) as error:
            read(path, "shapes")
        assert "\n" not in str(error.value)


def test_missing_and_empty_answers_files(tmp_path):
    with pytest.raises(CuMoError, match="does not exist"):
        read_answers(tmp_path / "nope.jsonl", "shapes")
    folder = shapes(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CuMoError, match="has no answers"):
        score("shapes", folder, tmp_path / "empty.jsonl")


class Killed(Exception):
    pass


def _engine(calls, fail_at=None):
    """A stand-in for batched generation: answers each question with its answer, padded with spaces."""
    answers = {record["id"]: record["answer"] for record in SHAPES_RECORDS}

    def answer_batch(batch):
        calls.append([q.question_id for q in batch])
        if len(calls) == fail_at:
            raise Killed
        return [f" {answers[q.question_id]} " for q in batch]

    return answer_batch


def test_run_task_killed_then_resumed_equals_one_run(tmp_path):
    folder = shapes(tmp_path)
    one_run = tmp_path / "one.jsonl"
    calls = []
    assert len(list(run_task("shapes", folder, one_run, _engine(calls), "m", batch_size=3))) == 4
    assert calls == [["0-0", "1-0", "1-1"], ["2-0"]]
    assert [r["text"] for r in read_answers(one_run, "shapes")] == ["circle", "three", "red", "two"]  # stripped

    cut = tmp_path / "cut.jsonl"
    with pytest.raises(Killed):
        list(run_task("shapes", folder, cut, _engine([], fail_at=2), "m", batch_size=2))
    assert len(read_answers(cut, "shapes")) == 2  # the first batch survives the kill
    cut.write_bytes(cut.read_bytes() + b'{"question_id": "1-1", "prompt": "What col')
    calls = []
    assert len(list(run_task("shapes", folder, cut, _engine(calls), "m", batch_size=2, resume=True))) == 2
    assert calls == [["1-1", "2-0"]]
    keys = [(r["question_id"], r["prompt"]) for r in read_answers(cut, "shapes")]
    assert keys == [(r["id"], r["question"]) for r in SHAPES_RECORDS]
    assert score("shapes", folder, cut) == score("shapes", folder, one_run)
    assert score("shapes", folder, cut).metrics["accuracy"] == 100


def test_run_task_limit_and_a_fresh_start(tmp_path):
    folder = shapes(tmp_path)
    path = tmp_path / "answers.jsonl"
    write_jsonl(path, [{"question_id": "old", "prompt": "p", "text": "t"}])
    list(run_task("shapes", folder, path, _engine([]), "m", limit=2))
    assert [r["question_id"] for r in read_answers(path, "shapes")] == ["0-0", "1-0"]  # started afresh
    # scored over the first 2 questions: a --limit run is not marked down for the questions it skipped
    result = score("shapes", folder, path, limit=2)
    assert (result.count, result.metrics["accuracy"]) == (2, 100)
    assert score("shapes", folder, path).metrics["accuracy"] == 50  # 2 of 4 without the limit


def test_run_task_checks_the_engine(tmp_path):
    folder = shapes(tmp_path)
    with pytest.raises(ValueError, match="gave 0 answers to 1 questions"):
        list(run_task("shapes", folder, tmp_path / "a.jsonl", lambda batch: [], "m"))


def test_an_answers_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(json.dumps({"question_id": 0, "prompt": "p", "text": "t"}).encode() + b"\n\xff\xfe\n")
    for read in (read_answers, resume_answers):
        with pytest.raises(CuMoError, match="is not UTF-8 text") as error:
            read(path, "shapes")
        assert "\n" not in str(error.value)
