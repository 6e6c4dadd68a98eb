"""Decoding user images into upright RGB, and turning odd or broken files into one-line InputErrors.

Only decoding lives here; resizing and normalising for the encoder belong to the encoder weights.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageCms, ImageOps

from show_attend_tell.errors import InputError

DEFAULT_MAX_PIXELS = 64_000_000  # well above any camera photo, well below what exhausts memory when decoded
# A whitelist, not "whatever Pillow can open": Pillow's EPS plugin hands files to Ghostscript, and the web
# demo decodes uploads from strangers. (Camera MPO files come through the JPEG plugin.)
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
BACKGROUND = (255, 255, 255, 255)  # transparent pixels are shown on white, as browsers and viewers do
# PNG and TIFF 16-bit greyscale arrives as one of these; "I" (32-bit) is read as 16-bit data too.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Pillow raises these (not one base class) when image data is cut short or malformed.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


def load_image(
    source: str | Path | bytes | Image.Image,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode `source` fully into an upright 8-bit RGB image.

    `name` labels errors (default: the path, "<bytes>" or "<image>"). The pixel count is checked against
    `max_pixels` from the header, before any pixel is decoded, so a decompression bomb costs nothing; Pillow's
    own global limit (about 179 megapixels) still applies on top. Transparency is composited on white,
    16-bit greyscale is scaled (not clipped) to 8 bits, CMYK goes through its embedded ICC profile when it
    has one, and EXIF orientation is applied. Truncated files are refused: Pillow's LOAD_TRUNCATED_IMAGES is
    never set here.
    """
    if isinstance(source, Image.Image):
        return _decode(source, name or "<image>", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if len(source) == 0:
            raise InputError(f"{label}: empty file (0 bytes)")
        return _open_and_decode(io.BytesIO(source), label, max_pixels)

    path = Path(source)
    label = name or str(path)
    try:
        file = path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label}: is a directory, not an image file") from None
    except PermissionError:
        raise InputError(f"{label}: cannot read the file (permission denied)") from None
    except OSError as error:
        raise InputError(f"{label}: cannot read the file ({error.strerror or error})") from None
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise InputError(f"{label}: empty file (0 bytes)")
        return _open_and_decode(file, label, max_pixels)


def iter_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders into image paths: folders non-recursively, by extension, sorted by name.

    Files named explicitly are kept whatever their extension (load_image judges them); hidden files such as
    macOS "._photo.jpg" resource forks are skipped in folders. Duplicates are dropped, order is kept.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            try:
                children = sorted(path.iterdir())
            except OSError as error:
                raise InputError(f"{path}: cannot list the folder ({error.strerror or error})") from None
            found = [
                child
                for child in children
                if child.suffix.lower() in IMAGE_EXTENSIONS and not child.name.startswith(".") and child.is_file()
            ]
            if not found:
                raise InputError(f"{path}: folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return list(dict.fromkeys(paths))


def _open_and_decode(file: IO[bytes], label: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns from about 89 megapixels; _decode applies the caller's explicit limit instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise InputError(f"{label}: image too large to decode safely ({_one_line(error)})") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{label}: not an image, or not a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except DECODE_ERRORS as error:
        raise InputError(f"{label}: corrupt image header ({_one_line(error)})") from None
    return _decode(image, label, max_pixels)


def _decode(image: Image.Image, label: str, max_pixels: int) -> Image.Image:
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(
            f"{label}: image too large to decode safely: {width}x{height} is "
            f"{width * height / 1e6:.1f} megapixels, the limit is {max_pixels / 1e6:g} (decompression bomb?)"
        )
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
    except DECODE_ERRORS as error:
        raise InputError(f"{label}: truncated or corrupt image data ({_one_line(error)})") from None
    return _to_rgb(upright)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to plain RGB (a new image, detached from the file)."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_eight(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba).convert("RGB")
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        return _cmyk_to_srgb(image)
    return image.convert("RGB")


def _sixteen_bit_to_eight(image: Image.Image) -> Image.Image:
    """Scale 0..65535 to 0..255 (Pillow's own convert clips everything above 255 to white)."""
    values = np.asarray(image).astype(np.int64)
    grey = Image.fromarray(np.round(np.clip(values, 0, 65535) / 257).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        # The tRNS colour key is a 16-bit value: it must be matched before scaling merges neighbours.
        grey.putalpha(Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8)))
    return grey


def _cmyk_to_srgb(image: Image.Image) -> Image.Image:
    """Use the embedded profile: the naive formula turns press colours (e.g. process cyan) too saturated."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        return ImageCms.profileToProfile(image, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError):
        # A broken or non-CMYK profile: the naive conversion is still a fair picture.
        return image.convert("RGB")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
