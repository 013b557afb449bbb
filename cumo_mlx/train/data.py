"""LLaVA-format training data: samples, prompts with label masks, batches, the data of each step.

A data file is a JSON list (or JSON Lines) of
    {"id": ..., "image": "rel/path.png" | ["a.png", "b.png"] (optional),
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}
Samples without "image" are text-only; a sample may hold several images, one `<image>` each.

Prompts are built as the original builds them (SHI-Labs/CuMo, cumo/train/train.py:
`preprocess_multimodal`, then `preprocess_llama_2` or `preprocess_plain`) and tokenized with the
processor's own splice (`Processor.tokenize`, as at inference). Supervised: every assistant answer
with its `</s>` (mistral_instruct_system), or the caption with its "\\n" (plain). The answer spans
are found by tokenizing the prompt up to each span boundary and checking the result is a prefix of
the whole prompt's ids, so the mask never depends on the tokenizer splitting text the way a
separate tokenization of a piece would.

Batches splice each image's patch rows in place of its placeholder, truncate to the maximum
length, and pad on the right (pad id = unk); the layout is computed here, on the host, and
`Model.embed_batch` applies it.

The data order and every batch derive from (seed, step) alone (`StepLoader`), so a resumed run
sees the very batches an uninterrupted one would.
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from ..errors import DataError, ImageError
from ..paths import inside, regular_file
from ..processor import Processor
from ..prompt import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    assistant_turn,
    image_layout,
    user_turn,
)

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
IMAGE_LENGTH_ESTIMATE = 128  # the original's stand-in for an image when sorting by length
DATA_MAX_BYTES = 8 << 30  # read whole into memory; LLaVA-665K's JSON is about 1 GB


class BadSample(Exception):
    """A sample that cannot be used; the message says why."""


@dataclass
class Sample:
    index: int  # position in the data file
    id: str
    turns: list  # [(role, text)]: human first, alternating, ending with an answer
    images: list  # [Path]
    length: int  # rough length (words + IMAGE_LENGTH_ESTIMATE per image), for sorting

    @property
    def name(self) -> str:
        return f"sample {self.id!r} (#{self.index})" if self.id != str(self.index) else f"sample #{self.index}"


@dataclass
class Encoded:
    ids: list  # prompt ids, IMAGE_TOKEN_INDEX where each image goes
    labels: list  # same length; IGNORE_INDEX where not supervised
    pixels: Optional[np.ndarray]  # [images, S, S, 3] or None


@dataclass
class Batch:
    """One padded batch, laid out for `Model.embed_batch` and the losses (numpy or mx arrays)."""

    tokens: object  # [B, L] ids (pad = unk, also at image rows)
    image_rows: object  # [B, L] row of the flattened image features, -1 for a token
    pixels: object  # [images, S, S, 3], or None
    inputs: object  # flat positions (b * L + p) whose next token is supervised
    targets: object  # the supervised next tokens
    real: object  # flat positions that are not padding
    lengths: list  # unpadded length of each row
    num_images: int
    names: list = field(default_factory=list)  # sample names, for messages

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def num_targets(self) -> int:
        return int(self.targets.size)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))

    def as_mx(self) -> "Batch":
        """The same batch with mx arrays (collate builds numpy, so it can run off the main thread)."""
        convert = lambda a: None if a is None else mx.array(a)  # noqa: E731
        return Batch(
            *(convert(getattr(self, k)) for k in ("tokens", "image_rows", "pixels", "inputs", "targets", "real")),
            self.lengths,
            self.num_images,
            self.names,
        )


# ---------------------------------------------------------------------------------------------
# Reading and checking samples
# ---------------------------------------------------------------------------------------------


def read_records(path: Path) -> list:
    """The list of records in a LLaVA JSON (or JSON Lines) file."""
    if str(path) and not os.path.exists(path):
        raise DataError(f"data file not found: {path}", "give a LLaVA-format .json file")
    path = regular_file(path, "data file", DATA_MAX_BYTES, DataError)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}", "check the file") from None
    try:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as first_error:
            try:  # JSON Lines
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError:
                raise DataError(f"{path} is not valid JSON: {first_error}", "fix the file") from None
    except RecursionError:
        raise DataError(f"{path} is nested too deeply to be a data file", "fix the file") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of samples", "see the LLaVA data format in the README")
    if not records:
        raise DataError(f"{path} holds no samples", "give a non-empty data file")
    return records


def resolve_image(name: object, image_folder: Optional[Path]) -> Path:
    """The image file for a sample's relative path, refusing paths that leave the image folder."""
    if not isinstance(name, str) or not name.strip():
        raise BadSample(f"image entry {name!r} is not a file name")
    if image_folder is None:
        raise BadSample("it has an image but no --image-folder was given")
    try:
        full = inside(image_folder, name)
    except ValueError:  # a NUL byte
        raise BadSample(f"image entry {name!r} is not a file name") from None
    if full is None:
        raise BadSample(f"image path {name!r} is outside the image folder")
    if not full.is_file():
        raise BadSample(f"image file not found: {name}")
    return full


def check_sample(record: object, index: int, image_folder: Optional[Path], template: str) -> Sample:
    """A usable Sample from one record, or BadSample saying what is wrong with it."""
    if not isinstance(record, dict):
        raise BadSample("it is not a JSON object")
    sample_id = str(record.get("id", index))
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadSample("it has no 'conversations' list")
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample("a turn is not an object with a string 'value'")
        try:
            turn["value"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape (\ud800-\udfff) in the JSON: tokenizers crash on it
            raise BadSample("a turn holds a lone surrogate, which is not text") from None
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise BadSample(f"unknown speaker {turn.get('from')!r} (expected human or gpt)")
        turns.append((role, turn["value"]))
    if turns[0][0] != "human":
        turns = turns[1:]  # the original drops a leading non-human turn
    if not any(role == "human" for role, _ in turns):
        raise BadSample("it has no human turn")
    for i, (role, _) in enumerate(turns):
        if role != ("human" if i % 2 == 0 else "gpt"):
            raise BadSample("its turns do not alternate human / gpt")
    if turns[-1][0] == "human":
        turns = turns[:-1]  # an unanswered last question teaches nothing
    if not turns:
        raise BadSample("it has no answer to learn from")
    image_names = record.get("image", [])
    image_names = [image_names] if isinstance(image_names, str) else image_names
    if not isinstance(image_names, list):
        raise BadSample("its 'image' is neither a file name nor a list of them")
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if placeholders != len(image_names):
        raise BadSample(f"it has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(image_names)} image(s)")
    if template == "plain":
        if not image_names:
            raise BadSample("the plain template (pretrain stage) needs an image")
        if len(turns) != 2:
            raise BadSample("the plain template takes one human turn and one caption")
    images = [resolve_image(name, image_folder) for name in image_names]
    words = sum(len(text.split()) for _, text in turns)
    return Sample(index, sample_id, turns, images, words + IMAGE_LENGTH_ESTIMATE * len(images))


# ---------------------------------------------------------------------------------------------
# Prompts and label masks
# ---------------------------------------------------------------------------------------------


def normalize_images(text: str) -> str:
    """The original's `preprocess_multimodal`: a turn's `<image>`s move to its front, one line each."""
    count = text.count(IMAGE_PLACEHOLDER)
    if not count:
        return text
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return (f"{IMAGE_PLACEHOLDER}\n" * count + rest).strip()


def build_prompt(turns: list, template: str, system: Optional[str] = None) -> tuple[str, list]:
    """The prompt text and the character spans [(start, end)] that are supervised."""
    if template == "plain":
        images = IMAGE_PLACEHOLDER * sum(value.count(IMAGE_PLACEHOLDER) for _, value in turns)
        text = images + turns[1][1].replace(IMAGE_PLACEHOLDER, "") + "\n"
        return text, [(len(images), len(text))]
    if template != "mistral_instruct_system":
        raise DataError(f"unknown template {template!r}", f"use one of {', '.join(TEMPLATES)}")
    kwargs = {} if system is None else {"system": system}
    text, spans = "", []
    for i, (role, value) in enumerate(turns):
        if role == "human":
            text += user_turn(normalize_images(value), i == 0, **kwargs)
        else:
            answer = assistant_turn(normalize_images(value))
            spans.append((len(text), len(text) + len(answer)))
            text += answer
    return text, spans


def tokenize_with_labels(tokenize: Callable[[str], list], text: str, spans: list) -> tuple[list, list]:
    """ids = tokenize(text); labels = ids inside the spans, IGNORE_INDEX elsewhere (and at images)."""
    ids = tokenize(text)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        bounds = []
        for boundary in (start, end):
            prefix = tokenize(text[:boundary]) if boundary < len(text) else ids
            if prefix != ids[: len(prefix)]:
                raise BadSample("its answer boundaries do not fall between tokens")
            bounds.append(len(prefix))
        for i in range(*bounds):
            if ids[i] != IMAGE_TOKEN_INDEX:
                labels[i] = ids[i]
    return ids, labels


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class Dataset:
    """The usable samples of a data file; bad ones are reported and skipped (or fatal when strict)."""

    def __init__(
        self,
        path,
        processor: Processor,
        image_folder=None,
        template: str = "mistral_instruct_system",
        strict: bool = False,
        report: Optional[Callable[[str], None]] = print,
    ):
        if template not in TEMPLATES:
            raise DataError(f"unknown template {template!r}", f"use one of {', '.join(TEMPLATES)}")
        self.path = Path(path)
        self.processor = processor
        self.image_folder = None if image_folder is None else Path(image_folder)
        if self.image_folder is not None and not self.image_folder.is_dir():
            raise DataError(f"image folder not found: {self.image_folder}", "give the folder the image paths are relative to")
        self.template = template
        self.strict = strict
        self.report = report or (lambda message: None)
        self.bad: dict = {}  # index in the file -> reason
        records = read_records(self.path)
        self.samples = []
        for index, record in enumerate(records):
            try:
                self.samples.append(check_sample(record, index, self.image_folder, template))
            except BadSample as e:
                name = f"sample #{index}"
                if isinstance(record, dict) and "id" in record:
                    name = f"sample {str(record['id'])!r} (#{index})"
                self.reject(index, name, str(e))
        if not self.samples:
            raise DataError(
                f"{self.path} has no usable samples ({len(self.bad)} skipped)",
                "fix the samples the messages above name",
            )
        self.num_records = len(records)

    def __len__(self) -> int:
        return len(self.samples)

    def reject(self, index: int, name: str, reason: str) -> None:
        """Record a bad sample: fatal with --strict, else reported once and skipped."""
        if self.strict:
            raise DataError(f"{self.path}: {name}: {reason}", "fix or remove the sample, or drop --strict to skip bad samples")
        if index not in self.bad:
            self.bad[index] = reason
            self.report(f"skipping {name}: {reason}")

    def encode(self, sample: Sample) -> Encoded:
        text, spans = build_prompt(sample.turns, self.template)
        ids, labels = tokenize_with_labels(self.processor.tokenize, text, spans)
        pixels = None
        if sample.images:
            try:
                pixels = np.stack([self.processor.preprocess_image(path) for path in sample.images])
            except ImageError as e:
                raise BadSample(e.what) from None
        return Encoded(ids, labels, pixels)

    def load(self, indices: list) -> list:
        """(Sample, Encoded) for the given sample indices, skipping (or failing on) bad ones."""
        out = []
        for i in indices:
            sample = self.samples[i]
            if sample.index in self.bad:
                continue
            try:
                out.append((sample, self.encode(sample)))
            except BadSample as e:
                self.reject(sample.index, sample.name, str(e))
                self.check_any_left()
        return out

    def check_any_left(self) -> None:
        """A DataError once every record is known bad (each is either a sample or rejected upfront)."""
        if len(self.bad) >= self.num_records:
            raise DataError(
                f"{self.path} has no usable samples left (all {len(self.bad)} skipped)",
                "fix the samples the messages above name",
            )


# ---------------------------------------------------------------------------------------------
# Order, sharding and batching
# ---------------------------------------------------------------------------------------------


def epoch_batches(dataset_lengths: list, batch_size: int, seed: int, epoch: int, sort_by_length: bool) -> list:
    """One epoch's batches of sample indices (the last may be short), in a seeded random order.

    sort_by_length: batches of samples of similar length (less padding), the batches shuffled.
    """
    n = len(dataset_lengths)
    rng = np.random.default_rng([seed, epoch])
    if sort_by_length:
        order = np.argsort(np.asarray(dataset_lengths), kind="stable")
        batches = [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]
    order = rng.permutation(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def shard(indices: list, rank: int, world_size: int) -> list:
    """This rank's part of a global batch."""
    return indices[rank::world_size]


def first_target(item: Encoded, image_tokens: int) -> float:
    """The position of the first supervised token once each image is spliced in (`collate`)."""
    labels = np.asarray(item.labels)
    supervised = np.flatnonzero(labels != IGNORE_INDEX)
    if supervised.size == 0:
        return math.inf  # nothing to learn: past any length
    first = int(supervised[0])
    images = int((np.asarray(item.ids[:first]) == IMAGE_TOKEN_INDEX).sum())
    return first + images * (image_tokens - 1)


def collate(encoded: list, image_tokens: int, max_length: Optional[int], pad_id: int = 0, names=None) -> Batch:
    """Splice, truncate and right-pad encoded samples into one Batch (numpy; see `Batch.as_mx`)."""
    rows_tokens, rows_images, rows_labels, pixels = [], [], [], []
    image_count = 0
    for item in encoded:
        ids = np.asarray(item.ids, dtype=np.int64)
        is_image = ids == IMAGE_TOKEN_INDEX
        tokens, image_rows = image_layout(ids, image_tokens, pad_id)
        row_labels, _ = image_layout(np.where(is_image, ids, item.labels), image_tokens, IGNORE_INDEX)
        image_rows = np.where(image_rows >= 0, image_rows + image_count * image_tokens, -1)
        image_count += int(is_image.sum())
        if item.pixels is not None:
            pixels.append(item.pixels)
        if max_length is not None:
            tokens, image_rows, row_labels = tokens[:max_length], image_rows[:max_length], row_labels[:max_length]
        rows_tokens.append(tokens)
        rows_images.append(image_rows)
        rows_labels.append(row_labels)
    lengths = [len(t) for t in rows_tokens]
    width = max(lengths)
    B = len(encoded)
    tokens = np.full((B, width), pad_id, dtype=np.int32)
    image_rows = np.full((B, width), -1, dtype=np.int32)
    labels = np.full((B, width), IGNORE_INDEX, dtype=np.int64)
    for b in range(B):
        tokens[b, : lengths[b]] = rows_tokens[b]
        image_rows[b, : lengths[b]] = rows_images[b]
        labels[b, : lengths[b]] = rows_labels[b]
    # position p predicts the label at p + 1
    b_idx, p_idx = np.nonzero(labels[:, 1:] != IGNORE_INDEX)
    inputs = (b_idx * width + p_idx).astype(np.int32)
    targets = labels[b_idx, p_idx + 1].astype(np.int32)
    real = np.concatenate([b * width + np.arange(n) for b, n in enumerate(lengths)]).astype(np.int32)
    return Batch(
        tokens=tokens,
        image_rows=image_rows,
        pixels=np.concatenate(pixels) if pixels else None,
        inputs=inputs,
        targets=targets,
        real=real,
        lengths=lengths,
        num_images=image_count,
        names=list(names or []),
    )


class StepLoader:
    """This rank's collated micro-batches of each optimizer step.

    Step s (1-based) takes micro-batches (s - 1) * A to s * A - 1 (A = grad_accumulation_steps) of
    the run's sequence of epochs, each a seeded order of the samples (`epoch_batches`); each
    micro-batch is split across the ranks. With `epochs` the run ends with the last micro-batch
    (the last step may hold fewer); with `iters` the epochs repeat as long as the steps go on.
    """

    def __init__(self, dataset: Dataset, config, image_tokens: int, rank: int = 0, world_size: int = 1):
        self.dataset, self.config, self.image_tokens = dataset, config, image_tokens
        self.rank, self.world_size = rank, world_size
        self.lengths = [s.length for s in dataset.samples]
        self.batches_per_epoch = math.ceil(len(self.lengths) / config.batch_size)
        if config.iters is not None:
            self.total_steps, self.total_micro = config.iters, None
        else:
            self.total_micro = max(1, math.ceil(config.epochs * self.batches_per_epoch))
            self.total_steps = math.ceil(self.total_micro / config.grad_accumulation_steps)
        self._epochs: dict = {}  # only the current epoch's batches
        tokenizer = dataset.processor.tokenizer
        unk = getattr(tokenizer, "unk_token_id", None)
        self.pad_id = unk if unk is not None else 0

    def micro_batch(self, k: int) -> list:
        """The sample indices of micro-batch `k` (0-based, over all ranks)."""
        epoch, j = divmod(k, self.batches_per_epoch)
        if epoch not in self._epochs:
            c = self.config
            self._epochs = {epoch: epoch_batches(self.lengths, c.batch_size, c.seed, epoch, c.sort_by_length)}
        return self._epochs[epoch][j]

    def step_samples(self, step: int) -> list:
        """This rank's sample indices for each micro-batch of optimizer step `step` (1-based)."""
        A = self.config.grad_accumulation_steps
        ks = range((step - 1) * A, step * A)
        if self.total_micro is not None:
            ks = [k for k in ks if k < self.total_micro]
        return [shard(self.micro_batch(k), self.rank, self.world_size) for k in ks]

    def keeps_answers(self, sample: Sample, encoded: Encoded) -> bool:
        """Whether the sample keeps a supervised token within --max-seq-length; one that loses them
        all is a bad sample (a batch with nothing to learn has no loss)."""
        if first_target(encoded, self.image_tokens) < self.config.max_seq_length:
            return True
        limit = self.config.max_seq_length
        self.dataset.reject(sample.index, sample.name, f"its answers all lie past --max-seq-length {limit}")
        self.dataset.check_any_left()
        return False

    def load(self, step: int) -> tuple[list, Optional[DataError]]:
        """(batches, error): the collated micro-batches of `step`; a strict-mode DataError is returned,
        not raised, so that every rank learns of it before any stops."""
        try:
            batches = []
            for indices in self.step_samples(step):
                items = [item for item in self.dataset.load(indices) if self.keeps_answers(*item)]
                if items:
                    encoded, names = [e for _, e in items], [s.name for s, _ in items]
                    batches.append(collate(encoded, self.image_tokens, self.config.max_seq_length, self.pad_id, names))
            return batches, None
        except DataError as e:
            return [], e
