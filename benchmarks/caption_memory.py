"""Peak memory of `sat caption` over a folder of huge PNGs and good photos (issue #14): it must not grow with the
photos' pixel counts beyond one photo's decode.

It writes --huge RGBA 7900x7900 PNGs (62 megapixels each, a few MB on disk, 250 MB each decoded) and the photos
of examples/ into a scratch folder, runs `sat caption` on the folder as a subprocess once with the default pixel
budget (the huge ones are refused from their header) and once with --max-pixels raised so that they are decoded
(shrunk to the model's size while decoding), and records each run's peak resident memory (the child's
ru_maxrss), exit code and counts. Not a timing: the figures do not depend on how busy the machine is.

    python benchmarks/caption_memory.py --huge 16 --out results/caption_memory.json
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import REPO, begin_record, benchmark_parser, finish
from PIL import Image

SIDE = 7900
TARGET_PEAK_RSS_MB = 1536


def huge_png(path: Path, seed: int) -> None:
    """An RGBA photo of SIDE x SIDE: a few coloured blocks over transparency, so it compresses to a few MB."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
    for _ in range(40):
        x, y = rng.integers(0, SIDE - 800, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(64, 256)),)
        image.paste(colour, (int(x), int(y), int(x) + 800, int(y) + 800))
    image.save(path, "PNG", compress_level=6)


def run(folder: Path, extra: list[str]) -> dict:
    """`sat caption FOLDER` in a child process: its peak RSS, exit code and what it printed."""
    command = [sys.executable, "-m", "show_attend_tell.cli", "caption", str(folder), "--beam", "3", *extra]
    start = time.perf_counter()
    # ru_maxrss of RUSAGE_CHILDREN is the largest of the waited-for children: one child per call, run in a fresh
    # grandchild via `python -c` so that earlier runs do not count.
    wrapper = (
        "import resource, subprocess, sys, json; "
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(json.dumps({'code': done.returncode, 'out': done.stdout, 'err': done.stderr, "
        "'peak_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True)
    child = json.loads(done.stdout)
    err_lines = [line for line in child["err"].splitlines() if line.strip()]
    return {
        "command": "sat " + shlex.join(command[3:]),
        "exit_code": child["code"],
        "peak_rss_mb": round(child["peak_kb"] / 1024, 1),
        "within_target": child["peak_kb"] / 1024 <= TARGET_PEAK_RSS_MB,
        "captioned": len(child["out"].splitlines()),
        "skipped": sum(line.startswith("sat caption: skipped:") for line in err_lines),
        "skipped_examples": [line for line in err_lines if "skipped" in line][:2],
        "tracebacks": child["err"].count("Traceback"),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def main() -> int:
    parser = benchmark_parser(__doc__, record="caption_memory.json", whole_doc=True)
    parser.add_argument("--huge", type=int, default=16, help="huge PNGs in the folder")
    args = parser.parse_args()
    if args.huge < 1:
        raise SystemExit("--huge must be at least 1")
    record = begin_record(args)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for n in range(args.huge):
            huge_png(folder / f"huge_{n:02d}.png", n)
        photos = sorted((REPO / "examples").glob("*.jpg"))
        for photo in photos:
            (folder / photo.name).write_bytes(photo.read_bytes())
        sizes = [path.stat().st_size for path in folder.glob("huge_*.png")]
        runs = {
            "default_pixel_budget": run(folder, []),
            "huge_photos_decoded": run(folder, ["--max-pixels", str(SIDE * SIDE)]),
        }
    record.update(
        inputs={
            "huge_pngs": args.huge,
            "huge_png": f"RGBA {SIDE}x{SIDE}: {SIDE * SIDE / 1e6:.1f} megapixels, "
            f"{SIDE * SIDE * 4 / 2**20:.0f} MB decoded",
            "huge_png_mb_on_disk": round(sum(sizes) / len(sizes) / 2**20, 2),
            "good_photos": len(photos),
        },
        target_peak_rss_mb=TARGET_PEAK_RSS_MB,
        runs=runs,
        ok=all(r["within_target"] and r["tracebacks"] == 0 for r in runs.values()),
    )
    finish(record, args.out)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
