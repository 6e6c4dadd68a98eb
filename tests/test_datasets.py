"""Dataset readers on tiny generated fixtures (and Flickr8k's real files): records, splits, counted skips, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import corrupt_tiff
from PIL import Image

from show_attend_tell.datasets import (
    ImageRecord,
    check_images,
    find_duplicates,
    read_coco,
    read_dataset,
    read_flickr8k,
    read_folder,
    read_karpathy,
)
from show_attend_tell.errors import InputError


def jpeg(path: Path, shade: int = 0) -> Path:
    """A tiny JPEG; a different `shade` gives different bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (shade, 255 - shade, 7)).save(path, "JPEG")
    return path


def write_flickr8k(root: Path) -> Path:
    """A miniature Flickr8k with the real corpus's quirks: captions of a missing image, an image in no split."""
    for n, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "loose.jpg"]):
        jpeg(root / "images" / name, shade=40 * n)
    lines = []
    for name in ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "loose.jpg", "gone.jpg.1"]:
        lines += [f"{name}#{i}\tA caption {i} of {name} ." for i in (1, 0)]  # out of order on purpose
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("c.jpg\n")
    (root / "Flickr_8k.testImages.txt").write_text("d.jpg\n")
    return root


def test_read_flickr8k_counts_quirks(tmp_path) -> None:
    raw = read_flickr8k(write_flickr8k(tmp_path))
    assert [(r.path.name, r.split) for r in raw.records] == [
        ("a.jpg", "train"),
        ("b.jpg", "train"),
        ("c.jpg", "val"),
        ("d.jpg", "test"),
    ]
    assert raw.records[0].captions == ["A caption 0 of a.jpg .", "A caption 1 of a.jpg ."]  # by #n
    assert raw.records[0].path == tmp_path / "images" / "a.jpg"
    assert raw.skipped["image in no split list"] == ["loose.jpg"]
    assert raw.skipped["caption for an image file that does not exist"] == [
        "Flickr8k.token.txt:11 gone.jpg.1",
        "Flickr8k.token.txt:12 gone.jpg.1",
    ]


def test_read_flickr8k_malformed_line_names_file_and_line(tmp_path) -> None:
    root = write_flickr8k(tmp_path)
    lines = (root / "Flickr8k.token.txt").read_text().splitlines()
    lines[2] = "c.jpg A caption without a tab or index"
    (root / "Flickr8k.token.txt").write_text("\n".join(lines))
    with pytest.raises(InputError, match=r"Flickr8k\.token\.txt:3: expected '<image>#<n><TAB><caption>'"):
        read_flickr8k(root)


def test_read_flickr8k_image_in_two_splits_is_an_error(tmp_path) -> None:
    root = write_flickr8k(tmp_path)
    (root / "Flickr_8k.testImages.txt").write_text("d.jpg\na.jpg\n")
    with pytest.raises(InputError, match=r"testImages\.txt:2: a\.jpg is already in the train list"):
        read_flickr8k(root)


def test_read_flickr8k_wrong_image_folder(tmp_path) -> None:
    root = write_flickr8k(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    jpeg(tmp_path / "elsewhere" / "other.jpg")
    with pytest.raises(InputError, match="none of the images"):
        read_flickr8k(root, tmp_path / "elsewhere")
    with pytest.raises(InputError, match="directory not found"):
        read_flickr8k(root, tmp_path / "missing")


def karpathy_json(path: Path, images: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def karpathy_image(filename: str, split: str, filepath: str | None = None, captions=("A cat .", "A dog .")) -> dict:
    image = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath:
        image["filepath"] = filepath
    return image


def test_read_karpathy(tmp_path) -> None:
    for n, name in enumerate(["train2014/t1.jpg", "val2014/v1.jpg", "val2014/v2.jpg", "val2014/v3.jpg"]):
        jpeg(tmp_path / "coco" / name, shade=50 * n)
    source = karpathy_json(
        tmp_path / "dataset_coco.json",
        [
            karpathy_image("t1.jpg", "train", "train2014"),
            karpathy_image("v1.jpg", "restval", "val2014"),
            karpathy_image("v2.jpg", "val", "val2014"),
            karpathy_image("v3.jpg", "test", "val2014", captions=("A bird .", "  ")),
            karpathy_image("v4.jpg", "test", "val2014"),
        ],
    )
    raw = read_karpathy(source, tmp_path / "coco")
    assert [(r.path.relative_to(tmp_path / "coco").as_posix(), r.split) for r in raw.records] == [
        ("train2014/t1.jpg", "train"),
        ("val2014/v1.jpg", "train"),  # restval -> train
        ("val2014/v2.jpg", "val"),
        ("val2014/v3.jpg", "test"),
    ]
    assert raw.records[3].captions == ["A bird ."]
    assert raw.skipped == {
        "empty caption": ["v3.jpg sentences[1]"],
        "image file does not exist": [str(tmp_path / "coco" / "val2014" / "v4.jpg")],
    }


def test_read_karpathy_unknown_split(tmp_path) -> None:
    jpeg(tmp_path / "x.jpg")
    source = karpathy_json(tmp_path / "d.json", [karpathy_image("x.jpg", "train"), karpathy_image("x.jpg", "holdout")])
    with pytest.raises(InputError, match=r"images\[1\] \(x\.jpg\): unknown split 'holdout'; expected one of train"):
        read_karpathy(source, tmp_path)


def test_read_karpathy_malformed(tmp_path) -> None:
    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(InputError, match="bad.json:1: not a readable JSON"):
        read_karpathy(tmp_path / "bad.json", tmp_path)
    source = karpathy_json(tmp_path / "d.json", [{"filename": "x.jpg", "split": "train", "sentences": [{"x": 1}]}])
    with pytest.raises(InputError, match=r"images\[0\] \(x\.jpg\): sentences\[0\]: expected an object with a 'raw'"):
        read_karpathy(source, tmp_path)


def coco_captions(path: Path, images: dict[int, str], captions: list[tuple[int, str]]) -> Path:
    data = {
        "images": [{"id": i, "file_name": name} for i, name in images.items()],
        "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(captions)],
    }
    path.write_text(json.dumps(data))
    return path


def test_read_coco_with_split_lists(tmp_path) -> None:
    images = tmp_path / "images"
    jpeg(images / "train2014" / "COCO_train2014_1.jpg", 0)
    jpeg(images / "train2014" / "COCO_train2014_2.jpg", 60)
    jpeg(images / "val2014" / "COCO_val2014_3.jpg", 120)
    jpeg(images / "val2014" / "COCO_val2014_4.jpg", 180)
    train = coco_captions(
        tmp_path / "captions_train2014.json",
        {1: "COCO_train2014_1.jpg", 2: "COCO_train2014_2.jpg"},
        [(1, "A cat."), (2, "A dog."), (1, "A cat sits."), (9, "Orphan caption.")],
    )
    val = coco_captions(
        tmp_path / "captions_val2014.json",
        {3: "COCO_val2014_3.jpg", 4: "COCO_val2014_4.jpg"},
        [(3, "A bird."), (4, "A fish.")],
    )
    (tmp_path / "train.txt").write_text("train2014/COCO_train2014_1.jpg 1\n\n")
    (tmp_path / "restval.txt").write_text("COCO_val2014_3.jpg\n")
    (tmp_path / "val.txt").write_text("val2014/COCO_val2014_4.jpg 4\n")
    (tmp_path / "test.txt").write_text("COCO_val2014_99.jpg\n")
    splits = {
        "train": [tmp_path / "train.txt"],
        "restval": [tmp_path / "restval.txt"],
        "val": [tmp_path / "val.txt"],
        "test": [tmp_path / "test.txt"],
    }
    raw = read_coco([train, val], images, splits)
    assert [(r.path.relative_to(images).as_posix(), r.split, r.captions) for r in raw.records] == [
        ("train2014/COCO_train2014_1.jpg", "train", ["A cat.", "A cat sits."]),
        ("val2014/COCO_val2014_3.jpg", "train", ["A bird."]),
        ("val2014/COCO_val2014_4.jpg", "val", ["A fish."]),
    ]
    assert raw.skipped == {
        "caption for an image id not in its file": ["captions_train2014.json annotations[3]"],
        "image in no split list": ["COCO_train2014_2.jpg"],
        "listed in a split file but not in the caption files": ["COCO_val2014_99.jpg"],
    }


def test_read_coco_official_split_without_lists(tmp_path) -> None:
    """No split lists: train2014 trains, val2014 is halved at random (seeded) into val and test."""
    for n in range(2):
        jpeg(tmp_path / "train2014" / f"t{n}.jpg", n)
    for n in range(6):
        jpeg(tmp_path / "val2014" / f"v{n}.jpg", 50 + n)
    files = [
        coco_captions(tmp_path / "captions_train2014.json", {n: f"t{n}.jpg" for n in range(2)}, [(0, "A."), (1, "B.")]),
        coco_captions(
            tmp_path / "captions_val2014.json", {n: f"v{n}.jpg" for n in range(6)}, [(n, "C.") for n in range(6)]
        ),
    ]
    raw = read_dataset("coco", tmp_path, images=tmp_path)
    splits = {r.path.relative_to(tmp_path).as_posix(): r.split for r in raw.records}
    assert [name for name, split in splits.items() if split == "train"] == ["train2014/t0.jpg", "train2014/t1.jpg"]
    val = sorted(name for name, split in splits.items() if split == "val")
    test = sorted(name for name, split in splits.items() if split == "test")
    assert len(val) == len(test) == 3 and set(val + test) == {f"val2014/v{n}.jpg" for n in range(6)}
    assert "official" in raw.source["splits"] and not raw.skipped
    again = read_coco(files, tmp_path, seed=0)
    assert {r.path: r.split for r in again.records} == {r.path: r.split for r in raw.records}
    other = read_coco(files, tmp_path, seed=1)
    assert {r.path: r.split for r in other.records} != {r.path: r.split for r in raw.records}


def test_split_lists_are_found_as_given_or_in_data_dir(tmp_path, monkeypatch) -> None:
    annotations = tmp_path / "coco" / "annotations"
    annotations.mkdir(parents=True)
    jpeg(tmp_path / "coco" / "val2014" / "v.jpg")
    coco_captions(annotations / "captions_val2014.json", {1: "v.jpg"}, [(1, "A cat.")])
    (tmp_path / "coco" / "splits").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / "coco" / "splits" / f"{split}.txt").write_text("v.jpg\n" if split == "train" else "")
    monkeypatch.chdir(tmp_path)  # the lists' paths are relative to here, not to the annotations folder
    lists = {split: [f"coco/splits/{split}.txt"] for split in ("train", "val", "test")}
    raw = read_dataset("coco", "coco/annotations", images="coco", split_files=lists)
    assert [r.split for r in raw.records] == ["train"]
    (annotations / "inside.txt").write_text("v.jpg\n")  # not in the current directory: found in --data-dir
    raw = read_dataset("coco", "coco/annotations", images="coco", split_files={**lists, "train": ["inside.txt"]})
    assert [r.split for r in raw.records] == ["train"]
    with pytest.raises(InputError, match=r"--split-file val=missing.txt: file not found as given .* nor in --data-dir"):
        read_dataset("coco", "coco/annotations", images="coco", split_files={**lists, "val": ["missing.txt"]})


def test_read_coco_split_list_errors(tmp_path) -> None:
    coco_captions(tmp_path / "captions_val2014.json", {1: "x.jpg"}, [(1, "A cat.")])
    (tmp_path / "a.txt").write_text("x.jpg\n")
    (tmp_path / "b.txt").write_text("y.jpg\nx.jpg\n")
    lists = {"train": [tmp_path / "a.txt"], "test": [tmp_path / "b.txt"]}
    with pytest.raises(InputError, match=r"b\.txt:2: x\.jpg is already listed at .*a\.txt:1"):
        read_coco([tmp_path / "captions_val2014.json"], tmp_path, lists)
    with pytest.raises(InputError, match="unknown split 'dev2'"):
        read_coco([tmp_path / "captions_val2014.json"], tmp_path, {"dev2": [tmp_path / "a.txt"]})


def folder_dataset(root: Path, n_images: int = 20) -> Path:
    for n in range(n_images):
        jpeg(root / "pics" / f"img{n:02d}.jpg", shade=n * 12)
    return root


def test_read_folder_csv_with_split_column(tmp_path) -> None:
    root = folder_dataset(tmp_path, 3)
    (root / "captions.csv").write_text(
        "image,caption,split\n"
        'pics/img00.jpg,"A red, round ball.",train\n'
        "pics/img00.jpg,A ball.,train\n"
        "pics/img01.jpg,A dog.,val\n"
        "pics/img02.jpg,A cat.,test\n"
        "pics/img09.jpg,A ghost.,test\n"
    )
    raw = read_folder(root / "captions.csv", root)
    assert [(r.path.name, r.split, r.captions) for r in raw.records] == [
        ("img00.jpg", "train", ["A red, round ball.", "A ball."]),
        ("img01.jpg", "val", ["A dog."]),
        ("img02.jpg", "test", ["A cat."]),
    ]
    assert raw.skipped == {"image file does not exist": [str(root / "pics" / "img09.jpg")]}


def test_read_folder_seeded_split_by_image(tmp_path) -> None:
    root = folder_dataset(tmp_path, 20)
    rows = [{"image": f"pics/img{n:02d}.jpg", "caption": f"Picture {n} take {k}."} for n in range(20) for k in (1, 2)]
    (root / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    first = read_folder(root / "captions.jsonl", root, (0.8, 0.1, 0.1), seed=3)
    again = read_folder(root / "captions.jsonl", root, (0.8, 0.1, 0.1), seed=3)
    other = read_folder(root / "captions.jsonl", root, (0.8, 0.1, 0.1), seed=4)
    splits = {r.path.name: r.split for r in first.records}
    assert splits == {r.path.name: r.split for r in again.records}
    assert splits != {r.path.name: r.split for r in other.records}
    assert sorted(splits.values()).count("train") == 16 and sorted(splits.values()).count("val") == 2
    assert all(len(r.captions) == 2 for r in first.records)  # an image's captions stay together
    tiny = folder_dataset(tmp_path / "tiny", 3)
    (tiny / "c.csv").write_text("image,caption\n" + "".join(f"pics/img{n:02d}.jpg,A thing.\n" for n in range(3)))
    assert sorted(r.split for r in read_folder(tiny / "c.csv", tiny).records) == ["test", "train", "val"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image,caption\npics/img00.jpg,A dog.\npics/img01.jpg,A cat.,extra\n", r"c\.csv:3: expected 2 fields"),
        ("image,text\npics/img00.jpg,A dog.\n", r"c\.csv:1: header must name columns 'image' and 'caption'"),
        ("image,caption\npics/img00.jpg,\n", r"c\.csv:2: missing or empty 'caption'"),
        ("image,caption,split\npics/img00.jpg,A dog.,holdout\n", r"c\.csv:2: unknown split 'holdout'; expected one of"),
        ("image,caption,split\npics/img00.jpg,A dog.,\n", r"c\.csv:2: missing or empty split; expected one of"),
        (
            "image,caption,split\npics/img00.jpg,A dog.,train\npics/img00.jpg,A cat.,test\n",
            r"c\.csv:3: pics/img00\.jpg is in split test, but in train on line 2",
        ),
    ],
)
def test_read_folder_bad_csv(tmp_path, content: str, message: str) -> None:
    root = folder_dataset(tmp_path, 2)
    (root / "c.csv").write_text(content)
    with pytest.raises(InputError, match=message):
        read_folder(root / "c.csv", root)


def test_read_folder_bad_jsonl(tmp_path) -> None:
    root = folder_dataset(tmp_path, 2)
    (root / "c.jsonl").write_text('{"image": "pics/img00.jpg", "caption": "A dog."}\n{"image": "pics/img01.jpg"\n')
    with pytest.raises(InputError, match=r"c\.jsonl:2: not valid JSON"):
        read_folder(root / "c.jsonl", root)
    (root / "c.txt").write_text("x")
    with pytest.raises(InputError, match="expected a .csv or .jsonl"):
        read_folder(root / "c.txt", root)
    with pytest.raises(InputError, match="fractions"):
        (root / "c.jsonl").write_text('{"image": "pics/img00.jpg", "caption": "A dog."}\n')
        read_folder(root / "c.jsonl", root, (0.5, 0.5, 0.5))


def test_read_dataset_defaults_and_errors(tmp_path) -> None:
    root = folder_dataset(tmp_path, 3)
    (root / "c.csv").write_text("image,caption\n" + "".join(f"pics/img{n:02d}.jpg,A thing.\n" for n in range(3)))
    assert len(read_dataset("folder", root).records) == 3  # the one .csv in the folder, images relative to it
    (root / "d.jsonl").write_text("")
    with pytest.raises(InputError, match="expected exactly one captions file .* found c.csv, d.jsonl"):
        read_dataset("folder", root)
    with pytest.raises(InputError, match="needs --images"):
        read_dataset("karpathy", root)
    with pytest.raises(InputError, match="no captions_.*json files; pass --captions"):
        read_dataset("coco", root, images=root)
    with pytest.raises(InputError, match="unknown dataset kind"):
        read_dataset("imagenet", root)


def test_check_images_lists_unreadable_files(tmp_path) -> None:
    good = jpeg(tmp_path / "good.jpg")
    truncated = jpeg(tmp_path / "truncated.jpg", 99)
    truncated.write_bytes(truncated.read_bytes()[:200])
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    records = [ImageRecord(p, ["A thing."], "train") for p in (good, truncated, text)]
    readable, unreadable = check_images(records, progress=False)
    assert [r.path for r in readable] == [good]
    assert [line.split(":")[0] for line in unreadable] == [str(truncated), str(text)]


def test_find_duplicates(tmp_path) -> None:
    a, b, c = jpeg(tmp_path / "a.jpg", 1), jpeg(tmp_path / "b.jpg", 1), jpeg(tmp_path / "c.jpg", 200)
    d = tmp_path / "d.jpg"
    d.write_bytes(a.read_bytes()[:-1] + b"\x00")  # same size, different bytes
    assert find_duplicates([c, b, a, d]) == [[a, b]]


@pytest.mark.flickr8k
def test_read_flickr8k_real_files(flickr8k) -> None:
    raw = read_flickr8k(flickr8k)
    splits = [r.split for r in raw.records]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (6000, 1000, 1000)
    assert all(len(r.captions) == 5 for r in raw.records)
    assert {reason: len(items) for reason, items in raw.skipped.items()} == {
        "image in no split list": 91,
        "caption for an image file that does not exist": 5,
    }


# Hostile dataset files (issue 14): wrong types, paths out of the image root, bad bytes: one line each.


@pytest.mark.parametrize(
    "change, message",
    [
        ({"filepath": 2014}, r"images\[0\] \(x\.jpg\): field 'filepath' must be a string, got int 2014"),
        (
            {"filename": "../../../../../etc/passwd"},
            r"image path '\.\./\.\./\.\./\.\./\.\./etc/passwd' must be relative",
        ),
        ({"filename": "/etc/passwd"}, r"image path '/etc/passwd' must be relative and stay inside"),
        ({"filepath": "../secret"}, r"image path '\.\./secret/x\.jpg' must be relative"),
    ],
)
def test_read_karpathy_refuses_bad_types_and_paths_out_of_the_image_root(tmp_path, change, message) -> None:
    jpeg(tmp_path / "x.jpg")
    source = karpathy_json(tmp_path / "d.json", [{**karpathy_image("x.jpg", "train"), **change}])
    with pytest.raises(InputError, match=message):
        read_karpathy(source, tmp_path)


@pytest.mark.parametrize(
    "images, annotations, message",
    [
        ([{"id": 1000, "file_name": "x.jpg"}], [{"image_id": [1000], "caption": "A cat."}], "'image_id' must be an"),
        ([{"id": {"a": 1}, "file_name": "x.jpg"}], [], r"images\[0\]: field 'id' must be an integer or a string"),
        ([{"id": 1, "file_name": "../x.jpg"}], [], "image path '../x.jpg' must be relative"),
    ],
)
def test_read_coco_refuses_bad_types_and_paths(tmp_path, images, annotations, message) -> None:
    jpeg(tmp_path / "x.jpg")
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (tmp_path / "val.txt").write_text("x.jpg\n")
    with pytest.raises(InputError, match=message):
        read_coco([tmp_path / "captions_val2014.json"], tmp_path, {"val": [tmp_path / "val.txt"]})


def test_read_folder_refuses_image_paths_out_of_the_root(tmp_path) -> None:
    root = folder_dataset(tmp_path, 2)
    (root / "c.csv").write_text("image,caption\npics/img00.jpg,A dog.\n../../etc/passwd,A file.\n")
    with pytest.raises(InputError, match=r"c\.csv: image path '\.\./\.\./etc/passwd' must be relative"):
        read_folder(root / "c.csv", root)


def test_bytes_that_are_not_utf8_are_reported_with_their_line(tmp_path) -> None:
    root = folder_dataset(tmp_path, 2)
    (root / "c.csv").write_bytes(b"image,caption\npics/img00.jpg,A dog.\npics/img01.jpg,A caf\xe9.\n")
    with pytest.raises(InputError, match=r"c\.csv:3: not UTF-8 text \(byte 0xe9 at column 21\)"):
        read_folder(root / "c.csv", root)
    (root / "c.jsonl").write_bytes(b'{"image": "pics/img00.jpg", "caption": "A dog."}\n{"caption": "\xff"}\n')
    with pytest.raises(InputError, match=r"c\.jsonl:2: not UTF-8"):
        read_folder(root / "c.jsonl", root)
    (root / "d.json").write_bytes(b'{"images": [\n\n "\x80"]}')
    with pytest.raises(InputError, match=r"d\.json:3: not UTF-8"):
        read_karpathy(root / "d.json", root)


def test_csv_errors_name_their_line(tmp_path) -> None:
    root = folder_dataset(tmp_path, 2)
    (root / "c.csv").write_text("image,caption\npics/img00.jpg,A dog.\npics/img01.jpg,A " + "very " * 40_000 + "\n")
    with pytest.raises(InputError, match=r"c\.csv:3: malformed CSV \(field larger than field limit"):
        read_folder(root / "c.csv", root)
    (root / "c.csv").write_text("")
    with pytest.raises(InputError, match=r"c\.csv:1: header must name"):
        read_folder(root / "c.csv", root)


def test_check_images_reports_a_file_that_makes_pillow_raise_anything(tmp_path) -> None:
    good = jpeg(tmp_path / "good.jpg")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(corrupt_tiff())
    readable, unreadable = check_images([ImageRecord(p, ["A thing."], "train") for p in (bad, good)], progress=False)
    assert [r.path for r in readable] == [good]
    assert len(unreadable) == 1 and unreadable[0].startswith(f"{bad}: ") and "corrupt" in unreadable[0]
