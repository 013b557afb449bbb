"""Tiny benchmark folders in LLaVA's playground/data/eval layout, drawn for the eval tests.

Each writer returns the task's folder under `root` (root plays LLaVA's playground/data/eval). The
answers and scores the tests expect are worked out by hand in the tests, from the records here.
"""

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image

SHORT = "Answer the question using a single word or phrase."


def png(path: Path, colour=(200, 30, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def png_base64(colour=(30, 30, 200)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_answers(path: Path, answers: list[tuple]) -> Path:
    """An answers file as LLaVA's scripts write it (metadata {}): (question_id, prompt, text) triples."""
    records = [
        {"question_id": qid, "prompt": prompt, "text": text, "answer_id": str(i), "model_id": "m", "metadata": {}}
        for i, (qid, prompt, text) in enumerate(answers)
    ]
    return write_jsonl(path, records)


TEXTVQA_QUESTIONS = [
    {"question_id": "img1", "image": "img1.png", "text": f"what brand is this?\nReference OCR token: Canon, EOS\n{SHORT}"},
    {"question_id": "img1", "image": "img1.png", "text": f"how many lenses are there?\n{SHORT}"},
    {"question_id": "img2", "image": "img2.png", "text": f"what colour is the sign?\nReference OCR token: STOP\n{SHORT}"},
]


def textvqa(root: Path) -> Path:
    folder = root / "textvqa"
    write_jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl", TEXTVQA_QUESTIONS)
    annotations = [
        {"image_id": "img1", "question": "What brand is this?", "answers": ["canon"] * 2 + ["nikon"] * 8},
        {"image_id": "img1", "question": "How many lenses are there?", "answers": ["two", "2", "2"] + ["3"] * 7},
        {"image_id": "img2", "question": "What colour is the sign?", "answers": ["red"] * 10},
    ]
    write_json(folder / "TextVQA_0.5.1_val.json", {"data": annotations})
    png(folder / "train_images/img1.png")
    png(folder / "train_images/img2.png")
    return folder


def gqa(root: Path) -> Path:
    folder = root / "gqa"
    ids = ["q1", "q2", "q3", "q4", "q5"]
    write_jsonl(
        folder / "llava_gqa_testdev_balanced.jsonl",
        [{"question_id": i, "image": "n1.png", "text": f"{i}?\n{SHORT}"} for i in ids],
    )

    def question(answer, structural, semantic, balanced=True):
        return {"answer": answer, "isBalanced": balanced, "types": {"structural": structural, "semantic": semantic}}

    official = {
        "q1": question("yes", "verify", "attr"),
        "q2": question("table", "query", "obj"),
        "q3": question("left", "choose", "rel"),
        "q4": question("no", "verify", "attr", balanced=False),
        "q5": question("red", "query", "attr"),
    }
    write_json(folder / "data/testdev_balanced_questions.json", official)
    png(folder / "data/images/n1.png")
    return folder


POPE_LABELS = {"adversarial": ["yes", "no", "no"], "popular": ["yes", "yes", "no"], "random": ["yes", "no"]}


def pope(root: Path) -> Path:
    folder = root / "pope"
    questions, question_id = [], 1
    for split, labels in POPE_LABELS.items():
        lines = [
            {"question_id": question_id + k, "image": "COCO_val2014_1.png", "text": f"Is there a thing {k}?", "label": label}
            for k, label in enumerate(labels)
        ]
        write_jsonl(folder / f"coco/coco_pope_{split}.json", lines)
        questions += [
            {"question_id": line["question_id"], "image": line["image"], "text": f"{line['text']}\n{SHORT}", "category": split}
            for line in lines
        ]
        question_id += len(labels)
    write_jsonl(folder / "llava_pope_test.jsonl", questions)
    png(folder / "val2014/COCO_val2014_1.png")
    return folder


SCIENCEQA_PROBLEMS = {
    "1": {"choices": ["cat", "dog", "cow"], "answer": 1, "image": "image.png"},
    "2": {"choices": ["x", "y"], "answer": 0, "image": None},
    "3": {"choices": ["p", "q", "r", "s"], "answer": 3, "image": "image.png"},
    "4": {"choices": ["m", "n"], "answer": 1, "image": None},
    "5": {"choices": ["u", "v", "w"], "answer": 2, "image": "image.png"},
    "6": {"choices": ["g", "h"], "answer": 0, "image": None},
}


def scienceqa(root: Path) -> Path:
    folder = root / "scienceqa"
    questions = []
    for pid, problem in SCIENCEQA_PROBLEMS.items():
        if pid == "6":
            continue  # a validation problem
        value = f"Context: none.\nQuestion: which one {pid}?\nOptions: (A) {problem['choices'][0]} (B) {problem['choices'][1]}"
        record = {"id": pid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "A"}]}
        if problem["image"]:
            record["image"] = f"{pid}/image.png"
            record["conversations"][0]["value"] = "<image>\n" + value
            png(folder / f"images/test/{pid}/image.png")
        questions.append(record)
    write_json(folder / "llava_test_CQM-A.json", questions)
    write_json(folder / "problems.json", SCIENCEQA_PROBLEMS)
    write_json(folder / "pid_splits.json", {"test": ["1", "2", "3", "4", "5"], "val": ["6"]})
    (folder / "images/test").mkdir(parents=True, exist_ok=True)
    return folder


MME_TRUTH = {
    # subtask folder, image (relative), the ground-truth .txt (relative), its lines
    "existence/000001.png": (
        "existence/000001.txt",
        [("Is there a dog in this image?", "Yes"), ("Is there a cat in this image?", "No")],
    ),
    "existence/000002.png": (
        "existence/000002.txt",
        [("Is there a car in this image?", "Yes"), ("Is there a bus in this image?", "No")],
    ),
    "artwork/images/10002.png": ("artwork/questions_answers_YN/10002.txt", [("Is it by X?", "Yes"), ("Is it by Y?", "No")]),
    "code_reasoning/0001.png": ("code_reasoning/0001.txt", [("Will it print 3?", "No"), ("Will it print 4?", "Yes")]),
}


def mme(root: Path) -> Path:
    folder = root / "MME"
    release = folder / "MME_Benchmark_release_version"
    questions = []
    for image, (truth, lines) in MME_TRUTH.items():
        png(release / image)
        # The bus question's file has two spaces before the instruction, as a few release files do.
        text = "".join(f"{q}{'  ' if 'bus' in q else ' '}Please answer yes or no.\t{a}\n" for q, a in lines)
        (release / truth).parent.mkdir(parents=True, exist_ok=True)
        (release / truth).write_text(text, encoding="utf-8")
        question_id = f"{image.split('/')[0]}/{image.split('/')[-1]}"
        questions += [
            {"question_id": question_id, "image": image, "text": f"{q}\n{SHORT}", "category": image.split("/")[0]}
            for q, _ in lines
        ]
    write_jsonl(folder / "llava_mme.jsonl", questions)
    return folder


MMBENCH_COLUMNS = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "source",
    "l2-category",
    "split",
]


def _mmbench_row(index, question, hint, options, answer, category, l2):
    options = list(options) + [""] * (4 - len(options))
    return [index, question, hint, *options, answer, category, png_base64(), "src", l2, "dev"]


MMBENCH_ROWS = [
    _mmbench_row(0, "What colour is the square?", "Look closely.", ["red", "blue", "green", ""], "A", "colour", "perception"),
    _mmbench_row(1, "How many shapes?", "nan", ["one", "two", "", "three"], "B", "count", "perception"),
    _mmbench_row(2, "Which is bigger?", "Line one\nline two", ["cat", "dog"], "B", "compare", "reasoning"),
    _mmbench_row(1000000, "What colour is the square?", "Look closely.", ["blue", "green", "red"], "C", "colour", "perception"),
    _mmbench_row(1000001, "How many shapes?", "nan", ["two", "one"], "A", "count", "perception"),
    _mmbench_row(2000000, "What colour is the square?", "Look closely.", ["green", "red", "blue"], "B", "colour", "perception"),
]


def mmbench(root: Path, name: str = "mmbench_dev_20230712.tsv", subfolder: str = "mmbench") -> Path:
    folder = root / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(MMBENCH_COLUMNS)
        writer.writerows(MMBENCH_ROWS)
    return folder


def seed(root: Path) -> Path:
    folder = root / "seed_bench"
    questions = [
        {
            "question_id": 101,
            "image": "SEED-Bench-image/a.png",
            "text": "Q101\nA. a\nB. b\nAnswer with the option's letter from the given choices directly.",
        },
        {"question_id": 102, "image": "SEED-Bench-image/a.png", "text": "Q102"},
        {"question_id": 103, "image": "SEED-Bench-image/a.png", "text": "Q103"},
        {"question_id": 201, "image": "SEED-Bench-video-image/v.png", "text": "Q201"},
    ]
    write_jsonl(folder / "llava-seed-bench.jsonl", questions)
    official = {
        "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10},
        "questions": [
            {"question_id": "101", "answer": "A", "question_type_id": 1, "data_type": "image"},
            {"question_id": "102", "answer": "B", "question_type_id": 1, "data_type": "image"},
            {"question_id": "103", "answer": "C", "question_type_id": 2, "data_type": "image"},
            {"question_id": "201", "answer": "D", "question_type_id": 10, "data_type": "video"},
            {"question_id": "104", "answer": "A", "question_type_id": 2, "data_type": "image"},
        ],
    }
    write_json(folder / "SEED-Bench.json", official)
    png(folder / "SEED-Bench-image/a.png")
    png(folder / "SEED-Bench-video-image/v.png")
    return folder


def vqav2(root: Path) -> Path:
    folder = root / "vqav2"
    lines = [{"question_id": i, "image": "COCO_test2015_1.png", "text": f"Question {i}?\n{SHORT}"} for i in (1, 2, 3)]
    write_jsonl(folder / "llava_vqav2_mscoco_test-dev2015.jsonl", lines[:2])
    write_jsonl(folder / "llava_vqav2_mscoco_test2015.jsonl", lines)
    png(folder / "test2015/COCO_test2015_1.png")
    return folder


def mmvet(root: Path) -> Path:
    folder = root / "mm-vet"
    write_jsonl(
        folder / "llava-mm-vet.jsonl", [{"question_id": i, "image": f"v1_{i}.png", "text": f"Explain {i}."} for i in (0, 1)]
    )
    png(folder / "images/v1_0.png")
    png(folder / "images/v1_1.png")
    return folder


SHAPES_RECORDS = [
    {"id": "0-0", "image": "images/000000.png", "question": "What shape is this?", "answer": "circle", "type": "shape"},
    {"id": "1-0", "image": "images/000001.png", "question": "How many shapes are there?", "answer": "three", "type": "count"},
    {"id": "1-1", "image": "images/000001.png", "question": "What colour is the star?", "answer": "red", "type": "colour"},
    {"id": "2-0", "image": "images/000002.png", "question": "How many shapes are there?", "answer": "two", "type": "count"},
]


def shapes(root: Path) -> Path:
    folder = root / "shapes"
    write_json(folder / "questions.json", SHAPES_RECORDS)
    for name in ("000000", "000001", "000002"):
        png(folder / f"images/{name}.png")
    return folder
