"""MM-Vet: the questions and the results file for its official GPT-4 grader (no local score).

Files under DIR/mm-vet: llava-mm-vet.jsonl (LLaVA's eval.zip) and images/ (MM-Vet's mm-vet.zip). The
results file is LLaVA's scripts/convert_mmvet_for_eval.py's: {"v1_<question_id>": answer}.
"""

import json
from pathlib import Path
from typing import Iterator

from .answers import check_known
from .files import LLAVA_EVAL_ZIP, require
from .llava_questions import llava_questions, question_ids
from .question import LONG_ANSWER_TOKENS, Question

FOLDERS = ("mm-vet", "mmvet")
QUESTIONS = "llava-mm-vet.jsonl"
IMAGES = "images"
IMAGES_SOURCE = "MM-Vet's mm-vet.zip (github.com/yuweihao/MM-Vet/releases/download/v1/mm-vet.zip), its images/ put in mm-vet/"


def questions(folder: Path) -> Iterator[Question]:
    require(folder / IMAGES, IMAGES_SOURCE)
    yield from llava_questions(folder / QUESTIONS, LLAVA_EVAL_ZIP, folder / IMAGES, LONG_ANSWER_TOKENS)


def upload(folder: Path, answers: list[dict], destination: Path) -> None:
    check_known(answers, set(question_ids(folder / QUESTIONS, LLAVA_EVAL_ZIP)), "mmvet", QUESTIONS)
    results = {f"v1_{answer['question_id']}": answer["text"] for answer in answers}
    destination.write_text(json.dumps(results, indent=2), encoding="utf-8")
