"""Decoding user images into upright RGB, and turning odd or broken files into one-line InputErrors.

Only decoding lives here; resizing and normalising for the encoder belong to the encoder weights.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageCms, ImageOps

from show_attend_tell.errors import Cancelled, InputError, TooManyPixelsError

# 40 megapixels: more than most cameras' photos (12-24 MP phones, 24-36 MP cameras), under half of Pillow's
# warning limit (89 MP). A small file can declare this many pixels (a flat 16-bit PNG compresses ~500:1), and
# every one of them is decoded before anything can be resized, so this is what one upload may cost.
DEFAULT_MAX_PIXELS = 40_000_000
# A whitelist, not "whatever Pillow can open": Pillow's EPS plugin hands files to Ghostscript, and the web
# demo decodes uploads from strangers. (Camera MPO files come through the JPEG plugin.)
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
BACKGROUND = (255, 255, 255, 255)  # transparent pixels are shown on white, as browsers and viewers do
# PNG and TIFF 16-bit greyscale arrives as one of these; "I" (32-bit) is read as 16-bit data too.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Shrinking for the model keeps each side at least this many times the model's input side (Pillow's own
# `reducing_gap` for thumbnails): the final antialiased resize then looks as if it started from the full photo.
REDUCING_GAP = 2
# Modes whose pixels Image.reduce can average as they are (not palettes or 1-bit, see _reducible; 16-bit modes
# have their own, _shrink_sixteen_bit).
REDUCIBLE_MODES = ("L", "RGB", "CMYK", "RGBa", "F")
# Bytes of encoded data Pillow's decoder is given at a time when a decode may be cancelled: cancellation is asked
# before each block, so a small one stops a highly compressed photo (a flat PNG inflates ~500:1) soon after.
STOPPABLE_BLOCK = 16 * 1024
ORIGINAL_SIZE = "original_size"  # key of Image.info: (width, height) of the upright photo before shrinking
EXIF_ORIENTATION = 0x0112
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_image(
    source: str | Path | bytes | Image.Image,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    size: int | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Image.Image:
    """Decode `source` into an upright 8-bit RGB image: in full, or with `size` only as much as a model whose
    input is size x size needs.

    `name` labels errors (default: the path, "<bytes>" or "<image>"). The pixel count is checked against
    `max_pixels` from the header, before any pixel is decoded, so a decompression bomb costs nothing; Pillow's
    own global limit (about 179 megapixels) still applies on top. Transparency is composited on white,
    16-bit greyscale is scaled (not clipped) to 8 bits, CMYK goes through its embedded ICC profile when it
    has one, and EXIF orientation is applied. Truncated files are refused: Pillow's LOAD_TRUNCATED_IMAGES is
    never set here. Whatever a malformed file makes Pillow raise, the caller gets an InputError.

    With `size`, a large photo is shrunk by whole factors while it is decoded (JPEG's DCT scaling, then
    Image.reduce) to no less than REDUCING_GAP x size per side, before any conversion copies it; the returned
    image's info[ORIGINAL_SIZE] is the upright photo's (width, height). A photo no larger than that is decoded
    exactly as without `size`.

    `cancelled` (bytes sources): asked before each STOPPABLE_BLOCK of the file is decoded and before the
    conversions; once it answers True the decode raises errors.Cancelled (a server whose client hung up).

    Pillow's warnings about the file ("Tag data larger than file") are not printed: they would come before, and
    apart from, the error's one line; a refused file's error ends with the first of them.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return _load_image(source, name, max_pixels, size, cancelled)
        except InputError as error:
            if caught:
                error.args = (f"{error} (Pillow warned: {' '.join(str(caught[0].message).split())[:200]})",)
            raise


def _load_image(
    source: str | Path | bytes | Image.Image,
    name: str | None,
    max_pixels: int,
    size: int | None,
    cancelled: Callable[[], bool] | None,
):
    if isinstance(source, Image.Image):
        return _decode(source, name or "<image>", max_pixels, size, mine=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if len(source) == 0:
            raise InputError(f"{label}: empty file (0 bytes)")
        if cancelled is None:
            return _open_and_decode(io.BytesIO(source), label, max_pixels, size)
        image = _open(_StoppableBytes(source, cancelled), label)
        image.decodermaxblock = STOPPABLE_BLOCK
        return _decode(image, label, max_pixels, size, cancelled=cancelled)

    path = Path(source)
    label = name or str(path)
    # Checked before opening: opening a FIFO blocks until someone writes to it, a device may never end.
    kind = _not_regular(path, label)
    if kind:
        raise InputError(kind)
    try:
        file = path.open("rb")
    except OSError as error:
        raise InputError(_open_error(label, error)) from None
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise InputError(f"{label}: empty file (0 bytes)")
        return _open_and_decode(file, label, max_pixels, size)


def iter_image_paths(
    inputs: Iterable[str | Path], problems: list[str] | None = None, *, recursive: bool = False
) -> list[Path]:
    """Expand files and folders into image paths: folders by extension, sorted by name; with `recursive` their
    subfolders too (each folder's photos, then its subfolders in name order; hidden folders and symlinked ones
    are not entered, so a link back up cannot loop).

    Files named explicitly are kept whatever their extension (load_image judges them); hidden files such as
    macOS "._photo.jpg" resource forks are skipped in folders, and so is anything that is not a regular file
    (a FIFO, device or socket is never opened). Duplicates are dropped, order is kept.

    An input that cannot be used (missing, a symlink loop, a FIFO, an unreadable or image-less folder) raises
    InputError, or with `problems` is described there in one line and left out, so the others still run; with
    `problems`, a folder's images that are not regular files are described there too.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        try:
            paths.extend(_expand(path, recursive, problems))
        except InputError as error:
            if problems is None:
                raise
            problems.append(str(error))
    return list(dict.fromkeys(paths))


def _expand(path: Path, recursive: bool = False, problems: list[str] | None = None) -> list[Path]:
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise InputError(f"{path}: no such file or folder") from None
        raise InputError(f"{path}: cannot use it ({error.strerror or error})") from None
    if not stat.S_ISDIR(mode):
        kind = _not_regular(path, str(path))
        if kind:
            raise InputError(kind)
        return [path]
    found = _folder_images(path, recursive, problems)
    if not found:
        where = "folder and its subfolders have" if recursive else "folder has"
        raise InputError(f"{path}: {where} no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def _folder_images(folder: Path, recursive: bool, problems: list[str] | None = None) -> list[Path]:
    try:
        children = sorted(folder.iterdir())
    except OSError as error:
        raise InputError(f"{folder}: cannot list the folder ({error.strerror or error})") from None
    named = [child for child in children if child.suffix.lower() in IMAGE_EXTENSIONS and not child.name.startswith(".")]
    found = [child for child in named if child.is_file()]
    if problems is not None:  # a FIFO or a symlink loop named like a photo is left out, but said
        problems.extend(
            reason for child in named if not child.is_file() and (reason := _not_regular(child, str(child)))
        )
    if recursive:
        for child in children:
            if not child.name.startswith(".") and child.is_dir() and not child.is_symlink():
                found.extend(_folder_images(child, recursive, problems))
    return found


def _not_regular(path: Path, label: str) -> str | None:
    """Why `path` is not a file to open (one line), or None when it is a regular file or absent (open says)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as error:
        return _open_error(label, error)
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"{label}: is a directory, not an image file"
    kinds = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device")]
    kind = next((name for test, name in kinds if test(mode)), "a device")
    return f"{label}: {kind}, not a regular file: not opened"


def _open_error(label: str, error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return f"{label}: no such file"
    if isinstance(error, IsADirectoryError):
        return f"{label}: is a directory, not an image file"
    if isinstance(error, PermissionError):
        return f"{label}: cannot read the file (permission denied)"
    return f"{label}: cannot read the file ({error.strerror or error})"


def image_header(
    data: bytes | bytearray, *, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) of an encoded image as its header declares them, checked against `max_pixels` and the
    format whitelist without decoding a pixel: the cheap part of load_image's checks, for refusing early."""
    if len(data) == 0:
        raise InputError(f"{name}: empty file (0 bytes)")
    with _open(io.BytesIO(data), name) as image:
        _check_pixels(image, name, max_pixels)
        return image.size


def decode_cost(
    data: bytes | bytearray, *, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS, size: int | None = None
) -> int:
    """Bytes that load_image(data, size=size) holds at most while it decodes, from the header alone (the
    checks of image_header included): the pixels as decoded (a JPEG at the scale its DCT will decode it) in
    Pillow's storage, and the full-size copies the conversion to RGB makes (see _full_size_copies), for charging
    a memory budget before the decode starts."""
    if len(data) == 0:
        raise InputError(f"{name}: empty file (0 bytes)")
    with _open(io.BytesIO(data), name) as image:
        _check_pixels(image, name, max_pixels)
        if size is not None and image.format in ("JPEG", "MPO"):
            image.draft(None, (REDUCING_GAP * size, REDUCING_GAP * size))  # only sets the scale: nothing decoded
        width, height = image.size
        shrunk = size is not None and min(width, height) // (REDUCING_GAP * size) > 1
        return width * height * (_stored_bytes_per_pixel(image.mode) + 4 * _full_size_copies(image, shrunk))


def _full_size_copies(image: Image.Image, shrunk: bool) -> int:
    """Four-byte-a-pixel copies of the whole photo that _decode_shrunk (`shrunk`: reduced by a factor) or
    _to_rgb make beside the decoded pixels, at most: transparency is flattened through RGBA, a reducible or 16-bit
    photo is reduced without a full-size copy, anything else is converted once."""
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info
    if shrunk:
        return 2 if transparent else 0 if image.mode in (*REDUCIBLE_MODES, *SIXTEEN_BIT_MODES) else 1
    return 3 if transparent else 1


def _stored_bytes_per_pixel(mode: str) -> int:
    """Pillow keeps one byte a pixel for "1", "L" and "P", two for 16-bit, and four for every other mode (its
    three-band modes are padded to four)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


class _StoppableBytes(io.BytesIO):
    """Encoded bytes whose every read first asks `cancelled` (Pillow's decoders read the file a block at a time)."""

    def __init__(self, data: bytes | bytearray | memoryview, cancelled: Callable[[], bool]) -> None:
        super().__init__(data)
        self.cancelled = cancelled

    def read(self, size: int | None = -1) -> bytes:
        if self.cancelled():
            raise Cancelled()
        return super().read(size)


def _open(file: IO[bytes], label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns from about 89 megapixels; _decode applies the caller's explicit limit instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(file, formats=IMAGE_FORMATS)
    except Cancelled:
        raise
    except Image.DecompressionBombError as error:
        raise TooManyPixelsError(f"{label}: image too large to decode safely ({_one_line(error)})") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{label}: not an image, or not a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as error:  # a malformed header can make a plugin raise anything (TypeError, KeyError...)
        raise InputError(f"{label}: corrupt image header ({_one_line(error)})") from None


def _check_pixels(image: Image.Image, label: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise TooManyPixelsError(
            f"{label}: image too large to decode safely: {width}x{height} is "
            f"{width * height / 1e6:.1f} megapixels, the limit is {max_pixels / 1e6:g} (decompression bomb?)"
        )


def _open_and_decode(file: IO[bytes], label: str, max_pixels: int, size: int | None) -> Image.Image:
    return _decode(_open(file, label), label, max_pixels, size)


def _decode(
    image: Image.Image,
    label: str,
    max_pixels: int,
    size: int | None,
    mine: bool = True,
    cancelled: Callable[[], bool] | None = None,
) -> Image.Image:
    """`mine`: the image was opened here, so it may be decoded at a reduced scale (not a caller's object).
    `cancelled`: asked once more after the pixels are decoded, before the conversions."""
    _check_pixels(image, label, max_pixels)
    try:
        if size is None:
            image.load()
            _check(cancelled)
            return _to_rgb(ImageOps.exif_transpose(image))
        return _decode_shrunk(image, size, mine, cancelled)
    except (InputError, Cancelled):
        raise
    except Exception as error:  # whatever Pillow raises on this file's data is this file's error
        raise InputError(f"{label}: truncated or corrupt image data ({_one_line(error)})") from None


def _check(cancelled: Callable[[], bool] | None) -> None:
    if cancelled is not None and cancelled():
        raise Cancelled()


def _decode_shrunk(
    image: Image.Image, size: int, draft: bool, cancelled: Callable[[], bool] | None = None
) -> Image.Image:
    """Decode at no less than REDUCING_GAP x size per side, convert the small image, then turn it upright."""
    least = REDUCING_GAP * size
    width, height = image.size
    if draft and image.format in ("JPEG", "MPO"):
        image.draft(None, (least, least))  # the DCT decodes at 1/2, 1/4 or 1/8 scale: the full size never exists
    image.load()
    _check(cancelled)
    orientation = image.getexif().get(EXIF_ORIENTATION)  # read after load: a PNG's eXIf chunk may follow the data
    # An image this function made (a server's upload, decoded before it reaches the captioner) is upright already
    # and knows its photo's size: decoding it again changes neither.
    width, height = image.info.get(ORIGINAL_SIZE, (width, height))
    factor = max(1, min(image.size) // least)  # one factor for both sides: the photo keeps its shape
    if factor > 1 and image.mode in SIXTEEN_BIT_MODES:
        image = _shrink_sixteen_bit(image, factor)
    elif factor > 1:
        image = _reducible(image).reduce(factor)
    rgb = _to_rgb(image)
    if orientation in ORIENTATION_TRANSPOSE:
        rgb = rgb.transpose(ORIENTATION_TRANSPOSE[orientation])
        if orientation >= 5:  # the quarter turns and transpositions swap the sides
            width, height = height, width
        exif = rgb.getexif()  # the new upright image's own copy: the tag goes, as ImageOps.exif_transpose drops it
        del exif[EXIF_ORIENTATION]
        rgb.info["exif"] = exif.tobytes()
    rgb.info[ORIGINAL_SIZE] = (width, height)
    return rgb


def _reducible(image: Image.Image) -> Image.Image:
    """The same 8-bit picture in a mode whose pixels Image.reduce can average (see REDUCIBLE_MODES), at most one
    full-size copy later: transparency is flattened onto the background first (averaging straight alpha would
    bleed invisible pixels' colours into visible ones)."""
    if image.mode in ("RGBA", "LA", "PA", "P", "RGBa") or "transparency" in image.info:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND[:3])
        flat.paste(rgba, mask=rgba)  # over an opaque background: the same as alpha_composite
        return flat
    if image.mode in REDUCIBLE_MODES:
        return image
    return image.convert("RGB")


def _shrink_sixteen_bit(image: Image.Image, factor: int) -> Image.Image:
    """16-bit grey averaged over factor x factor blocks and scaled to 8 bits, a band of rows at a time, so that
    no full-size copy exists beside the decoded image (Image.reduce refuses 16-bit modes). A tRNS colour key
    is matched before averaging: it becomes the blocks' coverage (alpha), and only opaque pixels are averaged.
    The last width % factor columns and height % factor rows are left out."""
    key = image.info.get("transparency")
    key = key if isinstance(key, int) and not isinstance(key, bool) else None
    width, height = image.width // factor, image.height // factor
    grey = np.empty((height, width), dtype=np.uint8)
    alpha = np.empty((height, width), dtype=np.uint8) if key is not None else None
    band = max(1, (1 << 20) // (width * factor * factor))  # output rows per band: about 1 M input pixels
    for top in range(0, height, band):
        rows = min(band, height - top)
        values = np.asarray(image.crop((0, top * factor, width * factor, (top + rows) * factor)))
        if values.dtype.itemsize > 2:  # mode "I": 32-bit values read as 16-bit data
            values = np.clip(values, 0, 65535)
        blocks = values.reshape(rows, factor, width, factor)
        if key is None:
            mean = blocks.sum(axis=(1, 3), dtype=np.uint64) / factor**2
        else:
            opaque = blocks != key
            count = opaque.sum(axis=(1, 3))
            mean = np.where(opaque, blocks, 0).sum(axis=(1, 3), dtype=np.uint64) / np.maximum(count, 1)
            alpha[top : top + rows] = np.round(count * 255 / factor**2).astype(np.uint8)
        grey[top : top + rows] = np.round(mean / 257).astype(np.uint8)
    shrunk = Image.fromarray(grey)
    if alpha is not None:
        shrunk.putalpha(Image.fromarray(alpha))
    return shrunk


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
    """Scale 0..65535 to 0..255 (Pillow's own convert clips everything above 255 to white), rounding, in
    32-bit integers: a float64 copy of a large photo would cost 8 bytes a pixel."""
    values = np.asarray(image)
    if values.dtype.itemsize > 2:  # mode "I": 32-bit values read as 16-bit data
        values = np.clip(values, 0, 65535)
    grey = Image.fromarray(((values.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8))  # round(v / 257)
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
