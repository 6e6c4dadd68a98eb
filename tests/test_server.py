"""`sat serve` in-process: captions with attention maps, every kind of bad upload as a 4xx, the bounded queue."""

from __future__ import annotations

import asyncio
import functools
import io
import math
import re
import struct
import threading
import time
import types
import zlib

import numpy as np
import pytest
import torch
from conftest import ColourGrid
from fastapi.testclient import TestClient
from helpers import EXAMPLES, PHOTO, corrupt_tiff, load_captioner, load_script, png_header_only, stand_in_captioner
from PIL import Image

from show_attend_tell.captioner import SHIPPED_MODEL, Alternative, Caption, Captioner
from show_attend_tell.fast_encoder import resolve_precision
from show_attend_tell.images import load_image
from show_attend_tell.server import FORM_OVERHEAD, MAX_BEAM_SIZE, PACE_POLL, PACE_SLICE, Health, Pacer, create_app


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Captioner:
    """The shipped model with the detector (slow: its 448 px encoder on every upload)."""
    return load_captioner(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module", params=["stand-in", pytest.param("shipped", marks=pytest.mark.slow)])
def captioner(request) -> Captioner:
    """Each API test runs on the stand-in captioner (a tiny model over mean colours: the fast loop) and on the
    shipped model (the slow suite)."""
    return stand_in_captioner() if request.param == "stand-in" else request.getfixturevalue("shipped")


@pytest.fixture(scope="module")
def client(captioner):
    with local_client(create_app(captioner, max_upload_bytes=200_000, queue_size=4)) as client:
        yield client


def shipped_model(captioner: Captioner) -> bool:
    """Whether `captioner` is the shipped model (not the stand-in, nor load_captioner's random decoder)."""
    return captioner.labels is not None and (SHIPPED_MODEL / "config.json").is_file()


def local_client(app) -> TestClient:
    """A client whose requests name localhost, one of the hosts a server answers by default."""
    return TestClient(app, base_url="http://localhost")


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def png_bomb(side: int = 100_000) -> bytes:
    """A valid PNG header declaring side x side pixels (30 GB decoded) and no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def post(client, data: bytes, *, name: str = "photo.jpg", content_type: str = "image/jpeg", query: str = ""):
    return client.post(f"/api/caption{query}", files={"image": (name, data, content_type)})


def assert_error(response, status: int, *phrases: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    return message


def assert_caption(body: dict, captioner: Captioner, beam_size: int) -> None:
    g = captioner.grid_size
    assert body["words"] and body["caption"] == " ".join(body["words"])
    assert body["decoder"] == captioner.decoder == captioner.model.config.decoder
    assert body["encoder_precision"] == captioner.encoder_precision
    assert body["decoder_precision"] == captioner.decoder_precision
    if not isinstance(captioner.model.encoder, ColourGrid):  # the real encoder: auto's choice for this CPU
        assert captioner.encoder_precision == captioner.model.encoder.precision == resolve_precision("auto")
    assert body["grid_size"] == g and body["beam_size"] == beam_size
    attention = np.array(body["attention"])
    assert attention.shape == (len(body["words"]), g, g)
    assert (attention >= 0).all()
    np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, atol=1e-3)
    assert isinstance(body["score"], float) and body["log_prob"] <= body["score"] < 0
    assert len(body["alternatives"]) <= beam_size - 1
    for alternative in body["alternatives"]:  # ranked by score, each shown with its log-probability
        assert alternative["caption"] and alternative["score"] <= body["score"] + 1e-6
        assert alternative["log_prob"] <= alternative["score"] < 0
    timings = body["timings"]
    assert all(timings[key] >= 0 for key in ("queue_ms", "image_ms", "decode_ms", "total_ms"))
    assert timings["total_ms"] >= timings["decode_ms"] > 0


def test_captions_a_photo_with_one_attention_map_per_word(client, captioner):
    response = post(client, PHOTO.read_bytes(), query="?beam_size=3")
    assert response.status_code == 200, response.text
    body = response.json()
    assert_caption(body, captioner, beam_size=3)
    assert len(body["alternatives"]) == 2
    assert (body["width"], body["height"]) == Image.open(PHOTO).size
    # the same caption as the Python API gives
    assert body["words"] == captioner.caption(PHOTO, beam_size=3).words


def test_greedy_decoding_and_an_exif_rotated_photo(client, captioner):
    photo = Image.open(EXAMPLES / "coffee.jpg")
    exif = photo.getexif()
    exif[0x0112] = 6  # stored sideways: upright it is taller than wide
    response = post(client, jpeg(photo, exif=exif), query="?beam_size=1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert_caption(body, captioner, beam_size=1)
    assert body["alternatives"] == []
    assert (body["width"], body["height"]) == (photo.height, photo.width)


def test_bad_files_are_4xx_with_the_reason_and_the_server_keeps_serving(client, captioner):
    data = PHOTO.read_bytes()
    assert_error(post(client, b"not an image at all", name="notes.jpg"), 422, "notes.jpg", "not an image")
    assert_error(post(client, data[: len(data) // 2], name="cut.jpg"), 422, "cut.jpg", "truncated")
    assert_error(post(client, b"", name="empty.jpg"), 422, "empty.jpg", "empty file (0 bytes)")
    assert_error(post(client, png_bomb(), name="bomb.png", content_type="image/png"), 413, "bomb.png", "too large")
    # the part's declared type: a text file is refused whatever its bytes; an unknown binary type is judged by them
    assert_error(post(client, data, content_type="text/plain"), 415, "text/plain", "expected an image")
    assert post(client, data, name="photo", content_type="application/octet-stream").status_code == 200
    response = post(client, data)
    assert response.status_code == 200 and response.json()["words"]
    assert client.get("/api/health").json()["queue_depth"] == 0


def test_requests_that_are_not_a_photo_upload(client):
    assert_error(client.post("/api/caption", json={"image": "x"}), 415, "multipart/form-data", "application/json")
    assert_error(client.post("/api/caption"), 415, "multipart/form-data")
    response = client.post("/api/caption", files={"photo": ("a.jpg", PHOTO.read_bytes(), "image/jpeg")})
    assert_error(response, 422, "missing", "'image'")
    response = client.post("/api/caption", files=[("image", ("a.jpg", b"1", "image/jpeg"))] * 2)
    assert_error(response, 422, "more than once")
    response = client.post(
        "/api/caption", content=b"--x\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert_error(response, 400, "incomplete multipart body")
    assert_error(client.get("/api/caption"), 405)
    assert_error(client.get("/no/such/page"), 404)


@pytest.mark.parametrize("value", ["0", str(MAX_BEAM_SIZE + 1), "-1", "abc", "2.5"])
def test_bad_beam_size(client, value):
    assert_error(post(client, PHOTO.read_bytes(), query=f"?beam_size={value}"), 422, "beam_size", repr(value))


def test_oversized_upload_is_413(client):
    big = jpeg(Image.effect_noise((400, 400), 60).convert("RGB"), quality=100)
    assert len(big) > 200_000
    assert_error(post(client, big), 413, "too large", "0.19")  # the limit in MB


def test_upload_limit_is_enforced_while_streaming(captioner):
    """A body with no Content-Length is cut off at the limit: the rest is never read."""
    app = create_app(captioner, max_upload_bytes=100_000, queue_size=2)
    boundary = b"b0undary"
    head = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    chunk_size, chunks = 16_384, 1_000  # a 16 MB body
    sent, messages = [], []

    async def receive():
        if not sent:
            sent.append(len(head))
            return {"type": "http.request", "body": head, "more_body": True}
        sent.append(chunk_size)
        return {"type": "http.request", "body": b"\xff" * chunk_size, "more_body": len(sent) < chunks}

    async def send(message):
        messages.append(message)

    asyncio.run(app(asgi_scope(boundary), receive, send))
    assert messages[0]["status"] == 413
    assert sum(sent) <= 100_000 + 2 * chunk_size  # read up to the limit, not the 16 MB
    assert app.state.queue.depth == 0


def test_declared_length_over_the_limit_is_refused_before_reading(client):
    response = client.post(
        "/api/caption",
        content=b"x" * 300_000,
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert_error(response, 413, "too large")


class BlockingCaptioner:
    """A stand-in model: each caption waits until the test lets it go, and records how many ran at once."""

    grid_size = 2
    image_size = 32
    decoder = "lstm"
    encoder_precision = "fp32"
    decoder_precision = "fp32"
    detector_name = None
    guidance = types.SimpleNamespace(user_words=lambda words: [])  # every mention is a word it knows

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.go = threading.Event()
        self.running = self.most_running = 0
        self.batches: list[tuple[int, int]] = []  # (photos, beam size) of each call
        self.lock = threading.Lock()

    def encode(self, images, **options):
        return torch.zeros(len(images), 1, 1)

    def caption_features(self, features, beam_size=3, **options):
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.batches.append((len(features), beam_size))
        self.started.release()
        self.go.wait(timeout=30)
        time.sleep(0.01)
        with self.lock:
            self.running -= 1
        alpha = np.full((2, 2, 2), 0.25, dtype=np.float32)
        caption = Caption("a photo", ["a", "photo"], -1.5, -2.6, alpha, [Alternative("the photo", -2.0, -3.5)])
        return [caption] * len(features)


def in_thread(function, *args, **kwargs) -> tuple[threading.Thread, list]:
    result = []
    thread = threading.Thread(target=lambda: result.append(function(*args, **kwargs)))
    thread.start()
    return thread, result


def test_full_queue_answers_503_with_retry_after():
    stub = BlockingCaptioner()
    data = PHOTO.read_bytes()
    with local_client(create_app(stub, queue_size=1)) as client:
        first, result = in_thread(post, client, data)
        assert stub.started.acquire(timeout=30)  # the first request holds the only slot
        health = client.get("/api/health").json()
        assert health["queue_depth"] == 1 and health["queue_size"] == 1
        busy = post(client, data)
        assert_error(busy, 503, "busy")
        assert int(busy.headers["Retry-After"]) >= 1
        stub.go.set()
        first.join(timeout=30)
        assert result[0].status_code == 200
        assert result[0].json()["attention"] == [[[0.25, 0.25], [0.25, 0.25]]] * 2
        assert post(client, data).status_code == 200  # served again once the queue has room
        assert client.get("/api/health").json()["queue_depth"] == 0


def test_waiting_requests_are_batched_by_their_options_one_batch_at_a_time():
    stub = BlockingCaptioner()
    data = PHOTO.read_bytes()
    app = create_app(stub, queue_size=16, max_batch=3)
    with local_client(app) as client:
        first = in_thread(post, client, data, query="?beam_size=2")
        assert stub.started.acquire(timeout=30)  # a batch of one holds the model
        beams = [3, 5, 3, 3, 3, 5, 3]
        threads = []
        for beam in beams:  # one after another: each waits before the next is sent
            threads.append(in_thread(post, client, data, query=f"?beam_size={beam}"))
            deadline = time.monotonic() + 30
            while app.state.queue.waiting < len(threads):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        stub.go.set()
        for thread, _ in [first, *threads]:
            thread.join(timeout=30)
    answers = [result[0] for _, result in [first, *threads]]
    assert [answer.status_code for answer in answers] == [200] * 8
    # oldest first, equal options together, at most max_batch at once; a batch at a time
    assert stub.batches == [(1, 2), (3, 3), (2, 5), (2, 3)]
    assert stub.most_running == 1
    assert sorted(answer.json()["timings"]["batch"] for answer in answers) == [1, 2, 2, 2, 2, 3, 3, 3]
    assert all(answer.json()["beam_size"] == beam for answer, beam in zip(answers, [2, *beams], strict=True))


class ThreadCountingCaptioner(BlockingCaptioner):
    """BlockingCaptioner that also records the torch threads each batch ran on (its model thread's own count)."""

    def __init__(self) -> None:
        super().__init__()
        self.torch_threads: list[int] = []

    def caption_features(self, features, beam_size=3, **options):
        with self.lock:
            self.torch_threads.append(torch.get_num_threads())
        return super().caption_features(features, beam_size=beam_size, **options)


def test_two_model_threads_caption_two_batches_at_once_and_share_the_torch_threads():
    """--model-threads 2: a second photo is captioned beside the first instead of after it; a batch alone runs on
    all of torch's threads, one beside another on half of them; the photos waiting are shared between the model
    threads (each batch takes ceil(waiting / 2))."""
    stub = ThreadCountingCaptioner()
    data = PHOTO.read_bytes()
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # the process's torch threads when the app is made
    try:
        app = create_app(stub, queue_size=16, max_batch=8, model_threads=2)
    finally:
        torch.set_num_threads(before)
    with local_client(app) as client:
        assert client.get("/api/health").json()["model_threads"] == 2
        first = in_thread(post, client, data)
        assert stub.started.acquire(timeout=30)
        second = in_thread(post, client, data)
        assert stub.started.acquire(timeout=30)  # started while the first still holds its model thread
        assert stub.running == 2 and stub.torch_threads == [4, 2]
        threads = []
        for _ in range(3):  # both model threads busy: these wait
            threads.append(in_thread(post, client, data))
            deadline = time.monotonic() + 30
            while app.state.queue.waiting < len(threads):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        stub.go.set()
        for thread, _ in [first, second, *threads]:
            thread.join(timeout=30)
    answers = [result[0] for _, result in [first, second, *threads]]
    assert [answer.status_code for answer in answers] == [200] * 5
    assert stub.most_running == 2
    # the three waiting photos: two for the first model thread to be free, the third for the other (the two
    # batches may reach the model in either order)
    assert [photos for photos, _ in stub.batches][:2] == [1, 1]
    assert sorted(photos for photos, _ in stub.batches[2:]) == [1, 2]


def test_with_two_model_threads_the_model_is_idle_only_when_neither_captions():
    """Batcher.idle (which paces large decodes) is clear while any batch of any model thread runs; use_cores
    gets all the cores for a batch that starts alone, a share for one that starts beside another."""
    from show_attend_tell.server import Batcher

    gates = [threading.Event() for _ in range(3)]
    started, calls, cores = threading.Semaphore(0), [], []

    def run(jobs):
        index = len(calls)
        calls.append(len(jobs))
        started.release()
        assert gates[index].wait(timeout=30)
        return [None] * len(jobs)

    batcher = Batcher(run, size=8, max_batch=8, max_delay=0, threads=2, cores=2, use_cores=cores.append)
    loop = asyncio.new_event_loop()
    worker = threading.Thread(target=loop.run_forever, daemon=True)
    worker.start()

    def submit():
        assert batcher.reserve()
        gone = loop.create_future()  # never: the client stays
        return asyncio.run_coroutine_threadsafe(batcher.run(Image.new("RGB", (4, 4)), (3,), gone), loop)

    try:
        assert batcher.idle.is_set()
        first = submit()
        assert started.acquire(timeout=30) and not batcher.idle.is_set()
        second = submit()
        assert started.acquire(timeout=30)
        assert cores == [2, 1]
        gates[0].set()
        first.result(timeout=30)
        assert not batcher.idle.is_set()  # the second batch still runs
        third = submit()
        assert started.acquire(timeout=30) and cores == [2, 1, 1]  # beside the second
        gates[1].set()
        second.result(timeout=30)
        assert not batcher.idle.is_set()
        gates[2].set()
        third.result(timeout=30)
        deadline = time.monotonic() + 30
        while not batcher.idle.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert calls == [1, 1, 1] and batcher.depth == 0
    finally:
        for gate in gates:
            gate.set()
        batcher.shutdown()
        loop.call_soon_threadsafe(loop.stop)
        worker.join(timeout=30)


def test_model_threads_auto_is_two_on_a_cpu_with_two_torch_threads_and_one_otherwise():
    from show_attend_tell.server import auto_model_threads

    assert auto_model_threads("cpu", 2) == 2 and auto_model_threads("cpu", 8) == 2
    assert auto_model_threads("cpu", 1) == 1 and auto_model_threads("cuda", 8) == 1
    with pytest.raises(Exception, match="model threads must be between 1 and 8, got 0"):
        create_app(BlockingCaptioner(), model_threads=0)


class OverlapCounter:
    """A captioner's stand-in that passes everything to it and counts the encodes running at once (most)."""

    def __init__(self, inner) -> None:
        self.inner, self.running, self.most, self.lock = inner, 0, 0, threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, *args, **options):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return self.inner.encode(*args, **options)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("model_threads", [1, 2])
def test_a_photo_in_a_batch_gets_the_answer_it_gets_alone(captioner, model_threads):
    """Also with two model threads, whose batches run side by side on a share of torch's threads each."""
    photos = [PHOTO, *(EXAMPLES / name for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"))]
    counted = OverlapCounter(captioner)
    app = create_app(counted, max_batch=4, max_delay_ms=1000, model_threads=model_threads)
    with local_client(app) as client:
        alone = [post(client, path.read_bytes(), query="?beam_size=3").json() for path in photos]
        assert counted.most == 1
        threads = [in_thread(post, client, path.read_bytes(), query="?beam_size=3") for path in photos]
        for thread, _ in threads:
            thread.join(timeout=120)
    together = [result[0].json() for _, result in threads]
    assert [body["timings"]["batch"] for body in alone] == [1] * len(photos)
    if model_threads == 1:
        assert max(body["timings"]["batch"] for body in together) > 1  # some were captioned together
        assert counted.most == 1
    elif shipped_model(captioner):  # its encoder takes long enough for the photos to meet there
        assert counted.most == 2  # some were captioned side by side
    # an int8 decoder (the shipped model's) does not depend on its batch; an fp32 one (the stand-in's, or the shipped
    # model's with int8=False) does in the last bits of its sums
    exact = captioner.decoder_precision == "int8"
    for one, batched in zip(alone, together, strict=True):
        del one["timings"], batched["timings"]
        if model_threads == 1 and exact:
            assert batched == one
        elif model_threads == 1:  # the same words, numbers up to 1e-4 apart (a rounded digit may tip)
            assert_close(batched, one, 1e-4)
        else:  # on one torch thread instead of two: the same words, numbers up to 0.02 apart (sums in another order)
            assert_close(batched, one, 0.02)


def assert_close(value, expected, tolerance: float, where: str = "body") -> None:
    """`value` equals `expected` (JSON bodies) but for floats, which may differ by `tolerance` (or that share of it)."""
    if isinstance(expected, float):
        assert value == pytest.approx(expected, rel=tolerance, abs=tolerance), where
    elif isinstance(expected, dict):
        assert isinstance(value, dict) and value.keys() == expected.keys(), where
        for key in expected:
            assert_close(value[key], expected[key], tolerance, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(value, list) and len(value) == len(expected), where
        for index, (item, wanted) in enumerate(zip(value, expected, strict=True)):
            assert_close(item, wanted, tolerance, f"{where}[{index}]")
    else:
        assert value == expected, where


def test_health_openapi_and_the_page(client, captioner):
    health = client.get("/api/health").json()
    assert health["status"] == "ok"
    assert health["grid_size"] == captioner.grid_size and health["queue_depth"] == 0
    assert health["decoder"] == captioner.decoder and health["encoder_precision"] == captioner.encoder_precision
    assert health["decoder_precision"] == captioner.decoder_precision
    assert health["max_upload_bytes"] == 200_000 and health["max_beam_size"] == MAX_BEAM_SIZE
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/api/caption"]["post"]
    assert "image" in operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    names = [p["name"] for p in operation["parameters"]]
    assert names == ["beam_size", "mention", "guidance", "templates", "detector", "repeat_words"]
    assert health["detector"] == captioner.detector_name
    assert {"200", "413", "415", "422", "503"} <= set(operation["responses"])
    assert "/api/health" in schema["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    # the docs page works offline: every script and stylesheet it names is served by this app
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs.text)
    assert assets and all(a.startswith("/") and client.get(a).status_code == 200 for a in assets)
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.head("/").status_code == 200
    for asset, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        response = client.get(f"/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_health_answers_only_once_the_model_is_loaded(monkeypatch, capsys):
    """No `model_loaded` flag: the app is built from a loaded model, so a server that answers has one, and a model
    that fails to load stops `sat serve` with one line before it listens."""
    import uvicorn

    from show_attend_tell import cli
    from show_attend_tell.errors import InputError

    assert "model_loaded" not in Health.model_fields
    with local_client(create_app(BlockingCaptioner())) as client:
        assert "model_loaded" not in client.get("/api/health").json()

    def broken(cls, path=None, **options):
        raise InputError("model/config.json: not a checkpoint")

    monkeypatch.setattr(Captioner, "load", classmethod(broken))
    monkeypatch.setattr(uvicorn, "Server", lambda config: pytest.fail("listening without a model"))
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err.strip().endswith("model/config.json: not a checkpoint")


def test_the_page_loads_nothing_from_the_internet():
    from show_attend_tell.server import WEB_DIR

    files = sorted(WEB_DIR.iterdir())
    assert {path.name for path in files} >= {"index.html", "app.js", "style.css"}
    for path in files:
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name


def test_bad_settings_are_refused(captioner):
    from show_attend_tell.errors import InputError

    with pytest.raises(InputError, match="queue size"):
        create_app(captioner, queue_size=0)
    with pytest.raises(InputError, match="max upload size"):
        create_app(captioner, max_upload_bytes=0)


def test_sat_serve_listens_on_loopback_with_the_given_limits(captioner, monkeypatch, capsys):
    import uvicorn

    from show_attend_tell import cli, listener, server

    served, warmed = {}, []

    class Server:
        def __init__(self, config) -> None:
            self.config = config

        def run(self) -> None:
            config = self.config
            served.update(app=config.app, host=config.host, port=config.port, http=config.http)
            served.update(max_connections=config.max_connections, header_timeout=config.header_timeout)

    monkeypatch.setattr(Captioner, "load", classmethod(lambda cls, path=None, **_: captioner))
    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setattr(server, "warm_up", lambda captioner, max_batch: warmed.append(max_batch))
    flags = ["--max-upload-mb", "0.5", "--queue-size", "3", "--max-batch", "4", "--max-delay-ms", "2.5"]
    flags += ["--model-threads", "3"]
    assert cli.main(["serve", *flags, "--max-connections", "50", "--header-timeout", "3"]) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 8000) and warmed == [4]
    assert served["http"] is listener.GuardedH11Protocol
    assert (served["max_connections"], served["header_timeout"]) == (50, 3.0)
    with local_client(served["app"]) as client:
        health = client.get("/api/health").json()
    assert health["max_upload_bytes"] == 2**19 and health["queue_size"] == 3
    assert (health["max_batch"], health["max_delay_ms"], health["model_threads"]) == (4, 2.5, 3)
    # the flags' defaults (literals, so that `sat` does not import the server to parse) are the library's
    from show_attend_tell.images import DEFAULT_MAX_PIXELS
    from show_attend_tell.server import (
        DEFAULT_MAX_BATCH,
        DEFAULT_MAX_DELAY_MS,
        DEFAULT_QUEUE_SIZE,
        DEFAULT_READ_TIMEOUT,
        DEFAULT_UPLOAD_MEMORY_BYTES,
        auto_model_threads,
    )

    assert (health["max_pixels"], health["upload_memory_bytes"]) == (DEFAULT_MAX_PIXELS, DEFAULT_UPLOAD_MEMORY_BYTES)
    assert health["read_timeout"] == DEFAULT_READ_TIMEOUT
    assert capsys.readouterr().err == ""  # no warning on loopback
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "8080"]) == 0
    assert (served["host"], served["port"]) == ("0.0.0.0", 8080)
    assert (served["max_connections"], served["header_timeout"]) == (
        listener.DEFAULT_MAX_CONNECTIONS,
        listener.DEFAULT_HEADER_TIMEOUT,
    )
    err = capsys.readouterr().err
    assert "anyone who can reach this machine" in err and "--allowed-host" in err
    with TestClient(served["app"], base_url="http://photos.example:8080") as client:
        assert_error(client.get("/api/health"), 400, "photos.example")  # a name it was not given
    with local_client(served["app"]) as client:
        health = client.get("/api/health").json()
    assert (health["queue_size"], health["max_batch"]) == (DEFAULT_QUEUE_SIZE, DEFAULT_MAX_BATCH)
    assert health["max_delay_ms"] == DEFAULT_MAX_DELAY_MS
    assert health["model_threads"] == auto_model_threads(captioner.device.type, torch.get_num_threads())
    assert cli.main(["serve", "--host", "0.0.0.0", "--allowed-host", "photos.example"]) == 0
    assert "--allowed-host" not in capsys.readouterr().err
    with TestClient(served["app"], base_url="http://photos.example:8080") as client:
        assert client.get("/api/health").status_code == 200
    # limits that contradict each other: one line, before the model is loaded
    monkeypatch.setattr(Captioner, "load", classmethod(lambda cls, path=None, **_: pytest.fail("model loaded")))
    assert cli.main(["serve", "--max-upload-mb", "20", "--upload-memory-mb", "10"]) == 2
    assert "upload memory must hold one upload of the limit" in capsys.readouterr().err
    for flag, value, message in [
        ("--queue-size", "0", "must be at least 1, got 0"),
        ("--max-batch", "65", "must be between 1 and 64, got 65"),
        ("--max-delay-ms", "-1", "must be between 0 and 1000 ms, got -1"),
        ("--workers", "0", "must be at least 1, got 0"),
        ("--model-threads", "9", "expected auto or a whole number from 1 to 8, got '9'"),
        ("--model-threads", "two", "expected auto or a whole number from 1 to 8, got 'two'"),
    ]:
        with pytest.raises(SystemExit) as exit:  # refused by the parser, before the model is loaded
            cli.main(["serve", flag, value])
        assert exit.value.code == 2
        assert f"{flag}: {message}" in capsys.readouterr().err


def test_the_users_words_and_label_guidance_in_the_api(client, captioner):
    photo = (EXAMPLES / "chelsea.jpg").read_bytes()
    body = post(client, photo, query="?beam_size=3&mention=grass").json()
    assert np.array(body["attention"]).shape == (len(body["words"]), captioner.grid_size, captioner.grid_size)
    sources = {guide["source"]: guide for guide in body["guidance"]}
    assert sources["user"]["word"] == "grass" and body["words"][sources["user"]["position"]] == "grass"
    if shipped_model(captioner):  # the labels guide only a vocabulary that has their words
        assert sources["label"]["label"] == "Egyptian cat" and 0.5 < sources["label"]["probability"] <= 1
        assert body["words"][sources["label"]["position"]] in sources["label"]["forms"]
    plain = post(client, photo, query="?beam_size=3&guidance=false").json()
    assert plain["guidance"] == []
    assert plain["words"] == captioner.caption(EXAMPLES / "chelsea.jpg", beam_size=3, guide=False).words
    assert_error(post(client, photo, query="?mention=cofee"), 422, "mention 'cofee'", "closest words")
    assert body["template"] is False and plain["template"] is False
    if shipped_model(captioner):  # a confident still life: its template, read by the decoder
        coffee = (EXAMPLES / "coffee.jpg").read_bytes()
        body = post(client, coffee, query="?beam_size=3").json()
        assert body["template"] and body["caption"] == "a cup of coffee on a table"
        assert body["guidance"][0]["label"] == "espresso" and body["words"][body["guidance"][0]["position"]] == "cup"
        assert np.array(body["attention"]).shape == (len(body["words"]), captioner.grid_size, captioner.grid_size)
        decoded = post(client, coffee, query="?beam_size=3&templates=false").json()
        assert not decoded["template"] and body["alternatives"][0]["caption"] == decoded["caption"]
    assert_error(post(client, photo, query="?" + "&".join(["mention=a"] * 9)), 422)


@pytest.mark.slow
def test_the_detector_in_the_api(shipped):
    captioner = shipped
    coffee = (EXAMPLES / "coffee.jpg").read_bytes()
    with local_client(create_app(captioner)) as client:
        body = post(client, coffee, query="?beam_size=3").json()
        off = post(client, coffee, query="?beam_size=3&detector=false").json()
    assert body["detector"] == "centernet"
    cup = body["detections"][0]
    assert cup["class"] == "cup" and cup["score"] > 0.4
    x1, y1, x2, y2 = cup["box"]
    assert 0 <= x1 < x2 <= body["width"] and 0 <= y1 < y2 <= body["height"]  # in the photo's pixels
    assert "person" in body["discouraged"]  # nobody in the photo: people words discouraged
    assert off["detections"] == [] and off["discouraged"] == []
    assert off["words"] == captioner.caption(EXAMPLES / "coffee.jpg", beam_size=3, detect=False).words


# Hostile clients (issue 14): slow, vanishing and pixel-heavy uploads cost no model time.


def multipart(data: bytes, boundary: bytes = b"b0undary", name: str = "photo.jpg") -> bytes:
    head = f'--{boundary.decode()}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
    return (head + "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n--" + boundary + b"--\r\n"


def asgi_scope(boundary: bytes = b"b0undary") -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/caption",
        "raw_path": b"/api/caption",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary), (b"host", b"localhost")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


class Client:
    """One raw ASGI request: sends `body` (or only its first `stall_after` bytes, then nothing more), and hangs
    up after the body when `hang_up` (as a client that gave up waiting) or once `hang_up_on` is set, else once
    the response is complete."""

    def __init__(
        self,
        body: bytes,
        *,
        stall_after: int | None = None,
        hang_up: bool = False,
        hang_up_on: asyncio.Event | None = None,
    ) -> None:
        self.body, self.stall_after, self.hang_up, self.hang_up_on = body, stall_after, hang_up, hang_up_on
        self.sent = False
        self.messages: list[dict] = []
        self.done = asyncio.Event()

    async def receive(self) -> dict:
        if not self.sent:
            self.sent = True
            if self.stall_after is not None:
                return {"type": "http.request", "body": self.body[: self.stall_after], "more_body": True}
            return {"type": "http.request", "body": self.body, "more_body": False}
        if self.stall_after is not None:
            await asyncio.Event().wait()  # never sends the rest
        if self.hang_up_on is not None:
            await self.hang_up_on.wait()
        elif not self.hang_up:
            await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.done.set()

    async def run(self, app) -> int | None:
        await app(asgi_scope(), self.receive, self.send)
        return self.status

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.messages if m["type"] == "http.response.start"), None)


def test_stalled_uploads_take_no_model_slot_and_get_408_at_the_read_deadline():
    stub = BlockingCaptioner()
    stub.go.set()
    app = create_app(stub, queue_size=1, read_timeout=1.0)
    body = multipart(PHOTO.read_bytes())

    async def scenario():
        stalled = [Client(body, stall_after=1024) for _ in range(4)]
        tasks = [asyncio.ensure_future(client.run(app)) for client in stalled]
        await asyncio.sleep(0.1)
        assert app.state.memory.receiving == 4 and app.state.memory.used == 4 * 1024
        assert app.state.queue.depth == 0
        start = time.perf_counter()
        assert await Client(body).run(app) == 200  # the only model slot was free all along
        assert time.perf_counter() - start < 0.9 and not any(task.done() for task in tasks)
        assert await asyncio.wait_for(asyncio.gather(*tasks), 10) == [408] * 4
        return stalled

    stalled = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert b"within 1 s" in stalled[0].messages[1]["body"]
    assert app.state.memory.receiving == 0 and app.state.memory.used == 0 and app.state.queue.depth == 0


def test_stalled_uploads_cost_only_their_bytes_and_full_upload_memory_is_503():
    stub = BlockingCaptioner()
    stub.go.set()
    app = create_app(stub, max_upload_bytes=100_000, upload_memory_bytes=100_000 + FORM_OVERHEAD, read_timeout=10.0)
    body = multipart(jpeg(Image.new("RGB", (32, 32), "red")))  # its decode costs 8 KB of the memory too
    photo = multipart(PHOTO.read_bytes())
    heavy = multipart(bytes(90_000))

    async def scenario():
        # more stalled clients than any count of uploads would have allowed: they hold 40 KB, the others get in
        stalled = [asyncio.ensure_future(Client(photo, stall_after=1024).run(app)) for _ in range(40)]
        await asyncio.sleep(0.1)
        assert app.state.memory.receiving == 40 and app.state.memory.used == 40 * 1024
        assert await Client(body).run(app) == 200
        # two that stall after sending 60 KB each: a larger upload no longer fits in the memory (503)...
        stalled += [asyncio.ensure_future(Client(heavy, stall_after=60_000).run(app)) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert app.state.memory.used == 40 * 1024 + 2 * 60_000
        busy = Client(photo)
        assert await busy.run(app) == 503
        # ...and a small one's upload does, but not its decode: that waits for memory, as for the model
        waiting = asyncio.ensure_future(Client(body).run(app))
        await asyncio.sleep(0.2)
        assert not waiting.done() and len(stub.batches) == 1
        for task in stalled:
            task.cancel()
        await asyncio.gather(*stalled, return_exceptions=True)
        assert await asyncio.wait_for(waiting, 10) == 200  # decoded once the stalled uploads gave their bytes back
        assert app.state.memory.receiving == 0 and app.state.memory.used == 0
        assert await Client(body).run(app) == 200
        return busy

    busy = asyncio.run(asyncio.wait_for(scenario(), 30))
    headers = dict(busy.messages[0]["headers"])
    assert int(headers[b"retry-after"]) >= 1 and b"busy" in busy.messages[1]["body"]


def test_requests_whose_client_hung_up_never_reach_the_model():
    stub = BlockingCaptioner()
    app = create_app(stub, queue_size=8)
    body = multipart(PHOTO.read_bytes())

    async def scenario():
        first = asyncio.ensure_future(Client(body).run(app))
        started = await asyncio.get_running_loop().run_in_executor(None, stub.started.acquire, True, 10)
        assert started  # the first request holds the model
        abandoned = [Client(body, hang_up=True) for _ in range(5)]
        await asyncio.wait_for(asyncio.gather(*(client.run(app) for client in abandoned)), 10)
        assert app.state.queue.depth == 1  # their slots are free again while the first still runs
        stub.go.set()
        assert await asyncio.wait_for(first, 10) == 200
        assert await Client(body).run(app) == 200

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert stub.started.acquire(blocking=False)  # the last request ran...
    assert not stub.started.acquire(blocking=False)  # ...and none of the abandoned ones did
    assert app.state.queue.depth == 0


class HeldEncoder:
    """conftest's ColourGrid encoder that, when `hold` is set, waits inside each call until `release`."""

    def __init__(self) -> None:
        from conftest import ColourGrid

        self.grid = ColourGrid()
        self.calls = 0
        self.hold, self.entered, self.release = threading.Event(), threading.Event(), threading.Event()

    def __call__(self, images):
        self.calls += 1
        if self.hold.is_set():
            self.entered.set()
            assert self.release.wait(timeout=30)
        return self.grid(images)


def tiny_captioner(monkeypatch, encoder=None) -> tuple[Captioner, HeldEncoder, list]:
    """A real Captioner on a tiny random model whose encoder is `encoder` (default a HeldEncoder), and the list
    of its beam searches (one entry per call of decoding.best_captions through guidance.search, the decoder's only
    way in)."""
    from show_attend_tell import guidance as guidance_module

    encoder = encoder or HeldEncoder()
    captioner = stand_in_captioner(encoder)
    searches = []
    search = guidance_module.best_captions

    def counted(*args, **kwargs):
        searches.append(len(args[2]))  # the images in the call (one list of required words each)
        return search(*args, **kwargs)

    monkeypatch.setattr(guidance_module, "best_captions", counted)
    return captioner, encoder, searches


def test_a_client_that_hangs_up_during_the_encoder_never_reaches_the_decoder(monkeypatch):
    captioner, encoder, searches = tiny_captioner(monkeypatch)
    app = create_app(captioner)
    body = multipart(PHOTO.read_bytes())

    async def scenario():
        loop = asyncio.get_running_loop()
        encoder.hold.set()
        hang_up = asyncio.Event()
        client = Client(body, hang_up_on=hang_up)
        task = asyncio.ensure_future(client.run(app))
        assert await loop.run_in_executor(None, encoder.entered.wait, 10)  # the request is in the encoder
        hang_up.set()
        await asyncio.wait_for(task, 10)  # the server has seen the client go...
        encoder.release.set()  # ...before the encoder finishes
        while app.state.queue.depth:  # the job has ended
            await asyncio.sleep(0.01)
        assert encoder.calls == 1 and searches == []
        encoder.hold.clear()
        assert await Client(body).run(app) == 200  # a client that stays gets its caption
        assert searches == [1]

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize(("answers_before_true", "encoder_calls", "searches_run"), [(1, 0, 0), (4, 1, 0), (6, 1, 1)])
def test_a_cancelled_batch_stops_before_its_next_stage(monkeypatch, answers_before_true, encoder_calls, searches_run):
    from show_attend_tell.captioner import Cancelled

    captioner, encoder, searches = tiny_captioner(monkeypatch)
    photos = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
    asked = []

    def cancelled() -> bool:  # asked before each photo's decode, the encoder, the decoder's setup, the search
        asked.append(True)
        return len(asked) > answers_before_true

    if searches_run:
        assert len(captioner.caption_batch(photos, beam_size=2, cancelled=cancelled)) == 3
    else:
        with pytest.raises(Cancelled):
            captioner.caption_batch(photos, beam_size=2, cancelled=cancelled)
    assert (encoder.calls, len(searches)) == (encoder_calls, searches_run)
    assert len(asked) == min(answers_before_true + 1, 6)


class Block(torch.nn.Module):
    """A residual block's stand-in: counts its calls and, in the thread named by `held_in`, waits in its forward
    until `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.held_in: int | None = None
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, images):
        self.calls += 1
        if threading.get_ident() == self.held_in:
            self.entered.set()
            assert self.release.wait(timeout=30)
        return images


class BlockEncoder(torch.nn.Module):
    """As model.Encoder: its residual blocks by name, run in order, then conftest's ColourGrid."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = Block(), Block()
        self.blocks = {"layer1.0": self.first, "layer1.1": self.second}

    def forward(self, images):
        from conftest import ColourGrid

        return ColourGrid()(self.second(self.first(images)))


def test_a_cancelled_call_leaves_the_encoder_between_two_residual_blocks(monkeypatch):
    from show_attend_tell.captioner import Cancelled

    encoder = BlockEncoder()
    captioner, _, searches = tiny_captioner(monkeypatch, encoder)
    asked = []

    def cancelled() -> bool:  # before the photo's decode, the encoder, block layer1.0, block layer1.1 ...
        asked.append(True)
        return len(asked) > 3

    with pytest.raises(Cancelled):
        captioner.caption(Image.new("RGB", (40, 30), "red"), beam_size=2, cancelled=cancelled)
    assert (encoder.first.calls, encoder.second.calls, searches) == (1, 0, [])
    assert captioner.caption(Image.new("RGB", (40, 30), "red"), beam_size=2).words is not None
    assert (encoder.first.calls, encoder.second.calls, searches) == (2, 1, [1])  # and no check is left behind


def test_a_cancelled_call_does_not_stop_another_threads_call_on_the_same_model(monkeypatch):
    from show_attend_tell.captioner import Cancelled

    encoder = BlockEncoder()
    captioner, _, searches = tiny_captioner(monkeypatch, encoder)
    photo = Image.new("RGB", (40, 30), "red")
    stop = threading.Event()
    outcome = []

    def cancelled_call() -> None:
        encoder.first.held_in = threading.get_ident()
        try:
            captioner.caption(photo, beam_size=2, cancelled=stop.is_set)
            outcome.append("captioned")
        except Cancelled:
            outcome.append("cancelled")

    thread = threading.Thread(target=cancelled_call)
    thread.start()
    try:
        assert encoder.first.entered.wait(timeout=10)  # inside the encoder, its checks registered
        stop.set()
        assert captioner.caption(photo, beam_size=2).words is not None  # this thread's call is not stopped
        assert searches == [1] and encoder.second.calls == 1
    finally:
        encoder.first.release.set()
        thread.join(timeout=30)
    assert outcome == ["cancelled"] and encoder.second.calls == 1 and searches == [1]


def test_pixel_heavy_and_unreadable_uploads_are_refused_before_taking_a_model_slot():
    stub = BlockingCaptioner()
    data = PHOTO.read_bytes()
    with local_client(create_app(stub, queue_size=1, max_pixels=30_000_000)) as client:
        first, result = in_thread(post, client, data)
        try:
            assert stub.started.acquire(timeout=30)  # the only slot is taken
            huge = post(client, png_header_only(7900, 7900), name="huge.png", content_type="image/png")
            assert_error(huge, 413, "huge.png", "7900x7900", "the limit is 30")
            assert_error(post(client, b"GIF89a\x00", name="bad.gif"), 422, "bad.gif")
            assert_error(post(client, data), 503, "busy")  # a good photo waits for the slot; the bad ones did not
            health = client.get("/api/health").json()
            assert health["max_pixels"] == 30_000_000 and health["uploads"] == 0
            # the photo being captioned: its form, and its pixels as decoded for the model
            decoded = load_image(data, size=stub.image_size)
            held = len(data) + 4 * decoded.width * decoded.height
            assert held < health["upload_bytes"] < held + 1000
        finally:
            stub.go.set()
            first.join(timeout=30)
    assert result[0].status_code == 200


def test_a_corrupt_tiff_is_422(client):
    response = post(client, corrupt_tiff(), name="bad.tif", content_type="image/tiff")
    assert_error(response, 422, "bad.tif", "corrupt")
    assert client.get("/api/health").json()["queue_depth"] == 0


def test_a_large_photo_is_decoded_small_and_reports_its_own_size(client, captioner):
    big = Image.open(PHOTO).resize((2400, 1800), Image.Resampling.NEAREST)
    data = jpeg(big, quality=20)
    assert len(data) < 200_000  # under the test client's upload limit
    response = post(client, data)
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (2400, 1800)


def test_bad_server_limits_are_refused(captioner, capsys):
    from show_attend_tell import cli
    from show_attend_tell.errors import InputError

    for option, value in [("upload_memory_bytes", 10**6), ("max_pixels", 0), ("read_timeout", 0.0)]:
        with pytest.raises(InputError):
            create_app(captioner, **{option: value})
    flags = [("--max-pixels", "0"), ("--read-timeout", "-1"), ("--upload-memory-mb", "x"), ("--port", "70000")]
    for flag, value in flags:
        with pytest.raises(SystemExit) as exit:
            cli.main(["serve", flag, value])
        assert exit.value.code == 2
        assert f"argument {flag}:" in capsys.readouterr().err


# Batching (issue 32): a client that leaves its batch does not stop it for the others.


def json_body(client: Client) -> dict:
    import json

    return json.loads(b"".join(m.get("body", b"") for m in client.messages if m["type"] == "http.response.body"))


def test_a_client_that_hangs_up_leaves_its_batch_and_the_others_get_their_captions(monkeypatch):
    captioner, encoder, searches = tiny_captioner(monkeypatch)
    app = create_app(captioner, max_batch=4)
    bodies = [multipart(jpeg(Image.new("RGB", (40, 30), colour))) for colour in ("red", "green", "blue")]

    async def scenario():
        loop = asyncio.get_running_loop()
        alone = []
        for body in bodies:
            client = Client(body)
            assert await client.run(app) == 200
            alone.append(json_body(client))
        searches.clear()
        encoder.hold.set()
        first = asyncio.ensure_future(Client(multipart(jpeg(Image.new("RGB", (40, 30), "grey")))).run(app))
        assert await loop.run_in_executor(None, encoder.entered.wait, 10)  # a batch of one in the encoder
        hang_up = asyncio.Event()
        clients = [Client(body, hang_up_on=hang_up if i == 1 else None) for i, body in enumerate(bodies)]
        tasks = []
        for client in clients:  # one after another, so that the queue holds them in this order: the first of the
            tasks.append(asyncio.ensure_future(client.run(app)))  # batch enters the encoder, not the one that leaves
            while app.state.queue.waiting < len(tasks):
                await asyncio.sleep(0.01)
        held, encoder.release = encoder.release, threading.Event()
        encoder.entered.clear()
        held.set()  # the first batch ends; the next, of the three, enters the encoder
        assert await loop.run_in_executor(None, encoder.entered.wait, 10)
        hang_up.set()
        assert await asyncio.wait_for(tasks[1], 10) == 499  # the middle one has gone...
        encoder.release.set()
        assert await asyncio.wait_for(asyncio.gather(first, tasks[0], tasks[2]), 10) == [200] * 3
        assert searches == [1, 2]  # ...its batch went on without stopping, and without its photo
        assert encoder.calls == len(bodies) + 1 + 2  # alone, the first batch, and not the photo of the one gone
        for i in (0, 2):
            answer = json_body(clients[i])
            assert answer["timings"]["batch"] == 2
            # as alone (the shipped model's whole answer is: test_a_photo_in_a_batch_gets_the_answer_it_gets_alone)
            assert (answer["words"], answer["guidance"]) == (alone[i]["words"], alone[i]["guidance"])
            np.testing.assert_allclose(answer["attention"], alone[i]["attention"], atol=1e-5)
            assert answer["score"] == pytest.approx(alone[i]["score"], abs=1e-5)
        assert app.state.queue.depth == 0

    asyncio.run(asyncio.wait_for(scenario(), 60))


# Hardening, second round (issue 31): pixel decoding is charged and stoppable, headers, connection floods.


def flat_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, "PNG")
    return buffer.getvalue()


def test_a_decode_is_charged_to_the_memory_budget_and_stops_when_its_client_hangs_up(monkeypatch):
    from show_attend_tell import server
    from show_attend_tell.errors import Cancelled
    from show_attend_tell.images import decode_cost

    stub = BlockingCaptioner()
    stub.go.set()
    png = flat_png(3000, 2000)
    body = multipart(png, name="big.png")
    cost = decode_cost(png, size=stub.image_size)
    assert cost >= 3000 * 2000 * 4  # the decoded pixels at least
    started, outcomes = threading.Event(), []

    def held_decode(data, **options):  # the server's decode, waiting until its client has gone
        started.set()
        deadline = time.monotonic() + 10
        while not options["cancelled"]() and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            return load_image(data, **options)
        except Cancelled:
            outcomes.append("stopped")
            raise

    monkeypatch.setattr(server, "load_image", held_decode)
    app = create_app(stub, queue_size=4)

    async def scenario():
        hang_up = asyncio.Event()
        task = asyncio.ensure_future(Client(body, hang_up_on=hang_up).run(app))
        assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        assert app.state.memory.used == len(body) + cost  # charged before the decode starts
        hang_up.set()
        assert await asyncio.wait_for(task, 10) == 499
        assert outcomes == ["stopped"] and stub.batches == []
        assert app.state.memory.used == 0 and app.state.queue.depth == 0

    asyncio.run(asyncio.wait_for(scenario(), 30))
    # a budget that could never hold the decode: 413 saying what it would take
    monkeypatch.setattr(server, "load_image", load_image)
    small = create_app(stub, max_upload_bytes=100_000, upload_memory_bytes=100_000 + FORM_OVERHEAD + cost // 2)
    with local_client(small) as client:
        assert_error(post(client, png, name="big.png", content_type="image/png"), 413, "big.png", "decoding", "MB")
        assert post(client, jpeg(Image.new("RGB", (64, 48), "red"))).status_code == 200


def test_every_response_carries_the_security_headers_and_other_hosts_are_refused(client):
    docs = client.get("/docs")
    asset = re.findall(r'src="([^"]+\.js)"', docs.text)[0]
    responses = {
        path: client.get(path) for path in ("/api/health", "/openapi.json", "/", "/app.js", "/no/such/page", asset)
    }
    responses["/docs"] = docs
    responses["POST /api/caption"] = client.post("/api/caption")
    for path, response in responses.items():
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "no-referrer" and headers["x-frame-options"] == "DENY", path
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
    for path in ("/api/health", "/openapi.json", "POST /api/caption"):  # JSON: nothing may load from it
        assert responses[path].headers["content-security-policy"].startswith("default-src 'none'"), path
    assert "default-src 'self'" in responses["/"].headers["content-security-policy"]
    # DNS rebinding: a page elsewhere whose name now resolves to this address reads nothing
    for host in ("evil.example", "localhost.evil.example:8000", "127.0.0.1.evil.example", "[::2]:8000"):
        response = client.get("/api/health", headers={"host": host})
        assert_error(response, 400, "does not answer to the host", host)
        assert response.headers["x-content-type-options"] == "nosniff"
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"):
        assert client.get("/api/health", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_and_any_host():
    stub = BlockingCaptioner()
    with TestClient(create_app(stub, allowed_hosts=["photos.example"]), base_url="http://photos.example") as client:
        assert client.get("/api/health").status_code == 200
        assert client.get("/api/health", headers={"host": "localhost"}).status_code == 400  # only those named
    with TestClient(create_app(stub, allowed_hosts=["*"]), base_url="http://anything.example") as client:
        assert client.get("/api/health").status_code == 200


def closed(sock, wait: float) -> bool:
    """Whether the server has closed `sock` (within `wait` seconds)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_connection_flood_is_bounded_and_timed_out_and_health_still_answers(caplog):
    import logging
    import socket

    import httpx
    import uvicorn

    from show_attend_tell.listener import GuardedConfig

    stub = BlockingCaptioner()
    stub.go.set()
    config = GuardedConfig(
        create_app(stub),
        host="127.0.0.1",
        port=0,
        log_config=None,  # uvicorn's own logging configuration would keep its lines from caplog
        max_connections=8,
        header_timeout=1.0,
        log_interval=0.5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    sockets = []

    def connect(data: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(data)
        sockets.append(sock)
        time.sleep(0.02)  # in this order
        return sock

    upload = b"POST /api/caption HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=x\r\n"
    try:
        with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
            partial = [connect(b"GET /api/health HTTP/1.1\r\nHost: local") for _ in range(8)]  # headers never end
            stalled = [connect(upload + b"Content-Length: 100000\r\n\r\n" + b"-" * 1024) for _ in range(4)]
            # the limit is 8: the four least recently active connections were closed to make room
            assert [closed(sock, 3) for sock in partial[:4]] == [True] * 4
            start = time.monotonic()
            response = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)
            assert response.status_code == 200 and time.monotonic() - start < 3
            # the other partial headers are closed at the header deadline; the stalled bodies are the app's to end
            assert all(closed(sock, 3) for sock in partial[4:])
            assert not any(closed(sock, 0.2) for sock in stalled)
            time.sleep(1.0)  # a log line for what was closed in the interval, not one per connection
        lines = [r.getMessage() for r in caplog.records if "connections closed in the last" in r.getMessage()]
        assert 1 <= len(lines) <= 3, lines
        assert "closed to make room" in " ".join(lines) and "headers not received within 1 s" in " ".join(lines)
        assert "Traceback" not in caplog.text
    finally:
        for sock in sockets:
            sock.close()
        server.should_exit = True
        thread.join(timeout=10)


def test_sat_serve_workers_each_load_their_own_model(captioner, monkeypatch):
    import json
    import os

    from show_attend_tell import cli, listener, server

    runs = []

    class Multiprocess:
        def __init__(self, config, sockets) -> None:
            runs.append((config, sockets))

        def run(self) -> None:
            pass

    monkeypatch.setattr(listener, "Multiprocess", Multiprocess)
    monkeypatch.setattr(listener.GuardedConfig, "bind_socket", lambda self: "the socket")
    monkeypatch.setenv(listener.SETTINGS_VARIABLE, "")  # restored after the test
    assert cli.main(["serve", "--workers", "2", "--max-batch", "3", "--port", "8123"]) == 0
    ((config, sockets),) = runs
    assert (config.workers, config.factory, sockets) == (2, True, ["the socket"])
    assert config.app == "show_attend_tell.listener:app_from_environment" and config.port == 8123
    assert config.http is listener.GuardedH11Protocol
    settings = json.loads(os.environ[listener.SETTINGS_VARIABLE])
    assert settings["max_batch"] == 3 and settings["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)
    # what each worker process runs: its own model, its share of the cores
    monkeypatch.setattr(Captioner, "load", classmethod(lambda cls, path=None, **_: captioner))
    monkeypatch.setattr(server, "warm_up", lambda captioner, max_batch: None)
    threads = torch.get_num_threads()
    try:
        app = listener.app_from_environment()
        assert torch.get_num_threads() == settings["torch_threads"]
    finally:
        torch.set_num_threads(threads)
    with local_client(app) as client:
        assert client.get("/api/health").json()["max_batch"] == 3


def hold_large_decodes(monkeypatch, big: bytes) -> tuple[threading.Event, list[float], set[str]]:
    """Make photos of more than 10 MB of pixels large decodes, and have each decode of `big` wait until the
    returned event is set: (that event, when each such decode began, the names of the threads that decoded)."""
    from show_attend_tell import server

    monkeypatch.setattr(server, "LARGE_DECODE_BYTES", 10 * 2**20)
    release, entered, threads = threading.Event(), [], set()

    def held_decode(data, **options):
        threads.add(threading.current_thread().name)
        if len(data) == len(big):
            entered.append(time.monotonic())
            assert release.wait(10)
        return load_image(data, **options)

    monkeypatch.setattr(server, "load_image", held_decode)
    return release, entered, threads


def test_large_decodes_go_one_at_a_time_and_never_hold_up_a_small_photo(monkeypatch):
    """Photos whose decode holds more than LARGE_DECODE_BYTES share one thread: while one is being decoded the
    next waits, and a small photo sent after both is decoded and captioned at once."""

    stub = BlockingCaptioner()
    stub.go.set()
    big = flat_png(3000, 2000)  # 24 MB of pixels at least
    release, entered, threads = hold_large_decodes(monkeypatch, big)
    with local_client(create_app(stub, queue_size=8)) as client:
        large = [in_thread(post, client, big, name="big.png", content_type="image/png") for _ in range(2)]
        deadline = time.monotonic() + 10
        while not entered:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        small = post(client, jpeg(Image.new("RGB", (64, 48), "red")))
        assert small.status_code == 200 and len(entered) == 1  # the second large one still waits for the first
        release.set()
        for thread, result in large:
            thread.join(timeout=30)
            assert result[0].status_code == 200
    assert len(entered) == 2
    assert any(name.startswith("sat-decode-large") for name in threads)
    assert any(name.startswith("sat-decode_") for name in threads)


class FakeTime:
    """A clock that moves only when told, and events that are set from a time on: Pacer without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def event(self, set_at: float = math.inf) -> types.SimpleNamespace:
        """is_set and wait of a threading.Event set at `set_at`; wait(t) lets t pass, or until it is set."""

        def wait(timeout: float) -> bool:
            self.now = max(self.now, min(self.now + timeout, set_at))
            return self.now >= set_at

        return types.SimpleNamespace(is_set=lambda: self.now >= set_at, wait=wait)


def test_a_pacer_never_pauses_a_decode_while_the_model_is_idle():
    time_ = FakeTime()
    pacer = Pacer(time_.event(set_at=0), time_.event(), duty=0.2, start_wait=0.25, clock=lambda: time_.now)
    for _ in range(10):
        assert pacer() is False
        time_.now += 0.01  # a block decoded
    assert time_.now == pytest.approx(0.1)  # the decoding only


def test_a_pacer_keeps_a_decode_to_its_duty_while_the_model_is_captioning():
    time_ = FakeTime()
    pacer = Pacer(time_.event(), time_.event(), duty=0.2, start_wait=0.25, clock=lambda: time_.now)
    assert pacer() is False
    assert time_.now == pytest.approx(0.25)  # the start wait, before the first block
    time_.now += PACE_SLICE / 2
    assert pacer() is False
    assert time_.now == pytest.approx(0.25 + PACE_SLICE / 2)  # less than a slice decoded: no pause yet
    time_.now += PACE_SLICE * 2
    assert pacer() is False
    decoded = PACE_SLICE * 2.5
    assert time_.now == pytest.approx(0.25 + decoded / 0.2)  # decoding was a fifth of the time since the start wait


@pytest.mark.parametrize("who", ["model idle", "client gone"])
def test_a_pacers_pause_ends_when_the_model_is_idle_or_the_client_gone(who):
    time_ = FakeTime()
    idle, abandoned = (
        time_.event(0.1 if who == "model idle" else math.inf),
        time_.event(0.1 if who != "model idle" else math.inf),
    )
    pacer = Pacer(idle, abandoned, duty=0.2, start_wait=10, clock=lambda: time_.now)
    assert pacer() is (who == "client gone")
    assert 0.1 <= time_.now <= 0.1 + PACE_POLL


def test_a_large_photo_sent_while_the_model_is_captioning_is_decoded_once_it_is_idle(monkeypatch):
    """With Pacer's start wait longer than the test, a large decode waits for the batch being captioned to end."""
    from show_attend_tell import server

    monkeypatch.setattr(server, "LARGE_DECODE_BYTES", 10 * 2**20)
    monkeypatch.setattr(server, "Pacer", functools.partial(Pacer, start_wait=60))
    decoded = []

    def timed_decode(data, **options):
        image = load_image(data, **options)
        decoded.append(time.monotonic())
        return image

    monkeypatch.setattr(server, "load_image", timed_decode)
    stub = BlockingCaptioner()
    threads = []
    with local_client(create_app(stub, queue_size=8)) as client:
        try:
            threads.append(in_thread(post, client, jpeg(Image.new("RGB", (64, 48), "red"))))
            assert stub.started.acquire(timeout=30)  # the model is captioning the small photo
            threads.append(in_thread(post, client, flat_png(3000, 2000), name="big.png", content_type="image/png"))
            time.sleep(1)
            assert len(decoded) == 1  # the small photo only: the large one waits
            released = time.monotonic()
        finally:
            stub.go.set()
            for thread, _ in threads:
                thread.join(timeout=30)
    assert [result[0].status_code for _, result in threads] == [200, 200]
    assert len(decoded) == 2 and decoded[1] >= released


def test_large_photos_past_their_bound_wait_for_their_turn_without_a_queue_slot(monkeypatch):
    """Past LARGE_DECODES large photos decoding or waiting, another large one waits for its turn before it takes a
    queue slot (a flood of them cannot fill the queue), while a small photo still gets its caption at once; once
    the large decode ends, the waiting one is decoded and captioned."""
    from show_attend_tell import server

    stub = BlockingCaptioner()
    stub.go.set()
    big = flat_png(3000, 2000)
    monkeypatch.setattr(server, "LARGE_DECODES", 1)
    release, entered, _ = hold_large_decodes(monkeypatch, big)
    with local_client(create_app(stub, queue_size=2)) as client:
        first = in_thread(post, client, big, name="big.png", content_type="image/png")
        try:
            deadline = time.monotonic() + 10
            while not entered:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            second = in_thread(post, client, big, name="big.png", content_type="image/png")
            while client.get("/api/health").json()["uploads"]:  # the second is read, then waits for its turn
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.2)
            depth, decodes = client.get("/api/health").json()["queue_depth"], len(entered)
            small = post(client, jpeg(Image.new("RGB", (64, 48), "red")))
        finally:
            release.set()
        for thread, result in (first, second):
            thread.join(timeout=30)
            assert result[0].status_code == 200
    assert (depth, decodes) == (1, 1)  # the waiting large photo holds no slot and is not being decoded
    assert small.status_code == 200  # so the second slot of two was free for the small photo
    assert len(entered) == 2


def test_the_hostile_load_benchmark_counts_5xx_besides_the_busy_503(monkeypatch):
    """benchmarks/hostile_load.py reads the server's access log: a 503 of a full queue (what attackers are meant to
    get) does not fail its target, a 500 or 502 does."""
    from collections import Counter

    bench = load_script("benchmarks/hostile_load.py", monkeypatch)
    log = "\n".join(
        f'INFO:     127.0.0.1:5{n} - "POST /api/caption?beam_size=7 HTTP/1.1" {status} Status'
        for n, status in enumerate([200, 200, 503, 413, 408, 503])
    )
    logged = Counter(bench.ACCESS_LOG.findall(log))
    assert logged == Counter({"200": 2, "503": 2, "413": 1, "408": 1})
    assert bench.server_errors(logged) == {"all": 2, "besides_busy_503": 0}
    assert bench.server_errors(logged + Counter({"500": 1, "502": 2})) == {"all": 5, "besides_busy_503": 3}


def test_the_hostile_load_benchmark_counts_the_cores_of_the_servers_threads_and_of_its_niced_ones(monkeypatch):
    """benchmarks/hostile_load.py's cores_used: each thread's CPU ticks between two readings, all of them, the main
    thread's own (the event loop) and those niced below it (the photo decoding threads); thread_ticks reads them
    from /proc."""
    import os

    bench = load_script("benchmarks/hostile_load.py", monkeypatch)
    hz = os.sysconf("SC_CLK_TCK")
    before = {1: (0, 10), 2: (0, 0), 3: (10, 5)}
    after = {1: (0, 10 + hz), 2: (0, hz // 2), 3: (10, 5 + hz // 4), 4: (10, hz // 4)}  # thread 4 began meanwhile
    assert bench.cores_used(1, before, after, seconds=2.0) == {
        "all": round((hz + hz // 2 + hz // 4 + hz // 4) / (2 * hz), 3),
        "event_loop": round(hz / (2 * hz), 3),
        "decoding_threads": round((hz // 4 + hz // 4) / (2 * hz), 3),
    }
    if os.path.isdir("/proc/self/task"):
        mine = bench.thread_ticks(os.getpid())
        assert os.getpid() in mine and mine[os.getpid()][0] == os.getpriority(os.PRIO_PROCESS, 0)
        assert all(ticks >= 0 for _, ticks in mine.values())


def test_the_hostile_load_benchmark_counts_the_machines_cores_by_state(monkeypatch):
    """benchmarks/hostile_load.py's machine_cores: the whole machine's CPU ticks by state between two /proc/stat
    readings (idle cores while requests wait show threads waiting on each other, not on a core)."""
    import os

    bench = load_script("benchmarks/hostile_load.py", monkeypatch)
    hz = os.sysconf("SC_CLK_TCK")
    before = {"user": 100, "system": 10, "idle": 50}
    after = {"user": 100 + 3 * hz, "system": 10 + hz // 2, "idle": 50 + hz}
    assert bench.machine_cores(before, after, seconds=2.0) == {
        "user": 1.5,
        "system": round((hz // 2) / (2 * hz), 3),
        "idle": 0.5,
    }
    if os.path.exists("/proc/stat"):
        first, second = bench.machine_ticks(), bench.machine_ticks()
        assert set(first) == set(bench.MACHINE_STATES)
        assert all(second[state] >= first[state] >= 0 for state in first)


@pytest.mark.slow
def test_repeat_words_in_the_api(shipped, flickr8k):
    # a Flickr8k test photo the self-critical model captions "a man is riding a bike on a bike" at the product's
    # defaults (no detector) when words may repeat (tests/test_captioner.py)
    photo = flickr8k / "images" / "2813992915_f732cf8539.jpg"
    with local_client(create_app(shipped)) as client:
        body = post(client, photo.read_bytes(), query="?detector=false").json()
        free = post(client, photo.read_bytes(), query="?detector=false&repeat_words=true").json()
    assert body["caption"] == shipped.caption(photo, detect=False).text
    assert free["caption"] == shipped.caption(photo, detect=False, repeat_words=True).text
    assert free["words"].count("bike") == 2 and body["words"].count("bike") == 1
