"""Every task's questions from a tiny folder in its LLaVA layout; missing files are one-line errors."""

import shutil

import eval_folders
import pytest
from eval_folders import SHORT
from PIL import Image

from cumo_mlx.errors import CuMoError
from cumo_mlx.eval import TASKS, get_task, questions, score

# task -> (folder writer, question count, first question's prompt, its image under the task folder, max new tokens)
EXPECTED = {
    "textvqa": (
        eval_folders.textvqa,
        3,
        f"<image>\nwhat brand is this?\nReference OCR token: Canon, EOS\n{SHORT}",
        "train_images/img1.png",
        128,
    ),
    "gqa": (eval_folders.gqa, 5, f"<image>\nq1?\n{SHORT}", "data/images/n1.png", 128),
    "pope": (eval_folders.pope, 8, f"<image>\nIs there a thing 0?\n{SHORT}", "val2014/COCO_val2014_1.png", 128),
    "mme": (
        eval_folders.mme,
        8,
        f"<image>\nIs there a dog in this image?\n{SHORT}",
        "MME_Benchmark_release_version/existence/000001.png",
        128,
    ),
    "seed": (
        eval_folders.seed,
        4,
        "<image>\nQ101\nA. a\nB. b\nAnswer with the option's letter from the given choices directly.",
        "SEED-Bench-image/a.png",
        128,
    ),
    "vqav2": (eval_folders.vqav2, 2, f"<image>\nQuestion 1?\n{SHORT}", "test2015/COCO_test2015_1.png", 128),
    "mmvet": (eval_folders.mmvet, 2, "<image>\nExplain 0.", "images/v1_0.png", 1024),
    "shapes": (eval_folders.shapes, 4, "<image>\nWhat shape is this?", "images/000000.png", 8),
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_questions(tmp_path, task):
    write, count, prompt, image, max_new_tokens = EXPECTED[task]
    folder = write(tmp_path)
    asked = list(questions(task, tmp_path))
    assert len(asked) == count
    first = asked[0]
    assert first.prompt == prompt and first.image == folder / image and first.max_new_tokens == max_new_tokens
    assert first.logged_prompt == prompt.removeprefix("<image>\n")  # LLaVA records the question file's text
    assert Image.open(first.image).size == (8, 6)
    assert [q.question_id for q in questions(task, folder, limit=2)] == [q.question_id for q in asked[:2]]  # DIR = task folder


def test_scienceqa_questions(tmp_path):
    folder = eval_folders.scienceqa(tmp_path)
    asked = {q.question_id: q for q in questions("scienceqa", tmp_path)}
    assert list(asked) == ["1", "2", "3", "4", "5"]
    instruction = "Answer with the option's letter from the given choices directly."
    with_image = "Context: none.\nQuestion: which one 1?\nOptions: (A) cat (B) dog"
    assert asked["1"].prompt == asked["1"].logged_prompt == f"<image>\n{with_image}\n{instruction}"
    assert asked["1"].image == folder / "images/test/1/image.png" and asked["1"].max_new_tokens == 1024
    assert asked["2"].prompt == f"Context: none.\nQuestion: which one 2?\nOptions: (A) x (B) y\n{instruction}"
    assert asked["2"].image is None


def test_repeated_question_ids_have_distinct_keys(tmp_path):
    eval_folders.mme(tmp_path)
    asked = list(questions("mme", tmp_path))
    assert asked[0].question_id == asked[1].question_id == "existence/000001.png"
    assert len({q.key for q in asked}) == len(asked)


@pytest.mark.parametrize(
    "task, missing, source",
    [
        ("textvqa", "textvqa/llava_textvqa_val_v051_ocr.jsonl", "LLaVA's eval.zip"),
        ("textvqa", "textvqa/train_images", "train_val_images.zip"),
        ("gqa", "gqa/data/images", "GQA's images.zip"),
        ("pope", "pope/val2014", "val2014.zip"),
        ("scienceqa", "scienceqa/images/test", "lupantech/ScienceQA"),
        ("mme", "MME/MME_Benchmark_release_version", "MME release"),
        ("mmbench", "mmbench/mmbench_dev_20230712.tsv", "download.openmmlab.com"),
        ("seed", "seed_bench/llava-seed-bench.jsonl", "LLaVA's eval.zip"),
        ("vqav2", "vqav2/test2015", "test2015.zip"),
        ("mmvet", "mm-vet/images", "mm-vet.zip"),
        ("shapes", "shapes/questions.json", "cumo-mlx data shapes"),
    ],
)
def test_missing_file_for_questions(tmp_path, task, missing, source):
    getattr(eval_folders, task)(tmp_path)
    target = tmp_path / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CuMoError) as error:
        list(questions(task, tmp_path))
    message = str(error.value)
    assert str(target) in message and source in message and "\n" not in message


@pytest.mark.parametrize(
    "task, missing, source",
    [
        ("textvqa", "textvqa/TextVQA_0.5.1_val.json", "dl.fbaipublicfiles.com"),
        ("gqa", "gqa/data/testdev_balanced_questions.json", "questions1.2.zip"),
        ("pope", "pope/coco", "AoiDragon/POPE"),
        ("scienceqa", "scienceqa/problems.json", "lupantech/ScienceQA"),
        ("scienceqa", "scienceqa/pid_splits.json", "lupantech/ScienceQA"),
        ("mme", "MME/MME_Benchmark_release_version", "MME release"),
        ("seed", "seed_bench/SEED-Bench.json", "AILab-CVC/SEED-Bench"),
    ],
)
def test_missing_file_for_scoring(tmp_path, task, missing, source):
    getattr(eval_folders, task)(tmp_path)
    answers = eval_folders.write_answers(tmp_path / "a.jsonl", [(1, "p", "t")])
    target = tmp_path / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CuMoError) as error:
        score(task, tmp_path, answers)
    message = str(error.value)
    assert str(target) in message and source in message and "\n" not in message


def test_bad_data_dir_and_task(tmp_path):
    with pytest.raises(CuMoError, match="does not exist"):
        list(questions("gqa", tmp_path / "nowhere"))
    (tmp_path / "file").write_text("")
    with pytest.raises(CuMoError, match="is not a folder"):
        list(questions("gqa", tmp_path / "file"))
    with pytest.raises(CuMoError, match="unknown task 'vqa'.*textvqa"):
        get_task("vqa")


def test_malformed_question_files(tmp_path):
    folder = eval_folders.textvqa(tmp_path)
    path = folder / "llava_textvqa_val_v051_ocr.jsonl"
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(CuMoError, match="line 4 is not valid JSON"):
        list(questions("textvqa", tmp_path))
    path.write_text('{"question_id": 1, "image": "img1.png"}\n')
    with pytest.raises(CuMoError, match="line 1 has no 'text' field"):
        list(questions("textvqa", tmp_path))


def test_every_task_is_covered():
    assert set(TASKS) == set(EXPECTED) | {"scienceqa", "mmbench", "mmbench_cn", "custom"}


@pytest.mark.parametrize("escape", ["../../outside.png", "/etc/hostname", "link"])
def test_a_question_file_image_must_stay_inside_the_benchmark_folder(tmp_path, escape):
    """An image name that climbs out, an absolute one, or a symlink in the folder pointing out: one-line error."""
    folder = eval_folders.pope(tmp_path)
    outside = eval_folders.png(tmp_path / "outside.png")
    (folder / "val2014" / "link").symlink_to(outside)
    path = folder / "llava_pope_test.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace("COCO_val2014_1.png", escape)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CuMoError, match="lies outside"):
        list(questions("pope", tmp_path))
