"""Tiny LLaVA-format datasets of small generated PNGs, for the training tests."""

import json
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def write_images(folder: Path) -> dict:
    """One small PNG per colour (non-square, so the `pad` path runs); {colour: file name}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (20 + 4 * i, 14), rgb)
        image.paste((255, 255, 255), (2, 2, 8, 8))
        names[colour] = f"{colour}.png"
        image.save(folder / names[colour])
    return names


def instruct_samples(names: dict) -> list:
    """Multi-turn and single-turn instructions, one per colour, plus a text-only sample."""
    samples = []
    for i, (colour, name) in enumerate(names.items()):
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the circle?"},
            {"from": "gpt", "value": f"The circle is {colour}."},
        ]
        if i % 2 == 0:
            turns += [{"from": "human", "value": "Is there a red circle?"}, {"from": "gpt", "value": "yes" if colour == "red" else "no"}]
        samples.append({"id": f"{colour}-{i}", "image": name, "conversations": turns})
    samples.append(
        {"id": "text", "conversations": [{"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "three"}]}
    )
    return samples


def caption_samples(names: dict) -> list:
    """Stage-1 captions (`plain`)."""
    return [
        {"id": f"cap-{colour}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"a {colour} circle"},
        ]}
        for colour, name in names.items()
    ]


def write_dataset(folder: Path, samples: list, name: str = "data.json") -> Path:
    path = Path(folder) / name
    path.write_text(json.dumps(samples))
    return path
