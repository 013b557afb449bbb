"""Pre-training the demo's vision tower on what the shapes scenes hold, patch by patch.

The real CuMo starts from OpenAI's CLIP, whose features already say what lies where in an image and
which objects, in which colours, it holds (CLIP learned to match images with their captions). The
demo's tiny CLIP has no such past: started as an edge detector (`demo_model.edge_energy_init`) and
trained only through the LLM's one-word answers, it learns to name a single shape but not to tie a
colour to a shape (the LLM answers one colour to every colour question). So before the three stages
it learns that knowledge from the scene descriptions the dataset writes (`scenes.json`): at every
patch of the base grid, the colour and kind of the shape covering it, whether that is the largest
shape and whether its centre lies there; and image-wide, how many shapes there are and which one is
clearly the largest. Linear heads on the S2 features (what the connector sees) read these out; the
heads are dropped afterwards."""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from cumo_mlx.shapes import COLOURS, SHAPES, Scene, outline
from cumo_mlx.train.optim import adamw
from PIL import Image, ImageDraw

# (name, classes). Per patch, of the shape covering it: colour, kind, the pair of both ("none" is the
# last class of each), whether it is the largest, whether its centre lies in the patch. Per image, on
# every patch: the number of shapes (1-3 as classes 0-2) and the kind of the clearly largest one (or none).
TARGETS = (
    ("colour", len(COLOURS) + 1),
    ("shape", len(SHAPES) + 1),
    ("pair", len(COLOURS) * len(SHAPES) + 1),
    ("largest", 2),
    ("centre", 2),
    ("count", 3),
    ("largest_kind", len(SHAPES) + 1),
)
OWNED = 0.2  # a patch belongs to the shape covering the most of it, if that is at least this share
SUPERSAMPLE = 4  # labels are drawn at this multiple of the model's resolution, for the coverage shares
EDGE_DETECTOR = tuple(  # what `edge_energy_init` sets, as PatchReadout's parameter paths
    f"tower.vision_model.{part}" for part in ("embeddings.", "pre_layrnorm.", "encoder.layers.0.")
)


def patch_labels(scene: Scene, image_size: int, grid: int) -> np.ndarray:
    """[grid * grid, len(TARGETS)] integer labels of one scene as the model sees its image: padded to
    a square (centred, as `pad` does) and resized to `image_size`."""
    side = max(scene.width, scene.height)
    left, top = (side - scene.width) // 2, (side - scene.height) // 2
    drawn = image_size * SUPERSAMPLE
    scale = drawn / side
    mask = Image.new("L", (drawn, drawn), 0)
    draw = ImageDraw.Draw(mask)
    for number, item in enumerate(scene.shapes, start=1):
        points = [((x + left) * scale, (y + top) * scale) for x, y in outline(item.shape, *item.center, item.size)]
        (draw.ellipse if item.shape == "circle" else draw.polygon)(points, fill=number)
    cell = drawn // grid
    cells = np.asarray(mask)[: grid * cell, : grid * cell].reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3)
    cells = cells.reshape(grid * grid, cell * cell)
    cover = np.stack([(cells == number).mean(axis=1) for number in range(1, len(scene.shapes) + 1)], axis=1)
    owner = np.where(cover.max(axis=1) >= OWNED, cover.argmax(axis=1), -1)

    colours, kinds = list(COLOURS), list(SHAPES)
    colour = np.array([colours.index(scene.shapes[o].colour) if o >= 0 else len(colours) for o in owner])
    kind = np.array([kinds.index(scene.shapes[o].shape) if o >= 0 else len(kinds) for o in owner])
    pair = np.where(owner >= 0, colour * len(kinds) + kind, len(colours) * len(kinds))
    largest = (owner == int(np.argmax([item.area for item in scene.shapes]))).astype(np.int64)
    centre = np.zeros(grid * grid, np.int64)
    for item in scene.shapes:
        column, row = ((c + offset) * scale // cell for c, offset in zip(item.center, (left, top)))
        centre[int(min(row, grid - 1)) * grid + int(min(column, grid - 1))] = 1
    count = np.full(grid * grid, len(scene.shapes) - 1)
    clear = scene.largest()
    largest_kind = np.full(grid * grid, kinds.index(clear.shape) if clear else len(kinds))
    return np.stack([colour, kind, pair, largest, centre, count, largest_kind], axis=1).astype(np.int32)


class PatchReadout(nn.Module):
    """The vision tower with one linear head per target on its (S2-merged) patch features."""

    def __init__(self, tower: nn.Module, feature_size: int):
        super().__init__()
        self.tower = tower
        self.heads = nn.Linear(feature_size, sum(classes for _, classes in TARGETS))

    def __call__(self, pixels: mx.array) -> mx.array:
        features, _ = self.tower(pixels)
        return self.heads(features)


def target_columns() -> list[slice]:
    """Where each target's logits lie in the read-out's output, in `TARGETS` order."""
    ends = np.cumsum([classes for _, classes in TARGETS])
    return [slice(int(end - classes), int(end)) for end, (_, classes) in zip(ends, TARGETS)]


def readout_loss(readout: PatchReadout, pixels: mx.array, labels: mx.array) -> mx.array:
    """Sum over targets of the mean cross-entropy over patches."""
    logits = readout(pixels)
    return sum(
        nn.losses.cross_entropy(logits[..., columns], labels[..., j]).mean() for j, columns in enumerate(target_columns())
    )


def patch_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of read-out logits [..., patches, sum of classes] against labels [..., patches, targets],
    per target. Colour, shape and pair count the patches a shape covers (where a model can be wrong in
    an interesting way; the background is nearly always right); the other targets count every patch."""
    accuracy = {}
    for j, ((name, classes), columns) in enumerate(zip(TARGETS, target_columns())):
        predicted, truth = logits[..., columns].argmax(-1), labels[..., j]
        counted = truth != classes - 1 if name in ("colour", "shape", "pair") else np.ones_like(truth, bool)
        accuracy[name] = float((predicted[counted] == truth[counted]).mean())
    return accuracy


def readout_accuracy(readout: PatchReadout, data: Path, processor, batch_size: int = 32) -> dict[str, float]:
    """`patch_accuracy` of a trained read-out on the scenes of a `cumo-mlx data shapes` folder."""
    pixels, labels = load_scenes(data, processor)
    logits = [
        np.array(readout(mx.array(pixels[i : i + batch_size]).astype(mx.float32)))
        for i in range(0, len(pixels), batch_size)
    ]
    return patch_accuracy(np.concatenate(logits), labels)


def load_scenes(folder: Path, processor, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [n, S, S, 3] float16, labels [n, patches, targets]) of a `cumo-mlx data shapes` folder."""
    folder = Path(folder)
    scenes = json.loads((folder / "scenes.json").read_text())[:limit]
    vision = processor.vision_config
    grid = vision.image_size // vision.patch_size
    pixels = np.stack([processor.preprocess_image(folder / s["image"]) for s in scenes]).astype(np.float16)
    labels = np.stack([patch_labels(Scene.from_record(s), vision.image_size, grid) for s in scenes])
    return pixels, labels


def pretrain_vision_tower(
    model,
    processor,
    data: Path,
    steps: int,
    batch_size: int,
    learning_rate: float,
    edge_learning_rate: float,
    seed: int = 0,
    progress: Optional[bool] = None,
) -> tuple[list[float], PatchReadout]:
    """Train `model.vision_tower` (dense CLIP) in place to read out `TARGETS` at every patch of the
    images in `data`. The edge detector the tower starts as (patch embedding, first layer) learns at
    `edge_learning_rate` (low: a high rate wipes it out), the later layers and the heads at
    `learning_rate`, both on a cosine decay. Returns the loss of every step and the read-out (tower
    and heads, for `readout_accuracy`). `progress`: a progress bar (None: on a terminal)."""
    from tqdm import tqdm

    pixels, labels = load_scenes(data, processor)
    mx.random.seed(seed)
    feature_size = model.args.vision_config.hidden_size * len(model.vision_tower.scales)
    readout = PatchReadout(model.vision_tower, feature_size)
    optimizer = optim.MultiOptimizer(
        [adamw(optim.cosine_decay(rate, steps)) for rate in (edge_learning_rate, learning_rate)],
        [lambda path, _: path.startswith(EDGE_DETECTOR)],
    )
    loss_and_grad = nn.value_and_grad(readout, readout_loss)
    rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(steps), desc="vision pretraining", unit="step", disable=None if progress is None else not progress)
    for _ in bar:
        batch = rng.choice(len(pixels), size=min(batch_size, len(pixels)), replace=False)
        loss, grads = loss_and_grad(readout, mx.array(pixels[batch]).astype(mx.float32), mx.array(labels[batch]))
        optimizer.update(readout, grads)
        mx.eval(readout.parameters(), optimizer.state)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses, readout
