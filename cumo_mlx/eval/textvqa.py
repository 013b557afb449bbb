"""TextVQA (val, with LLaVA's OCR-token prompts) and its official soft accuracy.

Files under DIR/textvqa: llava_textvqa_val_v051_ocr.jsonl (LLaVA's eval.zip), TextVQA_0.5.1_val.json and
train_images/ (textvqa.org). Scored as cumo/eval/eval_textvqa.py with m4c_evaluator.py's
TextVQAAccuracyEvaluator: an answer is matched to its annotation by image id (LLaVA's question_id) and the
question read back from its prompt; both the answer and the ten human answers are normalised as on EvalAI
(evalai.py); the answer scores the mean, over the ten ways of leaving one human answer out, of
min(1, humans among the other nine who gave it / 3).
"""

import re
from pathlib import Path
from typing import Iterator, Optional

from ..errors import DataError
from .evalai import normalise_answer
from .files import LLAVA_EVAL_ZIP, get, read_json, require
from .llava_questions import llava_questions
from .question import SHORT_ANSWER_TOKENS, Question
from .result import percent

FOLDERS = ("textvqa",)
QUESTIONS = "llava_textvqa_val_v051_ocr.jsonl"
ANNOTATIONS = "TextVQA_0.5.1_val.json"
IMAGES = "train_images"
ANNOTATIONS_SOURCE = "https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_val.json"
IMAGES_SOURCE = "https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip (extract it to textvqa/)"
HUMAN_ANSWERS = 10


def questions(folder: Path) -> Iterator[Question]:
    require(folder / IMAGES, IMAGES_SOURCE)
    yield from llava_questions(folder / QUESTIONS, LLAVA_EVAL_ZIP, folder / IMAGES, SHORT_ANSWER_TOKENS)


def question_in_prompt(prompt: str) -> Optional[str]:
    """The lowercased question of an answer's prompt, as eval_textvqa.py's prompt_processor finds it:
    after "Question: " in an "OCR tokens: " prompt; the line that is not the "Reference OCR token: " line
    of a three-line prompt (the last line is the instruction); the first line of a two-line prompt."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        return match.group(1).lower() if match else None
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    return lines[0].lower() if len(lines) == 2 else None


def soft_scores(human_answers: list[str]) -> dict[str, float]:
    """The score of each distinct (normalised) human answer."""
    answers = [normalise_answer(answer) for answer in human_answers]
    if len(answers) != HUMAN_ANSWERS:
        what = f"a question in {ANNOTATIONS} has {len(answers)} human answers, not {HUMAN_ANSWERS}"
        raise DataError(what, f"get it again from {ANNOTATIONS_SOURCE}")
    return {
        candidate: sum(min(1.0, (answers.count(candidate) - (left_out == candidate)) / 3) for left_out in answers) / len(answers)
        for candidate in set(answers)
    }


def score(folder: Path, answers: list[dict], keep: Optional[set]) -> tuple[int, dict]:
    """Accuracy over the answers (the official script scores the answers it is given; `keep` is unused)."""
    path = folder / ANNOTATIONS
    records = get(read_json(path, ANNOTATIONS_SOURCE), "data", str(path))
    annotations = {(record["image_id"], record["question"].lower()): record["answers"] for record in records}
    scores = []
    for answer in answers:
        question = question_in_prompt(answer["prompt"])
        human = annotations.get((answer["question_id"], question))
        if human is None:
            raise DataError(
                f"the answer to {answer['question_id']!r} ({answer['prompt'].splitlines()[0] if answer['prompt'] else ''!r}) "
                f"matches no question of {ANNOTATIONS}",
                "give a textvqa answers file: its lines keep the question file's id and text as prompt",
            )
        scores.append(soft_scores(human).get(normalise_answer(answer["text"]), 0.0))
    return len(scores), {"accuracy": percent(scores)}
