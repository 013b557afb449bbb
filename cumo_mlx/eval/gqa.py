"""GQA (test-dev balanced) and its official accuracy.

Files under DIR/gqa: llava_gqa_testdev_balanced.jsonl (LLaVA's eval.zip); data/testdev_balanced_questions.json
and data/images/ (GQA's download page). LLaVA's scripts/convert_gqa_for_eval.py turns an answer into a
prediction (trailing periods off, lowercased); GQA's eval.py counts a balanced question right when the
prediction equals its answer, overall, by answer kind (binary: verify/logical/choose/compare questions;
open: query questions) and by structural and semantic type.
"""

from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

from .answers import check_known
from .files import LLAVA_EVAL_ZIP, read_json, require
from .llava_questions import llava_questions
from .question import SHORT_ANSWER_TOKENS, Question
from .result import percent

FOLDERS = ("gqa",)
QUESTIONS = "llava_gqa_testdev_balanced.jsonl"
OFFICIAL = "data/testdev_balanced_questions.json"
IMAGES = "data/images"
OFFICIAL_SOURCE = "GQA's questions1.2.zip (cs.stanford.edu/people/dorarad/gqa/download.html), extracted to gqa/data"
IMAGES_SOURCE = "GQA's images.zip (cs.stanford.edu/people/dorarad/gqa/download.html), extracted to gqa/data"
SEMANTIC_NAMES = {"attr": "attribute", "cat": "category", "global": "scene", "obj": "object", "rel": "relation"}


def questions(folder: Path) -> Iterator[Question]:
    require(folder / IMAGES, IMAGES_SOURCE)
    yield from llava_questions(folder / QUESTIONS, LLAVA_EVAL_ZIP, folder / IMAGES, SHORT_ANSWER_TOKENS)


def prediction(text: str) -> str:
    return text.rstrip(".").lower()


def score(folder: Path, answers: list[dict], keep: Optional[set]) -> tuple[int, dict]:
    """Accuracy over the balanced questions (those in `keep`, when given); an unanswered one counts wrong
    (GQA's eval.py needs every prediction)."""
    official = read_json(folder / OFFICIAL, OFFICIAL_SOURCE)
    check_known(answers, set(official), "gqa", OFFICIAL, str)
    predictions = {str(answer["question_id"]): prediction(answer["text"]) for answer in answers}
    keep = None if keep is None else {str(question_id) for question_id in keep}
    hits, kinds = [], defaultdict(list)
    structural, semantic = defaultdict(list), defaultdict(list)
    for question_id, question in official.items():
        if not question.get("isBalanced") or (keep is not None and question_id not in keep):
            continue
        hit = predictions.get(question_id) == question["answer"]
        hits.append(hit)
        types = question["types"]
        kinds["open" if types["structural"] == "query" else "binary"].append(hit)
        structural[types["structural"]].append(hit)
        semantic[SEMANTIC_NAMES.get(types["semantic"], types["semantic"])].append(hit)
    metrics = {"accuracy": percent(hits), **{kind: percent(kinds[kind]) for kind in ("binary", "open") if kinds[kind]}}
    metrics["categories"] = {name: percent(group) for name, group in sorted(semantic.items())}
    metrics["structural"] = {name: percent(group) for name, group in sorted(structural.items())}
    return len(hits), metrics
