"""Fuzzing the parsers of outside data with hypothesis: each either succeeds or raises our own error
(a CuMoError subclass; BadSample for one dataset record), never anything else, and never hangs (every
example has a deadline).

- config parsing: `ModelArgs.from_dict` on any JSON value and on valid configs with fields replaced,
  removed or added; `load_config` on any bytes;
- the LLaVA dataset loader: `read_records` on any bytes, `check_sample` on any JSON value and on
  LLaVA-shaped records with any text, speakers and image entries, and the prompts and label masks of
  the samples that pass (any Unicode text through the tokenizer);
- image preprocessing: any bytes, every PIL mode at random sizes (1 px to extreme aspect ratios) in
  every format that can hold it, and valid files with bytes flipped or cut off;
- the restricted unpickler: any bytes, any picklable data, torch zip checkpoints with bytes flipped
  anywhere, inside the pickle, or cut off (and torch's own weights_only loader on the same files);
  tensors that load are read too;
- safetensors headers with any entries, and with valid entries whose bytes may overlap (refused if they do);
- any path given as a file to read (text, FIFOs, devices, folders): an image read in time, or our error.

Examples are derandomized (the same every run, no database written) and few enough for CI (~15 s).
One-off runs of 1500 random examples per test found the damaged-archive errors and the memory bomb
(a broadcast tensor view) that convert/unpickler.py now refuses.
"""

import io
import json
import math
import os
import pickle
import struct
import sys
import tempfile
from pathlib import Path

import cumo_mlx
import numpy as np
import pytest
import torch
from cumo_mlx.convert import checkpoint
from cumo_mlx.convert.unpickler import load_torch_zip
from cumo_mlx.errors import CuMoError
from cumo_mlx.models.config import ModelArgs, load_config
from cumo_mlx.processor import load_image
from cumo_mlx.train.data import (
    BadSample,
    build_prompt,
    check_sample,
    read_records,
    tokenize_with_labels,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_security import rewrite_torch_zip
from tiny_models import tiny_config

# torch and PIL warn about what a damaged file claims; what matters is the error (or image) that follows.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
    pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning"),
]

FUZZ = settings(
    max_examples=200,
    deadline=5000,  # ms; a hang fails the test
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
SCRATCH = Path(tempfile.mkdtemp(prefix="cumo-fuzz-"))

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=20
)


def scratch_file(data: bytes, name: str = "file") -> Path:
    path = SCRATCH / name
    path.write_bytes(data)
    return path


def ours_or_success(call, *errors):
    """The result of call(), or None when it raised one of our errors; anything else fails the test."""
    try:
        return call()
    except (CuMoError, *errors):
        return None


# ---------------------------------------------------------------------------------------------
# Config parsing
# ---------------------------------------------------------------------------------------------


@FUZZ
@given(json_values)
def test_config_from_any_json(value):
    ours_or_success(lambda: ModelArgs.from_dict(value))


CONFIG = tiny_config()
FIELDS = sorted(CONFIG) + sorted(f"vision_config.{k}" for k in CONFIG["vision_config"]) + ["text_config", "quantization"]


odd_paths = st.sampled_from(["~nobody-here/clip", "x" * 5000, "a\x00b", "../..", "/", "", "openai/clip-vit-large-patch14-336"])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(st.just("<delete>"), odd_paths, json_values)), min_size=1, max_size=4))
def test_config_with_fields_changed(changes):
    config = json.loads(json.dumps(CONFIG))
    for name, value in changes:
        owner, key = (config.get("vision_config"), name.split(".")[1]) if name.startswith("vision_config.") else (config, name)
        if not isinstance(owner, dict):
            continue
        if value == "<delete>":
            owner.pop(key, None)
        else:
            owner[key] = value
    args = ours_or_success(lambda: ModelArgs.from_dict(config))
    if args is not None:  # what parses describes a model whose sizes make sense
        text, vision = args.text_config, args.vision_config
        assert text.hidden_size >= 1 and text.num_attention_heads % text.num_key_value_heads == 0
        assert vision.image_size % vision.patch_size == 0 and len(vision.image_std) == 3


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_load_config_of_any_bytes(data):
    scratch_file(data, "config.json")
    config = ours_or_success(lambda: load_config(SCRATCH))
    assert config is None or isinstance(config, dict)


# ---------------------------------------------------------------------------------------------
# The LLaVA dataset loader
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir():
    folder = SCRATCH / "images"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (5, 3), (1, 2, 3)).save(folder / "a.png")
    return folder


@FUZZ
@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_read_records_of_any_bytes(data):
    records = ours_or_success(lambda: read_records(scratch_file(data, "data.json")))
    assert records is None or (isinstance(records, list) and records)


texts = st.text(max_size=40) | st.sampled_from(["<image>", "<image>\nWhat?", "</s>", "<s>", "[INST]", "\x00", "\ud800"])
turns = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "user", "assistant", "system", 3]), "value": texts})
records = st.fixed_dictionaries(
    {"conversations": st.lists(turns, max_size=5)},
    optional={"id": json_scalars, "image": st.sampled_from(["a.png", "../a.png", "/a.png", "", "nope.png"]) | st.lists(st.sampled_from(["a.png", "..", 3]), max_size=3)},
)


@pytest.fixture(scope="module")
def processor(tiny_mlx_model_dir):
    return cumo_mlx.load(tiny_mlx_model_dir)[1]


@FUZZ
@given(st.one_of(records, json_values), st.sampled_from(["mistral_instruct_system", "plain"]))
def test_any_record_is_a_sample_or_a_bad_sample_and_samples_encode(data_dir, processor, record, template):
    sample = ours_or_success(lambda: check_sample(record, 0, data_dir, template), BadSample)
    if sample is None:
        return
    assert all(data_dir.resolve() in Path(p).resolve().parents for p in sample.images)
    text, spans = build_prompt(sample.turns, template)
    encoded = ours_or_success(lambda: tokenize_with_labels(processor.tokenize, text, spans), BadSample)
    if encoded is not None:
        ids, labels = encoded
        assert len(ids) == len(labels) and ids.count(-200) == len(sample.images)


# ---------------------------------------------------------------------------------------------
# Image preprocessing
# ---------------------------------------------------------------------------------------------


FORMATS = {  # mode -> formats that hold it
    "1": ["PNG", "BMP", "TIFF"], "L": ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"], "LA": ["PNG", "TIFF"],
    "P": ["PNG", "GIF", "BMP", "TIFF"], "RGB": ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"],
    "RGBA": ["PNG", "TIFF", "WEBP"], "CMYK": ["JPEG", "TIFF"], "I;16": ["PNG", "TIFF"], "I": ["TIFF"], "F": ["TIFF"],
    "YCbCr": ["JPEG"], "LAB": ["TIFF"], "HSV": [],
}  # fmt: skip
sizes = st.tuples(st.integers(1, 40), st.integers(1, 40)) | st.tuples(st.integers(1, 3), st.integers(100, 400)) | st.tuples(
    st.integers(100, 400), st.integers(1, 3)
)


def random_image(mode: str, size: tuple, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        return Image.fromarray(rng.integers(0, 65535, size[::-1]).astype(dtype))
    pixels = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    image = Image.frombytes(mode, size, pixels.tobytes()) if mode != "1" else Image.fromarray(pixels[..., 0] > 127)
    return image


@st.composite
def image_files(draw):
    mode = draw(st.sampled_from(sorted(FORMATS)))
    image = random_image(mode, draw(sizes), draw(st.integers(0, 2**32 - 1)))
    buffer = io.BytesIO()
    if FORMATS[mode]:
        image.save(buffer, draw(st.sampled_from(FORMATS[mode])))
        return buffer.getvalue(), None
    return None, image  # a mode no format stores: given as a PIL image


@FUZZ
@given(image_files())
def test_every_mode_and_shape_preprocesses(processor, file):
    data, image = file
    source = image if image is not None else scratch_file(data, "image")
    pixels = processor.preprocess_image(source)
    crop = processor.vision_config.crop_size
    assert pixels.shape == (crop, crop, 3) and pixels.dtype == np.float32 and np.isfinite(pixels).all()


@FUZZ
@given(st.binary(max_size=600))
def test_any_bytes_as_an_image(data):
    ours_or_success(lambda: load_image(scratch_file(data, "image")))


VALID_IMAGES = {}


def valid_image(fmt: str) -> bytes:
    if fmt not in VALID_IMAGES:
        buffer = io.BytesIO()
        random_image("RGB", (23, 17), 0).save(buffer, fmt)
        VALID_IMAGES[fmt] = buffer.getvalue()
    return VALID_IMAGES[fmt]


@FUZZ
@given(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]), st.data())
def test_damaged_image_files(processor, fmt, data):
    raw = bytearray(valid_image(fmt))
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(1, len(raw)))]
    path = scratch_file(bytes(raw), "damaged")
    if ours_or_success(lambda: load_image(path)) is not None:
        assert np.isfinite(processor.preprocess_image(path)).all()


# ---------------------------------------------------------------------------------------------
# The restricted unpickler (and torch's weights_only loader)
# ---------------------------------------------------------------------------------------------


def read_all(path: Path, without_torch: bool) -> None:
    """Read every tensor of a .bin checkpoint; only CheckpointError may come out."""
    saved = sys.modules.get("torch")
    if without_torch:
        sys.modules["torch"] = None
    try:
        entries = ours_or_success(lambda: checkpoint.read_pickle(path))
        for entry in (entries or {}).values():
            data = ours_or_success(entry.read)
            if data is not None:
                assert tuple(data.shape) == tuple(entry.shape)
    finally:
        sys.modules["torch"] = saved


@FUZZ
@given(st.binary(max_size=600))
def test_any_bytes_as_a_checkpoint(data):
    read_all(scratch_file(data, "model.bin"), without_torch=True)


picklable = st.recursive(
    json_scalars | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=15,
)


@FUZZ
@given(picklable, st.integers(0, 5))
def test_any_pickled_data_in_a_torch_archive(value, protocol):
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    path = rewrite_torch_zip(buffer, SCRATCH / "model.bin", "data.pkl", lambda _: pickle.dumps(value, protocol=protocol))
    assert ours_or_success(lambda: load_torch_zip(path)) in (None, {})  # no tensors in there: refused, or empty

STATE = {
    "f32": torch.randn(3, 4),
    "bf16": torch.randn(5).to(torch.bfloat16),
    "view": torch.arange(12.0).reshape(3, 4).t(),
    "i64": torch.arange(4),
}


def torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save(STATE, buffer)
    return buffer.getvalue()


TORCH_ZIP = torch_zip()


@st.composite
def damaged_checkpoints(draw):
    raw = bytearray(TORCH_ZIP)
    where = draw(st.sampled_from(["anywhere", "pickle", "cut"]))
    if where == "cut":
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    if where == "pickle":  # keep the archive valid, damage only data.pkl

        def damage(pkl: bytes) -> bytes:
            pkl = bytearray(pkl)
            for _ in range(draw(st.integers(1, 4))):
                pkl[draw(st.integers(0, len(pkl) - 1))] = draw(st.integers(0, 255))
            return bytes(pkl)

        return rewrite_torch_zip(io.BytesIO(TORCH_ZIP), io.BytesIO(), "data.pkl", damage).getvalue()
    for _ in range(draw(st.integers(1, 8))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@FUZZ
@given(damaged_checkpoints(), st.booleans())
def test_damaged_torch_checkpoints(data, without_torch):
    read_all(scratch_file(data, "model.bin"), without_torch)


# ---------------------------------------------------------------------------------------------
# Safetensors headers
# ---------------------------------------------------------------------------------------------


entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "x"]) | json_scalars,
        "shape": st.lists(st.integers(-2, 6) | st.floats() | st.text(max_size=2), max_size=3) | json_scalars,
        "data_offsets": st.lists(st.integers(-4, 200) | st.floats(), max_size=3) | json_scalars,
    }
)


@FUZZ
@given(st.dictionaries(st.text(max_size=6), entries | json_values, max_size=4) | json_values, st.binary(max_size=200))
def test_safetensors_headers(header, body):
    blob = json.dumps(header).encode()
    path = scratch_file(struct.pack("<Q", len(blob)) + blob + body, "model.safetensors")
    found = ours_or_success(lambda: checkpoint.read_safetensors(path))
    for entry in (found or {}).values():
        assert entry.read().shape == entry.shape and math.prod(entry.shape) >= 0


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 4)), min_size=1, max_size=5))
def test_safetensors_tensors_never_share_bytes(spans):
    """Tensors at any offsets in a 64-byte body: read only when no two of them share a byte."""
    header = {f"t{i}": {"dtype": "F32", "shape": [n], "data_offsets": [4 * at, 4 * (at + n)]} for i, (at, n) in enumerate(spans)}
    blob = json.dumps(header).encode()
    path = scratch_file(struct.pack("<Q", len(blob)) + blob + bytes(64), "model.safetensors")
    found = ours_or_success(lambda: checkpoint.read_safetensors(path))
    words = [set(range(at, at + n)) for at, n in spans]
    overlap = any(a & b for i, a in enumerate(words) for b in words[i + 1 :])
    assert (found is None) == overlap


SPECIAL_PATHS = ["", " ", "/dev/stdin", "/dev/zero", "/dev/null", "/", ".", "~", "/proc/self/fd/0", str(SCRATCH / "fifo")]


@FUZZ
@given(st.sampled_from(SPECIAL_PATHS) | st.text(max_size=30))
def test_any_path_as_an_image_file(path):
    """Any path is read in time (a FIFO or a device would block forever) or refused with our error."""
    if not os.path.exists(SCRATCH / "fifo"):
        os.mkfifo(SCRATCH / "fifo")
    image = ours_or_success(lambda: load_image(path))
    assert image is None or image.mode == "RGB"


# ---------------------------------------------------------------------------------------------
# Generation arguments: prompt ids and options as the Python API takes them
# ---------------------------------------------------------------------------------------------


@FUZZ
@given(st.lists(st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([-200, 0, 1, 399, 400]), json_scalars), max_size=8),
       st.integers(0, 2))  # fmt: skip
def test_any_prompt_ids(processor, ids, num_images):
    """Prompt ids either pass as ints inside the vocabulary (or image placeholders) or are our error."""
    from cumo_mlx.generate import prompt_ids

    vocabulary = processor.args.text_config.vocab_size
    checked = ours_or_success(lambda: prompt_ids(processor, ids, num_images))
    if checked is not None:
        assert all(type(i) is int and (0 <= i < vocabulary or i == -200) for i in checked)
        assert checked == [int(i) for i in ids]


OPTION_FIELDS = ("max_tokens", "temp", "top_p", "min_p", "top_k", "repetition_penalty", "repetition_context_size",
                 "logit_bias", "max_kv_size", "kv_bits", "kv_group_size", "quantized_kv_start", "prefill_step_size")  # fmt: skip


@FUZZ
@given(st.dictionaries(st.sampled_from(OPTION_FIELDS), json_values | st.dictionaries(st.integers(-5, 5), json_scalars), max_size=3))
def test_any_generation_options(values):
    """GenerationOptions of any values is made with ints where counts go and finite numbers where
    numbers go, or raises our error (a float max_tokens generated without bound)."""
    from cumo_mlx.generate import INT_OPTIONS, GenerationOptions

    options = ours_or_success(lambda: GenerationOptions(**values))
    if options is not None:
        for name in INT_OPTIONS:
            value = getattr(options, name)
            assert value is None or (isinstance(value, int) and not isinstance(value, bool))
        assert isinstance(options.temp, (int, float)) and math.isfinite(options.temp)
