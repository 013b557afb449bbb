"""LLaVA's question files (JSON lines: question_id, image, text) as Questions.

The prompt is the file's text as is after an `<image>` line (cumo/eval/model_vqa_loader.py and
model_vqa.py); the answers file records the text alone, as those scripts do.
"""

from pathlib import Path
from typing import Iterator, Optional

from .files import get, image_in, read_jsonl
from .question import Question, with_image

OWN_FIELDS = ("question_id", "image", "text")


def question_from_line(line: dict, where: str, image: Optional[Path], max_new_tokens: int) -> Question:
    text = get(line, "text", where)
    return Question(
        question_id=get(line, "question_id", where),
        prompt=with_image(text, image),
        image=image,
        max_new_tokens=max_new_tokens,
        logged_prompt=text,
        metadata={key: value for key, value in line.items() if key not in OWN_FIELDS},
    )


def llava_questions(path: Path, source: str, image_folder: Path, max_new_tokens: int) -> Iterator[Question]:
    """The questions of a LLaVA question file whose lines each name an image in `image_folder`."""
    for number, line in read_jsonl(path, source):
        where = f"{path} line {number}"
        yield question_from_line(line, where, image_in(image_folder, get(line, "image", where), where), max_new_tokens)


def question_ids(path: Path, source: str) -> list:
    """The question ids of a LLaVA question file, in file order (no image is looked at)."""
    return [get(line, "question_id", f"{path} line {number}") for number, line in read_jsonl(path, source)]
