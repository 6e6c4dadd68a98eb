"""`sat serve`: the HTTP API and the web page around one loaded Captioner.

POST /api/caption   multipart field `image` (+ query `beam_size`) -> caption, words, one attention map per word
GET  /api/health    the model's decoder, grid size, queue depth (answered once the model is loaded)
GET  /              the page (show_attend_tell/web/); OpenAPI at /openapi.json, docs at /docs

The model runs in batches, on `model_threads` threads: the photos waiting for it with equal options are
captioned together (Batcher: each photo through Captioner.encode, then one Captioner.caption_features for them
all, the two halves of caption_batch, so each gets the caption it gets alone), and with two model threads two
batches run side by side, each on a share of torch's threads. A request is read whole first: in chunks, refused
(413) as soon as it passes the upload limit, answered 408 when it takes longer than the read deadline, and its
image header checked against the pixel budget (413) and the format whitelist (422). What bounds the uploads is
memory, not their number: the bodies held at once (being received, waiting or captioned) and the pixels of the
photos being decoded share `upload_memory_bytes`, a body charged as its bytes arrive and a decode before it
starts, so a slow client costs a connection and the bytes it sent, never model time or a place another client
needs. Only then does a request take one of `queue_size` slots (being decoded, waiting or captioned); its photo
is decoded on a decoding thread, only as large as the model needs, once its pixels fit in the memory (a decode
waits for it as a photo waits for the model); photos that take many megabytes to decode go one at a time on a
thread of their own (LARGE_DECODE_BYTES), paced while the model is captioning (Pacer). When the queue is full,
or a body does not fit in the memory, the server is at capacity and says so: 503 with Retry-After. A request
whose client hangs up stops its decode within a block of the file, leaves the queue, or leaves its batch, which
goes on for the others without its photo; a batch stops between the model's stages only when all of its clients
are gone (Captioner's `cancelled`). Every response carries security headers, and a Host header the server was
not configured to answer is refused (Guard). Every error is JSON {"error": "..."}; bad input is always a 4xx
saying what is wrong, and the image checks are load_image's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, Field
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from show_attend_tell import __version__
from show_attend_tell.config import DEFAULT_BEAM_SIZE, MAX_MENTIONS
from show_attend_tell.errors import Cancelled, InputError, TooManyPixelsError
from show_attend_tell.images import DEFAULT_MAX_PIXELS, IMAGE_FORMATS, ORIGINAL_SIZE, decode_cost, load_image

WEB_DIR = Path(__file__).resolve().parent / "web"
MEGABYTE = 2**20
DEFAULT_MAX_UPLOAD_BYTES = 10 * MEGABYTE
# Requests waiting for the model or captioned: room for issue #14's 16 clients that each hold a request until they
# hang up, beside the normal clients (a queue of 16 turned normal clients away: results/hostile_load_before.json).
# The longest wait it allows is this many photos' decode_ms (results/hostile_load.json).
DEFAULT_QUEUE_SIZE = 32
# Request bodies held at once (being received, waiting or captioned) and photos' pixels being decoded: room for
# a photo of the pixel budget with transparency (images.decode_cost: 480 MB at 40 megapixels) beside its upload.
DEFAULT_UPLOAD_MEMORY_BYTES = 512 * MEGABYTE
DEFAULT_READ_TIMEOUT = 60.0  # seconds to send a whole request; 10 MB takes 8 s at 10 Mbit/s
MAX_BEAM_SIZE = 10
FIELD = "image"
# Room for the multipart boundaries and part headers around the image, and a small extra form field or two.
FORM_OVERHEAD = 64 * 1024
ATTENTION_DECIMALS = 5  # 49 rounded weights still sum to 1 within 3e-4
MAX_NAME_CHARS = 100  # an uploaded file name is echoed in error messages, shortened
# Browsers send image/*; curl sends application/octet-stream for an unknown extension. Which bytes really are
# an image is load_image's decision, not the declared type's.
ACCEPTED_PART_TYPES = ("image/", "application/octet-stream")
# Photos captioned together at most, and how long the oldest waits for others (see Batcher): chosen with
# benchmarks/load.py (results/load_batching.json).
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_DELAY_MS = 10.0
MAX_MAX_BATCH = 64
# Model threads on a CPU with two torch threads or more (sat serve --model-threads auto). A batch alone uses every
# torch thread; two at once use half each. With one model thread of two torch threads, the hang-up flood's event
# loop took a core from one of them and the other waited for it at every barrier: the machine stood idle 0.48 of a
# core while photos waited (results/hostile_load_rounds/probe_cores_2.json). With two, interleaved with one, the
# flood's p99 was 1036 and 1006 ms against 1149 and 1268, 8 clients got 4.18 and 4.05 captions/s against 3.67 and
# 3.63, one client's p50 was 275 and 285 ms against 319 and 302 (results/hostile_load_rounds/model_threads_*,
# results/load_batching/model_threads/).
CPU_MODEL_THREADS = 2
MAX_MODEL_THREADS = 8
# Threads that decode uploaded photos beside the model, each decode charged to the memory budget first. They run
# at a lower priority than the model (a niceness, on Linux): a normal photo's decode is short whatever its
# priority, while a flood of large ones that are hung up on would otherwise take the cores the model needs
# (results/hostile_load.json, hang_up_flood).
DECODE_THREADS = 2
DECODE_NICENESS = 10
# A decode that holds more pixels than this (images.decode_cost; a 12-megapixel JPEG decoded for the model holds
# about 3 MB, a 40-megapixel PNG 160 MB) runs on the one large-decode thread, never on the others: large decodes
# go one at a time, so a flood of them holds one photo's pixels and one core at most, and a normal photo is never
# decoded behind them (results/hostile_load.json, hang_up_flood).
LARGE_DECODE_BYTES = 32 * MEGABYTE
# Large decodes being decoded or waiting for the large-decode thread, at most. A large photo past it waits for its
# turn before it takes a queue slot, so a flood of large photos that are hung up on cannot fill the queue normal
# photos need (it did: results/hostile_load_rounds/); it waits rather than being answered 503 at once, which let
# the flood send about twice the requests (results/hostile_load_rounds/large_decodes_busy.json).
LARGE_DECODES = 2
# While the model is captioning, a large decode first waits up to LARGE_DECODE_START_WAIT seconds for it to be idle,
# then pauses between blocks of its file so that it takes at most LARGE_DECODE_DUTY of the wall time (Pacer): on two
# cores, a niced thread that decodes photos nobody waits for still took half a core and slowed the model's batches
# (results/hostile_load_rounds/, pacing), since the model's threads leave the cores idle for moments at every
# step. A large photo sent while the model is busy takes up to 1 / LARGE_DECODE_DUTY times as long to decode.
LARGE_DECODE_START_WAIT = 0.25
LARGE_DECODE_DUTY = 0.2
PACE_SLICE = 0.005  # seconds of decoding before a pause is due
PACE_POLL = 0.01  # seconds between two looks at whether the model is idle, while pausing
# The names a server bound to loopback answers to; any other Host header (DNS rebinding: a page on evil.example
# whose name now resolves to 127.0.0.1) is refused.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ANY_HOST = "*"
# On every response. The page needs nothing from elsewhere; blob: is the chosen photo, data: the blank favicon.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
# Swagger UI starts itself from an inline script (FastAPI's docs page), and styles itself inline.
DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
# JSON is never a document to render: nothing may load from it, nothing may frame it.
API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_PATHS = ("/docs", "/redoc")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong, in one sentence")


SCORE = (
    "what beams are ranked by: log_prob / (words + <end>)**length_penalty (beam size 1: log_prob); a template caption "
    "comes first whatever its score"
)
LOG_PROB = "log-probability of the caption (with <end>)"


class Alternative(BaseModel):
    caption: str
    score: float = Field(description=SCORE)
    log_prob: float = Field(description=LOG_PROB)


class Guide(BaseModel):
    word: str = Field(description="the word the caption was asked to contain")
    forms: list[str] = Field(description="any of these words met it")
    source: str = Field(
        description='"label": the encoder\'s ImageNet head; "detector": a COCO detection; "user": the request\'s '
        "`mention`"
    )
    label: str | None = Field(
        None, description="source label: the concept's most probable ImageNet class; detector: the COCO class"
    )
    probability: float | None = Field(
        None, description="source label: the concept's probability; detector: the detection's score"
    )
    position: int | None = Field(description="index in `words` of the word that meets it (null: none could)")


class DetectionModel(BaseModel):
    class_: str = Field(alias="class", description="the COCO class")
    score: float = Field(description="the detector's confidence")
    box: list[float] = Field(description="x1, y1, x2, y2 in the photo's pixels (upright)")


class Timings(BaseModel):
    queue_ms: float = Field(description="from the photo's decode to its batch's start (other requests ahead)")
    image_ms: float = Field(description="decoding the uploaded file into pixels")
    decode_ms: float = Field(description="the model: encoder and beam search, for the whole batch")
    batch: int = Field(description="photos captioned together in this request's batch")
    total_ms: float = Field(description="from the request's arrival to the response")


class CaptionResponse(BaseModel):
    caption: str
    words: list[str]
    attention: list[list[list[float]]] = Field(
        description="one grid_size x grid_size map per word (rows top to bottom, columns left to right) over "
        "the whole photo, each summing to 1"
    )
    score: float = Field(description=SCORE)
    log_prob: float = Field(description=LOG_PROB)
    alternatives: list[Alternative] = Field(
        description="the other beams, best first (highest score); after a template caption, all of the decoder's"
    )
    guidance: list[Guide] = Field(description="words the caption had to contain, and where each came from")
    template: bool = Field(
        description="the words are the template caption of the label concept in `guidance` ('a cup of coffee on a "
        "table'), read by the decoder for the attention maps and score; its own best caption is alternatives[0]"
    )
    detections: list[DetectionModel] = Field(
        description="the COCO detector's detections that guided the caption (at the presence threshold), best first"
    )
    discouraged: list[str] = Field(description="COCO classes nothing saw, whose words the search discouraged")
    decoder: str = Field(description='the decoder that wrote the caption: "lstm" (the paper\'s) or "transformer"')
    encoder_precision: str = Field(description='the precision the encoder ran in: "fp32", "bf16" or "int8"')
    decoder_precision: str = Field(description='the precision the decoder ran in: "fp32" or "int8"')
    detector: str | None = Field(description="the COCO detector that guided the caption (null: none)")
    grid_size: int
    beam_size: int
    width: int = Field(description="width of the photo in pixels, upright (EXIF orientation applied)")
    height: int = Field(description="height of the photo in pixels, upright")
    timings: Timings


class Health(BaseModel):
    status: str
    decoder: str = Field(description='the model\'s decoder: "lstm" (the paper\'s) or "transformer"')
    encoder_precision: str = Field(description='the precision the encoder runs in: "fp32", "bf16" or "int8"')
    decoder_precision: str = Field(description='the precision the decoder runs in: "fp32" or "int8"')
    detector: str | None = Field(description="the COCO detector that guides captions (null: none)")
    grid_size: int
    queue_depth: int = Field(description="requests read and not finished (waiting for the model or captioned)")
    queue_size: int = Field(description="requests waiting or captioned at most; beyond it, 503 with Retry-After")
    max_batch: int = Field(description="photos captioned together at most (equal options only)")
    max_delay_ms: float = Field(description="how long a waiting photo waits for others to fill its batch, at most")
    model_threads: int = Field(description="batches captioned at once")
    uploads: int = Field(description="requests still being received")
    upload_bytes: int = Field(
        description="bytes held now by request bodies (received, waiting or captioned) and photos' pixels (being "
        "decoded, or decoded and waiting)"
    )
    upload_memory_bytes: int = Field(description="bytes of request bodies and pixels held at most; beyond it, 503")
    max_upload_bytes: int
    max_pixels: int = Field(description="largest photo accepted, in pixels (width x height); beyond it, 413")
    read_timeout: float = Field(description="seconds a client has to send its request; beyond it, 408")
    max_beam_size: int


@dataclasses.dataclass(eq=False)
class Job:
    """One decoded photo waiting for the model, with the options it was asked for."""

    image: Image.Image
    options: tuple  # (beam_size, mentions, guidance, templates, detector, repeat_words): only equal ones share a batch
    abandoned: threading.Event  # its client hung up
    future: Future
    ready: float  # time.perf_counter() when it began to wait


class Batcher:
    """The model's threads (`threads` of them): each captions the photos that are waiting in batches of up to
    `max_batch` with equal options (create_app's caption_jobs: each photo gets the caption it gets alone), oldest
    first. A batch starts once it is full, or `max_delay` seconds after its oldest photo began to wait, or as soon
    as no other request that could join it is still being decoded (so a request alone never waits for company).
    With several model threads, the photos waiting are shared between them: a batch takes at most its share,
    ceil(waiting / threads), and the rest are left for the next thread.

    `use_cores(n)`, when given, is called on a model thread before each of its batches: `cores` for a batch that
    starts while no other batch runs or waits, cores // threads (at least 1) for the others (torch's thread count
    is the calling thread's own).

    At most `size` requests hold a slot at a time, from before their photo is decoded until its batch ends (or
    until they leave the queue, their client gone)."""

    def __init__(
        self,
        run: Callable[[list[Job]], list],
        *,
        size: int,
        max_batch: int,
        max_delay: float,
        threads: int = 1,
        cores: int = 1,
        use_cores: Callable[[int], None] | None = None,
    ) -> None:
        self.size, self.max_batch, self.max_delay, self.threads = size, max_batch, max_delay, threads
        self.cores, self._use_cores = cores, use_cores
        self._run = run
        self._condition = threading.Condition()
        self._depth = 0
        self._decoding = 0  # holding a slot, not waiting yet: they may join the next batch
        self._waiting: list[Job] = []
        self._running = 0  # batches being captioned
        self._stopped = False
        self._job_seconds = 1.0  # running mean of a batch's duration per photo, for Retry-After
        self.idle = threading.Event()  # set while no batch is being captioned (Pacer)
        self.idle.set()
        self._threads = [
            threading.Thread(target=self._loop, name=f"sat-caption-{index}", daemon=True) for index in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def waiting(self) -> int:
        """Requests decoded and waiting for a batch."""
        return len(self._waiting)

    def reserve(self) -> bool:
        """Take a slot if one is free; the request counts as being decoded until `submit` or `release`."""
        with self._condition:
            if self._depth >= self.size:
                return False
            self._depth += 1
            self._decoding += 1
            return True

    def release(self) -> None:
        """Give back the slot of a request that never reached `submit` (refused or gone while decoding)."""
        with self._condition:
            self._depth -= 1
            self._decoding -= 1
            self._condition.notify()

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: whole seconds, at least 1 (the header's format)."""
        return max(1, math.ceil(self._depth * self._job_seconds / self.threads))

    async def run(self, image: Image.Image, options: tuple, gone: asyncio.Future) -> Any:
        """Caption `image` in a batch for a caller holding a slot (taken by `reserve`). When `gone` (the client
        hung up) completes first, the photo leaves the queue, or its batch goes on without it (a batch stops only
        when all its clients are gone), and ClientGone is raised."""
        job = Job(image, options, threading.Event(), Future(), time.perf_counter())
        with self._condition:
            self._decoding -= 1
            self._waiting.append(job)
            self._condition.notify()
        result = asyncio.wrap_future(job.future)
        await asyncio.wait([result, gone], return_when=asyncio.FIRST_COMPLETED)
        if not result.done():
            job.abandoned.set()
            with self._condition:
                if job in self._waiting:  # not in a batch yet: it never will be
                    self._waiting.remove(job)
                    self._depth -= 1
                    self._condition.notify()
            result.cancel()
            raise ClientGone()
        return result.result()

    def _loop(self) -> None:
        while (taken := self._next_batch()) is not None:
            batch, cores = taken
            if self._use_cores is not None:
                self._use_cores(cores)
            present = []
            for job in batch:
                if job.abandoned.is_set():
                    job.future.cancel()
                elif job.future.set_running_or_notify_cancel():
                    present.append(job)
            start = time.perf_counter()
            outcomes: list | Exception = []
            try:
                if present:
                    outcomes = self._run(present)
            except Exception as error:  # the batch's error is each of its requests' error
                outcomes = error
            finally:
                with self._condition:
                    self._running -= 1
                    if not self._running:
                        self.idle.set()
            seconds = (time.perf_counter() - start) / max(1, len(present))
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * seconds
            with self._condition:  # the slots are free before anyone is answered
                self._depth -= len(batch)
                self._condition.notify()
            for index, job in enumerate(present):
                if isinstance(outcomes, Exception):
                    job.future.set_exception(outcomes)
                else:
                    job.future.set_result(outcomes[index])

    def _next_batch(self) -> tuple[list[Job], int] | None:
        """The next batch and the torch threads it may use; None once shut down."""
        with self._condition:
            while True:
                if self._stopped:
                    return None
                if self._waiting:
                    first = self._waiting[0]
                    alike = [job for job in self._waiting if job.options == first.options]
                    share = min(self.max_batch, math.ceil(len(alike) / self.threads))
                    batch = alike[:share]
                    wait = first.ready + self.max_delay - time.perf_counter()
                    if len(batch) >= self.max_batch or self._decoding == 0 or wait <= 0:
                        for job in batch:
                            self._waiting.remove(job)
                        alone = self._running == 0 and not self._waiting
                        self._running += 1
                        self.idle.clear()
                        if self._waiting:
                            self._condition.notify()  # the rest, for another model thread
                        return batch, self.cores if alone else max(1, self.cores // self.threads)
                    self._condition.wait(wait)
                else:
                    self._condition.wait()

    def shutdown(self) -> None:
        with self._condition:
            self._stopped = True
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
            self._condition.notify_all()


class Pacer:
    """A large decode's `cancelled` (load_image asks it before each block of the file): True once the client is
    gone (`abandoned`). Meanwhile, while the model is captioning (`idle` clear), it pauses the decode: first up to
    `start_wait` seconds before the first block, then, after each PACE_SLICE or more of decoding, long enough that
    the decode takes at most `duty` of the wall time. A pause ends as soon as the model is idle or the client gone.
    So a flood of large photos whose clients hang up costs the model little: most are gone before they start."""

    def __init__(
        self,
        idle: threading.Event,
        abandoned: threading.Event,
        *,
        duty: float = LARGE_DECODE_DUTY,
        start_wait: float = LARGE_DECODE_START_WAIT,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.idle, self.abandoned, self.duty, self.start_wait, self.clock = idle, abandoned, duty, start_wait, clock
        self.resumed: float | None = None  # when the decode last resumed; None before its first block

    def __call__(self) -> bool:
        now = self.clock()
        if self.resumed is None:
            self._pause(now + self.start_wait)
        elif now - self.resumed >= PACE_SLICE:
            self._pause(now + (now - self.resumed) * (1 - self.duty) / self.duty)
        else:
            return self.abandoned.is_set()
        self.resumed = self.clock()
        return self.abandoned.is_set()

    def _pause(self, until: float) -> None:
        while not self.idle.is_set() and (left := until - self.clock()) > 0:
            if self.abandoned.wait(min(left, PACE_POLL)):
                return


class ClientGone(Exception):
    """The client hung up before its request was captioned."""


class BodyMemory:
    """Bytes of request bodies and decoded pixels held at once, at most `size`: a body charged chunk by chunk as
    it arrives, a photo's decode before it starts (images.decode_cost), each given back when the request ends.
    Used from the event loop only."""

    def __init__(self, size: int) -> None:
        self.size, self.used = size, 0
        self.receiving = 0  # requests still being received, for /api/health
        self._freed = asyncio.Event()  # set (and replaced) whenever bytes are given back

    def take(self, count: int) -> bool:
        if self.used + count > self.size:
            return False
        self.used += count
        return True

    async def take_when_free(self, count: int, gone: asyncio.Future) -> bool:
        """Charge `count` as soon as it fits (True), or False when `gone` completes first. A decode waits for
        memory as a photo waits for the model: the budget being full is not the client's doing, nor a reason to
        turn it away while others' decodes end within moments."""
        while not self.take(count):
            freed = asyncio.ensure_future(self._freed.wait())
            await asyncio.wait([freed, gone], return_when=asyncio.FIRST_COMPLETED)
            freed.cancel()
            if gone.done():
                return False
        return True

    def give_back(self, count: int) -> None:
        self.used -= count
        if count:
            self._freed.set()
            self._freed = asyncio.Event()


class Upload:
    """The `image` field of a multipart body, read chunk by chunk and refused as soon as it is too large."""

    def __init__(self, boundary: bytes, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.data: bytearray | None = None  # None until the field is seen
        self.filename: str | None = None
        self.complete = False  # the closing boundary was seen
        self.held = 0  # bytes of the body charged to the server's BodyMemory
        self._in_image = False
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_end": self._end,
            },
        )

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def finish(self) -> None:
        self._parser.finalize()

    def _part_begin(self) -> None:
        self._in_image = False
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") != FIELD.encode():
            return
        if self.data is not None:
            raise HTTPException(422, f"field '{FIELD}' was sent more than once; send one photo per request")
        declared = self._headers.get(b"content-type", b"").decode("latin-1").strip().lower()
        if declared and not declared.startswith(ACCEPTED_PART_TYPES):
            raise HTTPException(
                415, f"field '{FIELD}' is declared as {declared!r}; expected an image (image/jpeg, image/png, ...)"
            )
        filename = options.get(b"filename")
        if filename:
            self.filename = filename.decode("utf-8", "replace")[:MAX_NAME_CHARS]
        self.data = bytearray()
        self._in_image = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_image:
            return  # other fields are counted in the body's size but not kept
        self.data += data[start:end]
        if len(self.data) > self.max_bytes:
            raise HTTPException(413, _too_large(self.max_bytes))

    def _end(self) -> None:
        self.complete = True


def create_app(
    captioner,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    upload_memory_bytes: int = DEFAULT_UPLOAD_MEMORY_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
    model_threads: int = 1,
    allowed_hosts: Iterable[str] = LOOPBACK_HOSTS,
) -> FastAPI:
    """The API and the page around `captioner` (a loaded show_attend_tell.captioner.Captioner, or anything
    with the same `caption_batch(images, beam_size=, ...)`, `grid_size` and `image_size`).

    model_threads: batches captioned at once (Batcher), each on torch's threads alone or a share of them.
    allowed_hosts: the names (without port) a request's Host header may give; "*" answers any."""
    check_limits(
        max_upload_bytes=max_upload_bytes,
        queue_size=queue_size,
        upload_memory_bytes=upload_memory_bytes,
        max_pixels=max_pixels,
        read_timeout=read_timeout,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        model_threads=model_threads,
    )

    def caption_jobs(jobs: list[Job]) -> list[tuple | None]:
        """On the model's thread: one batch of equal options -> (caption, batch start, seconds, photos) each, None
        for a job whose client left. Each photo is encoded with its own client's cancellation (one who hangs up
        stops costing at once; on a CPU the encoder takes large photos one at a time anyway, inference.cpu_chunk),
        then the photos still wanted are captioned together."""
        # loaded with the model already; not at import, so that the server's flags parse without torch
        from show_attend_tell.captioner import Seen

        beam_size, mentions, guide, templates, detect, repeat_words = jobs[0].options
        started = time.perf_counter()
        present, seen = [], []
        for job in jobs:
            try:
                seen.append(
                    captioner.encode(
                        [job.image], max_pixels=max_pixels, detect=guide and detect, cancelled=job.abandoned.is_set
                    )
                )
                present.append(job)
            except Cancelled:
                pass
        if not present:
            raise Cancelled()
        captions = iter(
            captioner.caption_features(
                Seen.join(seen),
                beam_size=beam_size,
                mentions=list(mentions),
                guide=guide,
                templates=templates,
                repeat_words=repeat_words,
                cancelled=lambda: all(job.abandoned.is_set() for job in present),
            )
        )
        seconds = time.perf_counter() - started
        return [(next(captions), started, seconds, len(present)) if job in present else None for job in jobs]

    cores, use_cores = 1, None
    if model_threads > 1:  # torch is loaded with the model by now
        import torch

        cores, use_cores = torch.get_num_threads(), torch.set_num_threads
    queue = Batcher(
        caption_jobs,
        size=queue_size,
        max_batch=max_batch,
        max_delay=max_delay_ms / 1000,
        threads=model_threads,
        cores=cores,
        use_cores=use_cores,
    )
    memory = BodyMemory(upload_memory_bytes)
    decoding = ThreadPoolExecutor(
        max_workers=DECODE_THREADS, thread_name_prefix="sat-decode", initializer=_lower_this_threads_priority
    )
    large_decoding = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="sat-decode-large", initializer=_lower_this_threads_priority
    )
    large_decodes = asyncio.Semaphore(LARGE_DECODES)  # held while being decoded or waiting for large_decoding

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        queue.shutdown()
        for pool in (decoding, large_decoding):
            pool.shutdown(wait=False, cancel_futures=True)

    # FastAPIOffline serves Swagger UI's files itself: plain FastAPI's /docs loads them from a CDN.
    app = FastAPIOffline(
        title="Show, Attend and Tell",
        summary="Caption a photo and see where the model looked for each word.",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.queue = queue
    app.state.memory = memory
    app.add_middleware(Guard, allowed_hosts=tuple(allowed_hosts))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        # Reached only by a bug: the traceback goes to the server's log (uvicorn logs it), not to the client.
        return JSONResponse({"error": "internal error"}, status_code=500)

    errors = {
        status: {"model": ErrorBody, "description": description}
        for status, description in [
            (400, "malformed multipart body, or a Host header this server does not answer to"),
            (408, "the request was not received within the read deadline"),
            (
                413,
                "upload larger than the server's limit, a photo with more pixels than its budget, or one whose decode "
                "needs more memory than the server has",
            ),
            (415, "not a multipart/form-data upload, or the field is not declared as an image"),
            (422, "missing field, bad beam_size, or a file that is not a readable image"),
            (503, "at capacity (the queue or the upload memory is full): try again after Retry-After seconds"),
        ]
    }

    @app.post(
        "/api/caption",
        response_model=CaptionResponse,
        responses=errors,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": [FIELD],
                            "properties": {
                                FIELD: {
                                    "type": "string",
                                    "format": "binary",
                                    "description": f"the photo ({', '.join(IMAGE_FORMATS)})",
                                }
                            },
                        }
                    }
                },
            }
        },
    )
    async def caption(
        request: Request,
        beam_size: Annotated[
            int, Query(ge=1, le=MAX_BEAM_SIZE, description=f"1 = greedy decoding; default {DEFAULT_BEAM_SIZE}")
        ] = DEFAULT_BEAM_SIZE,
        mention: Annotated[
            list[str],
            Query(
                max_length=MAX_MENTIONS,
                description="a word the caption must contain (repeat for several: mention=cat&mention=sofa)",
            ),
        ] = [],  # noqa: B006 (FastAPI copies the default)
        guidance: Annotated[
            bool, Query(description="let the encoder's ImageNet labels add a word when they are confident")
        ] = True,
        templates: Annotated[
            bool,
            Query(
                description="with guidance and no mention: a photo whose most probable label is a still life or a "
                "room with a template caption gets it when the label is confident"
            ),
        ] = True,
        detector: Annotated[
            bool,
            Query(
                description="with guidance: the COCO detector names what it finds and discourages people and objects "
                "it does not see"
            ),
        ] = True,
        repeat_words: Annotated[
            bool,
            Query(
                description="let the caption hold a word twice; by default only words such as 'a', 'in', 'and' may "
                "come again (no 'a man is riding a bike on a bike')"
            ),
        ] = False,
    ) -> CaptionResponse:
        """Caption the uploaded photo, with one attention map per word."""
        arrived = time.perf_counter()
        try:
            captioner.guidance.user_words(mention)  # a word the model cannot write: 422 before any upload work
        except InputError as error:
            raise HTTPException(422, str(error)) from None
        boundary = _multipart_boundary(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes + FORM_OVERHEAD:
            raise HTTPException(413, _too_large(max_upload_bytes))
        upload = Upload(boundary, max_upload_bytes)
        try:
            return await caption_upload(
                request, upload, arrived, beam_size, mention, guidance, templates, detector, repeat_words
            )
        finally:
            memory.give_back(upload.held)

    async def caption_upload(
        request: Request,
        upload: Upload,
        arrived: float,
        beam_size: int,
        mention: list[str],
        guidance: bool,
        templates: bool,
        detector: bool,
        repeat_words: bool,
    ) -> dict:
        memory.receiving += 1
        try:
            await asyncio.wait_for(_read_upload(request, upload, memory, queue), read_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request was not received within {read_timeout:g} s") from None
        finally:
            memory.receiving -= 1
        name = upload.filename or FIELD
        try:
            cost = decode_cost(upload.data, name=name, max_pixels=max_pixels, size=captioner.image_size)
        except TooManyPixelsError as error:
            raise HTTPException(413, str(error)) from None
        except InputError as error:
            raise HTTPException(422, str(error)) from None
        if cost > memory.size - upload.held:
            message = (
                f"{name}: decoding this photo takes {_mb(cost)} MB, more than the server's memory budget leaves beside "
                f"its upload ({_mb(memory.size - upload.held)} MB)"
            )
            raise HTTPException(413, message)
        gone = asyncio.ensure_future(_client_gone(request))
        large = cost > LARGE_DECODE_BYTES
        try:
            if large and not await _acquire_unless_gone(large_decodes, gone):
                raise ClientGone()
            try:
                if not queue.reserve():
                    message = f"the server is busy ({queue.size} requests in progress); try again shortly"
                    raise _busy(message, queue.retry_after())
                try:
                    image, decoded, kept = await decode(upload.data, name, cost, gone, large)
                except BaseException:
                    queue.release()
                    raise
            finally:
                if large:
                    large_decodes.release()
            try:
                options = (beam_size, tuple(mention), guidance, templates, detector, repeat_words)
                caption, started, seconds, batch = await queue.run(image, options, gone)
            finally:
                memory.give_back(kept)
        except TooManyPixelsError as error:
            raise HTTPException(413, str(error)) from None
        except InputError as error:
            raise HTTPException(422, str(error)) from None
        except (ClientGone, Cancelled):
            # Nobody is listening; the status is for the access log.
            raise HTTPException(499, "the client closed the connection before its photo was captioned") from None
        finally:
            gone.cancel()
        result = _response(caption, image, captioner, beam_size, guidance and detector)
        result["timings"] = {
            "queue_ms": _ms(started - decoded[1]),
            "image_ms": _ms(decoded[1] - decoded[0]),
            "decode_ms": _ms(seconds),
            "batch": batch,
            "total_ms": _ms(time.perf_counter() - arrived),
        }
        return result

    async def decode(
        data: bytearray, name: str, cost: int, gone: asyncio.Future, large: bool
    ) -> tuple[Image.Image, tuple, int]:
        """The photo decoded on a decoding thread, its `cost` charged to the memory budget meanwhile: (image,
        (start, end) of the decode, bytes still charged for the decoded image, to give back when the request
        ends). A client that hangs up stops its decode (ClientGone) within a block of the file."""
        if not await memory.take_when_free(cost, gone):
            raise ClientGone()
        kept = 0
        abandoned = threading.Event()
        try:
            started = time.perf_counter()
            read = functools.partial(
                load_image,
                data,
                name=name,
                max_pixels=max_pixels,
                size=captioner.image_size,
                cancelled=Pacer(queue.idle, abandoned) if large else abandoned.is_set,
            )
            pool = large_decoding if large else decoding
            future = asyncio.get_running_loop().run_in_executor(pool, read)
            await asyncio.wait([future, gone], return_when=asyncio.FIRST_COMPLETED)
            if not future.done():
                abandoned.set()
                await asyncio.wait([future])  # it stops within a block; its memory is held until it has
                future.exception()  # retrieved: a decode stopped for a client that left is no error
                raise ClientGone()
            image = future.result()
            kept = min(cost, image.width * image.height * 4)
            return image, (started, time.perf_counter()), kept
        finally:
            memory.give_back(cost - kept)

    @app.get("/api/health", response_model=Health)
    async def health() -> Health:
        """The model's decoder and attention grid, the limits, and how busy the queue is. The app exists only once
        its model is loaded (listener.app_from_settings loads it before listening), so an answer means it is."""
        return Health(
            status="ok",
            decoder=captioner.decoder,
            encoder_precision=captioner.encoder_precision,
            decoder_precision=captioner.decoder_precision,
            detector=captioner.detector_name,
            grid_size=captioner.grid_size,
            queue_depth=queue.depth,
            queue_size=queue.size,
            max_batch=queue.max_batch,
            max_delay_ms=max_delay_ms,
            model_threads=queue.threads,
            uploads=memory.receiving,
            upload_bytes=memory.used,
            upload_memory_bytes=memory.size,
            max_upload_bytes=max_upload_bytes,
            max_pixels=max_pixels,
            read_timeout=read_timeout,
            max_beam_size=MAX_BEAM_SIZE,
        )

    pages = {path.name: path for path in WEB_DIR.iterdir() if path.is_file()}

    # Routes rather than a static mount at "/", which would answer 404 instead of 405 for GET /api/caption.
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    @app.api_route("/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def page(name: str = "index.html") -> FileResponse:
        if name not in pages:
            raise HTTPException(404, f"no such page: /{name}")
        return FileResponse(pages[name])

    return app


def check_limits(
    *,
    max_upload_bytes: int,
    queue_size: int,
    upload_memory_bytes: int,
    max_pixels: int,
    read_timeout: float,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
    model_threads: int = 1,
) -> None:
    """An InputError naming the first limit of create_app that makes no sense."""
    if max_upload_bytes < 1:
        raise InputError(f"max upload size must be positive, got {max_upload_bytes} bytes")
    if queue_size < 1:
        raise InputError(f"queue size must be at least 1, got {queue_size}")
    if upload_memory_bytes < max_upload_bytes + FORM_OVERHEAD:
        raise InputError(
            f"upload memory must hold one upload of the limit and its form ({_mb(max_upload_bytes + FORM_OVERHEAD)} "
            f"MB), got {_mb(upload_memory_bytes)} MB"
        )
    if max_pixels < 1:
        raise InputError(f"max pixels must be at least 1, got {max_pixels}")
    if not read_timeout > 0:
        raise InputError(f"read timeout must be positive, got {read_timeout} s")
    if not 1 <= max_batch <= MAX_MAX_BATCH:
        raise InputError(f"max batch must be between 1 and {MAX_MAX_BATCH}, got {max_batch}")
    if not 0 <= max_delay_ms <= 1000:
        raise InputError(f"max delay must be between 0 and 1000 ms, got {max_delay_ms} ms")
    if not 1 <= model_threads <= MAX_MODEL_THREADS:
        raise InputError(f"model threads must be between 1 and {MAX_MODEL_THREADS}, got {model_threads}")


def auto_model_threads(device: str, torch_threads: int) -> int:
    """`sat serve --model-threads auto`: CPU_MODEL_THREADS on a CPU with that many torch threads or more (each batch
    then runs on all of them alone, or on its share beside another); 1 on a GPU, which runs one batch at a time
    anyway, or on a single torch thread."""
    return CPU_MODEL_THREADS if device == "cpu" and torch_threads >= CPU_MODEL_THREADS else 1


class Guard:
    """ASGI middleware in front of the app: a request whose Host header names none of `allowed_hosts` gets 400
    (a page elsewhere whose name was rebound to this address reads nothing), and every response carries the
    security headers (SECURITY_HEADERS and the Content-Security-Policy of its kind: the page, the API docs, or
    JSON). Starlette's TrustedHostMiddleware answers in plain text; this API answers every error in JSON."""

    def __init__(self, app, *, allowed_hosts: tuple[str, ...]) -> None:
        self.app = app
        self.any_host = ANY_HOST in allowed_hosts
        self.allowed_hosts = {host.lower().strip("[]") for host in allowed_hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {**SECURITY_HEADERS, "Content-Security-Policy": _policy(scope["path"])}
        host = Headers(scope=scope).get("host", "")
        if not self.any_host and _host_name(host) not in self.allowed_hosts:
            shown = host[:MAX_NAME_CHARS]
            message = f"this server does not answer to the host {shown!r} (see sat serve --allowed-host)"
            await JSONResponse({"error": message}, status_code=400, headers=headers)(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name, value in headers.items():
                    response_headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _policy(path: str) -> str:
    if path.startswith("/api/") or path == "/openapi.json":
        return API_POLICY
    if path.startswith(DOCS_PATHS):
        return DOCS_POLICY
    return PAGE_POLICY


def _host_name(host: str) -> str | None:
    """The name in a Host header, without its port: "[::1]:8000" -> "::1"; None when it is not a host."""
    try:
        return urlsplit("//" + host).hostname
    except ValueError:
        return None


def _multipart_boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        got = content_type.decode("latin-1") or "no content type"
        raise HTTPException(415, f"expected a multipart/form-data upload with the photo in field '{FIELD}', got {got}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart/form-data without a boundary")
    return boundary


async def _read_upload(request: Request, upload: Upload, memory: BodyMemory, queue: Batcher) -> None:
    """Stream the body into `upload`, never holding more than the limit, each chunk charged to `memory`."""
    max_bytes = upload.max_bytes
    try:
        async for chunk in request.stream():
            if upload.held + len(chunk) > max_bytes + FORM_OVERHEAD:
                raise HTTPException(413, _too_large(max_bytes))
            if not memory.take(len(chunk)):
                message = f"the server is busy (uploads hold {_mb(memory.used)} MB); try again shortly"
                raise _busy(message, queue.retry_after())
            upload.held += len(chunk)
            upload.write(chunk)
        upload.finish()
    except FormParserError as error:
        raise HTTPException(400, f"malformed multipart body ({error})") from None
    except ClientDisconnect:
        raise HTTPException(400, "the upload was interrupted") from None
    if not upload.complete:
        raise HTTPException(400, "incomplete multipart body: it ends before the closing boundary")
    if upload.data is None:
        raise HTTPException(422, f"missing the multipart field '{FIELD}' (the photo)")


async def _acquire_unless_gone(semaphore: asyncio.Semaphore, gone: asyncio.Future) -> bool:
    """Take `semaphore`: True once held, False (not held) if `gone` completes first."""
    acquire = asyncio.ensure_future(semaphore.acquire())
    await asyncio.wait([acquire, gone], return_when=asyncio.FIRST_COMPLETED)
    if acquire.done():
        return True
    acquire.cancel()
    return False


async def _client_gone(request: Request) -> None:
    """Returns when the client hangs up (the ASGI server's http.disconnect once the body has been read)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a connection the server can no longer read from is as gone as a closed one
        return


def _busy(message: str, retry_after: int) -> HTTPException:
    return HTTPException(503, message, headers={"Retry-After": str(retry_after)})


def _too_large(max_bytes: int) -> str:
    return f"upload too large: the limit is {_mb(max_bytes)} MB"


def _mb(count: int) -> str:
    return f"{count / MEGABYTE:.3g}"


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part not in ("query", "body"))
        value = f" (got {item['input']!r})" if "input" in item and item["input"] is not None else ""
        parts.append(f"{where or 'request'}: {item.get('msg', 'invalid')}{value}")
    return "; ".join(parts)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _response(result, image: Image.Image, captioner, beam_size: int, detected: bool) -> dict:
    """The answer's fields for one caption (CaptionResponse, but for its timings); `detected`: the detector ran."""
    width, height = image.info[ORIGINAL_SIZE]
    return {
        **result.as_dict(),
        "attention": np.round(np.asarray(result.attention, dtype=np.float64), ATTENTION_DECIMALS).tolist(),
        "decoder": captioner.decoder,
        "encoder_precision": captioner.encoder_precision,
        "decoder_precision": captioner.decoder_precision,
        "detector": captioner.detector_name if detected else None,
        "grid_size": captioner.grid_size,
        "beam_size": beam_size,
        "width": width,
        "height": height,
    }


def warm_up(captioner, max_batch: int) -> None:
    """Caption a blank photo alone and in a batch of `max_batch`, so that the first requests do not pay for what
    the CPU libraries prepare on first meeting a shape."""
    blank = Image.new("RGB", (captioner.image_size, captioner.image_size), "grey")
    for size in sorted({1, max_batch}):
        captioner.caption_batch([blank] * size)


def _lower_this_threads_priority() -> None:
    """Give the calling thread DECODE_NICENESS more niceness (Linux schedules threads one by one; elsewhere the
    call fails and the thread keeps its priority)."""
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + DECODE_NICENESS)
