"""Any LLaVA question file (JSON lines: question_id, image, text): answers only, no score.

--data-dir is the question file, or a folder with questions.jsonl. Image paths are relative to the file's
folder, or to the images/ folder beside it (LLaVA-Bench's layout). A line without an image is asked as
text alone. The prompt and the new-token budget are cumo/eval/model_vqa.py's.
"""

from pathlib import Path
from typing import Iterator

from .files import image_in, read_jsonl
from .llava_questions import question_from_line
from .question import LONG_ANSWER_TOKENS, Question

FOLDERS = None  # --data-dir as given
QUESTIONS = "questions.jsonl"
SOURCE = "your LLaVA question file (one JSON object per line: question_id, image, text)"


def image_path(folder: Path, name: str, where: str) -> Path:
    """The image beside the question file, or in its images/ folder; either way inside that folder."""
    beside = image_in(folder, name, where)
    return beside if beside.exists() or not (folder / "images" / name).exists() else image_in(folder / "images", name, where)


def questions(path: Path) -> Iterator[Question]:
    path = path if path.is_file() else path / QUESTIONS
    for number, line in read_jsonl(path, SOURCE):
        where = f"{path} line {number}"
        image = image_path(path.parent, line["image"], where) if "image" in line else None
        yield question_from_line(line, where, image, LONG_ANSWER_TOKENS)
