"""What the benchmarks share: their common flags, the record's provenance, a timer, medians, interleaved rounds
for a shared machine, and the record printed and written (records.write_record).

A benchmark runs as `python benchmarks/NAME.py`, which puts this folder on sys.path: `from harness import ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from show_attend_tell.records import provenance, write_record

REPO = Path(__file__).resolve().parent.parent
THREADS = 2  # the target machine's cores


def benchmark_parser(
    doc: str, *, record: str, required: bool = False, whole_doc: bool = False
) -> argparse.ArgumentParser:
    """A benchmark's flags: its docstring's first paragraph as the description (`whole_doc`: all of it, as written),
    and --out, where the record goes (`record`: its usual name under results/)."""
    made = (
        argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        if whole_doc
        else argparse.ArgumentParser(description=doc.split("\n\n")[0])
    )
    made.add_argument(
        "--out", type=Path, required=required, help=f"write the record as JSON here (e.g. results/{record})"
    )
    return made


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS}: the target machine)"
    )


def add_rounds(
    parser: argparse.ArgumentParser, default: int, *, warmup: int | None = None, help: str = "measured rounds"
) -> None:
    """--repeats (measured rounds) and, with a `warmup` default, --warmup (unmeasured rounds first)."""
    parser.add_argument("--repeats", type=int, default=default, help=help)
    if warmup is not None:
        parser.add_argument("--warmup", type=int, default=warmup, help="unmeasured rounds first")


def add_note(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--note", default="", help="recorded beside the figures, e.g. the machine's state")


def begin_record(args: argparse.Namespace) -> dict:
    """The torch threads set from --threads (where the benchmark has it); the record begun with its provenance."""
    threads = getattr(args, "threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return provenance("python " + shlex.join(sys.argv))


def finish(record: dict, out: str | Path | None, shown: dict | None = None, *, indent: int = 2) -> int:
    """Print the record (or `shown`, a summary of it) and write it to `out` when given; the exit code."""
    print(json.dumps(record if shown is None else shown, indent=indent))
    if out:
        write_record(record, out)
    return 0


def load_at_end(record: dict, note: str = "") -> None:
    """The 1-minute load average as the measurement ends, and the --note, beside the figures."""
    record["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    if note:
        record["note"] = note


def seconds(function: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


@dataclasses.dataclass
class Rounds:
    """Each variant's measured seconds and return values, one per round, in round order."""

    seconds: dict[str, list[float]]
    results: dict[str, list]


def interleaved(
    variants: dict[str, Callable[[int], object]],
    rounds: int,
    *,
    warmup: int = 0,
    reverse: bool = True,
    after_round: Callable[[int, Rounds], None] | None = None,
) -> Rounds:
    """Every variant once per round, called with the round's number (negative for the `warmup` rounds first, which
    are not kept), the order reversed every other round (`reverse`) so that neither side always runs first on a
    shared machine; `after_round(r, rounds)` after each measured round (progress lines)."""
    names = list(variants)
    found = Rounds({name: [] for name in names}, {name: [] for name in names})
    for r in range(-warmup, rounds):
        for name in names if r % 2 == 0 or not reverse else names[::-1]:
            started = time.perf_counter()
            result = variants[name](r)
            elapsed = time.perf_counter() - started
            if r >= 0:
                found.seconds[name].append(elapsed)
                found.results[name].append(result)
        if r >= 0 and after_round is not None:
            after_round(r, found)
    return found


def per_photo_rounds(
    variants: dict[str, tuple[Callable[[int], object], int]], rounds: int, *, warmup: int = 1
) -> dict[str, list[float]]:
    """`interleaved` over variants given as (run it, how many photos it captions) -> each variant's seconds per
    photo, one per measured round."""
    found = interleaved({name: run for name, (run, _) in variants.items()}, rounds, warmup=warmup)
    return {name: [s / variants[name][1] for s in values] for name, values in found.seconds.items()}


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median of two variants' per-round ratios (per_round_ratio), to 3 digits."""
    return median(per_round_ratio(times[numerator], times[denominator]), digits=3)


def photos_in(folder: Path) -> list:
    """The JPEG and PNG photos of `folder`, decoded (images.load_image), in name order."""
    from show_attend_tell.images import load_image

    return [load_image(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]


def median(values: Iterable[float], *, scale: float = 1.0, digits: int | None = None) -> float:
    """The median of `values` times `scale` (1e3: seconds to ms), rounded to `digits` when given."""
    value = scale * statistics.median(values)
    return value if digits is None else round(value, digits)


def latency(values: list[float]) -> dict:
    """Milliseconds of requests -> their count, median, 99th percentile and the slowest."""
    if not values:
        return {"n": 0}
    values = sorted(values)
    p99 = statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(values[-1], 1),
    }


def per_round_ratio(numerators: list[float], denominators: list[float]) -> list[float]:
    """Each round's ratio: the two sides ran seconds apart, so a busy spell of the machine hits both."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]
