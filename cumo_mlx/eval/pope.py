"""POPE (COCO; adversarial, popular and random splits) and its official metrics.

Files under DIR/pope: llava_pope_test.jsonl (LLaVA's eval.zip), coco/coco_pope_<split>.json (POPE's labels)
and val2014/ (COCO). Scored as cumo/eval/eval_pope.py: an answer is "no" when its first sentence (the text
before its first period), commas dropped and split at spaces, has the word "No", "no" or "not", else "yes";
per split: accuracy, precision, recall and F1 of "yes", and the share of "yes" answers; then their means
over the splits.

The official script pairs the k-th answer of a split with the k-th line of the split's label file; it
relies on answers in question-file order. Here the k-th question of a split in the question file takes
the k-th label: the same pairs for such a file, and right for a file in any order.
"""

from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

from ..errors import DataError
from .answers import check_known
from .files import LLAVA_EVAL_ZIP, get, read_jsonl, require
from .llava_questions import llava_questions
from .question import SHORT_ANSWER_TOKENS, Question

FOLDERS = ("pope",)
QUESTIONS = "llava_pope_test.jsonl"
LABELS = "coco"
IMAGES = "val2014"
LABELS_SOURCE = "POPE's output/coco folder (github.com/AoiDragon/POPE, commit e3e39262), put in pope/"
IMAGES_SOURCE = "COCO's val2014.zip (images.cocodataset.org/zips/val2014.zip), extracted to pope/"
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def questions(folder: Path) -> Iterator[Question]:
    require(folder / IMAGES, IMAGES_SOURCE)
    yield from llava_questions(folder / QUESTIONS, LLAVA_EVAL_ZIP, folder / IMAGES, SHORT_ANSWER_TOKENS)


def says_yes(text: str) -> bool:
    words = text.split(".")[0].replace(",", "").split(" ")
    return not any(word in ("No", "no", "not") for word in words)


def _labels(folder: Path) -> dict[str, list[bool]]:
    """Each split's labels (True: "yes"; the official script reads any label but "no" as yes), in file order."""
    require(folder / LABELS, LABELS_SOURCE)
    labels = {}
    for path in sorted((folder / LABELS).glob("coco_pope_*.json")):
        split = path.name[len("coco_pope_") : -len(".json")]
        labels[split] = [get(line, "label", f"{path} line {n}") != "no" for n, line in read_jsonl(path, LABELS_SOURCE)]
    if not labels:
        raise DataError(f"{folder / LABELS} has no coco_pope_<split>.json file", f"they come from {LABELS_SOURCE}")
    return labels


def _question_places(folder: Path) -> dict:
    """question_id -> (split, position of the question among its split's questions)."""
    places, seen = {}, Counter()
    for number, line in read_jsonl(folder / QUESTIONS, LLAVA_EVAL_ZIP):
        split = get(line, "category", f"{folder / QUESTIONS} line {number}")
        places[get(line, "question_id", f"{folder / QUESTIONS} line {number}")] = (split, seen[split])
        seen[split] += 1
    return places


def split_fractions(pairs: list[tuple[bool, bool]]) -> dict:
    """(predicted yes, labelled yes) pairs -> the split's metrics as fractions (a ratio with nothing to
    divide, which stops the official script, is 0)."""
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    tn = sum(not p and not t for p, t in pairs)
    fn = sum(not p and t for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(pairs),
    }


def _in_percent(fractions: dict) -> dict:
    return {name: 100 * value for name, value in fractions.items()}


def score(folder: Path, answers: list[dict], keep: Optional[set]) -> tuple[int, dict]:
    """Metrics over the answers, per split and averaged over the splits answered (`keep` is unused: the
    official script scores the answers it is given)."""
    labels, places = _labels(folder), _question_places(folder)
    check_known(answers, set(places), "pope", QUESTIONS)
    pairs: dict[str, list] = {split: [] for split in labels}
    for answer in answers:
        split, position = places[answer["question_id"]]
        if split not in labels:
            continue  # the official script scores the splits that have a label file
        if position >= len(labels[split]):
            raise DataError(
                f"{LABELS}/coco_pope_{split}.json has fewer labels than {QUESTIONS} has {split} questions",
                f"get it again from {LABELS_SOURCE}",
            )
        pairs[split].append((says_yes(answer["text"]), labels[split][position]))
    splits = {split: split_fractions(found) for split, found in pairs.items() if found}
    if not splits:
        raise DataError("no answer is to a question of a split with a label file", f"the label files come from {LABELS_SOURCE}")
    averages = {name: sum(row[name] for row in splits.values()) / len(splits) for name in METRICS}
    categories = {split: _in_percent(row) | {"count": len(pairs[split])} for split, row in splits.items()}
    return sum(len(found) for found in pairs.values()), _in_percent(averages) | {"categories": categories}
