"""The answers file: LLaVA's format, one JSON line per answered question, written as the answers come.

A line holds question_id, prompt (the question's logged prompt), text (the answer), answer_id, model_id
and metadata: {"task": TASK}, which tells an answers file for another task apart (LLaVA writes {}; such
files are read too). Lines are appended and flushed one at a time, so a killed run loses at most the
questions in flight; `resume_answers` keeps the finished lines and drops a half-written last one.
"""

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from ..errors import CuMoError
from .question import Question

FORMAT = "an answers file holds one JSON object per line with question_id, prompt and text (LLaVA's format)"


class AnswersWriter:
    """Appends answers to a file line by line, each flushed as it is written."""

    def __init__(self, path: Path, task: str, model_id: str, append: bool = False):
        self.path = Path(path)
        self.task = task
        self.model_id = model_id
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a" if append else "w", encoding="utf-8")
        except OSError as e:
            what = f"cannot write answers to {self.path}: {e.strerror or e}"
            raise CuMoError(what, "check the path and its permissions") from None

    def write(self, question: Question, text: str) -> None:
        record = {
            "question_id": question.question_id,
            "prompt": question.logged_prompt,
            "text": text,
            "answer_id": uuid.uuid4().hex,
            "model_id": self.model_id,
            "metadata": {"task": self.task},
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AnswersWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False


def _record(path: Path, number: int, line: str, task: str) -> dict:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise CuMoError(f"{where} is not JSON", FORMAT) from None
    question_id = record.get("question_id") if isinstance(record, dict) else None
    if (
        not isinstance(question_id, (int, str))
        or isinstance(question_id, bool)
        or not isinstance(record.get("prompt"), str)
        or not isinstance(record.get("text"), str)
    ):
        raise CuMoError(f"{where} is not an answer record", FORMAT)
    metadata = record.get("metadata")
    other = metadata.get("task") if isinstance(metadata, dict) else None
    if other is not None and other != task:
        raise CuMoError(f"{path} holds answers for task {other}, not {task}", f"score it with --task {other}")
    return record


def _parse(path: Path, data: bytes, task: str) -> list[dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CuMoError(f"answers file {path} is not UTF-8 text", FORMAT) from None
    # Split at "\n" only: JSON escapes it inside strings, but not other line breaks such as U+2028.
    return [_record(path, number, line, task) for number, line in enumerate(text.split("\n"), 1) if line.strip()]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CuMoError(f"cannot read answers file {path}: {e.strerror or e}", "check the path") from None


def read_answers(path: Path, task: str) -> list[dict]:
    """The records of a complete answers file for `task`, in file order."""
    path = Path(path)
    if not path.is_file():
        raise CuMoError(f"answers file {path} does not exist", "give the --output of a `cumo-mlx eval` run")
    data = _read(path)
    if data and not data.endswith(b"\n") and not _is_record(data[data.rfind(b"\n") + 1 :]):
        raise CuMoError(f"{path} ends in a half-written line (its run was stopped)", "finish the run with --resume")
    return _parse(path, data, task)


def resume_answers(path: Path, task: str) -> Counter:
    """The keys of the questions the file answers already (a Counter: a question may be asked twice).

    A half-written last line (a run killed while writing it) is cut from the file; a last line that is
    whole but lacks its newline gets one. No file: nothing answered.
    """
    path = Path(path)
    if not path.exists():
        return Counter()
    data = _read(path)
    if data and not data.endswith(b"\n"):
        whole = data.rfind(b"\n") + 1
        data = data + b"\n" if _is_record(data[whole:]) else data[:whole]
        path.write_bytes(data)
    return Counter((record["question_id"], record["prompt"]) for record in _parse(path, data, task))


def remaining(questions: Iterable[Question], done: Counter) -> Iterator[Question]:
    """The questions that `done` (from resume_answers) does not answer yet, in order."""
    left = Counter(done)
    for question in questions:
        if left[question.key] > 0:
            left[question.key] -= 1
            continue
        yield question


def check_known(answers: list[dict], known: set, task: str, where: str, canonical: Optional[Callable] = None) -> None:
    """A one-line error for the first answer whose question id (through `canonical`) is not in `known`."""
    for answer in answers:
        if (canonical(answer["question_id"]) if canonical else answer["question_id"]) not in known:
            raise CuMoError(
                f"the answers answer question {answer['question_id']!r}, which is not a {task} question in {where}",
                f"give an answers file for {task}",
            )
