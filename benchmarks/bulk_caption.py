"""Bulk captioning throughput: `sat caption --from-list --out` over the same Flickr8k test photos as one process
with 2 threads and as 2 torchrun processes with 1 thread each, the shipped model at its defaults.

Each way runs twice: once over all the photos, then again over the finished file, which loads the model,
finds nothing left and exits. The second run's time is the fixed cost (start-up, model load, reading and
merging the file), so the record gives photos/s end to end and with that cost taken off.

    flock -x /tmp/bench.lock python benchmarks/bulk_caption.py --photos 1000 --out results/bulk_caption.json
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, begin_record, benchmark_parser, finish

FLICKR8K = Path(os.environ.get("SAT_FLICKR8K_DIR", REPO.parent / "shared" / "data" / "flickr8k"))


def main() -> int:
    parser = benchmark_parser(__doc__, record="bulk_caption.json")
    parser.add_argument("--data", type=Path, default=FLICKR8K, help="the Flickr8k folder")
    parser.add_argument("--photos", type=int, default=1000, help="the first N photos of the test split")
    args = parser.parse_args()
    names = (args.data / "Flickr_8k.testImages.txt").read_text().split()[: args.photos]
    record = begin_record(args)
    sat = [sys.executable, "-m", "show_attend_tell.cli", "caption"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    ways = {
        "1_process_x_2_threads": ({"OMP_NUM_THREADS": "2"}, sat),
        "2_processes_x_1_thread": ({"OMP_NUM_THREADS": "1"}, [*torchrun, "show_attend_tell.cli", "caption"]),
    }
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as work:
        photo_list = Path(work) / "photos.txt"
        photo_list.write_text("".join(f"{args.data / 'images' / name}\n" for name in names))
        for way, (env, command) in ways.items():
            out = Path(work) / f"{way}.jsonl"
            full = [*command, "--from-list", str(photo_list), "--out", str(out)]
            seconds = []
            for _ in ("all photos", "nothing left"):
                start = time.perf_counter()
                ran = subprocess.run(full, env={**os.environ, **env}, capture_output=True, text=True)
                seconds.append(time.perf_counter() - start)
                if ran.returncode != 0:
                    print(ran.stderr[-3000:], file=sys.stderr)
                    return 1
            outputs[way] = [json.loads(line) for line in out.read_text().splitlines()]
            assert len(outputs[way]) == len(names), (way, len(outputs[way]))
            shown = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(full).replace(work, "$WORK")
            results[way] = {
                "command": shown,
                "seconds": round(seconds[0], 1),
                "fixed_seconds": round(seconds[1], 1),
                "photos_per_second": round(len(names) / seconds[0], 2),
                "photos_per_second_without_fixed": round(len(names) / (seconds[0] - seconds[1]), 2),
            }
            print(way, results[way], file=sys.stderr)
    one, two = outputs.values()
    record.update(
        photos=len(names),
        photos_from="the first N of Flickr_8k.testImages.txt (224x224 copies), model at its defaults",
        results=results,
        two_over_one=round(
            results["2_processes_x_1_thread"]["photos_per_second"]
            / results["1_process_x_2_threads"]["photos_per_second"],
            3,
        ),
        same_order=[r["image"] for r in one] == [r["image"] for r in two],
        same_captions=sum(a["caption"] == b["caption"] for a, b in zip(one, two, strict=True)),
    )
    return finish(record, args.out)


if __name__ == "__main__":
    sys.exit(main())
