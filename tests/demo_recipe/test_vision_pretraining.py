"""The demo's vision-tower pre-training: the patch labels it learns from, and that it learns them."""

import mlx.core as mx
import numpy as np
from cumo_mlx.loader import load_processor
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from cumo_mlx.shapes import COLOURS, SHAPES, Scene, Shape, write_dataset
from demo_model import demo_config, write_tokenizer
from vision_pretraining import (
    TARGETS,
    PatchReadout,
    patch_accuracy,
    patch_labels,
    pretrain_vision_tower,
    readout_accuracy,
)

NONE_COLOUR, NONE_SHAPE = len(COLOURS), len(SHAPES)


def scene(width, height, *shapes):
    return Scene(width, height, "green", False, [Shape(*s) for s in shapes])


def test_patch_labels_follow_the_padded_image():
    """A 200 x 100 image is padded to 200 x 200 (50 px above and below) and seen at 96 px on an 8 x 8
    grid: a red square filling its left half's middle owns the patches there, a small blue circle
    centred on a patch corner on the right owns the four patches around it, and only the square is
    the largest (clearly: every patch says so)."""
    labels = patch_labels(
        scene(200, 100, ("square", "red", (50, 50), 50, 6400), ("circle", "blue", (150, 50), 20, 1000)),
        image_size=96,
        grid=8,
    ).reshape(8, 8, -1)
    colour, shape, pair, largest, centre, count, largest_kind = (labels[..., j] for j in range(7))
    red, blue = list(COLOURS).index("red"), list(COLOURS).index("blue")
    assert (colour[:2] == NONE_COLOUR).all() and (colour[6:] == NONE_COLOUR).all()  # the padding
    assert (colour[2:6, :4] == red).all() and (shape[2:6, :4] == SHAPES.index("square")).all()
    assert (largest[2:6, :4] == 1).all() and largest.sum() == 16
    assert (colour[3:5, 5:7] == blue).all() and (shape[3:5, 5:7] == SHAPES.index("circle")).all()
    assert (colour == blue).sum() == 4
    assert (pair == np.where(colour < NONE_COLOUR, colour * len(SHAPES) + shape, len(COLOURS) * len(SHAPES))).all()
    assert centre.sum() == 2 and centre[4, 2] == 1 and centre[4, 6] == 1  # centres (50, 100) and (150, 100) of 200
    assert (count == 1).all()  # two shapes: class 1
    assert (largest_kind == SHAPES.index("square")).all()


def test_no_largest_kind_without_a_clear_largest():
    equal = scene(100, 100, ("square", "red", (25, 50), 15, 600), ("star", "blue", (75, 50), 15, 500))
    column = [name for name, _ in TARGETS].index("largest_kind")
    assert (patch_labels(equal, image_size=96, grid=8)[:, column] == NONE_SHAPE).all()


def test_the_tower_learns_the_patch_labels(tmp_path):
    """A few dozen steps on a small shapes set lower the read-out loss and raise its accuracy; the layers
    after the edge detector move, the edge detector keeps still at an edge learning rate of 0."""
    write_dataset(tmp_path / "data", 16, seed=0, progress=False)
    processor = load_processor(write_tokenizer(tmp_path / "tok"), ModelArgs.from_dict(demo_config()))
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(demo_config(moe=False)))
    clip = model.vision_tower.vision_model
    layers = clip.encoder.layers
    watched = (clip.embeddings.patch_embedding, layers[0].mlp.fc1, layers[1].mlp.fc1)
    weights = lambda: [np.array(module.weight) for module in watched]
    before = weights()
    untrained_readout = PatchReadout(model.vision_tower, clip.config.hidden_size * len(model.vision_tower.scales))
    untrained = readout_accuracy(untrained_readout, tmp_path / "data", processor)
    losses, readout = pretrain_vision_tower(
        model, processor, tmp_path / "data", steps=40, batch_size=8, learning_rate=3e-3, edge_learning_rate=0.0,
        progress=False,
    )
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    after = weights()
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert not np.allclose(before[2], after[2])
    trained = readout_accuracy(readout, tmp_path / "data", processor)
    assert np.mean(list(trained.values())) > np.mean(list(untrained.values())) + 0.15, (untrained, trained)


def test_patch_accuracy_counts_the_shapes_patches_for_colour_shape_and_pair():
    """Two images of three patches; the first patch of each is background. Colour, shape and pair are
    scored on the four covered patches only, the other targets on all six."""
    labels = np.zeros((2, 3, len(TARGETS)), np.int64)
    none = {name: classes - 1 for name, classes in TARGETS}
    for j, (name, _) in enumerate(TARGETS):
        labels[:, 0, j] = none[name] if name in ("colour", "shape", "pair") else 0
    labels[:, 1:, 0] = [[2, 3], [4, 5]]  # colours of the covered patches
    predicted = labels.copy()
    predicted[0, 0, 0] = 1  # a background patch called a colour: not counted for colour
    predicted[1, 2, 0] = 0  # one of the four covered patches wrong: colour 3/4
    predicted[0, 0, 3] = 1  # "largest" wrong on one of six patches
    logits = np.concatenate([np.eye(classes)[predicted[..., j]] for j, (_, classes) in enumerate(TARGETS)], axis=-1)
    accuracy = patch_accuracy(logits, labels)
    assert accuracy["colour"] == 0.75 and accuracy["largest"] == 5 / 6
    assert all(accuracy[name] == 1.0 for name, _ in TARGETS if name not in ("colour", "largest"))
