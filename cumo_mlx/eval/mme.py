"""MME (perception and cognition yes/no questions) and its official scores.

Files under DIR/MME: llava_mme.jsonl (LLaVA's eval.zip) and MME_Benchmark_release_version/ (the MME
release, with its ground-truth .txt files). Scored as LLaVA's MME/convert_answer_to_mme.py (eval.zip)
followed by MME's eval_tool/calculation.py: an answer's ground truth is found by its subtask and image
(question_id "<subtask>/<image>") and its question (the prompt without LLaVA's short-answer instruction,
ending in "Please answer yes or no."); an answer reads yes/no when it is exactly that, lowercased, else by
which of them its first four characters hold ("yes" first), else neither (wrong). Per subtask: acc (right
answers), acc+ (images with both questions right) and their sum in percent, the subtask's score; the
perception and cognition scores sum their subtasks' scores.

calculation.py pairs consecutive lines as an image's two questions, which needs answers in question-file
order; here an image's answers are found by its question_id: the same pairs for such a file.
"""

from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

from ..errors import DataError
from .files import LLAVA_EVAL_ZIP, require
from .llava_questions import llava_questions
from .question import SHORT_ANSWER_TOKENS, Question
from .result import percent

FOLDERS = ("MME", "mme")
QUESTIONS = "llava_mme.jsonl"
RELEASE = "MME_Benchmark_release_version"
RELEASE_SOURCE = "the MME release (github.com/BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation branch), put in MME/"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."


def questions(folder: Path) -> Iterator[Question]:
    require(folder / RELEASE, RELEASE_SOURCE)
    yield from llava_questions(folder / QUESTIONS, LLAVA_EVAL_ZIP, folder / RELEASE, SHORT_ANSWER_TOKENS)


def ground_truth(release: Path) -> dict:
    """(subtask, image's .txt name, question) -> "Yes"/"No", from each subtask's question files: in its
    questions_answers_YN/ folder when it has an images/ folder, else beside the images."""
    truth = {}
    for subtask in sorted(path for path in require(release, RELEASE_SOURCE).iterdir() if path.is_dir()):
        folder = subtask / "questions_answers_YN" if (subtask / "images").exists() else subtask
        for path in sorted(folder.glob("*.txt")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2:
                    raise DataError(f"{path} has a line that is not <question>TAB<answer>", f"get it again from {RELEASE_SOURCE}")
                truth[(subtask.name, path.name, fields[0])] = fields[1]
    return truth


def _truth_of(answer: dict, truth: dict) -> tuple[str, str]:
    """(subtask, ground truth) of an answer."""
    question_id = str(answer["question_id"])
    subtask, file = question_id.split("/")[0], question_id.split("/")[-1].split(".")[0] + ".txt"
    question = answer["prompt"]
    if SHORT_ANSWER in question:
        question = question.replace(SHORT_ANSWER, "").strip()
    if YES_NO not in question:
        question = f"{question} {YES_NO}"
        if (subtask, file, question) not in truth:  # a few release files have two spaces there
            question = question.replace(f" {YES_NO}", f"  {YES_NO}")
    if (subtask, file, question) not in truth:
        raise DataError(
            f"the answer to {question_id!r} ({question!r}) has no ground truth in {RELEASE}",
            "give an mme answers file: its lines keep the question file's id and text as prompt",
        )
    return subtask, truth[(subtask, file, question)]


def yes_or_no(text: str) -> str:
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def score(folder: Path, answers: list[dict], keep: Optional[set]) -> tuple[int, dict]:
    """Scores over the answers (`keep` is unused: the official tool scores the answers it is given)."""
    truth = ground_truth(folder / RELEASE)
    images: dict = defaultdict(lambda: defaultdict(list))  # subtask -> question_id -> hits
    for answer in answers:
        subtask, expected = _truth_of(answer, truth)
        images[subtask][answer["question_id"]].append(yes_or_no(answer["text"]) == expected.lower())
    order = [name for name in PERCEPTION + COGNITION if name in images] + sorted(set(images) - set(PERCEPTION + COGNITION))
    acc = {name: percent([hit for hits in images[name].values() for hit in hits]) for name in order}
    acc_plus = {name: percent([all(hits) for hits in images[name].values()]) for name in order}
    scores = {name: acc[name] + acc_plus[name] for name in order}
    metrics = {
        "perception": sum(scores[name] for name in PERCEPTION if name in scores),
        "cognition": sum(scores[name] for name in COGNITION if name in scores),
        "categories": scores,
        "acc": acc,
        "acc_plus": acc_plus,
    }
    return len(answers), metrics
