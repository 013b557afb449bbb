"""The benchmarks `cumo-mlx eval` runs: where each one's files are, its questions and its scorer.

questions(task, data_dir, limit)        the questions to answer, in question-file order
score(task, data_dir, answers_path)     an answers file's Result, as the official scripts score it
write_upload(task, data_dir, answers_path, destination)
                                        the file an outside grader takes (vqav2's server, mmvet's GPT-4 grader)
"""

from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import CuMoError
from . import custom, gqa, mmbench, mme, mmvet, pope, scienceqa, seed, shapes, textvqa, vqav2
from .answers import read_answers
from .files import task_folder
from .question import Question
from .result import Result

Scorer = Callable[[Path, list, Optional[set]], tuple]


@dataclass(frozen=True)
class Task:
    """folders: the benchmark's folder names under LLaVA's playground/data/eval (None: --data-dir as given);
    score(folder, answers, keep) -> (count, metrics), keep the question ids to score (None: all);
    upload(folder, answers, destination) writes the file an outside grader takes."""

    name: str
    folders: Optional[tuple[str, ...]]
    questions: Callable[[Path], Iterator[Question]]
    score: Optional[Scorer] = None
    upload: Optional[Callable[[Path, list, Path], None]] = None


TASKS = {
    task.name: task
    for task in (
        Task("textvqa", textvqa.FOLDERS, textvqa.questions, textvqa.score),
        Task("gqa", gqa.FOLDERS, gqa.questions, gqa.score),
        Task("scienceqa", scienceqa.FOLDERS, scienceqa.questions, scienceqa.score),
        Task("pope", pope.FOLDERS, pope.questions, pope.score),
        Task("mme", mme.FOLDERS, mme.questions, mme.score),
        Task("mmbench", mmbench.FOLDERS["en"], partial(mmbench.questions, lang="en"), partial(mmbench.score, lang="en")),
        Task("mmbench_cn", mmbench.FOLDERS["cn"], partial(mmbench.questions, lang="cn"), partial(mmbench.score, lang="cn")),
        Task("seed", seed.FOLDERS, seed.questions, seed.score),
        Task("vqav2", vqav2.FOLDERS, vqav2.questions, upload=vqav2.upload),
        Task("mmvet", mmvet.FOLDERS, mmvet.questions, upload=mmvet.upload),
        Task("custom", custom.FOLDERS, custom.questions),
        Task("shapes", shapes.FOLDERS, shapes.questions, shapes.score),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise CuMoError(f"unknown task {name!r}", f"choose from {', '.join(TASKS)}")
    return TASKS[name]


def questions(task: str, data_dir: Path, limit: Optional[int] = None) -> Iterator[Question]:
    """The task's questions (the first `limit`), read lazily: images are opened as they come."""
    spec = get_task(task)
    return islice(spec.questions(task_folder(data_dir, spec.folders)), limit)


def score(task: str, data_dir: Path, answers_path: Path, limit: Optional[int] = None) -> Result:
    """The answers file's Result. With `limit`, the questions scored are the task's first `limit` (those
    a --limit run answers); without, the official scripts' (all of them for ScienceQA, GQA, MMBench,
    SEED and shapes, where a missing answer counts wrong; the answers given for the others)."""
    spec = get_task(task)
    answers = read_answers(answers_path, spec.name)
    if not answers:
        raise CuMoError(f"answers file {answers_path} has no answers", "answer some of the task's questions first")
    if spec.score is None:
        return Result(spec.name, len(answers))
    folder = task_folder(data_dir, spec.folders)
    keep = None if limit is None else {question.question_id for question in islice(spec.questions(folder), limit)}
    count, metrics = spec.score(folder, answers, keep)
    return Result(spec.name, count, metrics)


def write_upload(task: str, data_dir: Path, answers_path: Path, destination: Path) -> Path:
    """Writes the file the task's outside grader takes (vqav2: the EvalAI upload; mmvet: the grader's
    results) from an answers file; returns `destination`."""
    spec = get_task(task)
    if spec.upload is None:
        raise CuMoError(f"task {task} has no upload file", "tasks vqav2 and mmvet have one")
    spec.upload(task_folder(data_dir, spec.folders), read_answers(answers_path, spec.name), Path(destination))
    return Path(destination)
