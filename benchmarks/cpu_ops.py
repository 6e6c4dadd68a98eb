"""Two CPU measurements behind design choices in model.py, recorded rather than remembered.

1. tanh against sigmoid over an attention energy tensor (K beams x P cells x A): SoftAttention computes the
   paper's w^T tanh(u) through sigmoid, which gives the same alpha (tests/test_model.py).
2. The ResNet-50 encoder's time per image by batch size at inference: Encoder.forward runs CPU batches in
   chunks of CPU_CHUNK images.

Each figure is the median over --repeats rounds, the sizes interleaved within a round (the machine is shared).

    python benchmarks/cpu_ops.py --out results/cpu_ops.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time

import torch

from show_attend_tell.config import ModelConfig
from show_attend_tell.model import CPU_CHUNK, Encoder
from show_attend_tell.records import provenance, write_record


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def activations(repeats: int) -> dict:
    """Median ns per element of tanh and sigmoid (in place, as SoftAttention runs it) for 1 and 32 photos."""
    results = {}
    for rows in (3, 96):  # beam 3 for one photo; for 32 photos
        x = torch.randn(rows, 49, 512)
        timings: dict[str, list[float]] = {"tanh": [], "sigmoid": []}
        for _ in range(repeats):
            for name, op in (("tanh", torch.tanh_), ("sigmoid", torch.sigmoid_)):
                work = x.clone()
                timings[name].append(seconds(lambda op=op, work=work: op(work)) * 1e9 / x.numel())
        medians = {name: round(statistics.median(values), 3) for name, values in timings.items()}
        results[f"{rows}x49x512"] = {
            "ns_per_element_median": medians,
            "tanh_over_sigmoid": round(medians["tanh"] / medians["sigmoid"], 2),
        }
    return results


def encoder_batches(repeats: int, images: int) -> dict:
    """Median ms per image of the (random-weight) ResNet-50 trunk at 224 px, one forward per batch size."""
    encoder = Encoder(ModelConfig(vocab_size=10), pretrained=False).eval()
    x = torch.randn(images, 3, 224, 224)
    sizes = (1, 2, 4, 8, 16, 32)
    timings: dict[int, list[float]] = {size: [] for size in sizes}
    with torch.inference_mode():
        encoder.trunk(x[:2])  # warm-up
        for r in range(repeats):
            for size in sizes if r % 2 == 0 else sizes[::-1]:
                batch = x[:size]
                timings[size].append(seconds(lambda batch=batch: encoder.trunk(batch)) * 1e3 / size)
    return {f"batch_{size}": round(statistics.median(values), 1) for size, values in timings.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the target machine)")
    parser.add_argument("--out", help="write the figures as JSON here (e.g. results/cpu_ops.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = provenance("python " + shlex.join(sys.argv))
    record["activations"] = activations(args.repeats * 5)
    record["encoder_ms_per_image"] = encoder_batches(args.repeats, 32)
    record["encoder_cpu_chunk"] = CPU_CHUNK
    print(json.dumps(record, indent=2))
    if args.out:
        write_record(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
