"""`sat prepare` end to end: the files it writes, the report, the loader, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from show_attend_tell.cli import main
from show_attend_tell.datasets import read_folder
from show_attend_tell.errors import InputError
from show_attend_tell.prepare import PreparedDataset, format_report, prepare
from show_attend_tell.text import END_ID, PAD_ID, START_ID, UNK_ID

ROWS = [  # image, caption, split
    ("p0.jpg", "A dog runs on the grass.", "train"),
    ("p0.jpg", "A dog runs.", "train"),
    ("p1.jpg", "A dog and a cat on the grass.", "train"),
    ("p1.jpg", "A cat on a dog, a cat on a dog, a cat on a dog!", "train"),
    ("p2.jpg", "A zebra runs on the grass.", "val"),
    ("p3.jpg", "A cat.", "test"),
    ("p3.jpg", "...", "test"),
]


def write_folder(root: Path, rows=ROWS) -> Path:
    for n, name in enumerate(sorted({row[0] for row in rows})):
        Image.new("RGB", (16, 16), (60 * n, 10, 200)).save(root / name, "JPEG")
    lines = ["image,caption,split"] + [f'{image},"{caption}",{split}' for image, caption, split in rows]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def prepared(tmp_path) -> tuple[dict, Path]:
    root = write_folder(tmp_path)
    report = prepare(
        read_folder(root / "captions.csv", root),
        tmp_path / "out",
        dataset="folder",
        min_count=2,
        max_length=8,
        progress=False,
    )
    return report, tmp_path / "out"


def test_prepare_writes_tokens_vocab_and_images(prepared) -> None:
    report, out = prepared
    data = PreparedDataset.load(out)
    # Train words seen twice or more: the zebra (val only) and words seen once stay out.
    assert data.vocab.words[4:] == ["a", "dog", "on", "cat", "grass", "runs", "the"]  # by count, then a-z
    assert data.tokens.dtype == torch.int32 and data.tokens.shape == (6, 10)
    assert data.lengths.dtype == torch.int32 and data.image_index.dtype == torch.int64
    assert data.image_index.tolist() == [0, 0, 1, 1, 2, 3]
    first = data.tokens[0].tolist()
    assert first[:8] == [START_ID, *data.vocab.encode(["a", "dog", "runs", "on", "the", "grass"]), END_ID]
    assert first[8:] == [PAD_ID, PAD_ID] and data.lengths[0] == 8
    clipped = data.tokens[3].tolist()  # 15 words clipped to 8, then <end>
    assert clipped[0] == START_ID and clipped[9] == END_ID and PAD_ID not in clipped and data.lengths[3] == 10
    assert data.vocab.decode(data.tokens[4].tolist()) == ["a", "<unk>", "runs", "on", "the", "grass"]
    assert data.tokens[4, 2] == UNK_ID
    assert [image.path for image in data.images] == [out.parent / f"p{n}.jpg" for n in range(4)]
    assert data.images[3].captions == ["A cat."]  # "..." has no words: skipped, also as a reference
    assert data.image_root == out.parent and data.max_length == 8
    assert data.indices("train") == [0, 1] and data.indices("val") == [2] and data.indices("test") == [3]
    assert data.caption_indices("train") == [0, 1, 2, 3] and data.caption_indices("test") == [5]
    with pytest.raises(InputError, match="unknown split 'dev'"):
        data.indices("dev")
    images = json.loads((out / "images.json").read_text())
    assert images["format"] == 1 and images["dataset"] == "folder" and images["images"][0]["file"] == "p0.jpg"


def test_prepare_report(prepared) -> None:
    report, out = prepared
    assert json.loads((out / "report.json").read_text()) == report
    assert report["images"] == {"train": 2, "val": 1, "test": 1}
    assert report["captions"] == {"train": 4, "val": 1, "test": 1}
    assert report["vocab_size"] == 11
    assert report["val_oov_rate"] == pytest.approx(1 / 6)  # "zebra" of a runs on the grass
    assert report["clipped"]["count"] == 1 and report["clipped"]["items"] == ["p1.jpg: 15 words"]
    assert report["caption_words"]["max"] == 15 and report["caption_words"]["p50"] == 6
    assert report["skipped"] == {"caption with no words": {"count": 1, "items": ["p3.jpg: '...'"]}}
    text = format_report(report)
    for expected in ["train         2         4", "vocabulary: 11 tokens", "on val: 16.67%", "max 15", "p3.jpg: '...'"]:
        assert expected in text


def test_limit_keeps_the_first_images_of_each_split_in_prepare_and_in_the_loader(prepared, tmp_path, capsys) -> None:
    _, full = prepared
    limited = PreparedDataset.load(full, limit=1)  # p0 (train), p2 (val), p3 (test) and their captions
    assert [image.path.name for image in limited.images] == ["p0.jpg", "p2.jpg", "p3.jpg"]
    assert limited.image_index.tolist() == [0, 0, 1, 2] and limited.tokens.tolist() == full_rows(full, [0, 1, 4, 5])
    assert limited.indices("train") == [0] and limited.caption_indices("test") == [3]
    # `sat prepare --limit 1` keeps the same images, and says what it left out and why
    args = ["prepare", "--dataset", "folder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "small")]
    assert main([*args, "--min-count", "1", "--limit", "1"]) == 0
    assert "limited to the first 1 images of each split (--limit)" in capsys.readouterr().out
    small = PreparedDataset.load(tmp_path / "small")
    assert [image.path for image in small.images] == [image.path for image in limited.images]
    report = json.loads((tmp_path / "small" / "report.json").read_text())
    assert report["limit"] == 1 and report["images"] == {"train": 1, "val": 1, "test": 1}
    assert report["skipped"]["beyond --limit 1 images per split"]["items"] == [str(tmp_path / "p1.jpg")]
    assert main([*args, "--limit", "-1"]) == 2
    assert "--limit must be 0 (everything) or a positive number" in capsys.readouterr().err


def full_rows(directory: Path, rows: list[int]) -> list[list[int]]:
    return PreparedDataset.load(directory).tokens[rows].tolist()


def test_prepare_empty_split_is_an_error(tmp_path) -> None:
    root = write_folder(tmp_path, [row for row in ROWS if row[2] != "val"])
    with pytest.raises(InputError, match="split 'val' has no images .* expected images in each of train, val, test"):
        prepare(read_folder(root / "captions.csv", root), tmp_path / "out", dataset="folder")


def test_prepare_notes_duplicate_images(tmp_path) -> None:
    root = write_folder(tmp_path)
    (root / "p2.jpg").write_bytes((root / "p0.jpg").read_bytes())
    report = prepare(read_folder(root / "captions.csv", root), tmp_path / "out", dataset="folder", progress=False)
    assert report["notes"] == {"byte-identical images": {"count": 1, "items": ["p0.jpg (train) = p2.jpg (val)"]}}


def test_cli_prepare_folder_and_check_images(tmp_path, capsys) -> None:
    root = write_folder(tmp_path)
    (root / "p1.jpg").write_bytes((root / "p1.jpg").read_bytes()[:100])  # truncated: caught only by opening it
    args = [
        "prepare",
        "--dataset",
        "folder",
        "--data-dir",
        str(root),
        "--out",
        str(tmp_path / "out"),
        "--min-count",
        "1",
    ]
    assert main(args) == 0
    assert "p1.jpg" not in capsys.readouterr().out
    assert main([*args, "--check-images"]) == 0
    out = capsys.readouterr().out
    assert "image cannot be opened" in out and "p1.jpg" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["checked_images"] and report["images"]["train"] == 1


def test_cli_prepare_reports_missing_image_and_bad_row(tmp_path, capsys) -> None:
    root = write_folder(tmp_path)
    (root / "p0.jpg").unlink()
    out = str(tmp_path / "out")
    assert main(["prepare", "--dataset", "folder", "--data-dir", str(root), "--out", out]) == 0
    assert f"image file does not exist: {root / 'p0.jpg'}" in capsys.readouterr().out
    with (root / "captions.csv").open("a") as handle:
        handle.write("p1.jpg,A cat,train,extra\n")
    assert main(["prepare", "--dataset", "folder", "--data-dir", str(root), "--out", out]) == 2
    assert "captions.csv:9: expected 3 fields (image, caption, split), got 4" in capsys.readouterr().err
    bad_split = ["prepare", "--dataset", "coco", "--data-dir", str(root), "--images", str(root)]
    assert main([*bad_split, "--split-file", "train", "--out", out]) == 2
    assert "expected SPLIT=FILE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("vocab.json", "{broken", "vocab.json: not a readable vocabulary JSON"),
        ("images.json", '{"format": 1, "image_root": "/x", "images": [{"file": "a"}]}', r"images.json: images\[0\]"),
        ("captions.safetensors", "garbage", "captions.safetensors: not a readable safetensors file"),
        ("captions.safetensors", None, "captions.safetensors: missing"),
    ],
)
def test_load_names_the_broken_file(prepared, name: str, damage: str | None, message: str) -> None:
    _, out = prepared
    if damage is None:
        (out / name).unlink()
    else:
        (out / name).write_text(damage)
    with pytest.raises(InputError, match=message):
        PreparedDataset.load(out)


def test_load_checks_tensor_consistency(prepared) -> None:
    from safetensors.torch import save_file

    _, out = prepared
    data = PreparedDataset.load(out)
    image_index = data.image_index.clone()
    image_index[0] = 99
    save_file(
        {"tokens": data.tokens, "lengths": data.lengths, "image_index": image_index}, out / "captions.safetensors"
    )
    with pytest.raises(InputError, match="image_index out of range"):
        PreparedDataset.load(out)


@pytest.mark.flickr8k
def test_cli_prepare_flickr8k(flickr8k, tmp_path, capsys) -> None:
    out = tmp_path / "f8k"
    assert main(["prepare", "--dataset", "flickr8k", "--data-dir", str(flickr8k), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == {"train": 6000, "val": 1000, "test": 1000}
    assert report["captions"] == {"train": 30000, "val": 5000, "test": 5000}
    assert report["captions_per_image"] == {"min": 5, "max": 5}
    assert report["skipped"]["caption for an image file that does not exist"]["count"] == 5
    assert report["skipped"]["image in no split list"]["count"] == 91
    assert report["notes"]["byte-identical images"]["items"] == [
        "2851198725_37b6027625.jpg (train) = 3050606344_af711c726c.jpg (train)"
    ]
    assert f"vocabulary: {report['vocab_size']} tokens" in printed and "91  image in no split list" in printed
    data = PreparedDataset.load(out)
    assert len(data.images) == 8000 and data.tokens.shape == (40000, 32)
    assert all(image.path.is_file() for image in data.images[:50])
