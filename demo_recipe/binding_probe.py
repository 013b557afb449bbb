"""Can the demo LLM learn the shapes questions when the image features are perfect?

    python demo_recipe/binding_probe.py [--work runs/demo] [--steps 1400] [--batch-size 8]
        [--learning-rate 1e-3] [--heads 4] [--kv-heads 2] [--seed 0] [--labels colour,shape,...]
        [--kind-noise 0] [--text | --features MODEL] [--quick] [--json]

The demo's accuracy is limited by its vision tower (what the image features hold) or by its LLM
(whether it learns to pick out the shape a question names). This separates the two. Each image's
features are replaced by ideal ones: at every patch, the sum of learned embeddings of the patch's
labels from the scene description (`vision_pretraining.patch_labels`, the targets CLIP is pre-trained
on). A fresh demo LLM (`demo_config`, attention heads as given) learns the instruction data of a
`recipe.py` work folder (WORK/data) from them, as stage 3 does, and answers the held-out
questions (WORK/heldout, the first 500) greedily: accuracy per question type. --labels: which labels
the ideal features are made of (all the targets by default); --kind-noise: the share of the patches a
shape covers whose kind label is made random (a vision tower that tells the kind of the rest). --text
gives the LLM each image's caption ("A red circle and a blue star.") in place of the image instead: the
same lookup in words. --features gives it MODEL's CLIP features (frozen, what its connector reads: the
demo's own vision tower in place of the ideal one) through a fresh dense connector. --quick makes its
own tiny dataset and trains a few steps (a smoke test).

Measured on the recipe's data (2-core CPU; count, largest and shape 100% with image features):
  4 heads of 32 (2 KV), 1400 steps of 8 (~stage 3, ~6 min):            colour 76%, exists 55%
  the same on data with 2 to 8 questions an image (5 on average):     colour 69%, exists 55%
  the same, later turns colour or exists only (--follow-ups colour,exists; seeds 0 / 1):
                                                                      colour 84 / 86%, exists 49 / 47%
  the same, later turns colour only (--follow-ups colour):            colour 88%, exists 50%
On the recipe's data (2 to 8 questions an image), neither a larger batch nor a wider LLM learns more:
  350 steps of 32, learning rate 2e-3 (the same samples, 7 min):     colour 76%, exists 53%
  width 256, MLP 768, 8 heads (4 KV), 1400 steps of 8 (15 min):      colour 77%, exists 54%
  --text (each image's caption in words instead, 4 min):             colour 65%, exists 53%, largest 66%
Even with the answer written in its prompt the LLM does not learn the lookup from this many samples:
the samples stage 3 can afford, not the LLM's size or batch, bound it (the demo's own features then
lose more, below).
With perfect features the LLM learns part of the colour lookup (more of it when the later turns ask
colour questions) and next to none of "Is there a <colour> <shape>?" (answering "no" to all gets 53%).
The demo's own features do worse on the same data: its stage 3 on --follow-ups colour,exists data
answers 65% of colour questions, at chance with two or three shapes. (Naming a random colour of the
image gets 68% of the held-out colour questions.)
On the --follow-ups colour data (1400 steps of 8, ~5 min each; count and shape 84-100% in all):
  --labels colour,shape (no pair label):                              colour 91%, exists 58%
  --labels pair:                                                      colour 85%, exists 59%
  --labels colour,shape --kind-noise 0.25:                           colour 67%, exists 50%
  --labels colour,shape --kind-noise 0.1:                            colour 70%, exists 48%
  --features runs/v11/vision (the recipe's pre-trained CLIP):         colour 69%, exists 50%
The lookup needs neither a label for the pair nor more than the colour and kind of each patch, but it
needs the kind nearly always right: with a quarter or even a tenth of the patches' kinds random it is not
learned (67-70%: the lone-shape questions and chance with two or three shapes), and the demo's own CLIP
features, whose kind a linear read-out gets right on 76% of the patches, do no better.
"""

import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import cumo_mlx  # first: an optimized BLAS before mlx
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from cumo_mlx.loader import load_processor
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from cumo_mlx.prompt import IMAGE_PLACEHOLDER, chat_prompt, image_layout
from cumo_mlx.shapes import SHAPES, Scene, caption, write_dataset
from cumo_mlx.train.data import (
    Dataset,
    Encoded,
    build_prompt,
    collate,
    tokenize_with_labels,
)
from cumo_mlx.train.optim import adamw
from demo_model import IMAGE_SIZE, PATCH_SIZE, demo_config, write_tokenizer
from evaluation import accuracy_by_type
from vision_pretraining import TARGETS, patch_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks' output helpers
import harness  # noqa: E402

GRID = IMAGE_SIZE // PATCH_SIZE


TARGET_NAMES = tuple(name for name, _ in TARGETS)


class IdealFeatures(nn.Module):
    """Patch labels [..., patches, targets] -> the sum of one learned embedding per label, of the
    targets named in `labels` (all by default)."""

    def __init__(self, dims: int, labels: tuple = TARGET_NAMES):
        super().__init__()
        self.columns = [TARGET_NAMES.index(name) for name in labels]
        self.tables = [nn.Embedding(TARGETS[j][1], dims) for j in self.columns]

    def __call__(self, labels: mx.array) -> mx.array:
        return sum(table(labels[..., j]) for j, table in zip(self.columns, self.tables))


class Probe(nn.Module):
    """A fresh LLM reading images through `features`: ideal ones (the default), or (`connector`) a
    fresh dense connector over a model's frozen CLIP features."""

    def __init__(self, language_model: nn.Module, connector: Optional[nn.Module] = None, labels: tuple = TARGET_NAMES):
        super().__init__()
        self.language_model = language_model
        dims = language_model.model.embed_tokens.weight.shape[1]
        self.features = IdealFeatures(dims, labels) if connector is None else connector

    def hidden(self, tokens: mx.array, image_rows: mx.array, image_inputs: mx.array) -> mx.array:
        """Last hidden states [B, L, D] with the image features of `image_inputs` (patch labels or
        CLIP features [B, patches, ...]) at the image rows."""
        rows = self.features(image_inputs)
        rows = rows.reshape(-1, rows.shape[-1])
        embeddings = self.language_model.model.embed_tokens(tokens)
        embeddings = mx.where((image_rows >= 0)[..., None], rows[mx.maximum(image_rows, 0)], embeddings)
        return self.language_model.model(None, input_embeddings=embeddings)[0]


def read_scenes(folder: Path) -> dict:
    """image path (as in the data files) -> its Scene."""
    return {s["image"]: Scene.from_record(s) for s in json.loads((folder / "scenes.json").read_text())}


def scene_labels(scene: Scene) -> np.ndarray:
    """The ideal features' input: each patch's labels [patches, targets]."""
    return patch_labels(scene, IMAGE_SIZE, GRID)


def with_kind_noise(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """The labels with the kind of about `share` of the shape-covered patches replaced by a random kind
    (a vision tower that gets the rest right)."""
    kinds = labels[:, TARGET_NAMES.index("shape")]
    covered = kinds < len(SHAPES)
    flipped = covered & (rng.random(len(kinds)) < share)
    noisy = labels.copy()
    noisy[flipped, TARGET_NAMES.index("shape")] = rng.integers(0, len(SHAPES), int(flipped.sum()))
    return noisy


def image_context(scene: Scene, text: bool) -> str:
    """What stands for the image in a prompt: the image itself, or (--text) its caption."""
    return caption(scene) if text else IMAGE_PLACEHOLDER


def clip_features(model_path: Path, folder: Path, batch_size: int = 32) -> dict:
    """image path (as in the data files) -> the model's CLIP features of it [patches, D * scales]
    (what its connector reads), for every scene of a dataset folder."""
    model, processor = cumo_mlx.load(model_path)
    names = list(read_scenes(folder))
    features = {}
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        pixels = mx.array(np.stack([processor.preprocess_image(folder / name) for name in chunk]))
        batch, _ = model.vision_tower(pixels)
        features.update(zip(chunk, np.array(batch)))
    return features


def loss_fn(probe: Probe, tokens, image_rows, image_inputs, inputs, targets) -> mx.array:
    hidden = probe.hidden(tokens, image_rows, image_inputs)
    logits = probe.language_model.lm_head(hidden.reshape(-1, hidden.shape[-1])[inputs])
    return nn.losses.cross_entropy(logits, targets).mean()


def answer(probe: Probe, processor, context: str, question: str, image_input: np.ndarray, max_tokens: int = 4) -> str:
    ids = processor.tokenize(chat_prompt([f"{context}\n{question}"]))
    tokens, rows = image_layout(ids, GRID * GRID)
    out = []
    for _ in range(max_tokens):  # answers are a word or two: no KV cache needed
        hidden = probe.hidden(mx.array(tokens)[None], mx.array(rows)[None], mx.array(image_input)[None])
        token = int(mx.argmax(probe.language_model.lm_head(hidden[0, -1])).item())
        if token == processor.tokenizer.eos_token_id:
            break
        out.append(token)
        tokens, rows = np.append(tokens, token), np.append(rows, -1)
    return processor.tokenizer.decode(out).strip()


def training_samples(
    data: Path, processor, text: bool, features: Optional[dict] = None
) -> list[tuple[Encoded, np.ndarray]]:
    """The instruction samples of a dataset folder, encoded, each with what the probe reads of its
    image: the scene's patch labels, or its entry of `features` (`clip_features`)."""
    scenes = read_scenes(data)
    dataset = Dataset(data / "instruct.json", processor, data, report=None)
    samples = []
    for sample in dataset.samples:
        name = sample.images[0].resolve().relative_to(data.resolve()).as_posix()
        scene = scenes[name]
        context = image_context(scene, text)
        turns = [(role, value.replace(IMAGE_PLACEHOLDER, context)) for role, value in sample.turns]
        ids, targets = tokenize_with_labels(processor.tokenize, *build_prompt(turns, dataset.template))
        samples.append((Encoded(ids, targets, None), scene_labels(scene) if features is None else features[name]))
    return samples


def train_and_ask(
    work: Path,
    steps: int,
    batch_size: int,
    learning_rate: float,
    heads: int,
    kv_heads: int,
    questions: int,
    text: bool = False,
    seed: int = 0,
    features_model: Optional[Path] = None,
    ideal_labels: tuple = TARGET_NAMES,
    kind_noise: float = 0.0,
) -> dict:
    """Train a fresh demo LLM on ideal features (or, `text`, captions; or `features_model`'s CLIP
    features through a fresh connector) of WORK/data; its answers to WORK/heldout's questions."""
    config = demo_config(moe=False) | {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    args = ModelArgs.from_dict(config)
    processor = load_processor(write_tokenizer(work / "probe-tokenizer"), args)
    heldout = work / "heldout"
    train_features = heldout_features = None
    if features_model is not None:
        train_features, heldout_features = (clip_features(features_model, folder) for folder in (work / "data", heldout))
    mx.random.seed(seed)
    model = Model(args)
    probe = Probe(model.language_model, None if features_model is None else model.mm_projector, ideal_labels)

    samples = training_samples(work / "data", processor, text, train_features)
    noise = np.random.default_rng([seed, 1])
    if kind_noise:
        samples = [(encoded, with_kind_noise(labels, kind_noise, noise)) for encoded, labels in samples]

    warmup = max(1, steps // 50)
    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, learning_rate, warmup), optim.cosine_decay(learning_rate, steps)], [warmup]
    )
    optimizer = adamw(schedule)
    loss_and_grad = nn.value_and_grad(probe, loss_fn)
    rng = np.random.default_rng(seed)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        chosen = rng.choice(len(samples), size=min(batch_size, len(samples)), replace=False)
        batch = collate([samples[i][0] for i in chosen], GRID * GRID, None)
        image_inputs = np.stack([samples[i][1] for i in chosen])
        inputs = (batch.tokens, batch.image_rows, image_inputs, batch.inputs, batch.targets)
        loss, grads = loss_and_grad(probe, *map(mx.array, inputs))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(probe, grads)
        mx.eval(probe.parameters(), optimizer.state)
        losses.append(loss.item())
    train_seconds = time.perf_counter() - start

    asked = json.loads((heldout / "questions.json").read_text())[:questions]
    heldout_scenes = read_scenes(heldout)
    predictions = []
    for q in asked:
        scene = heldout_scenes[q["image"]]
        if heldout_features is not None:
            image_input = heldout_features[q["image"]]
        else:
            image_input = with_kind_noise(scene_labels(scene), kind_noise, noise)
        predictions.append(answer(probe, processor, image_context(scene, text), q["question"], image_input))
    if text:
        kind = "captions"
    elif features_model is not None:
        kind = f"CLIP features of {features_model}"
    else:
        kind = "ideal image features" + ("" if ideal_labels == TARGET_NAMES else f" ({', '.join(ideal_labels)})")
        kind += f", {100 * kind_noise:.0f}% of the kinds random" if kind_noise else ""
    return {
        "input": kind,
        "heads": heads,
        "kv_heads": kv_heads,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "loss_first_last": [losses[0], float(np.mean(losses[-max(1, steps // 10) :]))],
        "accuracy": accuracy_by_type(asked, predictions),
    }


def main():
    parser = harness.parser(__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/demo"), help="A recipe.py work folder.")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--heads", type=int, default=demo_config()["num_attention_heads"])
    parser.add_argument("--kv-heads", type=int, default=demo_config()["num_key_value_heads"])
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--text", action="store_true", help="Give the LLM each image's caption instead.")
    parser.add_argument(
        "--features", type=Path, metavar="MODEL",
        help="Give the LLM MODEL's frozen CLIP features through a fresh connector instead.",
    )
    parser.add_argument(
        "--labels", default=",".join(TARGET_NAMES),
        help="Comma-separated patch labels the ideal features are made of.",
    )
    parser.add_argument(
        "--kind-noise", type=float, default=0.0, metavar="SHARE",
        help="Make the kind label of this share of the shape-covered patches random (ideal features).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seeds the LLM's initial weights and the batch order.")
    options = parser.parse_args()
    unknown = set(options.labels.split(",")) - set(TARGET_NAMES)
    if unknown:
        parser.error(f"unknown --labels {', '.join(sorted(unknown))}: choose from {', '.join(TARGET_NAMES)}")
    if not 0 <= options.kind_noise <= 1:
        parser.error("--kind-noise is a share: give a number from 0 to 1")
    if options.text and options.features:
        parser.error("--text and --features are two different inputs: give one")
    measure = functools.partial(
        train_and_ask, heads=options.heads, kv_heads=options.kv_heads, text=options.text, seed=options.seed,
        features_model=options.features, ideal_labels=tuple(options.labels.split(",")),
        kind_noise=options.kind_noise,
    )
    if options.quick:
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            write_dataset(work / "data", 24, seed=0, progress=False)
            write_dataset(work / "heldout", 24, seed=1, progress=False)
            figures = measure(work, steps=6, batch_size=4, learning_rate=1e-3, questions=12)
    else:
        steps, batch_size, learning_rate = options.steps, options.batch_size, options.learning_rate
        figures = measure(options.work, steps, batch_size, learning_rate, questions=options.questions)
    result = {"machine": harness.machine(), "quick": options.quick, **figures}
    rows = [
        [kind, f"{row['correct']}/{row['total']}", f"{100 * row['accuracy']:.1f}%"]
        for kind, row in figures["accuracy"].items()
    ]
    text = (
        f"{figures['input']} -> fresh demo LLM, {figures['heads']} heads ({figures['kv_heads']} KV), "
        f"{figures['steps']} steps of {figures['batch_size']} in {figures['train_seconds']} s\n\n"
        + harness.table(["question", "right", "accuracy"], rows)
    )
    harness.emit(result, text, options)


if __name__ == "__main__":
    main()
