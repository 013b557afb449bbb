"""`shapes`: the synthetic questions of `cumo-mlx data shapes` (questions.json), scored on one-word answers.

An answer is right when its first word, lowercased and without punctuation, equals the answer ("colour"
read as "color"; the digits 1-3 as the count words one-three). Accuracy overall and per question type;
unanswered questions count wrong. The demo's recipe scores its held-out questions with the same rules
(demo_recipe/evaluation.py) and asks them with 8 new tokens.
"""

from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

from ..errors import DataError
from ..shapes import COUNT_WORDS
from .answers import check_known
from .files import get, image_in, read_json
from .question import Question, with_image
from .result import percent

FOLDERS = ("shapes",)
QUESTIONS = "questions.json"
SOURCE = "`cumo-mlx data shapes --out DIR`"
MAX_NEW_TOKENS = 8  # one-word answers; as demo_recipe/recipe.py's evaluation
_DIGITS = {str(number): word for number, word in COUNT_WORDS.items()}


def normalise_answer(text: str) -> str:
    """Lowercase first word without punctuation; digits 1-3 become words ("3." -> "three")."""
    words = text.strip().lower().replace("colour", "color").split()
    word = words[0].strip(".,!?;:'\"") if words else ""
    return _DIGITS.get(word, word)


def is_correct(prediction: str, answer: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(answer)


def accuracy_by_type(records: list[dict], predictions: list[str]) -> dict:
    """{"overall": {...}, type: {"correct", "total", "accuracy"}} for questions.json records (accuracy as a
    fraction)."""
    table: dict = {}
    for record, prediction in zip(records, predictions, strict=True):
        for key in ("overall", record["type"]):
            row = table.setdefault(key, {"correct": 0, "total": 0})
            row["correct"] += is_correct(prediction, record["answer"])
            row["total"] += 1
    for row in table.values():
        row["accuracy"] = row["correct"] / row["total"]
    return table


def _records(folder: Path) -> list[dict]:
    records = read_json(folder / QUESTIONS, SOURCE)
    if not isinstance(records, list):
        raise DataError(f"{folder / QUESTIONS} is not a list of questions", f"write it again with {SOURCE}")
    return records


def questions(folder: Path) -> Iterator[Question]:
    path = folder / QUESTIONS
    for number, record in enumerate(_records(folder)):
        where = f"{path} question {number}"
        question, image = get(record, "question", where), image_in(folder, get(record, "image", where), where)
        metadata = {"type": get(record, "type", where)}
        prompt = with_image(question, image)
        yield Question(get(record, "id", where), prompt, image, MAX_NEW_TOKENS, logged_prompt=question, metadata=metadata)


def score(folder: Path, answers: list[dict], keep: Optional[set]) -> tuple[int, dict]:
    """Accuracy over questions.json (the questions in `keep`, when given), overall and per type."""
    records = _records(folder)
    check_known(answers, {record["id"] for record in records}, "shapes", QUESTIONS)
    texts = {answer["question_id"]: answer["text"] for answer in answers}
    hits, by_type = [], defaultdict(list)
    for record in records:
        if keep is None or record["id"] in keep:
            hit = is_correct(texts.get(record["id"], ""), record["answer"])
            hits.append(hit)
            by_type[record["type"]].append(hit)
    return len(hits), {"accuracy": percent(hits), "categories": {kind: percent(group) for kind, group in by_type.items()}}
