"""The images of a request: `data:` URIs, http(s) URLs, and local files only where allowed.

Every source is read whole into memory (at most `max_bytes`) and decoded here, before the request
is queued, so a bad image is a 400 and the generation thread never waits on the network:
- `data:image/...;base64,...` URIs;
- http(s) URLs: within `timeout_s` in all, an `image/*` content type, redirects only to http(s);
- file paths and `file://` URLs only when the server was given a folder (`--allow-local-files`):
  relative paths are taken in it, and the real path (symlinks resolved) must lie inside it.
Any other scheme is refused. An image over `max_pixels` is refused before it is decoded.
"""

import base64
import binascii
import io
import os
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image

from ..errors import ImageError
from ..paths import inside
from ..processor import _HttpRedirectsOnly, decode_image


@dataclass(frozen=True)
class ImageFetcher:
    allow_local_files: Optional[Path] = None
    max_bytes: int = 20 << 20
    max_pixels: int = 50_000_000
    timeout_s: float = 20.0

    def fetch(self, url: str) -> Image.Image:
        """The RGB image (EXIF orientation applied) at `url`; ImageError if it cannot be used."""
        try:
            scheme = urllib.parse.urlsplit(url).scheme.lower()
        except ValueError:
            raise ImageError(f"{shorten(url)} is not a valid URL", "give a data: URI or an http(s) URL") from None
        if scheme == "data":
            data, name = self._data_uri(url), "the data: URI"
        elif scheme in ("http", "https"):
            data, name = self._download(url), shorten(url)
        elif scheme in ("file", ""):
            data, name = self._local_file(url), shorten(url)
        else:
            raise ImageError(f"unsupported image URL scheme {scheme!r}", "give a data: URI or an http(s) URL")
        return decode_image(io.BytesIO(data), name, self.max_pixels)

    def _data_uri(self, url: str) -> bytes:
        header, comma, payload = url.partition(",")
        media = header[5:].split(";")
        if not comma or not media[0].lower().startswith("image/") or "base64" not in media[1:]:
            raise ImageError("a data: URI must be data:image/<type>;base64,<data>", "encode the image in base64")
        if len(payload) > self.max_bytes * 4 // 3 + 4:
            raise ImageError(f"the data: URI holds over {self.max_bytes >> 20} MB", "send a smaller image")
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data: URI is not valid base64", "encode the image in base64") from None

    def _download(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        try:
            with urllib.request.build_opener(_HttpRedirectsOnly).open(url, timeout=self.timeout_s) as response:
                kind = response.headers.get_content_type()
                if not kind.startswith("image/"):
                    raise ImageError(f"{shorten(url)} is {kind}, not an image", "give the URL of the image itself")
                return self._read(response, shorten(url), deadline)
        except ImageError:
            raise
        except Exception as e:  # refused, unreachable, HTTP error, a redirect to another scheme, timeout
            raise ImageError(f"cannot download image {shorten(url)}: {e}", "check the URL") from None

    def _read(self, stream, name: str, deadline: float = float("inf")) -> bytes:
        data = bytearray()
        while len(data) <= self.max_bytes and (chunk := stream.read1(1 << 16)):
            data += chunk
            if time.monotonic() > deadline:
                raise ImageError(f"downloading {name} took over {self.timeout_s:g} s", "give a faster source")
        if len(data) > self.max_bytes:
            raise ImageError(f"{name} is larger than {self.max_bytes >> 20} MB", "send a smaller image")
        return bytes(data)

    def _local_file(self, url: str) -> bytes:
        if self.allow_local_files is None:
            raise ImageError("this server does not read local files", "send the image as a data: URI or an http(s) URL")
        name = shorten(url)
        try:
            path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url[:5].lower() == "file:" else url
            real = inside(self.allow_local_files, path)
        except ValueError:  # a NUL byte
            raise ImageError(f"{name} is not a valid path", "check the path") from None
        if real is None:
            raise ImageError(f"{name} is outside the folder this server may read", "put the image in that folder")
        if not os.path.isfile(real):
            raise ImageError(f"image file not found: {name}", "check the path")
        try:
            with open(real, "rb") as f:
                return self._read(f, name)
        except OSError as e:
            raise ImageError(f"cannot read {name}: {e.strerror}", "check the file") from None


def shorten(url: str, limit: int = 120) -> str:
    """`url` for a message: never the whole of a long one."""
    return url if len(url) <= limit else url[: limit - 3] + "..."
