"""Seeded fuzzing of image decoding and the upload API: a few hundred mutants of small JPEG, PNG, GIF, TIFF, WebP
and BMP files. Each must decode or be refused with the project's InputError (a 4xx from the API), never raise
anything else, answer 5xx or hang."""

from __future__ import annotations

import io
import random
import signal
import struct
import time
import types

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from show_attend_tell.captioner import Caption
from show_attend_tell.errors import InputError
from show_attend_tell.images import load_image
from show_attend_tell.server import create_app

FORMATS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "TIFF": "tif", "WEBP": "webp", "BMP": "bmp"}
MUTANTS_PER_FORMAT = 60
TIME_LIMIT = 60  # seconds for the whole file; a hang fails through SIGALRM


def seed_file(fmt: str) -> bytes:
    rng = np.random.default_rng(len(fmt))
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    options = {}
    if fmt == "PNG":
        image = image.convert("RGBA")
    elif fmt == "GIF":
        image = image.convert("P")
    elif fmt == "TIFF":
        options = {"compression": "raw"}
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: flipped bytes, a cut, bytes inserted, a header run set to 0xFF (sizes, counts), a part repeated,
    or a 16-bit field set to a small number: in a TIFF the type of one of its tags (the kind of edit that made
    Pillow raise TypeError), elsewhere one near the start (a palette size, a chunk length...)."""
    entries = tiff_tag_entries(data)
    data = bytearray(data)
    kind = 5 if entries and rng.random() < 0.5 else rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        del data[rng.randrange(1, len(data)) :]
    elif kind == 2:
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 3:
        at = rng.randrange(min(len(data), 64))
        data[at : at + rng.randint(1, 4)] = b"\xff" * 4
    elif kind == 4:
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randint(1, 256))
        data[end:end] = data[start:end] * rng.randint(1, 4)
    else:
        at = rng.choice(entries) + 2 if entries else rng.randrange(0, min(len(data), 256) - 1, 2)
        data[at : at + 2] = rng.randint(0, 12).to_bytes(2, "little")
    return bytes(data)


def tiff_tag_entries(data: bytes) -> list[int]:
    """Offsets of the 12-byte tag entries of a little-endian TIFF's first directory (empty for other files)."""
    if data[:4] != b"II*\x00":
        return []
    directory = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[directory : directory + 2])[0]
    return [directory + 2 + 12 * i for i in range(count)]


def mutants() -> list[tuple[str, int, bytes]]:
    cases = []
    for fmt in FORMATS:
        original = seed_file(fmt)
        for seed in range(MUTANTS_PER_FORMAT):
            cases.append((fmt, seed, mutate(original, random.Random(f"{fmt}-{seed}"))))
    return cases


@pytest.fixture(scope="module")
def cases() -> list[tuple[str, int, bytes]]:
    return mutants()


@pytest.fixture
def deadline():
    def hung(signum, frame):
        raise TimeoutError(f"fuzzing took longer than {TIME_LIMIT} s: a mutant hangs the decoder?")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(TIME_LIMIT)
    start = time.perf_counter()
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    assert time.perf_counter() - start < TIME_LIMIT


def test_seed_files_decode(cases):
    for fmt in FORMATS:
        assert load_image(seed_file(fmt)).size == (32, 24), fmt


def test_mutants_decode_or_raise_the_input_error(cases, deadline):
    outcomes = {"decoded": 0, "refused": 0}
    for fmt, seed, data in cases:
        name = f"{fmt}-{seed}.{FORMATS[fmt]}"
        try:
            image = load_image(data, name=name, size=32 if seed % 2 else None)
        except InputError as error:
            message = str(error)
            assert message.startswith(f"{name}: ") and "\n" not in message, message
            outcomes["refused"] += 1
        except Exception as error:  # the failure this test exists for: anything but InputError
            pytest.fail(f"{name}: {type(error).__name__}: {error}")
        else:
            assert image.mode == "RGB" and image.width > 0 and image.height > 0, name
            outcomes["decoded"] += 1
    assert sum(outcomes.values()) == len(FORMATS) * MUTANTS_PER_FORMAT
    assert outcomes["refused"] > 50 and outcomes["decoded"] > 50, outcomes  # the mutants test both paths


class InstantCaptioner:
    grid_size, image_size, decoder, encoder_precision, detector_name = 2, 32, "lstm", "fp32", None
    decoder_precision = "fp32"
    guidance = types.SimpleNamespace(user_words=lambda words: [])

    def encode(self, images, **options):
        import torch

        return torch.zeros(len(images), 1, 1)

    def caption_features(self, features, beam_size=3, **options):
        alpha = np.full((2, 2, 2), 0.25, dtype=np.float32)
        return [Caption("a photo", ["a", "photo"], -1.0, -1.5, alpha, []) for _ in range(len(features))]


def test_mutants_through_the_api_are_captioned_or_a_4xx(cases, deadline):
    statuses: dict[int, int] = {}
    with TestClient(create_app(InstantCaptioner()), base_url="http://localhost") as client:
        for fmt, seed, data in cases:
            name = f"{fmt}-{seed}.{FORMATS[fmt]}"
            response = client.post("/api/caption", files={"image": (name, data, "application/octet-stream")})
            assert response.status_code in (200, 413, 422), (name, response.status_code, response.text)
            if response.status_code != 200:
                assert name in response.json()["error"]
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert client.get("/api/health").json()["queue_depth"] == 0
    assert statuses.get(200, 0) > 50 and statuses.get(422, 0) > 50, statuses
