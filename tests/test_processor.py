"""Image loading and preprocessing against transformers' CLIPImageProcessor and PIL's own conversions.

The original opens an image with PIL, converts it to RGB, pads it to a square of the mean colour
(`expand2square`), then runs CLIP's image processor. Here the processor is transformers'
`CLIPImageProcessorPil`, built with explicit settings (nothing is downloaded).
"""

import dataclasses
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from cumo_mlx.errors import CuMoError, ImageError
from cumo_mlx.models.config import CLIP_MEAN, CLIP_STD, ModelArgs, VisionConfig
from cumo_mlx.processor import Processor, load_image
from PIL import Image, ImageOps
from tiny_models import TINY_VISION, tiny_config
from transformers.image_utils import PILImageResampling
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

TOL = 1e-4
SIZES = [  # (width, height): 1x1, tiny, 1:2 .. 2:1, odd sizes, large
    (1, 1), (1, 2), (2, 1), (3, 7), (7, 3), (16, 16), (17, 9), (100, 200), (200, 100),
    (336, 336), (337, 335), (500, 375), (375, 500), (640, 480), (2000, 1000), (1200, 2400),
]


def make_processor(vision: dict, aspect: str = "pad") -> Processor:
    config = tiny_config()
    config.update(vision_config=vision, mm_hidden_size=vision["hidden_size"], image_aspect_ratio=aspect)
    return Processor(None, ModelArgs.from_dict(config))


PROCESSORS = {
    "clip-336": dataclasses.asdict(VisionConfig()),  # openai/clip-vit-large-patch14-336
    "tiny": dict(TINY_VISION, shortest_edge=20, crop_size=16),  # resize to 20, crop 16
}


def hf_processor(vision: dict) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": vision["shortest_edge"]},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": vision["crop_size"], "width": vision["crop_size"]},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def expand2square(image: Image.Image, background: tuple) -> Image.Image:
    """The original's `pad`, as written in LLaVA/CuMo."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise on top of gradients, so resampling and cropping errors show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) * 127 / max(width + height, 1)], -1)
    pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def expected_pixels(image: Image.Image, vision: dict, pad: bool = True) -> np.ndarray:
    if pad:
        image = expand2square(image, tuple(int(m * 255) for m in CLIP_MEAN))
    out = hf_processor(vision)(images=image, return_tensors="np")["pixel_values"][0]
    return out.transpose(1, 2, 0)  # CHW -> HWC, our layout


def test_pad_colour():
    assert make_processor(PROCESSORS["clip-336"]).pad_color == (122, 116, 104)


@pytest.mark.parametrize("name", PROCESSORS)
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_matches_clip_image_processor(name, size):
    vision = PROCESSORS[name]
    image = random_image(*size, seed=size[0] * 7 + size[1])
    got = make_processor(vision).preprocess_image(image)
    want = expected_pixels(image, vision)
    assert got.shape == (vision["crop_size"], vision["crop_size"], 3) and got.dtype == np.float32
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("size", [(1, 2), (2, 1), (17, 9), (100, 200), (640, 480), (1200, 2400)])
def test_square_mode_matches_without_pad(size):
    """image_aspect_ratio "square": no padding, the shortest-edge resize and centre crop alone."""
    vision = PROCESSORS["tiny"]
    image = random_image(*size, seed=1)
    got = make_processor(vision, aspect="square").preprocess_image(image)
    assert np.abs(got - expected_pixels(image, vision, pad=False)).max() <= TOL


def test_preprocess_images_batch(tmp_path):
    vision = PROCESSORS["tiny"]
    images = [random_image(30, 20, 1), random_image(20, 30, 2)]
    images[1].save(tmp_path / "b.png")
    batch = make_processor(vision).preprocess_images([images[0], tmp_path / "b.png"])
    assert batch.shape == (2, 16, 16, 3)
    for got, image in zip(np.array(batch), images):
        assert np.abs(got - expected_pixels(image, vision)).max() <= TOL


# ---------------------------------------------------------------- loading: modes and EXIF


def rgb_of(image: Image.Image) -> np.ndarray:
    loaded = load_image(image)
    assert loaded.mode == "RGB"
    return np.asarray(loaded)


@pytest.mark.parametrize(
    "orientation, transform",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored rotated: display turned 90 degrees clockwise
        (8, lambda a: np.rot90(a, 1)),
    ],
)
@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_exif_orientation_applied(tmp_path, orientation, transform, fmt):
    path = tmp_path / f"o{orientation}.{fmt}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    random_image(40, 24, seed=orientation).save(path, exif=exif)
    with Image.open(path) as stored:
        stored_pixels = np.asarray(stored.convert("RGB"))  # as decoded, before orientation
        documented = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    got = rgb_of(path)
    assert got.shape == documented.shape and np.array_equal(got, documented)
    assert np.array_equal(got, transform(stored_pixels))
    if orientation in (6, 8):
        assert got.shape[:2] == (40, 24)


def test_exif_orientation_of_a_pil_image():
    image = random_image(10, 6)
    image.getexif()[0x0112] = 6
    got = rgb_of(image)
    assert got.shape == (10, 6, 3) and np.array_equal(got, np.rot90(np.asarray(image), -1))


def save_and_check(tmp_path, image: Image.Image, name: str, **save) -> np.ndarray:
    path = tmp_path / name
    image.save(path, **save)
    with Image.open(path) as reopened:
        documented = np.asarray(reopened.convert("RGB"))  # the original: Image.open(f).convert("RGB")
    got = rgb_of(path)
    assert np.array_equal(got, documented)
    return got


def test_rgba_drops_alpha(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 9, 4), dtype=np.uint8)
    got = save_and_check(tmp_path, Image.fromarray(pixels, "RGBA"), "a.png")
    assert np.array_equal(got, pixels[..., :3])  # alpha dropped, not composited


def test_grayscale(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (12, 9), dtype=np.uint8)
    got = save_and_check(tmp_path, Image.fromarray(pixels, "L"), "l.png")
    assert np.array_equal(got, np.repeat(pixels[..., None], 3, axis=-1))


def test_grayscale_alpha(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (5, 4, 2), dtype=np.uint8), "LA")
    save_and_check(tmp_path, image, "la.png")


def test_palette(tmp_path):
    image = random_image(13, 11).quantize(colors=16)
    assert image.mode == "P"
    got = save_and_check(tmp_path, image, "p.png")
    palette = np.array(image.getpalette()[: 16 * 3], dtype=np.uint8).reshape(-1, 3)
    assert np.array_equal(got, palette[np.asarray(image)])


def test_palette_with_transparency(tmp_path):
    image = random_image(13, 11).quantize(colors=8)
    save_and_check(tmp_path, image, "pt.png", transparency=0)
    save_and_check(tmp_path, image, "pt.gif", transparency=0)


def test_cmyk(tmp_path):
    image = random_image(10, 8).convert("CMYK")
    save_and_check(tmp_path, image, "c.jpg", quality=95)
    save_and_check(tmp_path, image, "c.tiff")


def test_16bit_grayscale_png(tmp_path):
    """16-bit grayscale is scaled to 8 bits (value / 257, rounded); PIL's own convert would clip at 255."""
    values = np.random.default_rng(2).integers(0, 65536, (9, 7)).astype(np.uint16)
    values[0, :3] = [0, 65535, 257 * 100]
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")
    got = rgb_of(path)
    want = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(got, np.repeat(want[..., None], 3, axis=-1))
    assert got[0, :3, 0].tolist() == [0, 255, 100]


def write_png_rgb16(path: Path, values: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)."""
    height, width, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_rgb_png(tmp_path):
    values = np.random.default_rng(3).integers(0, 65536, (6, 5, 3)).astype(np.uint16)
    path = tmp_path / "rgb16.png"
    write_png_rgb16(path, values)
    with Image.open(path) as stored:
        documented = np.asarray(stored.convert("RGB"))
    got = rgb_of(path)
    assert np.array_equal(got, documented)
    assert np.abs(got.astype(int) - values / 257.0).max() <= 1.0  # 8-bit version of the same picture


def test_animated_gif_first_frame(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 6), c) for c in colours]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as stored:
        assert getattr(stored, "n_frames", 1) == 3
    got = rgb_of(path)
    assert got.shape == (6, 8, 3) and (got == np.array(colours[0], dtype=np.uint8)).all()


def test_pil_image_input_is_converted():
    image = Image.fromarray(np.full((4, 5), 77, dtype=np.uint8), "L")
    got = rgb_of(image)
    assert got.shape == (4, 5, 3) and (got == 77).all()


# ---------------------------------------------------------------- unreadable images


def check_error(source, *words: str) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(source)
    message = str(caught.value)
    assert isinstance(caught.value, CuMoError) and caught.value.fix  # says what to do
    for word in words:
        assert word in message, message
    return message


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    check_error(path, str(path), "cannot read", "as an image")


def test_truncated_png(tmp_path):
    path = tmp_path / "full.png"
    random_image(64, 64).save(path)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    check_error(truncated, str(truncated), "cannot read")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    check_error(path, str(path))


def test_missing_path(tmp_path):
    check_error(tmp_path / "nope.png", "not found", "nope.png")


def test_directory(tmp_path):
    check_error(tmp_path, "directory", str(tmp_path))


@pytest.mark.parametrize("size", [(40, 40), (100, 100)])  # over the limit (a warning in PIL), over twice it (an error)
def test_decompression_bomb(tmp_path, monkeypatch, size):
    path = tmp_path / "bomb.png"
    Image.new("RGB", size, (1, 2, 3)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    check_error(path, "too large", str(path))


def test_unsupported_url_scheme():
    check_error("ftp://example.com/a.png", "unsupported")
