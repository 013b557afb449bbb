"""The bundled example images in examples/ and their questions (examples.json)."""

from pathlib import Path

import numpy as np
from cumo_mlx.shapes import Scene, ask, available_types, make_sample, write_json

EXAMPLES_SEED = 2024
# file name -> (shape count, orientation, noisy background, the single shape), the first sample
# of EXAMPLES_SEED that fits
EXAMPLES = {
    "shapes.png": (1, "landscape", False, "triangle"),
    "two_shapes.png": (2, "portrait", False, None),
    "three_shapes.png": (3, "landscape", False, None),
    "noisy_star.png": (1, "portrait", True, "star"),
}


def example_questions(scene: Scene, image: str, seed: int) -> list[dict]:
    """Every question type the scene allows (both a yes and a no one for `exists`), with answers."""
    rng = np.random.default_rng(seed)
    records, wanted = [], {"yes", "no"}
    for kind in available_types(scene):
        for _ in range(20):
            question, answer = ask(scene, kind, rng)
            if kind != "exists" or answer in wanted:
                records.append({"image": image, "question": question, "answer": answer, "type": kind})
                wanted.discard(answer)
                if kind != "exists" or not wanted:
                    break
    return records


def write_examples(folder: Path) -> list[dict]:
    """The bundled example images (small PNGs) and `examples.json` with their questions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records, index = [], 0
    for name, (count, orientation, noise, shape) in EXAMPLES.items():
        while True:
            sample = make_sample(EXAMPLES_SEED, index)
            index += 1
            scene = sample.scene
            landscape = scene.width >= 1.3 * scene.height
            portrait = scene.height >= 1.3 * scene.width
            if (
                len(scene.shapes) == count
                and (landscape if orientation == "landscape" else portrait)
                and scene.noise == noise
                and max(scene.width, scene.height) <= 320
                and (count == 1 or scene.largest() is not None)
                and (shape is None or scene.shapes[0].shape == shape)
            ):
                break
        sample.image.save(folder / name, optimize=True)
        records += example_questions(scene, name, index)
    write_json(folder / "examples.json", records)
    return records
