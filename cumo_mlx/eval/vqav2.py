"""VQAv2 (test-dev): the questions and the upload file for the EvalAI server (no local score).

Files under DIR/vqav2: llava_vqav2_mscoco_test-dev2015.jsonl and llava_vqav2_mscoco_test2015.jsonl
(LLaVA's eval.zip) and test2015/ (COCO). The upload file is LLaVA's
scripts/convert_vqav2_for_submission.py's: every test2015 question with its answer normalised as on
EvalAI, "" for the questions not answered (those outside test-dev).
"""

import json
from pathlib import Path
from typing import Iterator

from .answers import check_known
from .evalai import normalise_answer
from .files import LLAVA_EVAL_ZIP, require
from .llava_questions import llava_questions, question_ids
from .question import SHORT_ANSWER_TOKENS, Question

FOLDERS = ("vqav2",)
QUESTIONS = "llava_vqav2_mscoco_test-dev2015.jsonl"
ALL_QUESTIONS = "llava_vqav2_mscoco_test2015.jsonl"
IMAGES = "test2015"
IMAGES_SOURCE = "COCO's test2015.zip (images.cocodataset.org/zips/test2015.zip), extracted to vqav2/"


def questions(folder: Path) -> Iterator[Question]:
    require(folder / IMAGES, IMAGES_SOURCE)
    yield from llava_questions(folder / QUESTIONS, LLAVA_EVAL_ZIP, folder / IMAGES, SHORT_ANSWER_TOKENS)


def upload(folder: Path, answers: list[dict], destination: Path) -> None:
    ids = question_ids(folder / ALL_QUESTIONS, LLAVA_EVAL_ZIP)
    check_known(answers, set(ids), "vqav2", ALL_QUESTIONS)
    texts = {answer["question_id"]: answer["text"] for answer in answers}
    entries = [{"question_id": i, "answer": normalise_answer(texts[i]) if i in texts else ""} for i in ids]
    destination.write_text(json.dumps(entries), encoding="utf-8")
