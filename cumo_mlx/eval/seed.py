"""SEED-Bench (image questions and the middle frames of its video questions) and its official accuracy.

Files under DIR/seed_bench: llava-seed-bench.jsonl (LLaVA's eval.zip; image paths relative to
seed_bench/), SEED-Bench.json and the SEED-Bench-image/ folder (SEED-Bench's release; the video questions
also need SEED-Bench-video-image/, LLaVA's extract_video_frames.py output). Scored as LLaVA's
scripts/convert_seed_for_submission.py: an answer is right when it is exactly the answer letter;
accuracy per question type and over all questions of SEED-Bench.json, of its image questions and of its
video questions; unanswered ones count wrong.
"""

from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

from .answers import check_known
from .files import LLAVA_EVAL_ZIP, get, int_or_same, read_json, require
from .llava_questions import llava_questions
from .question import SHORT_ANSWER_TOKENS, Question
from .result import percent

FOLDERS = ("seed_bench",)
QUESTIONS = "llava-seed-bench.jsonl"
OFFICIAL = "SEED-Bench.json"
IMAGES = "SEED-Bench-image"
SEED_SOURCE = "SEED-Bench's release (huggingface.co/datasets/AILab-CVC/SEED-Bench), put in seed_bench/"


def questions(folder: Path) -> Iterator[Question]:
    require(folder / IMAGES, SEED_SOURCE)
    yield from llava_questions(folder / QUESTIONS, LLAVA_EVAL_ZIP, folder, SHORT_ANSWER_TOKENS)


def score(folder: Path, answers: list[dict], keep: Optional[set]) -> tuple[int, dict]:
    """Accuracy over SEED-Bench.json's questions (those in `keep`, when given). Its ids are digit strings
    and may be numbers in the answers file; the official script looks answers up by the id as a number."""
    path = folder / OFFICIAL
    official = read_json(path, SEED_SOURCE)
    type_names = {type_id: name for name, type_id in get(official, "question_type", str(path)).items()}
    records = get(official, "questions", str(path))
    check_known(answers, {int_or_same(record["question_id"]) for record in records}, "seed", OFFICIAL, int_or_same)
    texts = {int_or_same(answer["question_id"]): answer["text"] for answer in answers}
    keep = None if keep is None else {int_or_same(question_id) for question_id in keep}
    hits, by_type, by_data = [], defaultdict(list), defaultdict(list)
    for record in records:
        question_id = int_or_same(record["question_id"])
        if keep is not None and question_id not in keep:
            continue
        hit = texts.get(question_id) == record["answer"]
        hits.append(hit)
        by_type[record["question_type_id"]].append(hit)
        by_data[record.get("data_type")].append(hit)
    metrics = {"accuracy": percent(hits)}
    metrics |= {f"{kind}_accuracy": percent(by_data[kind]) for kind in ("image", "video") if by_data[kind]}
    metrics["categories"] = {type_names.get(type_id, str(type_id)): percent(by_type[type_id]) for type_id in sorted(by_type)}
    return len(hits), metrics
