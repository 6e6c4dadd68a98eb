"""Decoding odd and broken images: every kind is generated here with Pillow, nothing is downloaded."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import corrupt_tiff, edited_tiff, noise, png_header_only
from PIL import Image, ImageFile

from show_attend_tell.errors import InputError, TooManyPixelsError
from show_attend_tell.images import ORIGINAL_SIZE, iter_image_paths, load_image

WHITE = (255, 255, 255)
# A CMYK press profile shipped by Debian's libgs-common; the ICC test is skipped without it.
SYSTEM_CMYK_PROFILE = Path("/usr/share/color/icc/ghostscript/default_cmyk.icc")  # SWOP press profile


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _error(source, **options) -> str:
    with pytest.raises(InputError) as caught:
        load_image(source, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


# Odd but valid images.


def test_rgb_round_trip_and_fully_decoded(tmp_path):
    original = noise(31, 17)
    image = load_image(_save(original, tmp_path / "noise.png"))
    assert image.mode == "RGB" and image.size == (31, 17)
    assert np.array_equal(np.asarray(image), np.asarray(original))
    assert not isinstance(image, ImageFile.ImageFile)  # detached from the (closed) file


def test_greyscale_and_one_bit(tmp_path):
    grey = load_image(_save(Image.new("L", (3, 2), 100), tmp_path / "grey.png"))
    assert grey.mode == "RGB" and grey.getpixel((1, 1)) == (100, 100, 100)

    bits = Image.new("1", (4, 4), 0)
    bits.putpixel((2, 3), 1)
    image = load_image(_save(bits, tmp_path / "bits.png"))
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert image.getpixel((2, 3)) == WHITE and image.getpixel((0, 0)) == (0, 0, 0)


def test_grey_with_alpha_is_composited_on_white(tmp_path):
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    image = load_image(_save(la, tmp_path / "la.png"))
    assert image.getpixel((0, 0)) == WHITE  # transparent black shows the background
    assert image.getpixel((1, 0)) == (0, 0, 0)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (255, 0, 0, 128)])
    image = load_image(_save(rgba, tmp_path / "rgba.png"))
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == (0, 0, 255)
    red, green, blue = image.getpixel((2, 0))
    assert red == 255 and abs(green - 127) <= 1 and green == blue


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 0, 200, 0])  # entry 0 black (made transparent), entry 1 green
    palette.putpixel((1, 1), 1)
    path = _save(palette, tmp_path / "palette.png", transparency=0)
    assert Image.open(path).mode == "P"
    image = load_image(path)
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 1)) == (0, 200, 0)


def test_cmyk_jpeg_without_profile(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    red, green, blue = load_image(path).getpixel((8, 8))
    assert red >= 250 and green <= 5 and blue <= 5


def test_cmyk_jpeg_with_broken_profile_falls_back(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", icc_profile=b"not a profile")
    red, green, blue = load_image(path).getpixel((8, 8))
    assert red >= 250 and green <= 5 and blue <= 5


@pytest.mark.skipif(not SYSTEM_CMYK_PROFILE.is_file(), reason=f"no CMYK ICC profile at {SYSTEM_CMYK_PROFILE}")
def test_cmyk_jpeg_uses_embedded_profile(tmp_path):
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    path = _save(cyan, tmp_path / "cyan.jpg", quality=95, icc_profile=SYSTEM_CMYK_PROFILE.read_bytes())
    red, green, blue = load_image(path).getpixel((8, 8))
    assert cyan.convert("RGB").getpixel((8, 8)) == (0, 255, 255)  # the naive formula: neon cyan
    assert red < 60 and 120 < green < 230 and blue > 200  # process cyan is a muted sky blue in sRGB


def _gradient_16bit() -> np.ndarray:
    return np.linspace(0, 65535, 300).round().astype(np.uint16)[None, :].repeat(3, axis=0)


def test_sixteen_bit_png_gradient_is_scaled_not_clipped(tmp_path):
    values = _gradient_16bit()
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_image(path))
    expected = np.round(values / 257).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected)
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    assert (pixels[0, :, 0] == 255).sum() == 1 and pixels[0, 150, 0] == 128


def test_thirty_two_bit_image_object_is_scaled_as_sixteen_bit():
    values = _gradient_16bit().astype(np.int32)
    image = Image.fromarray(values)
    assert image.mode == "I"
    pixels = np.asarray(load_image(image))
    assert np.array_equal(pixels[..., 1], np.round(values / 257).astype(np.uint8))


def test_sixteen_bit_colour_key_transparency(tmp_path):
    values = np.array([[1000, 1001, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "keyed.png", transparency=1000)
    image = load_image(path)
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == (4, 4, 4)  # 1001 / 257, a neighbour of the key stays opaque


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(stored, tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == (20, 40)
    red, green, blue = image.getpixel((15, 4))  # the marked corner is now top-right
    assert red > 200 and blue < 60
    red, green, blue = image.getpixel((4, 4))
    assert blue > 200 and red < 60


def test_tiny_image(tmp_path):
    image = load_image(_save(Image.new("RGB", (1, 1), (10, 20, 30)), tmp_path / "dot.png"))
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (10, 20, 30)


def test_large_image(tmp_path):
    large = Image.new("RGB", (6000, 4000), (10, 20, 30))
    large.putpixel((5999, 3999), (200, 100, 0))
    image = load_image(_save(large, tmp_path / "large.png", compress_level=1))
    assert image.size == (6000, 4000)
    assert image.getpixel((5999, 3999)) == (200, 100, 0) and image.getpixel((0, 0)) == (10, 20, 30)


def test_bytes_and_image_objects():
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), (1, 2, 3)).save(buffer, "PNG")
    assert load_image(buffer.getvalue()).getpixel((4, 3)) == (1, 2, 3)

    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    image = load_image(rgba)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == WHITE
    assert rgba.mode == "RGBA"  # the caller's image is not modified


# Broken files: one line naming the file and what is wrong.


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    message = _error(path)
    assert str(path) in message and "empty file" in message
    assert _error(b"", name="upload.jpg") == "upload.jpg: empty file (0 bytes)"


def test_text_file_renamed(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")
    message = _error(path)
    assert str(path) in message and "not an image" in message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    buffer = io.BytesIO()
    noise(64, 64).save(buffer, fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    message = _error(path)
    assert str(path) in message and "truncated" in message
    assert "truncated" in _error(data[: len(data) // 2], name="upload")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_beyond_pillows_limit(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    assert path.stat().st_size < 200
    message = _error(path)
    assert str(path) in message and "too large" in message


def test_explicit_pixel_limit_is_checked_before_decoding(tmp_path):
    # 81 megapixels: under Pillow's own limits, over ours. Decoding this file would fail as truncated,
    # so a "too large" message shows the header check came first.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(9000, 9000))
    message = _error(path)
    assert str(path) in message and "too large" in message and "9000x9000" in message

    small = _save(Image.new("RGB", (20, 10)), tmp_path / "small.png")
    assert "too large" in _error(small, max_pixels=199)
    assert load_image(small, max_pixels=200).size == (20, 10)


def test_directory_and_missing_path(tmp_path):
    message = _error(tmp_path)
    assert str(tmp_path) in message and "directory" in message
    missing = tmp_path / "gone.jpg"
    message = _error(missing)
    assert str(missing) in message and "no such file" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "secret.png")
    path.chmod(0)
    message = _error(path)
    assert str(path) in message and "permission denied" in message


def test_unsupported_format_is_refused(tmp_path):
    # Pillow can open EPS (through Ghostscript); the whitelist keeps it out.
    path = tmp_path / "figure.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert "not an image" in _error(path)


# Expanding inputs.


def test_iter_image_paths(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ["b.PNG", "a.jpg", "notes.txt", ".hidden.jpg", "c.JPEG"]:
        (folder / name).write_bytes(b"x")
    (folder / "nested").mkdir()
    (folder / "nested" / "d.jpg").write_bytes(b"x")
    extra = tmp_path / "extra.dat"
    extra.write_bytes(b"x")

    paths = iter_image_paths([folder, str(extra), folder / "a.jpg"])
    assert paths == [folder / "a.jpg", folder / "b.PNG", folder / "c.JPEG", extra]


def test_iter_image_paths_errors(tmp_path):
    with pytest.raises(InputError, match="gone: no such file or folder"):
        iter_image_paths([tmp_path / "gone"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: folder has no images"):
        iter_image_paths([tmp_path / "empty"])


# Hostile files (issue 14): whatever Pillow raises is the file's InputError; big photos cost one small decode.


def test_an_exception_of_any_type_inside_pillow_is_the_files_error(tmp_path):
    data = corrupt_tiff()
    with pytest.raises(TypeError):  # what Pillow itself does with it
        Image.open(io.BytesIO(data)).load()
    path = tmp_path / "bad.tif"
    path.write_bytes(data)
    for source in (path, data):
        message = _error(source, name="bad.tif")
        assert message.startswith("bad.tif: truncated or corrupt image data")
    assert "corrupt" in _error(path, size=64)


def test_the_default_pixel_budget_refuses_a_small_file_that_declares_a_huge_photo(tmp_path):
    from show_attend_tell.images import DEFAULT_MAX_PIXELS, image_header

    # Pillow warns from MAX_IMAGE_PIXELS (89 MP) and refuses from twice that
    assert DEFAULT_MAX_PIXELS <= Image.MAX_IMAGE_PIXELS // 2
    data = png_header_only(7900, 7900)
    with pytest.raises(TooManyPixelsError, match="7900x7900 is 62.4 megapixels"):
        load_image(data, name="huge.png")
    with pytest.raises(TooManyPixelsError, match="huge.png: .*7900x7900"):
        image_header(data, name="huge.png")
    assert image_header(png_header_only(7900, 7900), max_pixels=10**8) == (7900, 7900)
    with pytest.raises(InputError, match="not an image"):
        image_header(b"GIF89a? no", name="x")


def test_a_fifo_or_a_symlink_loop_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    # Opening the FIFO would block until a writer came: a hang here fails the test through its alarm.
    with _alarm(10):
        assert "FIFO" in _error(fifo) and "not opened" in _error(fifo)
        assert "loop.jpg" in _error(loop) and "symbolic links" in _error(loop)
        good = _save(Image.new("RGB", (4, 4)), tmp_path / "good.png")
        problems: list[str] = []
        paths = iter_image_paths([fifo, loop, tmp_path / "gone.jpg", good, tmp_path], problems)
    assert paths == [good]  # the folder's FIFO and loop are skipped too: they are not regular files
    assert len(problems) == 5
    assert "pipe.jpg: a FIFO" in problems[0] and "loop.jpg" in problems[1] and "gone.jpg" in problems[2]
    # and said, not left out silently (sat caption then exits 1)
    assert (
        problems[3].startswith(f"{loop}: ")
        and problems[4] == f"{fifo}: a FIFO (named pipe), not a regular file: not opened"
    )
    assert iter_image_paths([tmp_path]) == [good]  # the library's own listing skips them


class _alarm:
    """Fail a test that blocks longer than `seconds` (SIGALRM; the main thread only)."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self):
        import signal

        def timeout(signum, frame):
            raise TimeoutError(f"blocked for more than {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, timeout)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def _resized(image: Image.Image, side: int) -> np.ndarray:
    return np.asarray(image.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.float64)


@pytest.mark.parametrize(
    "mode, fmt",
    [("RGB", "JPEG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("P", "GIF"), ("L", "TIFF"), ("CMYK", "JPEG")],
)
def test_decoding_for_the_model_shrinks_large_photos_and_looks_the_same(tmp_path, mode, fmt):
    side = 64
    width, height = 1400, 700  # at least 4x the 2 x 64 px kept: shrunk by 10 and 5 while decoded
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
    photo = Image.fromarray(smooth).resize((width, height), Image.Resampling.BICUBIC)
    if mode == "I;16":
        grey = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
        photo = Image.fromarray(grey)
    elif mode == "RGBA":
        photo = photo.convert("RGBA")
        photo.putalpha(Image.linear_gradient("L").resize((width, height)))
    else:
        photo = photo.convert(mode)
    path = _save(photo, tmp_path / f"big.{fmt.lower()}")
    full = load_image(path)
    small = load_image(path, size=side)
    assert small.mode == "RGB" and small.info["original_size"] == (width, height) == full.size
    assert 2 * side <= min(small.size) < 4 * side
    assert abs(small.width / small.height - width / height) < 0.05  # the same shape
    difference = np.abs(_resized(full, side) - _resized(small, side))
    assert difference.mean() < 1.0, difference.mean()  # the same picture at the model's size


def test_decoding_for_the_model_turns_the_photo_upright(tmp_path):
    photo = Image.new("RGB", (1200, 400), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 300, 400))  # red on the left as stored
    exif = photo.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red on top
    path = _save(photo, tmp_path / "sideways.jpg", exif=exif)
    small = load_image(path, size=64)
    assert small.info["original_size"] == (400, 1200) and small.height > small.width
    red, _, blue = small.getpixel((small.width // 2, 5))
    assert red > 200 and blue < 60


def test_small_photos_are_decoded_exactly_as_in_full(tmp_path):
    path = _save(noise(120, 90), tmp_path / "small.jpg", quality=90)
    assert np.array_equal(np.asarray(load_image(path, size=64)), np.asarray(load_image(path)))


def test_memory_for_many_large_photos_is_one_photos_decode(tmp_path):
    """Peak memory of decoding 6 flat 4000x4000 RGBA PNGs (64 MB each decoded) for a 64 px model stays near
    one photo's decode; holding them decoded in full would take 6 times as much."""
    import subprocess
    import sys

    for n in range(6):
        Image.new("RGBA", (4000, 4000), (n, 100, 200, 128)).save(tmp_path / f"{n}.png")
    script = f"""
import resource, sys
from pathlib import Path
from show_attend_tell.images import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kept = [load_image(path, size=64) for path in sorted(Path({str(tmp_path)!r}).glob("*.png"))]
print(len(kept), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    count, megabytes = map(int, done.stdout.split())
    assert count == 6 and megabytes < 200, megabytes  # one decode: 64 MB RGBA + a 48 MB flattened copy


def test_a_large_sixteen_bit_photo_with_a_colour_key_is_shrunk_with_its_transparency(tmp_path):
    values = np.full((600, 900), 30_000, dtype=np.uint16)  # grey 117
    values[:, :300] = 4321  # the transparent colour key: the left third
    values[::2, 300:600] = 65_535  # the middle third: white and black rows, mid grey on average
    values[1::2, 300:600] = 0
    path = _save(Image.fromarray(values), tmp_path / "keyed.png", transparency=4321)
    full, small = load_image(path), load_image(path, size=64)
    assert small.size == (225, 150) and small.info["original_size"] == (900, 600)  # reduced by 4
    assert full.getpixel((10, 10)) == small.getpixel((2, 2)) == WHITE
    assert full.getpixel((800, 10)) == small.getpixel((200, 2)) == (117, 117, 117)
    assert abs(small.getpixel((110, 50))[0] - 128) <= 1  # averaged, not picked


def test_a_decode_stops_soon_after_it_is_cancelled():
    import math

    from show_attend_tell.errors import Cancelled
    from show_attend_tell.images import STOPPABLE_BLOCK

    noise = np.random.default_rng(0).integers(0, 256, (900, 1200), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    data = buffer.getvalue()
    assert math.ceil(len(data) / STOPPABLE_BLOCK) > 20
    asked = []

    def cancelled() -> bool:
        asked.append(True)
        return len(asked) > 4

    with pytest.raises(Cancelled):  # not an InputError: nothing is wrong with the file
        load_image(data, size=64, cancelled=cancelled)
    assert len(asked) == 5  # stopped at its fifth block, not after the whole file
    kept = load_image(data, size=64, cancelled=lambda: False)  # never cancelled: the same photo
    assert np.array_equal(np.asarray(kept), np.asarray(load_image(data, size=64)))


def test_decode_cost_counts_the_pixels_as_they_will_be_decoded():
    from show_attend_tell.images import decode_cost

    def encoded(mode: str, size: tuple[int, int], fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.new(mode, size).save(buffer, fmt)
        return buffer.getvalue()

    rgb = decode_cost(encoded("RGB", (4000, 3000), "PNG"), size=224)
    assert rgb == 4000 * 3000 * 4  # Pillow keeps RGB in 4 bytes a pixel; reduced without a full-size copy
    assert decode_cost(encoded("RGBA", (4000, 3000), "PNG"), size=224) == 4000 * 3000 * (4 + 2 * 4)
    assert decode_cost(encoded("L", (4000, 3000), "PNG"), size=224) == 4000 * 3000
    # a JPEG is decoded at the DCT's scale: 1/4 here (1000x750, at least 2 x 224 a side), then converted once
    assert decode_cost(encoded("RGB", (4000, 3000), "JPEG"), size=224) == 1000 * 750 * (4 + 4)
    assert decode_cost(encoded("RGB", (4000, 3000), "JPEG")) == 4000 * 3000 * (4 + 4)  # in full: one conversion
    with pytest.raises(TooManyPixelsError):
        decode_cost(png_header_only(7900, 7900))


def test_pillows_warnings_on_a_refused_file_end_its_one_line_instead_of_printing(capsys):
    import warnings

    data = edited_tiff(16, 258, 4, struct.pack("<I", 10_000))  # BitsPerSample: a count that runs past the end
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        message = _error(data, name="bad.tif")
    assert escaped == [] and capsys.readouterr().err == ""
    assert message.startswith("bad.tif: ") and message.endswith(
        "(Pillow warned: Tag data larger than file. Skipping tag 258)"
    )


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_decoding_its_own_output_again_changes_nothing(tmp_path, orientation):
    """A server decodes an upload (shrunk for the model, turned upright) and hands the image to the captioner,
    which decodes it again: the second decode keeps it upright (the orientation tag is gone) and keeps the
    photo's original size, which detection boxes are mapped to. Before, a phone photo was turned twice."""
    stored = Image.new("RGB", (2400, 1600), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 400, 400))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(stored, tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95).read_bytes()
    once = load_image(data, size=224, cancelled=lambda: False)
    twice = load_image(once, size=224)
    upright = (1600, 2400) if orientation in (6, 8) else (2400, 1600)
    assert once.info[ORIGINAL_SIZE] == twice.info[ORIGINAL_SIZE] == upright
    assert once.size == twice.size and (once.size[0] < once.size[1]) == (orientation in (6, 8))
    assert np.array_equal(np.asarray(once), np.asarray(twice))
    assert once.getexif().get(0x0112) is None
