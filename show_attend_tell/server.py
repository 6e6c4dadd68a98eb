"""`sat serve`: the HTTP API and the web page around one loaded Captioner.

POST /api/caption   multipart field `image` (+ query `beam_size`) -> caption, words, one attention map per word
GET  /api/health    model loaded, grid size, queue depth
GET  /              the page (show_attend_tell/web/); OpenAPI at /openapi.json, docs at /docs

The model runs on one worker thread, so requests are captioned one at a time and never share it. At most
`queue_size` requests are admitted at once (uploading, waiting or being captioned); more are answered 503 with
Retry-After, so a burst costs at most queue_size uploads of memory. Uploads are read in chunks and refused
(413) as soon as they pass the limit. Every error is JSON {"error": "..."}; bad input is always a 4xx saying
what is wrong, and the image checks are load_image's own.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from show_attend_tell import __version__
from show_attend_tell.config import DEFAULT_BEAM_SIZE
from show_attend_tell.errors import InputError
from show_attend_tell.guidance import MAX_MENTIONS
from show_attend_tell.images import IMAGE_FORMATS, load_image

WEB_DIR = Path(__file__).resolve().parent / "web"
MEGABYTE = 2**20
DEFAULT_MAX_UPLOAD_BYTES = 10 * MEGABYTE
DEFAULT_QUEUE_SIZE = 16
MAX_BEAM_SIZE = 10
FIELD = "image"
# Room for the multipart boundaries and part headers around the image, and a small extra form field or two.
FORM_OVERHEAD = 64 * 1024
ATTENTION_DECIMALS = 5  # 49 rounded weights still sum to 1 within 3e-4
MAX_NAME_CHARS = 100  # an uploaded file name is echoed in error messages, shortened
# Browsers send image/*; curl sends application/octet-stream for an unknown extension. Which bytes really are
# an image is load_image's decision, not the declared type's.
ACCEPTED_PART_TYPES = ("image/", "application/octet-stream")
PAGE_HEADERS = {
    # The page needs nothing from elsewhere; blob: is the chosen photo, data: the blank favicon.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong, in one sentence")


SCORE = "what beams are ranked by: log_prob / (words + <end>)**length_penalty (beam size 1: log_prob)"
LOG_PROB = "log-probability of the caption (with <end>)"


class Alternative(BaseModel):
    caption: str
    score: float = Field(description=SCORE)
    log_prob: float = Field(description=LOG_PROB)


class Guide(BaseModel):
    word: str = Field(description="the word the caption was asked to contain")
    forms: list[str] = Field(description="any of these words met it")
    source: str = Field(description='"label": the encoder\'s ImageNet head; "user": the request\'s `mention`')
    label: str | None = Field(None, description="source label: the concept's most probable ImageNet class")
    probability: float | None = Field(None, description="source label: the concept's probability")
    position: int | None = Field(description="index in `words` of the word that meets it (null: none could)")


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting for the model (other requests ahead)")
    image_ms: float = Field(description="decoding the uploaded file into pixels")
    decode_ms: float = Field(description="the model: encoder and beam search")
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
    alternatives: list[Alternative] = Field(description="the other beams, best first (highest score)")
    guidance: list[Guide] = Field(description="words the caption had to contain, and where each came from")
    grid_size: int
    beam_size: int
    width: int = Field(description="width of the photo in pixels, upright (EXIF orientation applied)")
    height: int = Field(description="height of the photo in pixels, upright")
    timings: Timings


class Health(BaseModel):
    status: str
    model_loaded: bool
    grid_size: int
    queue_depth: int = Field(description="requests admitted and not finished (uploading, waiting or captioned)")
    queue_size: int = Field(description="requests admitted at most; beyond it, 503 with Retry-After")
    max_upload_bytes: int
    max_beam_size: int


class InferenceQueue:
    """One worker thread runs the jobs in turn; at most `size` requests hold a slot at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._depth = 0
        self._job_seconds = 1.0  # running mean of a job's duration, for Retry-After
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sat-caption")

    @property
    def depth(self) -> int:
        return self._depth

    def reserve(self) -> bool:
        """Take a slot if one is free."""
        with self._lock:
            if self._depth >= self.size:
                return False
            self._depth += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._depth -= 1

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: whole seconds, at least 1 (the header's format)."""
        return max(1, math.ceil(self._depth * self._job_seconds))

    async def run(self, job: Callable[[], Any]) -> Any:
        """Run `job` on the worker for a caller holding a slot; the slot is freed when the job ends or is
        cancelled (a request abandoned while waiting costs no model time)."""
        try:
            future = self._executor.submit(self._timed, job)
        except BaseException:
            self.release()
            raise
        future.add_done_callback(lambda _: self.release())
        return await asyncio.wrap_future(future)

    def _timed(self, job: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return job()
        finally:
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - start)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Upload:
    """The `image` field of a multipart body, read chunk by chunk and refused as soon as it is too large."""

    def __init__(self, boundary: bytes, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.data: bytearray | None = None  # None until the field is seen
        self.filename: str | None = None
        self.complete = False  # the closing boundary was seen
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
) -> FastAPI:
    """The API and the page around `captioner` (a loaded show_attend_tell.captioner.Captioner, or anything
    with the same `caption(image, beam_size=)` and `grid_size`)."""
    if max_upload_bytes < 1:
        raise InputError(f"max upload size must be positive, got {max_upload_bytes} bytes")
    if queue_size < 1:
        raise InputError(f"queue size must be at least 1, got {queue_size}")
    queue = InferenceQueue(queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        queue.shutdown()

    # FastAPIOffline serves Swagger UI's files itself: plain FastAPI's /docs loads them from a CDN.
    app = FastAPIOffline(
        title="Show, Attend and Tell",
        summary="Caption a photo and see where the model looked for each word.",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.queue = queue

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
            (400, "malformed multipart body"),
            (413, "upload larger than the server's limit"),
            (415, "not a multipart/form-data upload, or the field is not declared as an image"),
            (422, "missing field, bad beam_size, or a file that is not a readable image"),
            (503, "queue full: try again after Retry-After seconds"),
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
        if not queue.reserve():
            raise HTTPException(
                503,
                f"the server is busy ({queue.size} requests in progress); try again shortly",
                headers={"Retry-After": str(queue.retry_after())},
            )
        try:
            upload = await _read_upload(request, boundary, max_upload_bytes)
        except BaseException:
            queue.release()
            raise

        def job() -> dict:
            started = time.perf_counter()
            image = load_image(upload.data, name=upload.filename or FIELD)
            decoded = time.perf_counter()
            result = captioner.caption(image, beam_size=beam_size, mentions=mention, guide=guidance)
            return {
                "caption": result.text,
                "words": result.words,
                "attention": np.round(np.asarray(result.attention, dtype=np.float64), ATTENTION_DECIMALS).tolist(),
                "score": float(result.score),
                "log_prob": float(result.log_prob),
                "alternatives": [
                    {"caption": a.text, "score": float(a.score), "log_prob": float(a.log_prob)}
                    for a in result.alternatives
                ],
                "guidance": [
                    {**word.as_dict(), "position": position}
                    for word, position in zip(result.guidance, result.guided_positions, strict=True)
                ],
                "grid_size": captioner.grid_size,
                "beam_size": beam_size,
                "width": image.width,
                "height": image.height,
                "timings": {
                    "queue_ms": _ms(started - arrived),
                    "image_ms": _ms(decoded - started),
                    "decode_ms": _ms(time.perf_counter() - decoded),
                },
            }

        try:
            result = await queue.run(job)
        except InputError as error:
            raise HTTPException(422, str(error)) from None
        result["timings"]["total_ms"] = _ms(time.perf_counter() - arrived)
        return result

    @app.get("/api/health", response_model=Health)
    async def health() -> Health:
        """Whether the model is loaded, its attention grid, and how busy the queue is."""
        return Health(
            status="ok",
            model_loaded=captioner is not None,
            grid_size=captioner.grid_size,
            queue_depth=queue.depth,
            queue_size=queue.size,
            max_upload_bytes=max_upload_bytes,
            max_beam_size=MAX_BEAM_SIZE,
        )

    pages = {path.name: path for path in WEB_DIR.iterdir() if path.is_file()}

    # Routes rather than a static mount at "/", which would answer 404 instead of 405 for GET /api/caption.
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    @app.api_route("/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def page(name: str = "index.html") -> FileResponse:
        if name not in pages:
            raise HTTPException(404, f"no such page: /{name}")
        return FileResponse(pages[name], headers=PAGE_HEADERS)

    return app


def _multipart_boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        got = content_type.decode("latin-1") or "no content type"
        raise HTTPException(415, f"expected a multipart/form-data upload with the photo in field '{FIELD}', got {got}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart/form-data without a boundary")
    return boundary


async def _read_upload(request: Request, boundary: bytes, max_bytes: int) -> Upload:
    """Stream the body into an Upload, never holding more than the limit."""
    upload = Upload(boundary, max_bytes)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes + FORM_OVERHEAD:
                raise HTTPException(413, _too_large(max_bytes))
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
    return upload


def _too_large(max_bytes: int) -> str:
    return f"upload too large: the limit is {max_bytes / MEGABYTE:.3g} MB"


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part not in ("query", "body"))
        value = f" (got {item['input']!r})" if "input" in item and item["input"] is not None else ""
        parts.append(f"{where or 'request'}: {item.get('msg', 'invalid')}{value}")
    return "; ".join(parts)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
