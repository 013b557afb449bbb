"""Any LLaVA question file (JSON lines: question_id, image, text): answers only, no score.

--data-dir is the question file, or a folder with questions.jsonl. Image paths are relative to the file's
folder, or to the images/ folder beside it (LLaVA-Bench's layout). A line without an image is asked as
text alone. The prompt and the new-token budget are cumo/eval/model_vqa.py's.
"""

from pathlib import Path
from typing import Iterator

from .files import read_jsonl
from .llava_questions import question_from_line
from .question import LONG_ANSWER_TOKENS, Question

FOLDERS = None  # --data-dir as given
QUESTIONS = "questions.jsonl"
SOURCE = "your LLaVA question file (one JSON object per line: question_id, image, text)"


def image_path(folder: Path, name: str) -> Path:
    beside = folder / name
    return beside if beside.exists() or not (folder / "images" / name).exists() else folder / "images" / name


def questions(path: Path) -> Iterator[Question]:
    path = path if path.is_file() else path / QUESTIONS
    for number, line in read_jsonl(path, SOURCE):
        image = image_path(path.parent, line["image"]) if "image" in line else None
        yield question_from_line(line, f"{path} line {number}", image, LONG_ANSWER_TOKENS)
