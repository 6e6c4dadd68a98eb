"""Training from a feature store larger than memory (issue #19): peak RSS and captions/s, streamed against in memory.

Builds a synthetic prepared dataset of --images training images (captions only: no photo is read) and a 14x14
x 2048 fp16 store of random non-negative rows for it, larger than this machine's RAM by default (36,000 rows,
28.9 GB; COCO's would be 99 GB). Then, each in a process of its own whose memory is sampled from outside:

- `memory`: `sat train`'s loop on the first --small-images rows (a store that fits), held in memory;
- `stream_small`: the same store streamed from disk, its pages first dropped from the page cache;
- `stream_large`: the large store streamed, cold as well;
- `read_only`: the loader alone on the large store (no training), how many images/s it can feed a faster trainer.

The training runs take --steps cross-entropy steps of --batch-size captions (the default model, E=2048, on the
14x14 grid) and report captions/s between step --warmup and the last (log.jsonl's times). Memory is sampled
every 0.1 s over the process and its loader workers: peak RSS sums their Rss (pages the forked workers share
with the trainer counted in each, an upper bound), peak PSS their Pss (shared pages split among them). The
store is deleted at the end unless --keep.

    flock -s /work/bench.lock python benchmarks/store_streaming.py --build-only     # writes 32 GB, untimed
    flock -x /work/bench.lock python benchmarks/store_streaming.py --out results/store_streaming.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import begin_record, benchmark_parser, finish

from show_attend_tell.config import DataConfig, ModelConfig, TrainConfig
from show_attend_tell.features import FEATURES_FILE, META_FILE, expected_meta, open_store, shard_layout
from show_attend_tell.prepare import CAPTIONS_FILE, IMAGES_FILE, PreparedDataset

GRID, CHANNELS = 14, 2048


def synthetic_prepared(source: Path, out: Path, images: int) -> Path:
    """`source` (a small prepared dataset) with its training images repeated up to `images` (names made unique),
    captions and all: the prepared files of a dataset of that size, without photos."""
    from safetensors.torch import load_file, save_file

    dataset = PreparedDataset.load(source)
    document = json.loads((source / IMAGES_FILE).read_text())
    tensors = load_file(source / CAPTIONS_FILE)
    train = dataset.indices("train")
    others = [i for i in range(len(dataset.images)) if i not in set(train)]
    picked = [train[n % len(train)] for n in range(images)] + others
    entries = []
    for n, i in enumerate(picked):
        entry = dict(document["images"][i])
        entry["file"] = f"{n:06d}_{Path(entry['file']).name}"
        entries.append(entry)
    captions_of: dict[int, list[int]] = {}
    for caption, image in enumerate(dataset.image_index.tolist()):
        captions_of.setdefault(image, []).append(caption)
    rows, owners = [], []
    for n, i in enumerate(picked):
        mine = captions_of[i]
        rows += mine
        owners += [n] * len(mine)
    out.mkdir(parents=True, exist_ok=True)
    (out / IMAGES_FILE).write_text(json.dumps({**document, "images": entries}))
    for name in ("vocab.json",):
        (out / name).write_bytes((source / name).read_bytes())
    index = torch.tensor(rows)
    save_file(
        {
            "tokens": tensors["tokens"][index].contiguous(),
            "lengths": tensors["lengths"][index].contiguous(),
            "image_index": torch.tensor(owners, dtype=torch.int64),
        },
        str(out / CAPTIONS_FILE),
        metadata={"format": "1", "max_length": str(dataset.max_length)},
    )
    return out


def synthetic_store(prepared: Path, out: Path, encoder_sha256: str, *, progress: bool = True) -> Path:
    """A complete one-shard 14x14 x 2048 fp16 store for `prepared`: random non-negative rows (a pool of 512
    distinct ones, written in a scrambled order), written with plain file writes, then dropped from the page
    cache."""
    from tqdm import tqdm

    dataset = PreparedDataset.load(prepared)
    config = ModelConfig(vocab_size=len(dataset.vocab), image_size=448, grid_size=GRID, encoder_dim=CHANNELS)
    meta = expected_meta(config, [image.path for image in dataset.images], encoder_sha256)
    rows = meta["shape"][0]
    meta.update(dtype="float16", shards=shard_layout(rows, 1))
    out.mkdir(parents=True, exist_ok=True)
    pool = np.random.default_rng(0).standard_normal((512, GRID * GRID, CHANNELS), dtype=np.float32)
    pool = np.maximum(pool, 0).astype(np.float16)
    features = np.lib.format.open_memmap(out / FEATURES_FILE, mode="w+", dtype=np.float16, shape=tuple(meta["shape"]))
    offset = features.offset
    del features
    chunk = 256
    with open(out / FEATURES_FILE, "r+b") as handle:
        for start in tqdm(range(0, rows, chunk), desc="synthetic store", unit="chunk", disable=not progress):
            count = min(chunk, rows - start)
            picks = (np.arange(start, start + count) * 7919) % len(pool)
            handle.seek(offset + start * pool[0].nbytes)
            handle.write(pool[picks].tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    np.save(out / "done.npy", np.ones(rows, dtype=np.uint8))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    drop_cache(out)
    return out


def drop_cache(store: Path) -> None:
    """Evict the store's pages from the page cache (this file's only), so that reading it goes to the disk."""
    for path in store.glob("*.npy"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def tree_memory(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in bytes summed over a process and all its descendants: Rss counts the pages that forked loader
    workers share with the trainer once in each (an upper bound), Pss splits them among the sharers."""
    rss = pss = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return rss, pss


def run_child(arguments: list[str]) -> dict:
    """Run this script's `child` mode with `arguments`; its JSON result with the peak RSS of its process tree."""
    command = [sys.executable, __file__, "child", *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    while process.poll() is None:
        rss, pss = tree_memory(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.1)
    output = process.stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed with exit code {process.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    return {**result, "peak_rss_gb": round(peak_rss / 1e9, 3), "peak_pss_gb": round(peak_pss / 1e9, 3)}


def child(args: argparse.Namespace) -> dict:
    """One measurement in this process (see the module's docstring)."""
    from show_attend_tell.train import fit, new_run

    torch.set_num_threads(args.threads)
    store = open_store(args.store)
    if args.mode == "read_only":
        from show_attend_tell.training_data import StoreRows

        rows = np.random.default_rng(0).permutation(len(store))[: args.read_images].tolist()
        batches = [rows[i : i + args.images_per_batch] for i in range(0, len(rows), args.images_per_batch)]
        loader = torch.utils.data.DataLoader(
            StoreRows(store), batch_size=None, sampler=batches, num_workers=args.loader_workers, prefetch_factor=2
        )
        started = time.perf_counter()
        count = sum(len(batch) for batch in loader)
        seconds = time.perf_counter() - started
        return {
            "images": count,
            "images_per_second": round(count / seconds, 1),
            "megabytes_per_second": round(count * store.row_bytes / seconds / 1e6, 1),
        }
    dataset = PreparedDataset.load(args.prepared)
    config = ModelConfig(vocab_size=len(dataset.vocab), image_size=448, grid_size=GRID, encoder_dim=CHANNELS)
    train = TrainConfig(batch_size=args.batch_size, epochs=1, log_every_steps=1, checkpoint_every_steps=10**6)
    data = DataConfig(
        prepared=args.prepared, features=args.store, feature_loading=args.loading, loader_workers=args.loader_workers
    )
    with tempfile.TemporaryDirectory(prefix="sat-stream-") as run_dir:
        run = new_run(Path(run_dir) / "run", config, train, data, java=False)
        started = time.perf_counter()
        fit(run, max_steps=args.steps, progress=False)
        wall = time.perf_counter() - started
        log = [json.loads(line) for line in (Path(run_dir) / "run" / "log.jsonl").read_text().splitlines()]
    timed = [record for record in log if record["kind"] == "train" and record["step"] > args.warmup]
    seconds = timed[-1]["time"] - next(r for r in log if r["step"] == args.warmup)["time"]
    captions = sum(record["captions"] for record in timed)
    return {
        "steps": args.steps,
        "captions_per_second": round(captions / seconds, 2),
        "steps_timed": len(timed),
        "wall_seconds_with_loading": round(wall, 1),
        "in_memory": not hasattr(run.data.features, "row_bytes"),
    }


def main() -> None:
    parser = benchmark_parser(__doc__, record="store_streaming.json")
    parser.add_argument("mode", nargs="?", default="all", choices=("all", "child"))
    parser.add_argument("--source", default="/work/data/f8k", help="a small prepared dataset whose captions are reused")
    parser.add_argument("--work", default="/work/store-streaming", help="where the synthetic data goes (deleted)")
    parser.add_argument("--images", type=int, default=36_000, help="training images of the large store")
    parser.add_argument("--small-images", type=int, default=4_000, help="training images of the store that fits")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--read-images", type=int, default=2_000)
    parser.add_argument("--images-per-batch", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    parser.add_argument(
        "--build-only", action="store_true", help="make the stores (untimed) and keep them for a later measuring run"
    )
    # child mode
    parser.add_argument("--store")
    parser.add_argument("--prepared")
    parser.add_argument("--loading", choices=("memory", "stream", "read_only"))
    args = parser.parse_args()
    if args.mode == "child":
        args.mode = "read_only" if args.loading == "read_only" else "train"
        print(json.dumps(child(args)))
        return

    from show_attend_tell.weights import ENCODER_WEIGHTS

    record = begin_record(args)
    work = Path(args.work)
    sha = ENCODER_WEIGHTS["resnet50"].sha256()
    results = {}
    try:
        for name, images in (("small", args.small_images), ("large", args.images)):
            prepared, store = work / f"prepared_{name}", work / f"store_{name}"
            if not (store / META_FILE).is_file():  # made by an earlier --build-only run, else now
                synthetic_prepared(Path(args.source), prepared, images)
                synthetic_store(prepared, store, sha)
            results[f"{name}_store"] = {
                "images": len(PreparedDataset.load(prepared).images),
                "gigabytes": round(open_store(store).nbytes / 1e9, 2),
            }
        if args.build_only:
            print(json.dumps(results))
            return
        common = [
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--batch-size",
            str(args.batch_size),
            "--loader-workers",
            str(args.loader_workers),
            "--threads",
            str(args.threads),
        ]
        for name, size, loading in (
            ("memory", "small", "memory"),
            ("stream_small", "small", "stream"),
            ("stream_large", "large", "stream"),
            ("read_only", "large", "read_only"),
        ):
            drop_cache(work / f"store_{size}")
            results[name] = run_child(
                [
                    *common,
                    "--store",
                    str(work / f"store_{size}"),
                    "--prepared",
                    str(work / f"prepared_{size}"),
                    "--loading",
                    loading,
                    "--read-images",
                    str(args.read_images),
                    "--images-per-batch",
                    str(args.images_per_batch),
                ]
            )
            print(name, results[name], flush=True)
    finally:
        if not args.keep and not args.build_only:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    ratio = results["stream_large"]["captions_per_second"] / results["memory"]["captions_per_second"]
    record.update(
        settings={k: v for k, v in vars(args).items() if k not in ("mode", "store", "prepared", "loading")},
        ram_gigabytes=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 2),
        results=results,
        stream_large_over_memory=round(ratio, 3),
        stream_small_over_memory=round(
            results["stream_small"]["captions_per_second"] / results["memory"]["captions_per_second"], 3
        ),
        targets={"peak_rss_gb_at_most": 4.0, "captions_per_second_ratio_at_least": 0.8},
    )
    finish(record, args.out)


if __name__ == "__main__":
    main()
