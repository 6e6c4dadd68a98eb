"""HTTP load test of `sat serve` (issue #6), on loopback only: does it stay up, answer bad uploads with 4xx
and never 5xx, and how fast and how big is it under concurrent clients?

It starts `sat serve --host 127.0.0.1` as a subprocess on a free port, sends --requests requests IN TOTAL,
shared by --clients concurrent clients (each sends its next request when its previous one is answered), and
stops the server at the end. Three requests in four upload a photo from examples/; the fourth cycles through
bad uploads: a truncated JPEG, a text file, an empty file and an upload over the size limit. It records the
status codes (5xx must be zero), p50/p99 latency for good and bad requests separately, throughput, the
server's peak resident memory (VmHWM; with --workers, each process's and their sum) and any traceback in its
log. Bounded: --deadline seconds at most. --max-batch, --max-delay-ms and --workers are passed to `sat serve`
only when given, so that --code can serve a checkout from before they existed.

    python benchmarks/load.py --requests 200 --clients 8 --out results/load.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from harness import REPO, begin_record, benchmark_parser, finish, latency, median

from show_attend_tell.config import DEFAULT_BEAM_SIZE

HOST = "127.0.0.1"  # never anything else: this is not a tool for loading other people's servers
MEGABYTE = 2**20
EXPECTED = {"good": 200, "truncated": 422, "not_an_image": 422, "empty": 422, "oversize": 413}


def workload(requests: int, max_upload_bytes: int) -> list[tuple[str, str, bytes]]:
    """(kind, file name, bytes) for each request, in order: good photos with every fourth one bad."""
    photos = sorted((REPO / "examples").glob("*.jpg"))
    good = itertools.cycle([(path.name, path.read_bytes()) for path in photos])
    sample = photos[0].read_bytes()
    bad = itertools.cycle(
        [
            ("truncated", "truncated.jpg", sample[: len(sample) // 2]),
            ("not_an_image", "notes.jpg", b"this is a text file, not a photo\n" * 20),
            ("empty", "empty.jpg", b""),
            ("oversize", "huge.jpg", os.urandom(max_upload_bytes + 1024)),
        ]
    )
    return [next(bad) if i % 4 == 3 else ("good", *next(good)) for i in range(requests)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def memory_kb(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process from /proc, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a server's worker processes), from /proc."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = task / "children"
            if children.is_file():
                pending += [int(child) for child in children.read_text().split()]
    return found


def tree_memory_mb(pid: int, field: str) -> dict:
    """`field` of each process of the server (the supervisor first) and their sum, in MB; a worker's spawn
    helper (the multiprocessing resource tracker) is counted too, as it is memory the server holds."""
    each = []
    for process in process_tree(pid):
        with contextlib.suppress(OSError, RuntimeError):
            each.append(round(memory_kb(process, field) / 1024, 1))
    return {"processes": each, "total": round(sum(each), 1)}


def start_server(args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "show_attend_tell.cli", "serve", "--host", HOST, "--port", str(port)]
    command += ["--max-upload-mb", str(args.max_upload_mb), "--queue-size", str(args.queue_size)]
    if args.model:
        command += ["--model", args.model]
    if args.encoder_precision:
        command += ["--encoder-precision", args.encoder_precision]
    for flag, value in [("--max-batch", args.max_batch), ("--max-delay-ms", args.max_delay_ms)]:
        if value is not None:
            command += [flag, str(value)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    # another checkout's package: `python -m` puts the working directory first on the path
    env = {**os.environ, "PYTHONPATH": args.code} if args.code else None
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=args.code or None
    )


def wait_until_healthy(server: subprocess.Popen, url: str, timeout: float, log_path: Path) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"sat serve exited with code {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            return httpx.get(url + "/api/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.25)
    raise SystemExit(f"sat serve did not answer /api/health within {timeout:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_clients(url: str, jobs: list, clients: int, beam_size: int, deadline: float) -> tuple[list[dict], float]:
    """Send every job once, `clients` at a time; returns one record per request sent and the wall time."""
    records: list[dict] = []
    lock = threading.Lock()
    queue = iter(jobs)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                with lock:
                    job = next(queue, None)
                if job is None:
                    return
                kind, name, data = job
                start = time.perf_counter()
                record = {"kind": kind, "status": None}
                try:
                    response = http.post(
                        "/api/caption",
                        params={"beam_size": beam_size},
                        files={"image": (name, data, "image/jpeg")},
                    )
                    record["status"] = response.status_code
                    if response.status_code == 200:
                        record["decode_ms"] = response.json()["timings"]["decode_ms"]
                    elif not response.json().get("error"):
                        record["status"] = f"{response.status_code} without an error message"
                except (httpx.HTTPError, ValueError) as error:
                    record["status"] = f"client error: {type(error).__name__}: {error}"
                record["ms"] = (time.perf_counter() - start) * 1000
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records, time.perf_counter() - start


def summarise(records: list[dict], wall: float, jobs: int) -> dict:
    statuses: dict[str, Counter] = {}
    for record in records:
        statuses.setdefault(record["kind"], Counter())[str(record["status"])] += 1
    good = [r for r in records if r["kind"] == "good"]
    bad = [r for r in records if r["kind"] != "good"]
    server_errors = sum(1 for r in records if isinstance(r["status"], int) and r["status"] >= 500)
    unexpected = [r for r in records if r["status"] != EXPECTED[r["kind"]]]
    return {
        "sent": len(records),
        "not_sent_before_the_deadline": jobs - len(records),
        "wall_seconds": round(wall, 2),
        "requests_per_second": round(len(records) / wall, 2),
        "captions_per_second": round(sum(r["status"] == 200 for r in good) / wall, 2),
        "server_errors_5xx": server_errors,
        "unexpected_answers": len(unexpected),
        "unexpected_examples": sorted({f"{r['kind']}: {r['status']}" for r in unexpected})[:10],
        "status_by_kind": {kind: dict(counts) for kind, counts in sorted(statuses.items())},
        "latency_good": latency([r["ms"] for r in good]),
        "latency_bad": latency([r["ms"] for r in bad]),
        "latency_bad_by_kind": {
            kind: latency([r["ms"] for r in bad if r["kind"] == kind]) for kind in sorted({r["kind"] for r in bad})
        },
        "server_decode_ms_p50": median([r["decode_ms"] for r in good if "decode_ms" in r], digits=1)
        if any("decode_ms" in r for r in good)
        else None,
    }


def main() -> int:
    parser = benchmark_parser(__doc__, record="load.json", whole_doc=True)
    parser.add_argument("--requests", type=int, default=200, help="requests in total, shared by the clients")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, one request in flight each")
    parser.add_argument(
        "--beam-size", type=int, default=DEFAULT_BEAM_SIZE, help="(default: the product's, %(default)s)"
    )
    parser.add_argument("--model", help="checkpoint directory for `sat serve` (default: the shipped model)")
    parser.add_argument("--max-upload-mb", type=float, default=10)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=900, help="stop sending after this many seconds")
    parser.add_argument("--encoder-precision", help="passed to `sat serve` (default: its own, auto)")
    parser.add_argument("--max-batch", type=int, help="passed to `sat serve` (default: its own)")
    parser.add_argument("--max-delay-ms", type=float, help="passed to `sat serve` (default: its own)")
    parser.add_argument("--workers", type=int, help="passed to `sat serve` (default: its own, one process)")
    parser.add_argument(
        "--code", help="serve the package of this source tree instead (e.g. a `git worktree` of an older commit)"
    )
    args = parser.parse_args()
    if args.requests < 1 or args.clients < 1:
        raise SystemExit("--requests and --clients must be at least 1")

    from show_attend_tell.captioner import SHIPPED_MODEL

    model = args.model or str(SHIPPED_MODEL)
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"{model}: no checkpoint here (config.json missing); pass --model DIR")
    record = begin_record(args)
    jobs = workload(args.requests, round(args.max_upload_mb * MEGABYTE))
    port = free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory() as scratch:
        log_path = Path(scratch) / "server.log"
        with log_path.open("wb") as log:
            server = start_server(args, port, log)
            try:
                health = wait_until_healthy(server, url, 180, log_path)
                rss_after_start = tree_memory_mb(server.pid, "VmRSS")
                records, wall = run_clients(url, jobs, args.clients, args.beam_size, time.monotonic() + args.deadline)
                peak, rss_at_end = tree_memory_mb(server.pid, "VmHWM"), tree_memory_mb(server.pid, "VmRSS")
                alive = server.poll() is None and httpx.get(url + "/api/health", timeout=5).status_code == 200
            finally:
                stop_server(server)
        tracebacks = log_path.read_text(errors="replace").count("Traceback")

    results = summarise(records, wall, len(jobs))
    results.update(
        server_alive_at_end=alive,
        server_tracebacks_in_log=tracebacks,
        server_memory_mb={
            "rss_after_start": rss_after_start["total"],
            "peak_rss_vmhwm": peak["total"],
            "rss_at_end": rss_at_end["total"],
            "per_process": {"rss_after_start": rss_after_start, "peak_rss_vmhwm": peak, "rss_at_end": rss_at_end},
        },
    )
    ok = results["server_errors_5xx"] == 0 and results["unexpected_answers"] == 0 and alive and tracebacks == 0
    record.update(
        model=model,
        grid_size=health["grid_size"],
        settings={
            "requests": args.requests,
            "requests_are": "in total, shared by the clients",
            "clients": args.clients,
            "beam_size": args.beam_size,
            "max_upload_mb": args.max_upload_mb,
            "queue_size": args.queue_size,
            "encoder_precision": health.get("encoder_precision", "fp32 (model.Encoder, before fast_encoder.py)"),
            "max_batch": health.get("max_batch", "none (one photo at a time, before batching)"),
            "max_delay_ms": health.get("max_delay_ms"),
            "workers": args.workers or 1,
            "code": args.code or str(REPO),
            "host": HOST,
            "mix": "3 in 4 good photos from examples/; 1 in 4 bad, cycling truncated JPEG, text file, "
            "empty file, upload over the limit",
            "expected_status": EXPECTED,
        },
        results=results,
        ok=ok,
    )
    finish(record, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
