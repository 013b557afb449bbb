"""The synthetic shapes dataset: deterministic, in range, answers true to the pixels, LLaVA format."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from cli_util import assert_one_error_line, run_cli
from cumo_mlx import shapes
from cumo_mlx.shapes import COLOURS, COUNT_WORDS, SHAPES, make_sample, write_dataset
from cumo_mlx.train.data import check_sample
from PIL import Image

FILES = ("pretrain.json", "captions.json", "instruct.json", "questions.json", "scenes.json")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, 60, seed=7, multi_turn=0.3, max_turns=4, progress=False)
    return out


def load(out: Path, name: str):
    return json.loads((out / name).read_text())


def detect(image: Image.Image, background: str) -> dict:
    """Shapes seen in the pixels, independently of the generator: colour -> (shape, pixels, centre x).

    A shape's colour is the palette colour its pixels have exactly (background noise is grey and
    never lands on another palette colour); its kind comes from how much of its bounding box it
    fills: square 1, circle pi/4, triangle 1/2, five-pointed star ~0.4.
    """
    pixels = np.asarray(image)
    found = {}
    for colour, rgb in COLOURS.items():
        if colour == background:
            continue
        mask = np.all(pixels == rgb, axis=-1)
        if mask.sum() < 20:
            continue
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
        kind = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle" if fill > 0.46 else "star"
        found[colour] = (kind, int(mask.sum()), float(xs.mean()))
    return found


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda c: sum((int(a) - b) ** 2 for a, b in zip(rgb, COLOURS[c])))


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_same_dataset_and_prefix_stable(tmp_path):
    write_dataset(tmp_path / "a", 8, seed=3, progress=False)
    write_dataset(tmp_path / "b", 8, seed=3, progress=False)
    write_dataset(tmp_path / "c", 5, seed=3, progress=False)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for i in range(8):
        image = f"images/{i:06d}.png"
        assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    # the first 5 samples of a dataset of 8 are a dataset of 5
    assert load(tmp_path / "a", "instruct.json")[:5] == load(tmp_path / "c", "instruct.json")
    assert (tmp_path / "a" / "images/000004.png").read_bytes() == (tmp_path / "c" / "images/000004.png").read_bytes()


def test_different_seeds_differ():
    a = [make_sample(1, i) for i in range(6)]
    b = [make_sample(2, i) for i in range(6)]
    assert [s.caption for s in a] != [s.caption for s in b]
    assert all(np.asarray(x.image).tobytes() != np.asarray(y.image).tobytes() for x, y in zip(a, b))


# --- images ----------------------------------------------------------------------------------


def test_image_sizes_and_aspect_ratios():
    sizes = [make_sample(11, i).image.size for i in range(150)]
    for width, height in sizes:
        assert 64 <= width <= 512 and 64 <= height <= 512
        assert max(width, height) <= 2 * min(width, height)
    ratios = [w / h for w, h in sizes]
    assert min(ratios) < 0.7 and max(ratios) > 1.4  # both orientations, well away from square
    assert min(min(s) for s in sizes) < 120 and max(max(s) for s in sizes) > 450


def test_scene_shapes_fit_and_do_not_cover_each_other(dataset):
    for scene in load(dataset, "scenes.json"):
        assert 1 <= len(scene["shapes"]) <= 3
        colours = [s["colour"] for s in scene["shapes"]]
        assert len(set(colours)) == len(colours) and scene["background"] not in colours
        for item in scene["shapes"]:
            x0, y0, x1, y1 = item["bbox"]
            assert 0 <= x0 < x1 < scene["width"] and 0 <= y0 < y1 < scene["height"]
            assert item["area"] > 60
        # nothing covers anything: each shape's pixels in the image are all it drew
        seen = detect(Image.open(dataset / scene["image"]), scene["background"])
        assert {c: n for c, (_, n, _) in seen.items()} == {s["colour"]: s["area"] for s in scene["shapes"]}


# --- answers match the pixels ----------------------------------------------------------------


def test_answers_match_what_was_drawn(dataset):
    scenes = {s["id"]: s for s in load(dataset, "scenes.json")}
    instruct = load(dataset, "instruct.json")
    checked = set()
    for sample in instruct:
        scene = scenes[sample["id"]]
        image = Image.open(dataset / sample["image"])
        assert image.size == (scene["width"], scene["height"])
        seen = detect(image, scene["background"])
        drawn = {(s["colour"], s["shape"]) for s in scene["shapes"]}
        assert {(c, kind) for c, (kind, _, _) in seen.items()} == drawn
        for item in scene["shapes"]:  # the colour at each shape's centre is the shape's colour
            x, y = (int(round(v)) for v in item["center"])
            assert nearest_colour(image.getpixel((x, y))) == item["colour"]
        turns = sample["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question, answer = human["value"].replace("<image>\n", ""), gpt["value"]
            if question == "What shape is this?":
                assert len(seen) == 1 and answer == next(iter(seen.values()))[0]
                checked.add("shape")
            elif question.startswith(("What colour is the ", "What color is the ")):
                kind = question.rstrip("?").split()[-1]
                matches = [c for c, (k, _, _) in seen.items() if k == kind]
                assert matches == [answer]
                checked.add("colour")
            elif question == "How many shapes are there?":
                assert answer == COUNT_WORDS[len(seen)]
                checked.add("count")
            elif question.startswith("Is there "):
                *_, colour, kind = question.rstrip("?").split()
                assert answer == ("yes" if (colour, kind) in {(c, k) for c, (k, _, _) in seen.items()} else "no")
                checked.add("exists")
            elif question == "What is the largest shape?":
                areas = sorted((n, k) for k, n, _ in seen.values())
                assert len(areas) >= 2 and areas[-1][0] >= 1.5 * areas[-2][0]
                assert answer == areas[-1][1]
                checked.add("largest")
            elif question == shapes.CAPTION_QUESTION:
                left_to_right = sorted(seen.items(), key=lambda item: item[1][2])
                words = answer.rstrip(".").replace(",", "").replace(" and ", " ").lower().split()
                named = [(words[i + 1], words[i + 2]) for i in range(0, len(words), 3)]
                assert named == [(c, k) for c, (k, _, _) in left_to_right]
                checked.add("caption")
            else:
                pytest.fail(f"unexpected question {question!r}")
    assert checked == set(shapes.SAMPLE_TYPES)


def test_captions_name_every_shape_left_to_right(dataset):
    scenes = {s["id"]: s for s in load(dataset, "scenes.json")}
    for sample in load(dataset, "pretrain.json"):
        shapes_ = sorted(scenes[sample["id"]]["shapes"], key=lambda s: s["center"][0])
        text = sample["conversations"][1]["value"]
        assert text.endswith(".") and text[0].isupper()
        positions = [text.lower().index(f"{s['colour']} {s['shape']}") for s in shapes_]
        assert positions == sorted(positions)
    assert shapes.caption(make_sample(0, 0).scene)  # and articles: "an orange", never "a orange"
    assert all(" a orange" not in make_sample(0, i).caption.lower() for i in range(40))


def test_question_types_are_balanced_and_yes_no_too():
    samples = [make_sample(4, i, multi_turn=0) for i in range(180)]
    kinds = [s.turns[0][0] for s in samples]
    assert {k: kinds.count(k) for k in shapes.SAMPLE_TYPES} == {k: 30 for k in shapes.SAMPLE_TYPES}
    answers = [s.turns[0][2] for s in samples if s.turns[0][0] == "exists"]
    assert 0.3 <= answers.count("yes") / len(answers) <= 0.7
    counts = [s.turns[0][2] for s in samples if s.turns[0][0] == "count"]
    assert set(counts) == {"one", "two", "three"}
    assert {s.turns[0][2] for s in samples if s.turns[0][0] == "shape"} == set(SHAPES)
    spellings = [s.turns[0][1].split()[1] for s in samples if s.turns[0][0] == "colour"]
    assert {"colour", "color"} == set(spellings)


# --- files -----------------------------------------------------------------------------------


def test_files_are_llava_format(dataset):
    pretrain, captions, instruct = (load(dataset, name) for name in ("pretrain.json", "captions.json", "instruct.json"))
    assert len(pretrain) == len(captions) == len(instruct) == 60
    # the trainer's own checks (it raises on a bad sample)
    for index, sample in enumerate(pretrain):
        assert check_sample(sample, index, dataset, "plain").images == [dataset / sample["image"]]
    for index, sample in enumerate(captions + instruct):
        checked = check_sample(sample, index, dataset, "mistral_instruct_system")
        assert len(checked.turns) == len(sample["conversations"])
    for plain, chat in zip(pretrain, captions):  # the same captions, as instructions
        assert chat["conversations"][0]["value"] == "<image>\n" + shapes.CAPTION_QUESTION
        assert chat["conversations"][1] == plain["conversations"][1] and chat["image"] == plain["image"]
    for sample in pretrain:  # stage 1, plain style
        assert [t["value"] for t in sample["conversations"]][0] == "<image>"
        assert len(sample["conversations"]) == 2
    for sample in instruct:
        turns = sample["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        assert all(len(t["value"].split()) == 1 for t in turns[1::2] if not t["value"].endswith("."))
    assert any(len(s["conversations"]) > 2 for s in instruct)
    assert len({s["id"] for s in instruct}) == len(instruct)


def test_questions_file_lists_every_one_word_turn(dataset):
    instruct = {s["id"]: s for s in load(dataset, "instruct.json")}
    questions = load(dataset, "questions.json")
    total = 0
    for sample in instruct.values():
        turns = sample["conversations"]
        total += sum(t["value"].replace("<image>\n", "") != shapes.CAPTION_QUESTION for t in turns[::2])
    assert len(questions) == total
    for record in questions:
        assert set(record) == {"id", "image", "question", "answer", "type"}
        sample_id, turn = record["id"].rsplit("-", 1)
        sample = instruct[sample_id]
        assert record["image"] == sample["image"]
        assert sample["conversations"][2 * int(turn)]["value"].replace("<image>\n", "") == record["question"]
        assert sample["conversations"][2 * int(turn) + 1]["value"] == record["answer"]
        assert record["type"] in shapes.QUESTION_TYPES
        assert len(record["answer"].split()) == 1


def test_multi_turn_samples():
    for index in range(30):
        turns = make_sample(9, index, multi_turn=1.0, max_turns=5).turns
        assert 2 <= len(turns) <= 5
        assert len({question for _, question, _ in turns}) == len(turns)
        assert all(kind in shapes.QUESTION_TYPES for kind, _, _ in turns[1:])
    assert all(len(make_sample(9, index, multi_turn=0.0).turns) == 1 for index in range(10))


def test_follow_up_turns_are_of_the_chosen_types():
    samples = [make_sample(9, index, multi_turn=1.0, max_turns=6, follow_ups=("colour", "exists")) for index in range(40)]
    assert all(kind in ("colour", "exists") for s in samples for kind, _, _ in s.turns[1:])
    assert {kind for s in samples for kind, _, _ in s.turns[1:]} == {"colour", "exists"}
    assert sum(len(s.turns) > 1 for s in samples) > 30  # most scenes allow a colour or exists question
    # the image and the first question do not depend on the follow-ups
    assert [s.turns[0] for s in samples] == [make_sample(9, index, 1.0, 6).turns[0] for index in range(40)]


def test_generation_is_fast(tmp_path):
    start = time.perf_counter()
    write_dataset(tmp_path, 100, seed=0, progress=False)
    assert time.perf_counter() - start < 15  # ~1 s on a 2-core CPU: 1000 images take ~10 s


# --- CLI -------------------------------------------------------------------------------------


def test_cli_writes_the_dataset(tmp_path):
    code, out, err = run_cli("data", "shapes", "--out", tmp_path / "d", "--count", 7, "--seed", 5)
    assert code == 0, err
    assert "wrote 7 images" in out
    assert all((tmp_path / "d" / name).is_file() for name in FILES)
    assert len(list((tmp_path / "d" / "images").glob("*.png"))) == 7
    direct = tmp_path / "direct"
    write_dataset(direct, 7, seed=5, progress=False)
    assert (tmp_path / "d" / "instruct.json").read_bytes() == (direct / "instruct.json").read_bytes()


def test_cli_refuses_to_write_over_a_dataset_without_force(tmp_path):
    assert run_cli("data", "shapes", "--out", tmp_path / "d", "--count", 3)[0] == 0
    before = (tmp_path / "d" / "instruct.json").read_bytes()
    code, _, err = run_cli("data", "shapes", "--out", tmp_path / "d", "--count", 4, "--seed", 1)
    assert "already exists" in assert_one_error_line(code, err) and "--force" in err
    assert (tmp_path / "d" / "instruct.json").read_bytes() == before
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    assert run_cli("data", "shapes", "--out", tmp_path / "empty", "--count", 3)[0] == 0
    code, _, err = run_cli("data", "shapes", "--out", tmp_path / "d", "--count", 4, "--seed", 1, "--force")
    assert code == 0, err
    assert (tmp_path / "d" / "instruct.json").read_bytes() != before


@pytest.mark.parametrize("follow_ups", [None, "colour, exists"])
def test_cli_follow_ups(tmp_path, follow_ups):
    chosen = ["--follow-ups", follow_ups] if follow_ups else []
    code, out, err = run_cli("data", "shapes", "--out", tmp_path / "d", "--count", 12, "--multi-turn", 1, *chosen)
    assert code == 0, err
    types = ("colour", "exists") if follow_ups else shapes.QUESTION_TYPES
    write_dataset(tmp_path / "direct", 12, seed=0, multi_turn=1.0, progress=False, follow_ups=types)
    assert (tmp_path / "d" / "instruct.json").read_bytes() == (tmp_path / "direct" / "instruct.json").read_bytes()


@pytest.mark.parametrize(
    "args",
    [
        ["--count", "3"],  # no --out
        ["--out", "{tmp}/x", "--count", "0"],
        ["--out", "{tmp}/x", "--count", "many"],
        ["--out", "{tmp}/x", "--seed", "-1"],
        ["--out", "{tmp}/x", "--multi-turn", "2"],
        ["--out", "{tmp}/x", "--max-turns", "0"],
        ["--out", "{tmp}/x", "--follow-ups", "colour,size"],
        ["--out", "{tmp}/file"],  # a file, not a folder
        ["--out", "{tmp}/x", "--colours", "9"],
    ],
)
def test_cli_bad_arguments(tmp_path, args):
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli("data", "shapes", *[a.format(tmp=tmp_path) for a in args])
    assert_one_error_line(code, err)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args", [["data"], ["data", "nope"]])
def test_cli_data_needs_a_dataset_name(args):
    code, _, err = run_cli(*args)
    assert_one_error_line(code, err)
