"""MMBench and MMBench-CN (dev) and their circular evaluation.

Files: DIR/mmbench/mmbench_dev_20230712.tsv and DIR/mmbench_cn/mmbench_dev_cn_20231003.tsv (or in
mmbench/), from OpenMMLab. Each row is a question: hint, question, options A-D (up to the first empty
one), answer, category, l2-category and the image in base64. A row whose index is k * 1,000,000 plus a
question's index holds that question with its options rotated k times.

Prompt as cumo/eval/model_vqa_mmbench.py with --single-pred-prompt: the hint (when there is one), the
question and "X. option" lines, after an `<image>` line, then the letter instruction ("Answer with the
option's letter from the given choices directly." / "请直接回答选项字母。").

Scored as MMBench's evaluation (opencompass; its eval_sub_data and can_infer): a row's answer gives
option X when exactly one of A-E stands in it as a word (unless "A" does and it has more than 3 words:
"a" may be an article), else when exactly one of them stands as a word in one of the forms "X." "X,"
"X:" "X)" "X)." "(X)" "(X)." ":X" ":X," ":X." ":X)" ":X).", else when exactly one option's text is in it
(case ignored). A question is right only if every row of it (each rotation) is right. MMBench asks
ChatGPT to match the answers these rules cannot read; here they count wrong (VLMEvalKit's exact-matching
mode), and so do unanswered rows.
"""

import base64
import binascii
import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .answers import check_known
from .files import get, int_or_same, require
from .question import LONG_ANSWER_TOKENS, Question, with_image
from .result import percent

FOLDERS = {"en": ("mmbench",), "cn": ("mmbench_cn", "mmbench")}
TSV = {"en": "mmbench_dev_20230712.tsv", "cn": "mmbench_dev_cn_20231003.tsv"}
SOURCE = "https://download.openmmlab.com/mmclassification/datasets/mmbench/{name}"
INSTRUCTION = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}
LETTERS = ("A", "B", "C", "D")
ROTATION = 1_000_000
# The cells pandas reads as missing (LLaVA reads the TSV with pandas.read_table); LLaVA's is_none adds
# "nan" and "none" in any case.
_MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
            "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}  # fmt: skip
_WRAPPED = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
            (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))  # fmt: skip
_ANY_LETTER = ("A", "B", "C", "D", "E")


def is_missing(cell: Optional[str]) -> bool:
    return cell is None or cell in _MISSING or cell.lower() in ("nan", "none")


def read_rows(path: Path, lang: str) -> Iterator[dict]:
    require(path, SOURCE.format(name=TSV[lang]))
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # base64 images are longer than csv's default field limit (128 KiB)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f, delimiter="\t")
    finally:
        csv.field_size_limit(limit)


def options(row: dict) -> list[str]:
    """The options from A, up to the first missing one (model_vqa_mmbench.py's get_options)."""
    found = []
    for letter in LETTERS:
        if is_missing(row.get(letter)):
            break
        found.append(row[letter])
    return found


def question_text(row: dict, where: str) -> str:
    text = get(row, "question", where)
    if not is_missing(row.get("hint")):
        text = f"{row['hint']}\n{text}"
    return text + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, options(row), strict=False))


def _index(row: dict, where: str) -> int:
    try:
        return int(get(row, "index", where))
    except ValueError:
        raise DataError(f"{where} has index {row['index']!r}, not a number", "give MMBench's official TSV") from None


def _image(row: dict, where: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(get(row, "image", where))))
    except (binascii.Error, UnidentifiedImageError, ValueError):
        raise DataError(f"{where} has no readable base64 image", "give MMBench's official TSV") from None


def questions(folder: Path, lang: str) -> Iterator[Question]:
    path = folder / TSV[lang]
    for number, row in enumerate(read_rows(path, lang), 2):
        where = f"{path} line {number}"
        text, image = question_text(row, where), _image(row, where)
        metadata = {key: row[key] for key in ("category", "l2-category") if key in row}
        prompt = f"{with_image(text, image)}\n{INSTRUCTION[lang]}"
        yield Question(_index(row, where), prompt, image, LONG_ANSWER_TOKENS, logged_prompt=text, metadata=metadata)


def infer_letter(answer: str) -> Optional[str]:
    """The option letter standing in an answer as a word, bare or in one of MMBench's wrappings."""
    words = [word.strip() for word in answer.split()]
    bare = [letter for letter in _ANY_LETTER if letter in words]
    if len(bare) == 1 and not ("A" in words and len(words) > 3):
        return bare[0]
    for prefix, suffix in _WRAPPED:
        wrapped = [letter for letter in _ANY_LETTER if prefix + letter + suffix in words]
        if len(wrapped) == 1:
            return wrapped[0]
    return None


def infer_option(answer: str, choices: dict[str, str]) -> Optional[str]:
    """The letter of the one option whose text is in the answer (case ignored)."""
    answer = answer.lower()
    found = [letter for letter, text in choices.items() if text.lower() in answer]
    return found[0] if len(found) == 1 else None


def infer_choice(answer: str, choices: dict[str, str]) -> Optional[str]:
    return infer_letter(answer) or infer_option(answer, choices)


def is_right(row: dict, text: Optional[str]) -> bool:
    """Whether an answer (None: no answer) to a row gives its answer letter."""
    return text is not None and infer_choice(text, row["choices"]) == row["answer"]


def _scored_rows(path: Path, lang: str) -> dict[int, dict]:
    """index -> what scoring needs of the row (its answer, categories and option texts), without the image."""
    rows = {}
    for number, row in enumerate(read_rows(path, lang), 2):
        where = f"{path} line {number}"
        rows[_index(row, where)] = {
            "answer": get(row, "answer", where),
            "category": row.get("category") or "",
            "l2-category": row.get("l2-category") or "",
            # MMBench's build_choices: every option pandas reads as present
            "choices": {letter: row[letter] for letter in LETTERS if row.get(letter) not in _MISSING | {None}},
        }
    return rows


def score(folder: Path, answers: list[dict], keep: Optional[set], lang: str) -> tuple[int, dict]:
    """Circular accuracy over the questions (rows below 1,000,000; those in `keep`, when given), overall,
    per category and per l2-category."""
    rows = _scored_rows(folder / TSV[lang], lang)
    check_known(answers, set(rows), f"mmbench ({lang})", TSV[lang], int_or_same)
    texts = {int_or_same(answer["question_id"]): answer["text"] for answer in answers}
    rotations = defaultdict(list)
    for index in rows:
        if keep is None or index in keep:
            rotations[index % ROTATION].append(index)
    hits, categories, l2_categories = [], defaultdict(list), defaultdict(list)
    for main, group in rotations.items():
        if main not in rows or (keep is not None and main not in keep):
            continue
        hit = all(is_right(rows[index], texts.get(index)) for index in group)
        hits.append(hit)
        categories[rows[main]["category"]].append(hit)
        l2_categories[rows[main]["l2-category"]].append(hit)
    metrics = {
        "accuracy": percent(hits),
        "categories": {name: percent(group) for name, group in sorted(categories.items())},
        "l2_categories": {name: percent(group) for name, group in sorted(l2_categories.items())},
    }
    return len(hits), metrics
