"""Images and prompts to model inputs, exactly as the original prepares them.

Images: any PIL-readable file or an http(s) URL, EXIF orientation applied, RGB; `pad` pastes the
image centred on a square of the mean colour; then CLIP's processor (shortest edge resize with
PIL bicubic, centre crop, rescale, normalise), in numpy, channels last.

Prompts: split at `<image>`, each piece tokenized with BOS, a placeholder id between pieces, and
the leading BOS kept once; the template's literal `<s>` therefore gives the original's `[1, 1, ...]`.
With a SentencePiece `tokenizer.model` the pieces are tokenized as the original's slow tokenizer does.
"""

import io
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import BinaryIO, Optional, Union

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps

from .errors import CuMoError, ImageError
from .models.config import ModelArgs, VisionConfig
from .paths import regular_file
from .prompt import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

URL_TIMEOUT_S = 20
URL_MAX_BYTES = 50 * 1024 * 1024
IMAGE_MAX_BYTES = 1 << 30  # a local file; its pixels are bounded apart (PIL's decompression bomb limit)

ImageSource = Union[str, Path, Image.Image]


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Redirects stay on http(s) (urllib's own rule also follows them to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.URLError(f"redirected to {newurl}, which is not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open_url(url: str) -> bytes:
    """The bytes at an http(s) URL: at most URL_MAX_BYTES, within URL_TIMEOUT_S in all (not per read)."""
    too_large = ImageError(f"image at {url} is larger than {URL_MAX_BYTES >> 20} MB", "download and shrink it first")
    deadline = time.monotonic() + URL_TIMEOUT_S
    data = bytearray()
    try:
        with urllib.request.build_opener(_HttpRedirectsOnly).open(url, timeout=URL_TIMEOUT_S) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > URL_MAX_BYTES:
                raise too_large
            while len(data) <= URL_MAX_BYTES and (chunk := response.read1(1 << 16)):
                data += chunk
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the download took over {URL_TIMEOUT_S} s")
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"cannot download image {url}: {e}", "check the URL and your network") from None
    if len(data) > URL_MAX_BYTES:
        raise too_large
    return bytes(data)


def check_text(text: str) -> str:
    """`text` if it is valid Unicode; undecodable input bytes (read as lone surrogates) crash tokenizers."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CuMoError("the text is not valid UTF-8 (it holds undecodable bytes)", "give UTF-8 text") from None
    return text


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale scaled to 8 bits (PIL's own conversion would clip them at 255)."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        array = array * 255.0 if array.max() <= 1.0 else array
    else:
        array = array / 257.0  # 0..65535 -> 0..255
    return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), mode="L")


def _oriented_rgb(image: Image.Image) -> Image.Image:
    if image.width < 1 or image.height < 1:
        raise ImageError("the image is empty", "give a non-empty image")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:
        pass  # a broken EXIF block: keep the pixels as stored
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = _to_8bit(image)
    return image.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
    """An RGB PIL image from a path, an http(s) URL, or a PIL image, with EXIF orientation applied."""
    if isinstance(source, Image.Image):
        return _oriented_rgb(source)
    name = str(source)
    if name.startswith(("http://", "https://")):
        data = io.BytesIO(_open_url(name))
    elif "://" in name:
        raise ImageError(f"unsupported image URL scheme in {name}", "use a file path or an http(s) URL")
    else:
        path = os.path.expanduser(name)  # (Path.expanduser raises for "~nobody")
        if path and not os.path.exists(path):  # (False for a name too long to be a path, where Path.exists raises)
            raise ImageError(f"image file not found: {name}", "check the path")
        data = regular_file(path, "image", IMAGE_MAX_BYTES, ImageError)
    return decode_image(data, name)


def decode_image(data: BinaryIO, name: str, max_pixels: Optional[int] = None) -> Image.Image:
    """An RGB PIL image from an image file's bytes (`name` says which in errors), EXIF orientation
    applied; ImageError if it cannot be read, or has over `max_pixels` (checked before decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(data) as opened:  # closed here: multi-frame files (GIF) keep it open otherwise
                if max_pixels is not None and opened.width * opened.height > max_pixels:
                    size = f"{opened.width}x{opened.height}"
                    raise ImageError(f"{name} is {size} pixels, over the limit of {max_pixels}", "send a smaller image")
                opened.load()
                return _oriented_rgb(opened)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels)", "resize it first") from None
    except PermissionError:
        raise ImageError(f"cannot read {name}: permission denied", "check its permissions") from None
    except Exception as e:  # not an image, truncated, unsupported
        raise ImageError(f"cannot read {name} as an image ({type(e).__name__})", "give a PNG, JPEG or other image file") from None


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Paste the image centred on a square canvas of `background` (the original's `pad`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def clip_preprocess(image: Image.Image, config: VisionConfig) -> np.ndarray:
    """CLIP image processing: [crop, crop, 3] float32, as transformers' CLIPImageProcessor does it."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    pixels = np.asarray(image.resize(size, Image.BICUBIC))
    crop = config.crop_size
    top, left = (pixels.shape[0] - crop) // 2, (pixels.shape[1] - crop) // 2
    pixels = pixels[top : top + crop, left : left + crop]
    pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(config.image_mean, dtype=np.float32)
    std = np.array(config.image_std, dtype=np.float32)
    return (pixels - mean) / std


class SlowLlamaEncoder:
    """Ids as the original's tokenizer gives them: transformers' slow `LlamaTokenizer` (it loads the
    tokenizer with use_fast=False) on the checkpoint's SentencePiece `tokenizer.model`.

    transformers 5 has only the tokenizers-based LlamaTokenizer, whose Metaspace step adds no "▁"
    to text that already starts with a space, e.g. the piece after `<image>` or `</s>` in
    "<image> What is it?": one id fewer than the original there. This follows the slow one: split
    at the added tokens (`<s>`, `</s>`, ...), SentencePiece on the text between them; with
    `legacy` False the dummy prefix only starts the whole text.
    """

    def __init__(self, model_file: Path, special_tokens: dict, unk_token: str, bos_id: Optional[int],
                 eos_id: Optional[int] = None, legacy: bool = True):
        import sentencepiece as spm

        proto = Path(model_file).read_bytes()
        if not legacy:  # like the slow tokenizer: no dummy prefix from SentencePiece, "▁" added by hand
            from sentencepiece import sentencepiece_model_pb2

            model = sentencepiece_model_pb2.ModelProto()
            model.ParseFromString(proto)
            model.normalizer_spec.add_dummy_prefix = False
            proto = model.SerializeToString()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.special_tokens = dict(special_tokens)
        self.unk_token = unk_token
        self.unk_length = len(self.sp.encode(unk_token))
        self.bos_id, self.eos_id, self.legacy = bos_id, eos_id, legacy
        names = sorted(self.special_tokens, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def _encode_text(self, text: str) -> list[int]:
        if self.legacy or not text.startswith(("\u2581", " ")):
            return self.sp.encode(text)
        ids = self.sp.encode(self.unk_token + text)  # keeps the leading "▁" SentencePiece would drop
        return ids[self.unk_length :] if len(ids) >= self.unk_length else ids

    def encode(self, text: str) -> list[int]:
        if not self.legacy and text:
            text = "\u2581" + text.replace("\u2581", " ")
        pieces = [p for p in (self.split.split(text) if self.split else [text]) if p]
        if not self.legacy and len(pieces) > 1 and pieces[0] == "\u2581" and pieces[1] in self.special_tokens:
            pieces = pieces[1:]
        ids = [] if self.bos_id is None else [self.bos_id]
        for piece in pieces:
            ids += [self.special_tokens[piece]] if piece in self.special_tokens else self._encode_text(piece)
        return ids if self.eos_id is None else ids + [self.eos_id]


class Processor:
    """Turns images and prompt text into the model's inputs; holds the tokenizer (mlx-lm's wrapper)."""

    def __init__(self, tokenizer, args: ModelArgs, encoder: Optional[SlowLlamaEncoder] = None):
        self.tokenizer = tokenizer
        self.args = args
        self.vision_config = args.vision_config
        self.encoder = encoder  # the original's slow tokenizer when there is a tokenizer.model

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with the tokenizer's BOS, as the original's tokenizer gives them."""
        return self.encoder.encode(text) if self.encoder is not None else self.tokenizer.encode(text)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.vision_config.image_mean)

    def preprocess_image(self, image: ImageSource) -> np.ndarray:
        image = load_image(image)
        if self.args.image_aspect_ratio == "pad":
            image = expand_to_square(image, self.pad_color)
        return clip_preprocess(image, self.vision_config)

    def preprocess_images(self, images: list[ImageSource]) -> mx.array:
        """[n, S, S, 3] pixel values for the vision tower."""
        return mx.array(np.stack([self.preprocess_image(image) for image in images]))

    def tokenize(self, prompt: str) -> list[int]:
        """Prompt ids with IMAGE_TOKEN_INDEX where each `<image>` stands (the original's splice)."""
        bos = self.tokenizer.bos_token_id
        chunks = [self.encode(chunk) for chunk in check_text(prompt).split(IMAGE_PLACEHOLDER)]
        skip = 1 if chunks[0] and chunks[0][0] == bos else 0
        ids = [bos] if skip else []
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[skip:])
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i >= 0])
