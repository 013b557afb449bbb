"""Where a request's images may come from: data: URIs, http(s) URLs (content type, size, time,
redirects only to http(s)), local files only inside --allow-local-files (symlinks resolved first),
nothing else. Against a local http.server on 127.0.0.1: no real network."""

import io
import os
import time

import numpy as np
import pytest
from cumo_mlx.errors import ImageError
from cumo_mlx.serve.images import ImageFetcher
from PIL import Image
from serving import data_uri, http_site


@pytest.fixture(scope="module")
def picture():
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 34, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def png(picture):
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def trickle(handler):
    for _ in range(10):  # one byte every 0.2 s
        handler.wfile.write(b"x")
        handler.wfile.flush()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def site(png):
    routes = {
        "/image.png": (200, {"Content-Type": "image/png"}, png),
        "/page.html": (200, {"Content-Type": "text/html"}, b"<html></html>"),
        "/to-image": (302, {"Location": "/image.png"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/to-ftp": (301, {"Location": "ftp://127.0.0.1/image.png"}, b""),
        "/big.png": (200, {"Content-Type": "image/png"}, png + b"\0" * 4096),
        "/slow.png": (200, {"Content-Type": "image/png"}, trickle),
    }
    with http_site(routes) as url:
        yield url


@pytest.fixture
def folder(tmp_path, png):
    """An allowed folder with an image, a sub-folder, and symlinks that lead out of it."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    for place in (allowed / "image.png", allowed / "sub" / "image.png", outside / "secret.png"):
        place.write_bytes(png)
    os.symlink(outside / "secret.png", allowed / "escape.png")
    os.symlink(outside, allowed / "door")
    return allowed


def same(image: Image.Image, picture: Image.Image) -> bool:
    return image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(picture))


def test_data_uris(picture):
    fetcher = ImageFetcher()
    assert same(fetcher.fetch(data_uri(picture)), picture)
    assert fetcher.fetch(data_uri(picture, "JPEG")).size == picture.size
    for bad, fragment in [("data:image/png;base64,@@@", "not valid base64"), ("data:text/plain;base64,aGk=", "data:image"),
                          ("data:image/png,raw", "data:image"), ("data:image/png;base64,aGVsbG8=", "cannot read")]:  # fmt: skip
        with pytest.raises(ImageError, match=fragment):
            fetcher.fetch(bad)


def test_http_urls(site, picture):
    fetcher = ImageFetcher(timeout_s=0.5, max_bytes=len(data_uri(picture)))
    assert same(fetcher.fetch(f"{site}/image.png"), picture)
    assert same(fetcher.fetch(f"{site}/to-image"), picture)  # redirects within http(s) are followed
    for path, fragment in [("/page.html", "text/html, not an image"), ("/to-file", "cannot download"), ("/to-ftp", "cannot download"),
                           ("/missing.png", "404"), ("/slow.png", "took over 0.5 s")]:  # fmt: skip
        with pytest.raises(ImageError, match=fragment):
            fetcher.fetch(site + path)
    with pytest.raises(ImageError, match="larger than"):
        ImageFetcher(max_bytes=1024).fetch(f"{site}/big.png")


def test_other_schemes_are_refused(folder):
    fetcher = ImageFetcher(allow_local_files=folder)
    for url in ("ftp://127.0.0.1/image.png", "gopher://127.0.0.1/", "javascript:alert(1)", "jar:file:///x!/y"):
        with pytest.raises(ImageError, match="unsupported image URL scheme"):
            fetcher.fetch(url)


def test_local_files_only_inside_the_allowed_folder(folder, picture):
    fetcher = ImageFetcher(allow_local_files=folder)
    for inside in ("image.png", "sub/image.png", str(folder / "image.png"), f"file://{folder}/sub/image.png", "sub/../image.png"):
        assert same(fetcher.fetch(inside), picture), inside
    for outside in ("escape.png", "door/secret.png", "../outside/secret.png", str(folder.parent / "outside" / "secret.png"),
                    "/etc/passwd", "file:///etc/passwd", f"file://{folder}/../outside/secret.png"):  # fmt: skip
        with pytest.raises(ImageError, match="outside the folder"):
            fetcher.fetch(outside)
    for missing in ("nothing.png", "sub", "bad\0name.png"):
        with pytest.raises(ImageError):
            fetcher.fetch(missing)
    with pytest.raises(ImageError, match="does not read local files"):
        ImageFetcher().fetch(str(folder / "image.png"))


def test_pixel_limit(picture):
    with pytest.raises(ImageError, match="over the limit of 100"):
        ImageFetcher(max_pixels=100).fetch(data_uri(picture))
