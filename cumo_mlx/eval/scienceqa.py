"""ScienceQA (test split, CQM-A prompts) and its official accuracy.

Files under DIR/scienceqa: llava_test_CQM-A.json (LLaVA's eval.zip); problems.json, pid_splits.json and
images/test/ (ScienceQA's data/scienceqa). The prompt is cumo/eval/model_vqa_science.py's with
--single-pred-prompt: the question text without its `<image>` tag, after an `<image>` line when the
question has an image, then "Answer with the option's letter from the given choices directly.".

Scored as cumo/eval/eval_science_qa.py: an answer gives option X when it is exactly "X" (A-E), or starts
with "X. ", or has "The answer is X" plus one more character exactly once (X any capital); a letter beyond
the question's choices, an unparsed answer and a missing answer count wrong. Accuracy over all test
questions, and over those with an image (the paper's ScienceQA-IMG): problems.json names one. (The
official script looks for `<image>` in the answer's prompt instead: the same questions, unless some go
unanswered, which it then leaves out of the IMG figure.)
"""

import re
from pathlib import Path
from typing import Iterator, Optional

from ..errors import DataError
from .answers import check_known
from .files import LLAVA_EVAL_ZIP, get, image_in, read_json, require
from .question import LONG_ANSWER_TOKENS, Question, with_image
from .result import percent

FOLDERS = ("scienceqa",)
QUESTIONS = "llava_test_CQM-A.json"
PROBLEMS = "problems.json"
SPLITS = "pid_splits.json"
IMAGES = "images/test"
SCIENCEQA_SOURCE = "ScienceQA's data/scienceqa folder (github.com/lupantech/ScienceQA), put in scienceqa/"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPTIONS = ("A", "B", "C", "D", "E")
_STATED = re.compile(r"The answer is ([A-Z]).")


def questions(folder: Path) -> Iterator[Question]:
    require(folder / IMAGES, SCIENCEQA_SOURCE)
    path = folder / QUESTIONS
    records = read_json(path, LLAVA_EVAL_ZIP)
    if not isinstance(records, list):
        raise DataError(f"{path} is not a list of questions", f"get it again from {LLAVA_EVAL_ZIP}")
    for number, record in enumerate(records):
        where = f"{path} question {number}"
        turns = get(record, "conversations", where)
        text = get(turns[0] if turns else {}, "value", where).replace("<image>", "").strip()
        image = image_in(folder / IMAGES, record["image"], where) if "image" in record else None
        prompt = f"{with_image(text, image)}\n{INSTRUCTION}"
        yield Question(get(record, "id", where), prompt, image, LONG_ANSWER_TOKENS, logged_prompt=prompt)


def parse_option(text: str) -> Optional[str]:
    """The option letter an answer gives, or None."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    stated = _STATED.findall(text)
    return stated[0] if len(stated) == 1 else None


def is_right(text: Optional[str], problem: dict) -> bool:
    letter = parse_option(text) if text is not None else None
    return letter in OPTIONS[: len(problem["choices"])] and OPTIONS.index(letter) == problem["answer"]


def score(folder: Path, answers: list[dict], keep: Optional[set]) -> tuple[int, dict]:
    """Accuracy over the test questions (those in `keep`, when given)."""
    problems = read_json(folder / PROBLEMS, SCIENCEQA_SOURCE)
    test = get(read_json(folder / SPLITS, SCIENCEQA_SOURCE), "test", str(folder / SPLITS))
    check_known(answers, set(test), "scienceqa", f"{SPLITS} (test)", str)
    texts = {str(answer["question_id"]): answer["text"] for answer in answers}  # a later answer wins, as there
    keep = None if keep is None else {str(question_id) for question_id in keep}
    hits, image_hits = [], []
    for problem_id in test:
        if keep is not None and problem_id not in keep:
            continue
        problem = get(problems, problem_id, str(folder / PROBLEMS))
        hit = is_right(texts.get(problem_id), problem)
        hits.append(hit)
        if problem.get("image"):
            image_hits.append(hit)
    metrics = {"accuracy": percent(hits)}
    if image_hits:
        metrics["img_accuracy"] = percent(image_hits)
    return len(hits), metrics
