"""Answering on several processes or Macs (`mlx.launch -n N cumo-mlx eval ...`).

Each rank answers its share of the questions (every N-th, from its rank) into its own part file beside
the answers file (ANSWERS.rank<r>-of-<N>.jsonl); rank 0 waits for every rank, then merges the parts in
question order into the answers file, which is then the file one process writes. With --resume the
ranks skip what the answers file holds and resume their part files (of a run with the same N).
"""

import json
import os
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from ..errors import CuMoError
from .answers import read_answers, resume_answers
from .tasks import get_task, questions

# answer(answers_path, share, answered): run_task's arguments of one rank (see run.pending)
Answer = Callable[[Path, tuple[int, int], Optional[Counter]], None]


def part_path(output: Path, rank: int, world: int) -> Path:
    return output.with_name(f"{output.stem}.rank{rank}-of-{world}{output.suffix}")


def agree(group, error: Optional[BaseException]) -> None:
    """A barrier: returns once every rank reaches it without an error. Raises this rank's `error`, or
    a one-line error on the ranks that had none when another rank had one (so that none waits forever)."""
    failed = mx.distributed.all_sum(mx.array(int(error is not None)), group=group).item()
    if error is not None:
        raise error
    if failed:
        raise CuMoError("another rank stopped with an error (its message is above)", "fix it, then rerun with --resume")


def merge(task: str, data_dir: Path, records: list[dict], output: Path) -> None:
    """Writes `records` to `output` in the task's question order (records of no question of the task
    after them, in their order; a question answered twice keeps its first answer), through a
    temporary file so that the answers file is never half written."""
    by_key: dict = defaultdict(deque)
    for record in records:
        by_key[(record["question_id"], record["prompt"])].append(record)
    ordered, keys = [], set()
    for question in questions(task, data_dir):
        keys.add(question.key)
        if by_key[question.key]:
            ordered.append(by_key[question.key].popleft())
    ordered += [record for key, left in by_key.items() if key not in keys for record in left]
    temp = output.with_name(output.name + ".tmp")
    temp.write_text("".join(json.dumps(record) + "\n" for record in ordered), encoding="utf-8")
    os.replace(temp, output)


def answer_in_parts(group, task: str, data_dir: Path, output: Path, resume: bool, answer: Answer) -> bool:
    """Runs `answer` on this rank (into the answers file itself on one process); on several, rank 0
    merges the ranks' part files into `output` once every rank is done. True where `output` is then
    whole (rank 0)."""
    rank, world = group.rank(), group.size()
    if world == 1:
        answer(output, (0, 1), None)
        return True
    task = get_task(task).name
    error = None
    try:
        if resume and rank == 0:
            resume_answers(output, task)  # the one rank that repairs a half-written last line
    except Exception as e:  # every rank must reach the barrier
        error = e
    agree(group, error)
    part = part_path(output, rank, world)
    try:
        answer(part, (rank, world), resume_answers(output, task) if resume else None)
    except Exception as e:
        error = e
    agree(group, error)
    if rank != 0:
        return False
    parts = [part_path(output, r, world) for r in range(world)]
    kept = read_answers(output, task) if resume and output.exists() else []
    merge(task, data_dir, kept + [record for p in parts for record in read_answers(p, task)], output)
    for p in parts:
        p.unlink()
    return True
