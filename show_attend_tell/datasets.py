"""Readers for captioning datasets: Flickr8k's original files, Karpathy-split JSON, official COCO captions with
split lists, and a user's folder with a CSV/JSON Lines file. Every reader returns the same `RawDataset`: images
with their path, raw captions and split, plus everything it set aside, counted with the reason.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from show_attend_tell.errors import InputError
from show_attend_tell.images import load_image

SPLITS = ("train", "val", "test")
# Names other datasets use for our splits: Karpathy's "restval" images are trained on, Flickr8k calls val "dev".
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test"}
DATASET_KINDS = ("flickr8k", "karpathy", "coco", "folder")
CHECK_SIZE = 64  # check_images decodes at no less than 2x this per side (see images.load_image)


@dataclass
class ImageRecord:
    """One image: its file, its reference captions (raw text) and its split (train, val or test)."""

    path: Path
    captions: list[str]
    split: str


@dataclass
class RawDataset:
    """What a reader found, before tokenising.

    `skipped` maps a reason to the items (images, caption lines) left out for it; it ends up in the prepare
    report, so nothing disappears unexplained.
    """

    records: list[ImageRecord]
    image_root: Path
    source: dict[str, str] = field(default_factory=dict)  # what was read, for the report
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, item: str) -> None:
        self.skipped.setdefault(reason, []).append(item)


def normalise_split(value: Any, where: str) -> str:
    """Map a split name (or alias such as "restval", "dev") to train/val/test; `where` names the source."""
    expected = f"expected one of {', '.join(SPLIT_ALIASES)}"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{where}: missing or empty split; {expected}")
    split = SPLIT_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if split is None:
        raise InputError(f"{where}: unknown split {value!r}; {expected}")
    return split


def read_text(path: Path) -> str:
    """A UTF-8 text file; a missing file, a read error or bytes that are not UTF-8 are an InputError naming
    the file and, for bad bytes, the line and column."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise InputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def _read_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path}:{error.lineno}: not a readable JSON file ({error.msg}, column {error.colno})"
        ) from None
    except RecursionError:
        raise InputError(f"{path}: not a usable JSON file (nested too deeply)") from None


def _read_lines(path: Path) -> list[str]:
    return read_text(path).splitlines()


def _inside(root: Path, relative: str, where: str) -> Path:
    """root / relative, refusing a path that leaves the root (absolute, or with "..") or holds a NUL byte:
    a dataset file names images, it does not choose which files on the machine are read."""
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts or "\0" in relative or not relative.strip():
        raise InputError(f"{where}: image path {relative!r} must be relative and stay inside {root}")
    return root / path


def _string_field(item: dict, key: str, where: str, *, optional: bool = False) -> str | None:
    value = item.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{key}' must be a string, got {type(value).__name__} {value!r:.40}")
    return value


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise InputError(f"{path}: {what} directory not found")
    return path


def _keep_existing(raw: RawDataset, candidates: list[ImageRecord], listing: str) -> None:
    """Move the candidates whose file exists into `raw.records`, counting the others; all missing is an error."""
    for record in candidates:
        if record.path.is_file():
            raw.records.append(record)
        else:
            raw.skip("image file does not exist", str(record.path))
    if candidates and not raw.records:
        raise InputError(
            f"none of the {len(candidates)} images named in {listing} exist under {raw.image_root} "
            f"(first looked for: {candidates[0].path}); is the image directory right?"
        )


def _split_order(records: list[ImageRecord]) -> list[ImageRecord]:
    """Records grouped train, val, test (stable), so each split is one contiguous block."""
    return sorted(records, key=lambda r: SPLITS.index(r.split))


def read_flickr8k(data_dir: Path, images_dir: Path | None = None) -> RawDataset:
    """Flickr8k from its original files: Flickr8k.token.txt and the Flickr_8k.{train,dev,test}Images.txt lists.

    Copes with the corpus's known quirks by counting them: caption lines for an image that does not exist,
    images in no split list; images listed twice across splits are an error.
    """
    data_dir = Path(data_dir)
    images_dir = _require_dir(Path(images_dir) if images_dir else data_dir / "images", "Flickr8k image")
    raw = RawDataset(records=[], image_root=images_dir)
    token_file = data_dir / "Flickr8k.token.txt"
    raw.source = {"captions": str(token_file), "images": str(images_dir)}
    files = {entry.name for entry in images_dir.iterdir() if entry.is_file()}

    captions: dict[str, list[tuple[int, str]]] = defaultdict(list)
    line_numbers: dict[str, list[int]] = defaultdict(list)
    for number, line in enumerate(_read_lines(token_file), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, index = key.rpartition("#")
        if not tab or not hash_sign or not name or not index.isdigit():
            raise InputError(f"{token_file}:{number}: expected '<image>#<n><TAB><caption>', got {line[:80]!r}")
        if not caption.strip():
            raw.skip("empty caption", f"{token_file.name}:{number}")
            continue
        captions[name].append((int(index), caption.strip()))
        line_numbers[name].append(number)

    split_of: dict[str, str] = {}
    for split, list_name in [("train", "trainImages"), ("val", "devImages"), ("test", "testImages")]:
        list_file = data_dir / f"Flickr_8k.{list_name}.txt"
        raw.source[split] = str(list_file)
        for number, line in enumerate(_read_lines(list_file), start=1):
            name = line.strip()
            if not name:
                continue
            if name in split_of:
                raise InputError(f"{list_file}:{number}: {name} is already in the {split_of[name]} list")
            split_of[name] = split
            if name not in captions:
                raw.skip("listed in a split but has no captions", f"{list_file.name}:{number} {name}")

    candidates = []
    for name, entries in captions.items():
        if name not in files:
            for number in line_numbers[name]:
                raw.skip("caption for an image file that does not exist", f"{token_file.name}:{number} {name}")
        elif name not in split_of:
            raw.skip("image in no split list", name)
        else:
            ordered = [caption for _, caption in sorted(entries, key=lambda entry: entry[0])]
            candidates.append(ImageRecord(images_dir / name, ordered, split_of[name]))
    if captions and not files & set(captions):
        raise InputError(f"none of the images named in {token_file} are in {images_dir}; pass the right --images")
    for name in sorted(files - set(captions)):
        raw.skip("image file with no captions", name)
    _keep_existing(raw, candidates, str(token_file))
    raw.records = _split_order(raw.records)
    return raw


def read_karpathy(json_file: Path, images_dir: Path) -> RawDataset:
    """Karpathy's split JSON (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json).

    Image paths are `images_dir/filepath/filename` (`filepath`, e.g. "val2014", only in the COCO file);
    "restval" images go to train.
    """
    json_file, images_dir = Path(json_file), _require_dir(Path(images_dir), "image")
    data = _read_json(json_file)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise InputError(f"{json_file}: expected an object with an 'images' list (Karpathy split format)")
    raw = RawDataset(records=[], image_root=images_dir, source={"captions": str(json_file), "images": str(images_dir)})
    candidates = []
    for i, image in enumerate(images):
        where = f"{json_file}: images[{i}]"
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise InputError(f"{where}: expected an object with a 'filename' string")
        where = f"{where} ({image['filename']})"
        split = normalise_split(image.get("split"), where)
        sentences = image.get("sentences")
        if not isinstance(sentences, list):
            raise InputError(f"{where}: expected a 'sentences' list")
        texts = []
        for j, sentence in enumerate(sentences):
            if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                raise InputError(f"{where}: sentences[{j}]: expected an object with a 'raw' string")
            if sentence["raw"].strip():
                texts.append(sentence["raw"].strip())
            else:
                raw.skip("empty caption", f"{image['filename']} sentences[{j}]")
        filepath = _string_field(image, "filepath", where, optional=True) or ""
        relative = (Path(filepath) / image["filename"]).as_posix()
        if texts:
            candidates.append(ImageRecord(_inside(images_dir, relative, where), texts, split))
        else:
            raw.skip("image has no captions", relative)
    _keep_existing(raw, candidates, str(json_file))
    raw.records = _split_order(raw.records)
    return raw


def read_split_files(split_files: dict[str, list[Path]]) -> dict[str, str]:
    """File name -> split from Karpathy split lists: one image per line, first field a file name or path
    (so "val2014/COCO_val2014_000000391895.jpg 391895" works too)."""
    split_of: dict[str, str] = {}
    where_of: dict[str, str] = {}
    for key, paths in split_files.items():
        split = normalise_split(key, f"split list {key}={', '.join(map(str, paths))}")
        for path in paths:
            for number, line in enumerate(_read_lines(Path(path)), start=1):
                fields = line.split()
                if not fields:
                    continue
                name = Path(fields[0]).name
                if name in split_of:
                    raise InputError(f"{path}:{number}: {name} is already listed at {where_of[name]}")
                split_of[name], where_of[name] = split, f"{path}:{number}"
    if not split_of:
        raise InputError("the split lists name no images")
    return split_of


def _official_splits(annotation_file: Path, names: list[str], seed: int) -> dict[str, str]:
    """COCO's own split of one caption file: train2014 is train; val2014 (test2014 has no public captions) is
    halved at random with `seed` into val and test."""
    subset = annotation_file.stem.removeprefix("captions_")
    if subset.startswith("train"):
        return {name: "train" for name in names}
    if not subset.startswith("val"):
        raise InputError(
            f"{annotation_file}: cannot tell its split (expected captions_train*.json or captions_val*.json); "
            "pass Karpathy split lists with --split-file"
        )
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    half = len(shuffled) // 2
    return {name: ("val" if n < half else "test") for n, name in enumerate(shuffled)}


def read_coco(
    annotation_files: Iterable[Path],
    images_dir: Path,
    split_files: dict[str, list[Path]] | None = None,
    seed: int = 0,
) -> RawDataset:
    """Official COCO caption files (captions_train2014.json, captions_val2014.json) split by Karpathy lists,
    or without lists by COCO's own split (see `_official_splits`).

    Images of `captions_<set>.json` are looked for in `images_dir/<set>/` when that directory exists (the
    layout of the unzipped COCO archives), else in `images_dir`.
    """
    images_dir = _require_dir(Path(images_dir), "COCO image")
    split_of = read_split_files(split_files) if split_files else {}
    annotation_files = [Path(p) for p in annotation_files]
    listing = ", ".join(map(str, annotation_files))
    raw = RawDataset(records=[], image_root=images_dir, source={"captions": listing, "images": str(images_dir)})
    candidates, seen = [], set()
    for annotation_file in annotation_files:
        data = _read_json(annotation_file)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise InputError(f"{annotation_file}: expected COCO captions JSON with 'images' and 'annotations'")
        if not isinstance(data.get("annotations"), list):
            raise InputError(f"{annotation_file}: expected COCO captions JSON with an 'annotations' list")
        subset_dir = images_dir / annotation_file.stem.removeprefix("captions_")
        folder = subset_dir if subset_dir.is_dir() else images_dir
        names: dict[Any, str] = {}
        for i, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
                raise InputError(f"{annotation_file}: images[{i}]: expected an object with 'id' and 'file_name'")
            _image_id(image, "id", f"{annotation_file}: images[{i}]")
            _inside(images_dir, image["file_name"], f"{annotation_file}: images[{i}]")
            names[image["id"]] = image["file_name"]
        if not split_files:
            split_of.update(_official_splits(annotation_file, list(names.values()), seed))
        captions: dict[Any, list[str]] = defaultdict(list)
        for i, annotation in enumerate(data["annotations"]):
            if not isinstance(annotation, dict) or not isinstance(annotation.get("caption"), str):
                raise InputError(f"{annotation_file}: annotations[{i}]: expected an object with a 'caption'")
            image_id = _image_id(annotation, "image_id", f"{annotation_file}: annotations[{i}]")
            if image_id not in names:
                raw.skip("caption for an image id not in its file", f"{annotation_file.name} annotations[{i}]")
            elif annotation["caption"].strip():
                captions[image_id].append(annotation["caption"].strip())
            else:
                raw.skip("empty caption", f"{annotation_file.name} annotations[{i}]")
        for image_id, name in names.items():
            seen.add(name)
            if name not in split_of:
                raw.skip("image in no split list", name)
            elif not captions[image_id]:
                raw.skip("image has no captions", name)
            else:
                candidates.append(ImageRecord(folder / name, captions[image_id], split_of[name]))
    for name in sorted(set(split_of) - seen):
        raw.skip("listed in a split file but not in the caption files", name)
    raw.source["splits"] = (
        "; ".join(f"{k}={', '.join(map(str, v))}" for k, v in split_files.items())
        if split_files
        else f"official: train2014 -> train, val2014 halved at random (seed {seed}) -> val, test"
    )
    _keep_existing(raw, candidates, listing)
    raw.records = _split_order(raw.records)
    return raw


def coco_folder(directory: Path) -> tuple[list[Path], list[list[str]]]:
    """The photos of a COCO-format folder (captions_*.json beside images/, as coco-dev), sorted by name, and their
    captions: what the dev-set benchmarks and tuning recipes read."""
    raw = read_coco(sorted(Path(directory).glob("captions_*.json")), Path(directory) / "images")
    records = sorted(raw.records, key=lambda record: record.path.name)
    return [record.path for record in records], [record.captions for record in records]


def _image_id(item: dict, key: str, where: str) -> int | str:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(
            f"{where}: field '{key}' must be an integer or a string, got {type(value).__name__} {value!r:.40}"
        )
    return value


def _parse_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise InputError(f"split fractions must be three numbers >= 0 (train, val, test) summing to 1, got {fractions}")
    return fractions


def _rows_csv(path: Path) -> Iterable[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV file with a header naming image, caption and optionally split."""
    handle = io.StringIO(read_text(path), newline="")
    with handle:
        reader = csv.reader(handle)
        try:
            header = [name.strip().lower() for name in next(reader, [])]
            if "image" not in header or "caption" not in header:
                raise InputError(
                    f"{path}:1: header must name columns 'image' and 'caption' (and optionally 'split'), got {header}"
                )
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise InputError(
                        f"{path}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)}), got {len(row)}"
                    )
                yield reader.line_num, dict(zip(header, row, strict=True))
        except csv.Error as error:
            raise InputError(f"{path}:{max(1, reader.line_num)}: malformed CSV ({error})") from None


def _rows_jsonl(path: Path) -> Iterable[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a JSON Lines file of {"image", "caption", optional "split"} objects."""
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: expected an object with 'image' and 'caption'")
        yield number, row


def read_folder(
    captions_file: Path,
    images_dir: Path,
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    seed: int = 0,
) -> RawDataset:
    """A user's own images with a CSV (header: image,caption[,split]) or JSON Lines file of captions.

    Image paths are relative to `images_dir`. Without a split column, images (not captions) are split at
    random with `seed` in `split_fractions` (train, val, test), so one image's captions stay together.
    """
    captions_file, images_dir = Path(captions_file), _require_dir(Path(images_dir), "image")
    suffix = captions_file.suffix.lower()
    if suffix == ".csv":
        rows = _rows_csv(captions_file)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _rows_jsonl(captions_file)
    else:
        raise InputError(f"{captions_file}: expected a .csv or .jsonl captions file")
    raw = RawDataset(
        records=[], image_root=images_dir, source={"captions": str(captions_file), "images": str(images_dir)}
    )
    captions: dict[str, list[str]] = {}
    split_of: dict[str, tuple[str, int]] = {}
    has_split: bool | None = None
    for number, row in rows:
        where = f"{captions_file}:{number}"
        image, caption = row.get("image"), row.get("caption")
        if not isinstance(image, str) or not image.strip():
            raise InputError(f"{where}: missing or empty 'image'")
        if not isinstance(caption, str) or not caption.strip():
            raise InputError(f"{where}: missing or empty 'caption'")
        image = image.strip()
        if has_split is None:
            has_split = "split" in row
        if has_split:
            split = normalise_split(row.get("split", ""), where)
            if image in split_of and split_of[image][0] != split:
                first_split, first_line = split_of[image]
                raise InputError(f"{where}: {image} is in split {split}, but in {first_split} on line {first_line}")
            split_of.setdefault(image, (split, number))
        elif "split" in row:
            raise InputError(f"{where}: 'split' given here but not on the first row; give it on every row or none")
        captions.setdefault(image, []).append(caption.strip())
    if not captions:
        raise InputError(f"{captions_file}: no captions found")

    if has_split:
        splits = {image: split for image, (split, _) in split_of.items()}
    else:
        train, val, test = _parse_fractions(split_fractions)
        names = sorted(captions)
        random.Random(seed).shuffle(names)
        # At least one image in a split with a non-zero fraction, so small datasets still get val and test.
        n_val = max(1, round(len(names) * val)) if val > 0 else 0
        n_test = max(1, round(len(names) * test)) if test > 0 else 0
        splits = {name: "val" for name in names[:n_val]}
        splits |= {name: "test" for name in names[n_val : n_val + n_test]}
        splits |= {name: "train" for name in names[n_val + n_test :]}
        raw.source["split"] = f"random by image, seed {seed}, fractions {train}/{val}/{test}"
    candidates = [
        ImageRecord(_inside(images_dir, image, str(captions_file)), texts, splits[image])
        for image, texts in captions.items()
    ]
    _keep_existing(raw, candidates, str(captions_file))
    raw.records = _split_order(raw.records)
    return raw


def check_images(records: list[ImageRecord], progress: bool = True) -> tuple[list[ImageRecord], list[str]]:
    """Decode every image as captioning would (load_image: the same formats, pixel budget and errors); returns
    (readable records, one "path: error" line for each of the others).

    Large JPEGs are decoded at a reduced scale, which still reads the whole file and so catches truncated
    files, at a fraction of the cost of a full decode.
    """
    readable, unreadable = [], []
    for record in tqdm(records, desc="checking images", unit="img", disable=not progress):
        try:
            load_image(record.path, size=CHECK_SIZE)
            readable.append(record)
        except InputError as error:
            unreadable.append(str(error))
    return readable, unreadable


def _digest(path: Path, limit: int | None = None) -> str:
    with path.open("rb") as handle:
        return hashlib.blake2b(handle.read(limit) if limit else handle.read(), digest_size=16).hexdigest()


def find_duplicates(paths: Iterable[Path]) -> list[list[Path]]:
    """Groups of byte-identical files. Only files of equal size are read, first their first 64 KiB."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path in paths:
        by_size[path.stat().st_size].append(path)
    groups = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_head: dict[str, list[Path]] = defaultdict(list)
        for path in same_size:
            by_head[_digest(path, 1 << 16)].append(path)
        for same_head in by_head.values():
            if len(same_head) < 2:
                continue
            by_content: dict[str, list[Path]] = defaultdict(list)
            for path in same_head:
                by_content[_digest(path)].append(path)
            groups.extend(sorted(group) for group in by_content.values() if len(group) > 1)
    return sorted(groups)


def _resolve(path: str | Path, data_dir: Path, flag: str) -> Path:
    """A path as given (relative to the current directory) if it exists, else the same path inside `data_dir`;
    neither is an error naming both places."""
    path = Path(path)
    if path.exists():
        return path
    if not path.is_absolute() and (data_dir / path).exists():
        return data_dir / path
    inside = "" if path.is_absolute() else f" nor in --data-dir {data_dir}"
    raise InputError(f"{flag}{path}: file not found as given (from {Path.cwd()}){inside}")


def _only_match(data_dir: Path, patterns: list[str], what: str, flag: str) -> Path:
    found = sorted({p for pattern in patterns for p in data_dir.glob(pattern)})
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise InputError(
            f"{data_dir}: expected exactly one {what} ({' or '.join(patterns)}), found {names}; pass {flag}"
        )
    return found[0]


def read_dataset(
    kind: str,
    data_dir: str | Path,
    *,
    images: str | Path | None = None,
    captions: list[str | Path] | None = None,
    split_files: dict[str, list[str | Path]] | None = None,
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    seed: int = 0,
) -> RawDataset:
    """Read any supported dataset kind with the defaults `sat prepare` documents.

    Relative `captions` and `split_files` paths are taken as given when they exist, else inside `data_dir`.
    """
    data_dir = _require_dir(Path(data_dir), "data")
    caption_files = [_resolve(p, data_dir, "--captions ") for p in captions or []]
    if kind == "flickr8k":
        return read_flickr8k(data_dir, Path(images) if images else None)
    if kind == "karpathy":
        if images is None:
            raise InputError("--dataset karpathy needs --images (the folder the JSON's image paths start from)")
        json_file = (
            caption_files[0]
            if caption_files
            else _only_match(data_dir, ["dataset_*.json"], "Karpathy JSON", "--captions")
        )
        if len(caption_files) > 1:
            raise InputError("--dataset karpathy reads one JSON file; got several --captions")
        return read_karpathy(json_file, Path(images))
    if kind == "coco":
        if images is None:
            raise InputError("--dataset coco needs --images (the folder holding train2014/ and val2014/)")
        files = caption_files or sorted(data_dir.glob("captions_*.json"))
        if not files:
            raise InputError(f"{data_dir}: no captions_*.json files; pass --captions")
        lists = {
            split: [_resolve(p, data_dir, f"--split-file {split}=") for p in paths]
            for split, paths in (split_files or {}).items()
        }
        return read_coco(files, Path(images), lists, seed)
    if kind == "folder":
        if len(caption_files) > 1:
            raise InputError("--dataset folder reads one captions file; got several --captions")
        file = (
            caption_files[0]
            if caption_files
            else _only_match(data_dir, ["*.csv", "*.jsonl"], "captions file", "--captions")
        )
        return read_folder(file, Path(images) if images else data_dir, split_fractions, seed)
    raise InputError(f"unknown dataset kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
