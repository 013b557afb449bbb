"""Synthetic "shapes" dataset: rendered images of 1-3 coloured shapes with captions and questions.

The demo model is trained and evaluated on it (`cumo-mlx data shapes`). Each image holds 1 to 3
filled shapes (circle, square, triangle, star), each in its own colour, none overlapping, on a
plain or lightly noisy (grey grain) background of a colour no shape has. Image sizes run from 64 to 512 px with
aspect ratios from 1:2 to 2:1, so the `pad` preprocessing is exercised.

Files written to the output folder (image paths are relative to it: pass it as --image-folder):
- `images/NNNNNN.png`
- `pretrain.json`: stage-1 captions in the `plain` style, human "<image>" / gpt caption, one per
  image. Shapes are listed left to right: "A red circle and a blue square."
- `captions.json`: the same captions as instructions, human "<image>\\nDescribe the image." / gpt
  caption (stage 2, pre-finetuning: CuMo pre-finetunes on detailed captions).
- `instruct.json`: stage-2/3 samples in LLaVA format, one per image; a share (`multi_turn`,
  default 15%) has 2 to `max_turns` (default 3) turns, the later ones of the `follow_ups` types
  (default: every one-word type). The first human turn is "<image>\\n<question>".
- `questions.json`: every one-word question of instruct.json as a flat record
  {id, image, question, answer, type} for per-type accuracy.
- `scenes.json`: what was drawn (shape, colour, centre, size, pixel area, bounding box).

Question types and their answers (one lowercase word, no punctuation):
- shape    "What shape is this?" (single-shape images only) -> circle | square | triangle | star
- colour   "What colour is the <shape>?" or "What color is the <shape>?" (only when that shape
           is the only one of its kind) -> red | green | blue | ...
- count    "How many shapes are there?" -> one | two | three (words, not digits)
- exists   "Is there a/an <colour> <shape>?" -> yes | no (half each; most "no" questions name a
           shape or a colour that is in the image, paired with the wrong partner)
- largest  "What is the largest shape?" (2-3 shapes, the largest covers at least 1.5x the pixels
           of the next) -> its shape name
- caption  "Describe the image." -> the caption (instruct.json only, not in questions.json)

Every image has its own random stream seeded by (seed, index), so a dataset is deterministic for
a seed, and the first N samples of a larger dataset equal a dataset of N.
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTION_TYPES = ("shape", "colour", "count", "exists", "largest")  # one-word answers
SAMPLE_TYPES = QUESTION_TYPES + ("caption",)
CAPTION_QUESTION = "Describe the image."

MIN_SIDE, MAX_SIDE = 64, 512
MAX_ASPECT = 2.0
MIN_SIZE, MAX_SIZE = 0.09, 0.3  # shape size range, as a fraction of the image's long side
LARGEST_MARGIN = 1.5  # the largest shape covers at least this many times the next one's pixels
NOISE_SIGMA = 8.0  # grey noise on the background (when there is noise): std on the 0-255 scale, in 2x2 blocks
GAP = 0.15  # extra distance between shapes, as a fraction of their summed bounding radii


@dataclass
class Shape:
    shape: str
    colour: str
    center: tuple[float, float]
    size: float  # the shape's scale in pixels; its bounding radius is `bound` (see `outline`)
    area: int = 0  # pixels drawn
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 inclusive


@dataclass
class Scene:
    width: int
    height: int
    background: str
    noise: bool
    shapes: list[Shape] = field(default_factory=list)

    def by_type(self, shape: str) -> list[Shape]:
        return [s for s in self.shapes if s.shape == shape]

    @staticmethod
    def from_record(record: dict) -> "Scene":
        """The scene of a `scenes.json` record."""
        shapes = [Shape(**dict(item, center=tuple(item["center"]), bbox=tuple(item["bbox"]))) for item in record["shapes"]]
        return Scene(record["width"], record["height"], record["background"], record["noise"], shapes)

    def largest(self) -> Optional[Shape]:
        """The largest shape when it is clearly the largest (LARGEST_MARGIN), else None."""
        if len(self.shapes) < 2:
            return None
        first, second = sorted(self.shapes, key=lambda s: s.area, reverse=True)[:2]
        return first if first.area >= LARGEST_MARGIN * second.area else None


# --- geometry and drawing -------------------------------------------------------------------

BOUND = {"circle": 0.9, "square": 0.8 * math.sqrt(2), "triangle": 1.15, "star": 1.2}  # radius / size


def outline(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]]:
    """Polygon vertices of an upright shape (for a circle: its bounding box corners)."""
    if shape == "circle":
        r = BOUND["circle"] * size
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        h = 0.8 * size
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        r = BOUND["triangle"] * size  # equilateral, centroid at the centre, apex up
        angles = (-90, 30, 150)
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    if shape == "star":
        outer = BOUND["star"] * size
        inner = 0.45 * outer
        points = []
        for i in range(10):
            r = outer if i % 2 == 0 else inner
            a = math.radians(-90 + 36 * i)
            points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(image: Image.Image, item: Shape) -> None:
    """Fill `item` into `image` and record its pixel area and bounding box."""
    points = outline(item.shape, *item.center, item.size)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    x1, y1 = min(image.width - 1, math.ceil(max(xs))), min(image.height - 1, math.ceil(max(ys)))
    mask = Image.new("L", (x1 - x0 + 1, y1 - y0 + 1), 0)
    draw = ImageDraw.Draw(mask)
    local = [(x - x0, y - y0) for x, y in points]
    if item.shape == "circle":
        draw.ellipse(local, fill=255)
    else:
        draw.polygon(local, fill=255)
    image.paste(COLOURS[item.colour], (x0, y0), mask)
    pixels = np.asarray(mask)
    item.area = int(np.count_nonzero(pixels))
    rows, cols = np.nonzero(pixels)
    item.bbox = (x0 + int(cols.min()), y0 + int(rows.min()), x0 + int(cols.max()), y0 + int(rows.max()))


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    background = np.empty((scene.height, scene.width, 3), dtype=np.float32)
    background[:] = COLOURS[scene.background]
    if scene.noise:  # grey 2x2-block noise: light, and PNG still compresses it
        noise = rng.normal(0.0, NOISE_SIGMA, ((scene.height + 1) // 2, (scene.width + 1) // 2, 1))
        background += noise.repeat(2, 0).repeat(2, 1)[: scene.height, : scene.width].astype(np.float32)
    image = Image.fromarray(np.clip(background, 0, 255).round().astype(np.uint8))
    for item in scene.shapes:
        draw_shape(image, item)
    return image


# --- scenes ----------------------------------------------------------------------------------


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    while True:
        width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
        if max(width, height) <= MAX_ASPECT * min(width, height):
            return width, height


def _place(rng, width, height, shapes: list[str], sizes: list[float]) -> Optional[list[tuple[float, float]]]:
    """Centres for shapes of these sizes, inside the image and apart from each other, or None."""
    centres = []
    for shape, size in zip(shapes, sizes):
        bound = BOUND[shape] * size
        if 2 * bound + 4 > min(width, height):
            return None
        for _ in range(50):
            cx = rng.uniform(bound + 2, width - bound - 2)
            cy = rng.uniform(bound + 2, height - bound - 2)
            if all(
                math.hypot(cx - ox, cy - oy) >= (1 + GAP) * (bound + BOUND[os_] * osize) + 2
                for (ox, oy), os_, osize in zip(centres, shapes, sizes)
            ):
                centres.append((cx, cy))
                break
        else:
            return None
    return centres


def _scene_fits(scene: Scene, kind: str) -> bool:
    if kind == "colour":
        return any(len(scene.by_type(s.shape)) == 1 for s in scene.shapes)
    if kind == "largest":
        return scene.largest() is not None
    return True


def make_scene(rng: np.random.Generator, kind: str) -> tuple[Scene, Image.Image]:
    """A random scene (and its image) on which a question of type `kind` can be asked."""
    while True:
        width, height = _image_size(rng)
        if kind == "shape":
            count = 1
        elif kind == "largest":
            count = int(rng.integers(2, 4))
        else:
            count = int(rng.integers(1, 4))
        colours = [str(c) for c in rng.choice(list(COLOURS), size=count + 1, replace=False)]
        shapes = [str(s) for s in rng.choice(SHAPES, size=count)]
        long_side = max(width, height)
        sizes = [float(s) for s in rng.uniform(MIN_SIZE, MAX_SIZE, size=count) * long_side]
        for _ in range(8):  # shrink until they fit, but not below the minimum size
            centres = _place(rng, width, height, shapes, sizes)
            if centres is not None:
                break
            sizes = [max(MIN_SIZE * long_side, 0.85 * s) for s in sizes]
        if centres is None:
            continue
        scene = Scene(width, height, colours[0], bool(rng.random() < 0.5))
        scene.shapes = [Shape(s, c, (round(x, 2), round(y, 2)), round(z, 2)) for s, c, (x, y), z in zip(shapes, colours[1:], centres, sizes)]
        image = render(scene, rng)
        if _scene_fits(scene, kind):
            return scene, image


# --- language --------------------------------------------------------------------------------


def with_article(colour: str) -> str:
    """The article before a colour: "a red", "an orange"."""
    return ("an " if colour[0] in "aeiou" else "a ") + colour


def caption(scene: Scene) -> str:
    """"A red circle and a blue square.": the shapes from left to right."""
    items = [f"{with_article(s.colour)} {s.shape}" for s in sorted(scene.shapes, key=lambda s: s.center[0])]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return text[0].upper() + text[1:] + "."


def available_types(scene: Scene) -> list[str]:
    return [kind for kind in QUESTION_TYPES if (kind != "shape" or len(scene.shapes) == 1) and _scene_fits(scene, kind)]


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """A (question, answer) pair of type `kind` about the scene."""
    if kind == "shape":
        return "What shape is this?", scene.shapes[0].shape
    if kind == "colour":
        unique = [s for s in scene.shapes if len(scene.by_type(s.shape)) == 1]
        item = unique[int(rng.integers(len(unique)))]
        word = "colour" if rng.random() < 0.5 else "color"
        return f"What {word} is the {item.shape}?", item.colour
    if kind == "count":
        return "How many shapes are there?", COUNT_WORDS[len(scene.shapes)]
    if kind == "exists":
        present = {(s.colour, s.shape) for s in scene.shapes}
        if rng.random() < 0.5:
            colour, shape = sorted(present)[int(rng.integers(len(present)))]
            return f"Is there {with_article(colour)} {shape}?", "yes"
        pick = rng.random()
        if pick < 1 / 3:  # a shape that is there, in a colour it does not have
            shape = scene.shapes[int(rng.integers(len(scene.shapes)))].shape
            colours = [c for c in COLOURS if (c, shape) not in present]
            colour = colours[int(rng.integers(len(colours)))]
        elif pick < 2 / 3:  # a colour that is there, on a shape it is not
            colour = scene.shapes[int(rng.integers(len(scene.shapes)))].colour
            shapes = [s for s in SHAPES if (colour, s) not in present]
            shape = shapes[int(rng.integers(len(shapes)))]
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            colour, shape = absent[int(rng.integers(len(absent)))]
        return f"Is there {with_article(colour)} {shape}?", "no"
    if kind == "largest":
        return "What is the largest shape?", scene.largest().shape
    if kind == "caption":
        return CAPTION_QUESTION, caption(scene)
    raise ValueError(f"unknown question type {kind!r}")


def sample_type(seed: int, index: int) -> str:
    """The first question's type: each block of 6 consecutive images holds every type once."""
    block = np.random.default_rng([seed, index // len(SAMPLE_TYPES), 1]).permutation(len(SAMPLE_TYPES))
    return SAMPLE_TYPES[block[index % len(SAMPLE_TYPES)]]


@dataclass
class Sample:
    index: int
    image: Image.Image
    scene: Scene
    caption: str
    turns: list[tuple[str, str, str]]  # (type, question, answer)


def make_sample(
    seed: int, index: int, multi_turn: float = 0.15, max_turns: int = 3, follow_ups: tuple = QUESTION_TYPES
) -> Sample:
    """Image `index` of the dataset with this seed (independent of the dataset's size).

    With probability `multi_turn` the sample gets 2 to `max_turns` turns (different questions of
    the `follow_ups` types the scene allows), else one.
    """
    rng = np.random.default_rng([seed, index])
    kind = sample_type(seed, index)
    scene, image = make_scene(rng, kind)
    turns = [(kind, *ask(scene, kind, rng))]
    if max_turns > 1 and rng.random() < multi_turn:
        wanted = int(rng.integers(2, max_turns + 1))
        types = [t for t in available_types(scene) if t in follow_ups]
        for _ in range(4 * wanted if types else 0):
            if len(turns) == wanted:
                break
            more = types[int(rng.integers(len(types)))]
            question, answer = ask(scene, more, rng)
            if question not in {q for _, q, _ in turns}:
                turns.append((more, question, answer))
    return Sample(index, image, scene, caption(scene), turns)


# --- dataset files ---------------------------------------------------------------------------


def image_name(index: int) -> str:
    return f"images/{index:06d}.png"


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_dataset(
    out: Path,
    count: int,
    seed: int = 0,
    multi_turn: float = 0.15,
    progress: Optional[bool] = None,
    max_turns: int = 3,
    follow_ups: tuple = QUESTION_TYPES,
) -> dict:
    """Render `count` images and write the dataset files into `out`; returns a summary."""
    from tqdm import tqdm

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pretrain, captions, instruct, questions, scenes = [], [], [], [], []
    bar = tqdm(range(count), desc="shapes", unit="img", disable=None if progress is None else not progress)
    for index in bar:
        sample = make_sample(seed, index, multi_turn, max_turns, follow_ups)
        name = image_name(index)
        sample.image.save(out / name, compress_level=1)
        sample_id = f"shapes-{seed}-{index:06d}"
        pretrain.append(
            {
                "id": sample_id,
                "image": name,
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": sample.caption}],
            }
        )
        captions.append(
            {
                "id": sample_id,
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{CAPTION_QUESTION}"},
                    {"from": "gpt", "value": sample.caption},
                ],
            }
        )
        conversations = []
        for turn, (kind, question, answer) in enumerate(sample.turns):
            conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
            conversations.append({"from": "gpt", "value": answer})
            if kind in QUESTION_TYPES:
                questions.append({"id": f"{sample_id}-{turn}", "image": name, "question": question, "answer": answer, "type": kind})
        instruct.append({"id": sample_id, "image": name, "conversations": conversations})
        scenes.append({"id": sample_id, "image": name, **asdict(sample.scene)})
    write_json(out / "pretrain.json", pretrain)
    write_json(out / "captions.json", captions)
    write_json(out / "instruct.json", instruct)
    write_json(out / "questions.json", questions)
    write_json(out / "scenes.json", scenes)
    types = {kind: sum(q["type"] == kind for q in questions) for kind in QUESTION_TYPES}
    return {
        "images": count,
        "pretrain": len(pretrain),
        "instruct": len(instruct),
        "multi_turn": sum(len(s["conversations"]) > 2 for s in instruct),
        "questions": len(questions),
        "question_types": types,
        "seconds": time.perf_counter() - start,
    }
