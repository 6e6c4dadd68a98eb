"""Captioning a collection into one file (`sat caption --out`): written a batch at a time, resumed, sharded.

The file is JSON lines (one `caption_record` per photo), or CSV when its name ends in .csv (the same fields as
columns, lists and numbers as JSON text). One process appends each batch's records to it with one write and an
fsync, so a kill loses at most the batch being captioned; a rerun cuts a torn last line (a kill inside that
write) and skips every photo the file already holds, by its path as given.

Under torchrun, rank r of w captions the r-th of w contiguous blocks of the photos into a part file of its own
beside the output (captions.part-00001-of-00004.jsonl). Once every rank is done, rank 0 merges the output and
the part files it can see into the output, in input order, each photo once, with one rename, and removes the
parts. Ranks on machines that share no disk leave their parts on their own disks: copied beside the output,
they are merged by the same command run again (one process is enough; it finds nothing left to caption).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from show_attend_tell.captioner import Caption, Captioner
from show_attend_tell.config import write_atomically
from show_attend_tell.errors import InputError
from show_attend_tell.images import load_image

# The fields of a record in the order they are written (Caption.as_dict's, then the model's); "locations" only for
# sampled hard attention, "attention_figure" only with --attention-dir.
RECORD_FIELDS = (
    "image",
    "caption",
    "words",
    "score",
    "log_prob",
    "alternatives",
    "guidance",
    "template",
    "detections",
    "discouraged",
    "locations",
    "decoder",
    "encoder_precision",
    "detector",
    "attention_figure",
)


def caption_record(path: str | Path, caption: Caption, captioner: Captioner, figure: Path | None = None) -> dict:
    """One photo's caption as `sat caption --json` prints it and `--out` stores it."""
    record = {
        "image": str(path),
        **caption.as_dict(),
        "decoder": captioner.decoder,
        "encoder_precision": captioner.encoder_precision,
        "detector": captioner.detector_name,
    }
    if figure:
        record["attention_figure"] = str(figure)
    return record


def read_list(path: str | Path) -> list[str]:
    """The photos named in a list file, one path per line (blank lines skipped); a relative path is taken from
    the current folder, as `tar -T` and `rsync --files-from` take theirs."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"--from-list {path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise InputError(f"--from-list {path}: cannot read it ({error.strerror or error})") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def caption_photos(
    captioner: Captioner,
    paths: Sequence[Path],
    *,
    max_pixels: int,
    options: dict,
    skipped: Callable[[Path, str], None],
) -> list[tuple[Path, Image.Image, Caption]]:
    """One batch: each photo decoded (a broken one is given to `skipped` with the reason, and left out), then
    one `Captioner.caption_batch` with `options` for the rest."""
    loaded = []
    for path in paths:
        try:
            # decoded only as large as the model needs: memory stays one photo's decode, whatever the batch
            loaded.append((path, load_image(path, size=captioner.image_size, max_pixels=max_pixels)))
        except InputError as error:
            skipped(path, str(error))
    if not loaded:
        return []
    captions = captioner.caption_batch([image for _, image in loaded], **options)
    return [(path, image, caption) for (path, image), caption in zip(loaded, captions, strict=True)]


def is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def part_path(out: Path, rank: int, world_size: int) -> Path:
    """The file rank `rank` of `world_size` writes its share into, beside `out` and of its kind."""
    return out.with_name(f"{out.stem}.part-{rank:05d}-of-{world_size:05d}{out.suffix}")


def part_files(out: Path) -> list[Path]:
    """The part files beside `out`, of any number of ranks (an earlier run may have had another)."""
    pattern = f"{glob.escape(out.stem)}.part-[0-9]*-of-[0-9]*{glob.escape(out.suffix)}"
    return sorted(out.parent.glob(pattern))


def _row(record: dict, path: Path) -> str | dict:
    """What `path` stores of a record: its JSON line, or its CSV row (strings as they are, the rest as JSON)."""
    if is_csv(path):
        return {key: value if isinstance(value, str) else json.dumps(value) for key, value in record.items()}
    return json.dumps(record)


def _encode(path: Path, rows: list, *, header: bool) -> bytes:
    if not is_csv(path):
        return "".join(line + "\n" for line in rows).encode()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, RECORD_FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def read_rows(path: Path, *, repair: bool = False) -> list[tuple[str, str | dict]]:
    """(image, row) of each whole record in `path`, in file order; none when it does not exist. A last line
    without its newline was torn by a kill inside a write: with `repair` (the file is this process's own) it is
    cut off the file, otherwise (another rank may be writing it now) it is only passed over."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise InputError(f"{path}: cannot read it ({error.strerror or error})") from None
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        if repair:
            os.truncate(path, whole)
        data = data[:whole]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text (byte {error.start}); not a file `sat caption --out` wrote") from None
    if is_csv(path):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is not None and tuple(reader.fieldnames) != RECORD_FIELDS:
            raise InputError(
                f"{path}: its columns are not those `sat caption --out` writes ({', '.join(RECORD_FIELDS)}); "
                "give another --out"
            )
        rows = []
        for row in reader:
            if not row.get("image"):
                raise InputError(f"{path}: line {reader.line_num}: no image path; not a file `sat caption` wrote")
            rows.append((row["image"], row))
        return rows
    rows = []
    for number, line in enumerate(text.split("\n")[:-1], 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise InputError(f"{path}: line {number}: not a caption record (a JSON object with an image path)")
        rows.append((record["image"], line))
    return rows


def append_rows(path: Path, rows: list) -> None:
    """Add rows to `path` with one write, then fsync: a kill tears at most this write, which `read_rows` cuts
    off, and everything written before stays."""
    header = is_csv(path) and (not path.exists() or path.stat().st_size == 0)
    data = _encode(path, rows, header=header)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:  # write may take less than asked (a signal, a full pipe of a FUSE disk); go on from there
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as error:
        raise InputError(
            f"{path}: cannot write ({error.strerror or error}); the captions written before are kept and the same "
            "command resumes after them"
        ) from None


def merge(out: Path, order: Sequence[str]) -> list[str]:
    """Rewrite `out` with its records and those of the part files beside it: the photos of `order` in that
    order, then any others (an earlier run's) as they were; each photo once. One rename, then the parts are
    removed, so a kill in between leaves records that the next merge finds twice and keeps once. Returns the
    photos `out` now holds."""
    parts = part_files(out)
    rows: dict[str, str | dict] = {}
    for path in [out, *parts]:
        for image, row in read_rows(path):
            rows.setdefault(image, row)
    position = {image: i for i, image in enumerate(order)}
    images = sorted(rows, key=lambda image: position.get(image, len(order)))  # stable: the others keep theirs
    if parts or images != list(rows):
        data = _encode(out, [rows[image] for image in images], header=True)
        write_atomically(out, lambda temporary: Path(temporary).write_bytes(data))
        for part in parts:
            part.unlink(missing_ok=True)
    return images


def share(photos: int, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """The photos [start, stop) of `rank`: contiguous blocks of whole batches, so that every batch holds the
    photos it holds in one process (batched photos get their captions alone, but a score's last float32 digits
    can depend on the batch it was summed in)."""
    batches = -(-photos // batch_size)
    start, stop = (min(photos, (r * batches // world_size) * batch_size) for r in (rank, rank + 1))
    return start, stop


def caption_collection(
    captioner: Captioner,
    paths: Sequence[Path],
    out: str | Path,
    *,
    options: dict,
    batch_size: int = 16,
    max_pixels: int,
    describe: Callable[[Path, Image.Image, Caption], dict] | None = None,
    report: Callable[[str], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict:
    """Caption `paths` into `out` (see the module's docstring), skipping the photos it or its part files hold.

    options: `Captioner.caption_batch`'s. describe: a photo's record (default `caption_record`; `sat caption`
    also writes its attention figure there). report: one line per photo that could not be read. Under torchrun
    every rank calls this with its rank; they meet once at the end, where rank 0 merges. Returns (on rank 0,
    for all ranks) the photos given, those already captioned and skipped, those captioned now, the failures
    ({path: reason}), and the photos still missing from `out` (their parts are on another machine).
    """
    out = Path(out)
    report = report or (lambda line: tqdm.write(line, file=sys.stderr))  # above the progress bar
    describe = describe or (lambda path, image, caption: caption_record(path, caption, captioner))
    mine = out if world_size == 1 else part_path(out, rank, world_size)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--out {out}: cannot create its folder ({error.strerror or error})") from None
    done = set()
    for path in [out, *part_files(out)]:
        done.update(image for image, _ in read_rows(path, repair=path == mine))
    keys = [str(path) for path in paths]
    start, stop = share(len(paths), rank, world_size, batch_size)
    # the batches of one process's run, less what is done: a batch written whole before a kill is skipped whole
    batches = [
        [path for path, key in zip(paths[first:last], keys[first:last], strict=True) if key not in done]
        for first, last in ((i, min(stop, i + batch_size)) for i in range(start, stop, batch_size))
    ]
    pending = sum(len(batch) for batch in batches)
    # counted in each rank's own share, which no other rank writes (the other parts may be growing already)
    already = (stop - start) - pending
    if world_size > 1:
        import torch.distributed as dist

        counts = [None] * world_size
        dist.all_gather_object(counts, already)
        already = sum(counts)
    if rank == 0 and already:
        report(f"sat caption: {out} holds {already} of these {len(keys)} photos already: skipped")
    failed: dict[str, str] = {}

    def skipped(path: Path, reason: str) -> None:
        failed[str(path)] = reason
        report(f"sat caption: skipped: {reason}")

    description = f"caption (rank {rank} of {world_size})" if world_size > 1 else "caption"
    with tqdm(total=pending, desc=description, unit="photo", disable=not progress or rank != 0) as bar:
        for batch in filter(None, batches):
            captioned = caption_photos(captioner, batch, max_pixels=max_pixels, options=options, skipped=skipped)
            if captioned:
                append_rows(mine, [_row(describe(path, image, caption), mine) for path, image, caption in captioned])
            bar.update(len(batch))
    summary = {"photos": len(keys), "skipped": already, "captioned": pending - len(failed), "failed": failed}
    if world_size > 1:
        summaries = [None] * world_size
        dist.all_gather_object(summaries, summary)  # every rank's part is complete once this returns
        summary["captioned"] = sum(part["captioned"] for part in summaries)
        summary["failed"] = {path: reason for part in summaries for path, reason in part["failed"].items()}
    if rank == 0:
        held = set(merge(out, keys))
        summary["missing"] = sum(key not in held and key not in summary["failed"] for key in keys)
    return summary
