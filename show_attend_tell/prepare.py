"""`sat prepare`: tokenise a dataset's captions, build the vocabulary, and write the prepared directory that
training, feature extraction and evaluation read through `PreparedDataset.load`.

A prepared directory holds:
- `vocab.json`: the vocabulary, built from the train split only;
- `images.json`: {"format", "dataset", "image_root", "images": [{"file", "split", "captions"}]};
- `captions.safetensors`: `tokens` int32 (N, max_length + 2) = <start> words <end> <pad>...,
  `lengths` int32 (N,) counting <start> and <end>, `image_index` int64 (N,) into images.json's list;
- `report.json`: the counts `sat prepare` prints, and every item it skipped with the reason.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from show_attend_tell import datasets
from show_attend_tell.datasets import SPLITS, ImageRecord, RawDataset
from show_attend_tell.errors import InputError
from show_attend_tell.text import END_ID, PAD_ID, START_ID, Vocabulary, tokenize

FORMAT = 1
VOCAB_FILE, IMAGES_FILE, CAPTIONS_FILE, REPORT_FILE = "vocab.json", "images.json", "captions.safetensors", "report.json"
PERCENTILES = (50, 90, 95, 99)


def limit_per_split(splits: list[str], limit: int) -> list[int]:
    """Positions of the first `limit` items of each split, in their original order (`--limit` everywhere:
    `sat prepare`, `features`, `train` and `evaluate` take the same images from the same list)."""
    if limit < 0:
        raise InputError(f"--limit must be 0 (everything) or a positive number of images per split, got {limit}")
    seen: dict[str, int] = {}
    kept = []
    for position, split in enumerate(splits):
        seen[split] = seen.get(split, 0) + 1
        if not limit or seen[split] <= limit:
            kept.append(position)
    return kept


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def _listed(items: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    return {reason: {"count": len(found), "items": found} for reason, found in items.items()}


def prepare(
    raw: RawDataset,
    out_dir: str | Path,
    *,
    dataset: str,
    min_count: int = 5,
    max_length: int = 30,
    check_images: bool = False,
    limit: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenise, build the vocabulary from train, encode every split and write `out_dir`; returns the report.

    Captions longer than `max_length` words are clipped (and counted); nothing is dropped without a reason
    in the report. An empty split is an error, since training, validation and testing each need images.
    `limit` > 0 keeps the first `limit` images of each split (see `limit_per_split`), for quick experiments.
    """
    if max_length < 1:
        raise InputError(f"--max-length must be at least 1, got {max_length}")
    skipped = {reason: list(items) for reason, items in raw.skipped.items()}  # raw stays as read
    records = raw.records
    if limit:
        kept_rows = limit_per_split([record.split for record in records], limit)
        left_out = sorted(set(range(len(records))) - set(kept_rows))
        if left_out:
            skipped[f"beyond --limit {limit} images per split"] = [str(records[i].path) for i in left_out]
        records = [records[i] for i in kept_rows]
    if check_images:
        records, unreadable = datasets.check_images(records, progress=progress)
        if unreadable:
            skipped["image cannot be opened"] = unreadable

    kept: list[ImageRecord] = []
    tokenised: list[list[list[str]]] = []  # per kept image, per caption
    for record in tqdm(records, desc="tokenising", unit="img", disable=not progress):
        captions, token_lists = [], []
        for caption in record.captions:
            tokens = tokenize(caption)
            if tokens:
                captions.append(caption)
                token_lists.append(tokens)
            else:
                skipped.setdefault("caption with no words", []).append(f"{record.path.name}: {caption!r}")
        if captions:
            kept.append(ImageRecord(record.path, captions, record.split))
            tokenised.append(token_lists)
        else:
            skipped.setdefault("image with no usable captions", []).append(str(record.path))

    for split in SPLITS:
        if not any(record.split == split for record in kept):
            raise InputError(
                f"split '{split}' has no images (read from {raw.source.get('captions', 'the dataset')}); "
                f"expected images in each of {', '.join(SPLITS)}"
            )

    vocab = Vocabulary.build(
        (
            t
            for record, token_lists in zip(kept, tokenised, strict=True)
            if record.split == "train"
            for t in token_lists
        ),
        min_count=min_count,
    )
    n_captions = sum(len(token_lists) for token_lists in tokenised)
    tokens = torch.full((n_captions, max_length + 2), PAD_ID, dtype=torch.int32)
    lengths = torch.empty(n_captions, dtype=torch.int32)
    image_index = torch.empty(n_captions, dtype=torch.int64)
    word_counts: list[int] = []
    clipped: list[str] = []
    val_words = val_unknown = 0
    row = 0
    for i, (record, token_lists) in enumerate(zip(kept, tokenised, strict=True)):
        for caption_tokens in token_lists:
            word_counts.append(len(caption_tokens))
            if record.split == "val":
                val_words += len(caption_tokens)
                val_unknown += sum(word not in vocab for word in caption_tokens)
            if len(caption_tokens) > max_length:
                clipped.append(f"{record.path.name}: {len(caption_tokens)} words")
            ids = vocab.encode(caption_tokens[:max_length])
            tokens[row, : len(ids) + 2] = torch.tensor([START_ID, *ids, END_ID], dtype=torch.int32)
            lengths[row] = len(ids) + 2
            image_index[row] = i
            row += 1

    notes: dict[str, list[str]] = {}  # oddities that were kept
    split_of = {record.path: record.split for record in kept}
    for group in datasets.find_duplicates(record.path for record in kept):
        notes.setdefault("byte-identical images", []).append(
            " = ".join(f"{path.name} ({split_of[path]})" for path in group)
        )

    image_root = Path(os.path.abspath(raw.image_root))  # abspath, not resolve: keep symlinked folders as named
    sorted_counts = sorted(word_counts)
    report = {
        "format": FORMAT,
        "dataset": dataset,
        "source": raw.source,
        "out_dir": str(Path(out_dir).resolve()),
        "images": {split: sum(r.split == split for r in kept) for split in SPLITS},
        "captions": {
            split: sum(len(c) for r, c in zip(kept, tokenised, strict=True) if r.split == split) for split in SPLITS
        },
        "captions_per_image": {"min": min(map(len, tokenised)), "max": max(map(len, tokenised))},
        "vocab_size": len(vocab),
        "min_count": min_count,
        "max_length": max_length,
        "val_oov_rate": val_unknown / val_words if val_words else 0.0,
        "caption_words": {
            "mean": round(sum(word_counts) / len(word_counts), 2),
            **{f"p{q}": _percentile(sorted_counts, q) for q in PERCENTILES},
            "max": sorted_counts[-1],
        },
        "clipped": {"count": len(clipped), "items": clipped},
        "checked_images": check_images,
        "limit": limit,
        "skipped": _listed(skipped),
        "notes": _listed(notes),
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab.save(out_dir / VOCAB_FILE)
    images = [
        {
            "file": Path(os.path.relpath(os.path.abspath(r.path), image_root)).as_posix(),
            "split": r.split,
            "captions": r.captions,
        }
        for r in kept
    ]
    document = {"format": FORMAT, "dataset": dataset, "image_root": str(image_root), "images": images}
    (out_dir / IMAGES_FILE).write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")
    save_file(
        {"tokens": tokens, "lengths": lengths, "image_index": image_index},
        str(out_dir / CAPTIONS_FILE),
        metadata={"format": str(FORMAT), "max_length": str(max_length)},
    )
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def format_report(report: dict[str, Any], examples: int = 3) -> str:
    """The human-readable summary `sat prepare` prints (the same numbers as report.json)."""
    lines = [f"{report['dataset']} -> {report['out_dir']}", f"  {'split':<6} {'images':>8} {'captions':>9}"]
    for split in SPLITS:
        lines.append(f"  {split:<6} {report['images'][split]:>8} {report['captions'][split]:>9}")
    per_image = report["captions_per_image"]
    lines.append(
        f"captions per image: {per_image['min']}"
        + (f"-{per_image['max']}" if per_image["max"] != per_image["min"] else "")
    )
    lines.append(
        f"vocabulary: {report['vocab_size']} tokens incl. 4 special (train words seen >= {report['min_count']} times); "
        f"out-of-vocabulary rate on val: {100 * report['val_oov_rate']:.2f}%"
    )
    words = report["caption_words"]
    percentiles = ", ".join(f"p{q} {words[f'p{q}']}" for q in PERCENTILES)
    lines.append(f"caption length in words: mean {words['mean']}, {percentiles}, max {words['max']}")
    lines.append(f"clipped to {report['max_length']} words: {report['clipped']['count']} captions")
    if report.get("limit"):
        lines.append(f"limited to the first {report['limit']} images of each split (--limit)")
    lines.append(f"images opened and checked: {'yes' if report['checked_images'] else 'no (use --check-images)'}")
    for title, key in [("skipped", "skipped"), ("noted (kept)", "notes")]:
        if not report[key]:
            lines.append(f"{title}: nothing")
            continue
        lines.append(f"{title}:")
        for reason, entry in report[key].items():
            shown = "; ".join(entry["items"][:examples])
            more = f"; ... {entry['count'] - examples} more in {REPORT_FILE}" if entry["count"] > examples else ""
            lines.append(f"  {entry['count']:>6}  {reason}: {shown}{more}")
    return "\n".join(lines)


@dataclass
class PreparedDataset:
    """A prepared directory in memory: the one loader training, features and evaluation use.

    `tokens` (N, T) int32, `lengths` (N,) int32 and `image_index` (N,) int64 describe the N captions;
    `images[image_index[n]]` is the image of caption n, with its absolute path, split and raw captions.
    """

    directory: Path
    dataset: str
    vocab: Vocabulary
    image_root: Path
    images: list[ImageRecord]
    tokens: torch.Tensor
    lengths: torch.Tensor
    image_index: torch.Tensor

    @property
    def max_length(self) -> int:
        """Longest caption in words (without <start>/<end>)."""
        return self.tokens.shape[1] - 2

    @classmethod
    def load(cls, directory: str | Path, *, limit: int = 0) -> PreparedDataset:
        """Load and check a `sat prepare` directory; a missing or corrupt file raises InputError naming it.

        limit > 0: only the first `limit` images of each split and their captions (`--limit`).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise InputError(f"{directory}: prepared dataset directory not found (run `sat prepare` first)")
        for name in (VOCAB_FILE, IMAGES_FILE, CAPTIONS_FILE):
            if not (directory / name).is_file():
                raise InputError(f"{directory / name}: missing; is {directory} a `sat prepare` output directory?")
        vocab = Vocabulary.load(directory / VOCAB_FILE)
        dataset, image_root, images = _load_images(directory / IMAGES_FILE)
        tokens, lengths, image_index = _load_captions(directory / CAPTIONS_FILE, len(images), len(vocab))
        loaded = cls(directory, dataset, vocab, image_root, images, tokens, lengths, image_index)
        return loaded.limited(limit) if limit else loaded

    def limited(self, limit: int) -> PreparedDataset:
        """The first `limit` images of each split with their captions, image_index renumbered to match."""
        kept = limit_per_split([image.split for image in self.images], limit)
        new_index = torch.full((len(self.images),), -1, dtype=torch.int64)
        new_index[kept] = torch.arange(len(kept))
        rows = torch.nonzero(new_index[self.image_index] >= 0).flatten()
        return PreparedDataset(
            self.directory,
            self.dataset,
            self.vocab,
            self.image_root,
            [self.images[i] for i in kept],
            self.tokens[rows],
            self.lengths[rows],
            new_index[self.image_index[rows]],
        )

    def indices(self, split: str) -> list[int]:
        """Indices into `images` of the images in `split`."""
        _check_split(split)
        return [i for i, image in enumerate(self.images) if image.split == split]

    def caption_indices(self, split: str) -> list[int]:
        """Indices into `tokens`/`lengths`/`image_index` of the captions of images in `split`."""
        _check_split(split)
        in_split = torch.tensor([image.split == split for image in self.images], dtype=torch.bool)
        return torch.nonzero(in_split[self.image_index]).flatten().tolist()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _load_images(path: Path) -> tuple[str, Path, list[ImageRecord]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f'{path}: expected an object with "format": {FORMAT} (written by `sat prepare`)')
    if not isinstance(data.get("image_root"), str) or not isinstance(data.get("images"), list):
        raise InputError(f"{path}: expected 'image_root' (a path) and 'images' (a list)")
    image_root = Path(data["image_root"])
    images = []
    for i, image in enumerate(data["images"]):
        if (
            not isinstance(image, dict)
            or not isinstance(image.get("file"), str)
            or image.get("split") not in SPLITS
            or not isinstance(image.get("captions"), list)
            or not all(isinstance(c, str) for c in image["captions"])
        ):
            raise InputError(f"{path}: images[{i}]: expected {{file, split (one of {', '.join(SPLITS)}), captions}}")
        images.append(ImageRecord(image_root / image["file"], image["captions"], image["split"]))
    return str(data.get("dataset", "")), image_root, images


def _load_captions(path: Path, n_images: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable safetensors file ({error})") from None
    expected = {"tokens": torch.int32, "lengths": torch.int32, "image_index": torch.int64}
    for name, dtype in expected.items():
        if name not in tensors or tensors[name].dtype != dtype:
            raise InputError(f"{path}: expected tensor '{name}' of type {dtype}")
    tokens, lengths, image_index = tensors["tokens"], tensors["lengths"], tensors["image_index"]
    n = tokens.shape[0]
    if tokens.ndim != 2 or tokens.shape[1] < 3 or lengths.shape != (n,) or image_index.shape != (n,):
        raise InputError(f"{path}: tokens must be (N, T>=3) with lengths and image_index of shape (N,)")
    if n and (int(image_index.min()) < 0 or int(image_index.max()) >= n_images):
        raise InputError(f"{path}: image_index out of range for the {n_images} images in {IMAGES_FILE}")
    if n and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise InputError(f"{path}: token ids out of range for the {vocab_size}-word {VOCAB_FILE}")
    if n and (int(lengths.min()) < 2 or int(lengths.max()) > tokens.shape[1]):
        raise InputError(f"{path}: lengths must lie in [2, {tokens.shape[1]}]")
    return tokens, lengths, image_index
