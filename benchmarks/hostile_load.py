"""Hostile load on `sat serve` (issue #14), on loopback only: do normal clients still get their captions, as
fast as without the attack, while others stall their uploads, hang up on their requests and upload small
files that declare huge photos?

It starts `sat serve --host 127.0.0.1` as a subprocess on a free port and runs three phases with the same normal
clients (--clients of them, --requests photos each from examples/, one at a time):
  1. quiet: the normal clients alone;
  2. attack: the normal clients again while three groups of --attackers connections each run until the
     normal clients are done:
     - stalled: send the headers and 1 KB of a multipart upload, then nothing, until the server answers
       (408 at --read-timeout) or closes; then again at once;
     - abandoned: send a whole photo upload and hang up after --hang-up-after seconds without reading; again
       every --attack-interval seconds;
     - pixel-heavy: upload a 16-bit 7900x7900 PNG of about 130 KB (62 megapixels; 413 under the pixel budget),
       again every --attack-interval seconds (a flood as fast as the server answers would measure request
       rate, not these defects);
  3. hang-up flood (issue #31): the normal clients again while --attackers connections each upload a PNG of
     39.7 megapixels (within the pixel budget, about 120 KB) and hang up after --flood-hang-up-after seconds,
     then again at once: every one is a decode of 40 megapixels nobody waits for.
It records every status the server logged (no 5xx but the 503 of a full queue, which attackers may get and normal
clients may not), the normal clients' p50/p99 in every phase and the ratio of each attack's to the quiet one
(target: p99 within 2x), the cores the server used in every phase (all its threads, its event loop, and its niced
photo decoding threads: where the attack's cost goes), the benchmark's own and the whole machine's by state (idle
cores while photos wait: threads waiting on each other), its peak resident memory (target: 1.5 GB) and any traceback
in its log. Bounded:
every phase stops at --deadline seconds, attackers stop with the normal clients. --rounds N runs the three phases N
times in turn on the same server: the percentiles and ratios pool every round's requests (a p99 over 60 requests is
nearly the slowest one), and each round's own ratio is recorded beside them.

    python benchmarks/hostile_load.py --clients 2 --requests 30 --attackers 16 --out results/hostile_load.json
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from harness import REPO, begin_record, benchmark_parser, finish, latency
from load import HOST, free_port, memory_kb, stop_server, wait_until_healthy
from PIL import Image

from show_attend_tell.config import DEFAULT_BEAM_SIZE

BOUNDARY = "hostile-load-boundary"
TARGET_P99_RATIO = 2.0
TARGET_PEAK_RSS_MB = 1536
ACCESS_LOG = re.compile(r'"POST /api/caption[^"]*" (\d{3})')


def multipart_request(port: int, name: str, data: bytes, content_type: str) -> tuple[bytes, bytes]:
    """(headers, body) of one raw HTTP upload, for clients that misbehave below what httpx allows."""
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    headers = (
        f"POST /api/caption HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return headers, body


def huge_png() -> bytes:
    """A 16-bit greyscale 7900x7900 PNG: 62 megapixels in about 130 KB."""
    pixels = np.zeros((7900, 7900), dtype=np.uint16)
    pixels[::97, ::89] = 40_000  # not perfectly flat
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def in_budget_png() -> bytes:
    """An RGB 7000x5672 PNG: 39.7 megapixels, under the default pixel budget of 40, in about 120 KB."""
    pixels = np.zeros((5672, 7000, 3), dtype=np.uint8)
    pixels[::97, ::89] = 200  # not perfectly flat
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def answer(sock: socket.socket) -> str:
    """The status code of the server's answer (with the reason of a 5xx, from its JSON error), or how the
    connection ended without one."""
    reply = b""
    try:
        while len(reply) < 4096 and (part := sock.recv(4096)):  # Connection: close, so the answer ends with EOF
            reply += part
    except TimeoutError:
        if not reply:
            return "no answer"
    except OSError as error:
        if not reply:
            return f"closed: {type(error).__name__}"
    if not reply:
        return "closed without an answer"
    parts = reply.split(b" ", 2)
    status = parts[1].decode("latin-1") if len(parts) > 1 else "garbled"
    if status.startswith("5"):
        reason = re.search(rb'"error":"([^"]*)"', reply)
        return f"{status} {reason.group(1).decode('latin-1') if reason else '(no error message)'}"
    return status


def attacker(kind: str, port: int, request: tuple[bytes, bytes], args, stop: threading.Event, seen: Counter, lock):
    """One misbehaving connection after another until `stop`; `seen` counts what each one got back."""
    headers, body = request
    while not stop.is_set():
        started = time.monotonic()
        outcome = "not connected"
        try:
            with socket.create_connection((HOST, port), timeout=args.read_timeout + 15) as sock:
                if kind == "stalled":
                    sock.sendall(headers + body[:1024])
                    outcome = answer(sock)  # waits: the server's read deadline ends it
                elif kind in ("abandoned", "hang_up_flood"):
                    sock.sendall(headers + body)
                    # an answer sooner is counted; then it hangs up
                    sock.settimeout(args.hang_up_after if kind == "abandoned" else args.flood_hang_up_after)
                    outcome = answer(sock)
                    outcome = "hung up" if outcome == "no answer" else f"answered before hanging up: {outcome}"
                else:
                    sock.sendall(headers + body)
                    outcome = answer(sock)
        except OSError as error:
            outcome = f"connection error: {type(error).__name__}"
            stop.wait(0.1)
        with lock:
            seen[outcome] += 1
        if kind not in ("stalled", "hang_up_flood"):
            stop.wait(max(0.0, args.attack_interval - (time.monotonic() - started)))


def normal_clients(url: str, args, photos: list[tuple[str, bytes]], deadline: float) -> list[dict]:
    records: list[dict] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=args.read_timeout + 300) as http:
            for i in range(args.requests):
                if time.monotonic() > deadline:
                    return
                name, data = photos[(offset + i) % len(photos)]
                start = time.perf_counter()
                record: dict = {"status": None}
                try:
                    response = http.post(
                        "/api/caption",
                        params={"beam_size": args.beam_size},
                        files={"image": (name, data, "image/jpeg")},
                    )
                    record["status"] = response.status_code
                    if response.status_code == 200:  # where the time went, as the server saw it
                        record["timings"] = response.json()["timings"]
                    else:
                        record["error"] = f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as error:
                    record["status"] = f"client error: {type(error).__name__}"
                record["ms"] = (time.perf_counter() - start) * 1000
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def thread_ticks(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread of process `pid`: (its niceness, the CPU ticks it has used), from /proc (Linux)."""
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread has ended
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on; the name may hold spaces
        ticks[int(task.name)] = (int(fields[16]), int(fields[11]) + int(fields[12]))
    return ticks


def cores_used(pid: int, before: dict, after: dict, seconds: float) -> dict:
    """The server's cores between two thread_ticks readings: all its threads, its main thread's (the event loop),
    and those niced below it (the photo decoding threads, server.DECODE_NICENESS)."""
    per_second = os.sysconf("SC_CLK_TCK") * seconds
    used = {tid: ticks - before.get(tid, (nice, 0))[1] for tid, (nice, ticks) in after.items()}
    main_nice = after[pid][0]
    niced = sum(count for tid, count in used.items() if after[tid][0] > main_nice)
    return {
        "all": round(sum(used.values()) / per_second, 3),
        "event_loop": round(used.get(pid, 0) / per_second, 3),
        "decoding_threads": round(niced / per_second, 3),
    }


MACHINE_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq")


def machine_ticks() -> dict[str, int]:
    """The machine's CPU ticks by state since boot, all CPUs together (/proc/stat's first line; Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return {}
    return {state: int(count) for state, count in zip(MACHINE_STATES, fields, strict=False)}


def machine_cores(before: dict, after: dict, seconds: float) -> dict:
    """How many cores the whole machine spent in each state between two machine_ticks readings: idle cores while
    normal requests wait mean the server's threads were waiting on each other (a lock, the GIL), not on a core."""
    per_second = os.sysconf("SC_CLK_TCK") * seconds
    return {state: round((after[state] - before[state]) / per_second, 3) for state in after if state in before}


def phase(url: str, port: int, args, photos, attack: dict | None, server_pid: int) -> dict:
    """Run the normal clients, with the attackers of `attack` (kind -> request) alongside when given: what each
    normal request and each attacker got, and the server's cores (cores_used), unsummarised (`summary` pools the
    rounds)."""
    stop, lock = threading.Event(), threading.Lock()
    seen = {kind: Counter() for kind in attack or {}}
    threads = [
        threading.Thread(target=attacker, args=(kind, port, request, args, stop, seen[kind], lock), daemon=True)
        for kind, request in (attack or {}).items()
        for _ in range(args.attackers)
    ]
    for thread in threads:
        thread.start()
    if threads:
        time.sleep(1.0)  # the attack is under way before the first normal request
    start, ticks, own, machine = time.perf_counter(), thread_ticks(server_pid), time.process_time(), machine_ticks()
    records = normal_clients(url, args, photos, time.monotonic() + args.deadline)
    wall = time.perf_counter() - start
    cores = cores_used(server_pid, ticks, thread_ticks(server_pid), wall)
    own_cores = (time.process_time() - own) / wall
    machine = machine_cores(machine, machine_ticks(), wall)
    stop.set()
    for thread in threads:
        thread.join(timeout=args.read_timeout + 20)
    still_running = sum(thread.is_alive() for thread in threads)
    return {
        "records": records,
        "seen": seen,
        "wall": wall,
        "still_running": still_running,
        "cores": cores,
        "own_cores": own_cores,
        "machine": machine,
    }


def p99(run: dict) -> float | None:
    return latency([r["ms"] for r in run["records"] if r["status"] == 200]).get("p99_ms")


def over_rounds(runs: list[dict], cores) -> float:
    """The mean of `cores(run)` (cores used during a round) over the rounds, weighted by their walls."""
    return round(sum(cores(run) * run["wall"] for run in runs) / sum(run["wall"] for run in runs), 3)


def summary(runs: list[dict]) -> dict:
    """One phase's runs (one a round) pooled: every normal request's status and latency, what attackers saw."""
    records = [record for run in runs for record in run["records"]]
    seen: dict[str, Counter] = {}
    for run in runs:
        for kind, counts in run["seen"].items():
            seen.setdefault(kind, Counter()).update(counts)
    return {
        "normal_requests": len(records),
        "normal_status": dict(Counter(str(r["status"]) for r in records)),
        "normal_errors": dict(Counter(r["error"] for r in records if "error" in r)),
        "normal_latency": latency([r["ms"] for r in records if r["status"] == 200]),
        "normal_server_timings": {
            stage: latency([r["timings"][stage] for r in records if "timings" in r])
            for stage in ("queue_ms", "image_ms", "decode_ms")
        },
        "wall_seconds": round(sum(run["wall"] for run in runs), 2),
        "server_cores": {
            part: over_rounds(runs, lambda run, part=part: run["cores"][part])
            for part in ("all", "event_loop", "decoding_threads")
        },
        "machine_cores": {  # every process's, by state (machine_cores)
            state: over_rounds(runs, lambda run, state=state: run["machine"].get(state, 0)) for state in MACHINE_STATES
        },
        "benchmark_cores": over_rounds(runs, lambda run: run["own_cores"]),
        "attackers_saw": {kind: dict(counts) for kind, counts in seen.items()},
        "attackers_still_running_after_stop": sum(run["still_running"] for run in runs),
    }


def server_errors(logged: Counter) -> dict:
    """The 5xx answers in the server's access log: all of them, and those besides 503 ("busy"). A 503 is the bounded
    queue refusing more work, which attackers are meant to get; a normal client's 503 shows in its own statuses."""
    errors = {status: count for status, count in logged.items() if status.startswith("5")}
    return {"all": sum(errors.values()), "besides_busy_503": sum(n for status, n in errors.items() if status != "503")}


def ratio(p99_ms: float | None, quiet_p99_ms: float | None) -> float | None:
    return round(p99_ms / quiet_p99_ms, 2) if quiet_p99_ms and p99_ms else None


def main() -> int:
    parser = benchmark_parser(__doc__, record="hostile_load.json", whole_doc=True)
    parser.add_argument("--clients", type=int, default=2, help="normal clients, one request in flight each")
    parser.add_argument("--requests", type=int, default=30, help="photos each normal client sends per phase")
    parser.add_argument("--attackers", type=int, default=16, help="connections in each of the three attacks")
    parser.add_argument("--beam-size", type=int, default=DEFAULT_BEAM_SIZE)
    parser.add_argument("--read-timeout", type=float, default=10, help="`sat serve --read-timeout` (seconds)")
    parser.add_argument("--hang-up-after", type=float, default=1.0, help="abandoned requests hang up after this")
    parser.add_argument(
        "--attack-interval",
        type=float,
        default=2.0,
        help="seconds between an abandoning or pixel-heavy attacker's requests",
    )
    parser.add_argument(
        "--flood-hang-up-after", type=float, default=0.05, help="the hang-up flood's connections hang up after this"
    )
    parser.add_argument("--model", help="checkpoint directory for `sat serve` (default: the shipped model)")
    parser.add_argument("--deadline", type=float, default=900, help="seconds at most per phase")
    parser.add_argument("--max-batch", type=int, help="passed to `sat serve` (default: its own)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="quiet, attack and flood phases this many times in turn on one server: the ratios pool every round's "
        "requests, and each round's own ratio is recorded beside them (a busy spell of the machine hits one round)",
    )
    args = parser.parse_args()
    if min(args.clients, args.requests, args.attackers, args.rounds) < 1 or args.read_timeout <= 0:
        raise SystemExit("--clients, --requests, --attackers and --rounds must be at least 1, --read-timeout positive")

    record = begin_record(args)
    photos = [(path.name, path.read_bytes()) for path in sorted((REPO / "examples").glob("*.jpg"))]
    port = free_port()
    url = f"http://{HOST}:{port}"
    png, in_budget = huge_png(), in_budget_png()
    flood = {"hang_up_flood": multipart_request(port, "in-budget.png", in_budget, "image/png")}
    attack = {
        "stalled": multipart_request(port, photos[0][0], photos[0][1], "image/jpeg"),
        "abandoned": multipart_request(port, photos[1][0], photos[1][1], "image/jpeg"),
        "pixel_heavy": multipart_request(port, "huge.png", png, "image/png"),
    }
    command = [sys.executable, "-m", "show_attend_tell.cli", "serve", "--host", HOST, "--port", str(port)]
    command += ["--read-timeout", str(args.read_timeout)] + (["--model", args.model] if args.model else [])
    command += ["--max-batch", str(args.max_batch)] if args.max_batch else []
    with tempfile.TemporaryDirectory() as scratch:
        log_path = Path(scratch) / "server.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                health = wait_until_healthy(server, url, 180, log_path)
                rss_after_start = memory_kb(server.pid, "VmRSS")
                runs: dict[str, list[dict]] = {"quiet": [], "attack": [], "hang_up_flood": []}
                peaks: dict[str, int] = {}
                for _ in range(args.rounds):
                    for name, attackers in (("quiet", None), ("attack", attack), ("hang_up_flood", flood)):
                        runs[name].append(phase(url, port, args, photos, attackers, server.pid))
                        peaks[name] = memory_kb(server.pid, "VmHWM")
                peak = peaks["hang_up_flood"]
                alive = server.poll() is None and httpx.get(url + "/api/health", timeout=5).status_code == 200
            finally:
                stop_server(server)
        text = log_path.read_text(errors="replace")
    logged = Counter(ACCESS_LOG.findall(text))
    errors = server_errors(logged)
    quiet, attacked, flooded = (summary(runs[name]) for name in ("quiet", "attack", "hang_up_flood"))
    quiet_p99 = quiet["normal_latency"].get("p99_ms")
    ratio_attack = ratio(attacked["normal_latency"].get("p99_ms"), quiet_p99)
    flood_ratio = ratio(flooded["normal_latency"].get("p99_ms"), quiet_p99)
    rounds = [
        {
            "quiet_p99_ms": q,
            "attack_p99_ms": a,
            "flood_p99_ms": f,
            "attack_over_quiet": ratio(a, q),
            "flood_over_quiet": ratio(f, q),
        }
        for q, a, f in zip(*(map(p99, runs[name]) for name in ("quiet", "attack", "hang_up_flood")), strict=True)
    ]
    all_captioned = all(p["normal_status"] == {"200": p["normal_requests"]} for p in (quiet, attacked, flooded))
    results = {
        "quiet": quiet,
        "attack": attacked,
        "hang_up_flood": flooded,
        "normal_p99_ratio_attack_over_quiet": ratio_attack,
        "normal_p99_ratio_hang_up_flood_over_quiet": flood_ratio,
        "rounds": rounds,
        "server_status_counts_logged": dict(sorted(logged.items())),
        "server_errors_5xx": errors["all"],
        "server_errors_5xx_besides_busy_503": errors["besides_busy_503"],
        "server_tracebacks_in_log": text.count("Traceback"),
        "server_alive_at_end": alive,
        "server_memory_mb": {
            "rss_after_start": round(rss_after_start / 1024, 1),
            "peak_rss_vmhwm_after_quiet": round(peaks["quiet"] / 1024, 1),
            "peak_rss_vmhwm_after_attack": round(peaks["attack"] / 1024, 1),
            "peak_rss_vmhwm": round(peak / 1024, 1),
        },
        "huge_png_bytes": len(png),
        "in_budget_png_bytes": len(in_budget),
    }
    targets = {
        # normal clients' 503s fail normal_clients_all_captioned; an attacker's 503 is the queue's bound at work
        "no_5xx_besides_busy_503": errors["besides_busy_503"] == 0,
        "normal_clients_all_captioned": all_captioned,
        "p99_within_2x": ratio_attack is not None and ratio_attack <= TARGET_P99_RATIO,
        "hang_up_flood_p99_within_2x": flood_ratio is not None and flood_ratio <= TARGET_P99_RATIO,
        "peak_rss_within_1_5_gb": peak / 1024 <= TARGET_PEAK_RSS_MB,
        "no_traceback": results["server_tracebacks_in_log"] == 0 and alive,
    }
    record.update(
        model=args.model or "shipped",
        grid_size=health["grid_size"],
        settings={**{k: v for k, v in vars(args).items() if k != "out"}, "host": HOST},
        results=results,
        targets=targets,
        ok=all(targets.values()),
    )
    finish(record, args.out)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
