"""Answering a task's questions into an answers file: the loop a generation engine plugs into."""

from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from .answers import AnswersWriter, remaining, resume_answers
from .question import Question
from .tasks import get_task, questions


def batches(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


def pending(
    task: str,
    data_dir: Path,
    answers_path: Path,
    limit: Optional[int] = None,
    resume: bool = False,
    share: tuple[int, int] = (0, 1),
    answered: Optional[Counter] = None,
) -> Iterator[Question]:
    """The questions left to answer into `answers_path`, in question order: the task's first `limit`,
    less those `answered` holds (Question.key counts, e.g. a merged answers file's), then this process's
    share (rank, world): every world-th from the rank-th; less, with `resume`, those the file holds."""
    name = get_task(task).name
    rank, world = share
    todo = islice(remaining(questions(name, data_dir, limit), answered or Counter()), rank, None, world)
    return remaining(todo, resume_answers(answers_path, name)) if resume else todo


def run_task(
    task: str,
    data_dir: Path,
    answers_path: Path,
    answer_batch: Callable[[Sequence[Question]], Sequence[str]],
    model_id: str,
    batch_size: int = 1,
    limit: Optional[int] = None,
    resume: bool = False,
    share: tuple[int, int] = (0, 1),
    answered: Optional[Counter] = None,
) -> Iterator[tuple[Question, str]]:
    """Answers the task's questions (the first `limit`) with `answer_batch` and appends each answer to
    `answers_path` as soon as it is known; yields (question, answer) after writing it, for progress.

    answer_batch(questions) -> one text per question: the model's greedy answers to up to `batch_size`
    questions, each built from question.prompt in the conversation template with question.image and at
    most question.max_new_tokens new tokens. Answers are stored stripped, as LLaVA stores them.
    resume: keep the answers already in the file (a half-written last line is dropped) and answer only
    the rest; else the file is started afresh. share and answered: see `pending` (several processes
    each answer their share into their own file).
    """
    name = get_task(task).name
    todo = pending(name, data_dir, answers_path, limit, resume, share, answered)
    with AnswersWriter(answers_path, name, model_id, append=resume) as writer:
        for batch in batches(todo, batch_size):
            texts = answer_batch(batch)
            if len(texts) != len(batch):
                raise ValueError(f"answer_batch gave {len(texts)} answers to {len(batch)} questions")
            for question, text in zip(batch, texts, strict=True):
                text = text.strip()
                writer.write(question, text)
                yield question, text
