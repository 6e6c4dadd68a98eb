"""Object hallucination: CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning").

A caption hallucinates when it names a COCO class that the photo's COCO object annotations do not hold. CHAIR-i
is the share of object mentions that are hallucinated, CHAIR-s the share of captions with at least one. The words
that name each class are this project's own reviewed list (labels/coco_words.json: "words" and "phrases"); a
phrase is matched before its words, so "a hot dog" names no dog and "a teddy bear" no bear.

People counted: how many people a caption says there are (`caption_count`: "two men" 2, "a group of people" 3 for
three or more, "a man" 1) against the photo's person annotations (`people_counts`), on the photos with two or more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

from show_attend_tell.guidance import coco_words

# Words that count people in a caption: numbers first ("two people" is two), then words of a group (three or more).
NUMBERS = {"two": 2, "couple": 2, "pair": 2, "both": 2, "three": 3, "four": 3, "five": 3, "six": 3, "seven": 3}
GROUPS = frozenset({"people", "group", "crowd", "several", "many", "team", "crowds", "groups"})


@cache
def _names() -> tuple[dict[tuple[str, ...], str], int]:
    """Every word or phrase (as a word tuple) that names a COCO class -> the class, and the longest's length."""
    names: dict[tuple[str, ...], str] = {}
    for name, entry in coco_words().items():
        for text in [*entry["words"], *entry.get("phrases", [])]:
            names[tuple(text.split())] = name
    return names, max(len(key) for key in names)


def mentioned_objects(caption: str) -> list[str]:
    """The COCO classes a caption names, in order, once per mention ("two dogs and a dog" -> dog, dog)."""
    words = re.findall(r"[a-z]+", caption.lower())
    names, longest = _names()
    found, i = [], 0
    while i < len(words):
        for length in range(min(longest, len(words) - i), 0, -1):
            name = names.get(tuple(words[i : i + length]))
            if name is not None:
                found.append(name)
                i += length
                break
        else:
            i += 1
    return found


def chair(captions: Sequence[str], objects: Sequence[Iterable[str]]) -> dict:
    """CHAIR of captions against each photo's annotated COCO classes: {"CHAIR-i", "CHAIR-s" (x100, as every metric
    in the project), "mentions", "hallucinated_mentions", "captions_with_hallucination", "hallucinated": per caption
    the classes it names that its photo lacks}."""
    mentions = hallucinated_mentions = with_hallucination = 0
    per_caption = []
    for caption, present in zip(captions, objects, strict=True):
        present = set(present)
        named = mentioned_objects(caption)
        wrong = [name for name in named if name not in present]
        mentions += len(named)
        hallucinated_mentions += len(wrong)
        with_hallucination += bool(wrong)
        per_caption.append(sorted(set(wrong)))
    return {
        "CHAIR-i": round(100 * hallucinated_mentions / max(mentions, 1), 2),
        "CHAIR-s": round(100 * with_hallucination / max(len(per_caption), 1), 2),
        "mentions": mentions,
        "hallucinated_mentions": hallucinated_mentions,
        "captions_with_hallucination": with_hallucination,
        "hallucinated": per_caption,
    }


def people_without_people(captions: Sequence[str], objects: Sequence[Iterable[str]]) -> dict:
    """How many photos without a person annotation are captioned with a person word."""
    empty = [caption for caption, present in zip(captions, objects, strict=True) if "person" not in set(present)]
    with_people = sum("person" in mentioned_objects(caption) for caption in empty)
    return {
        "photos_without_people": len(empty),
        "captioned_with_people": with_people,
        "share": round(100 * with_people / max(len(empty), 1), 2),
    }


def coco_objects(instances: Path, file_names: Iterable[str]) -> list[set[str]]:
    """Each photo's annotated COCO classes (an instances_*.json file), in the order of `file_names`."""
    data = json.loads(Path(instances).read_text())
    categories = {category["id"]: category["name"] for category in data["categories"]}
    ids = {image["file_name"]: image["id"] for image in data["images"]}
    present: dict[int, set[str]] = {}
    for annotation in data["annotations"]:
        present.setdefault(annotation["image_id"], set()).add(categories[annotation["category_id"]])
    return [present.get(ids[name], set()) for name in file_names]


def people_counts(instances: Path, file_names: Iterable[str]) -> list[int]:
    """Each photo's number of person annotations (an instances_*.json file), in the order of `file_names`; a crowd
    annotation (iscrowd: one region for many people) counts as three."""
    data = json.loads(Path(instances).read_text())
    person = next(category["id"] for category in data["categories"] if category["name"] == "person")
    ids = {image["file_name"]: image["id"] for image in data["images"]}
    counts: dict[int, int] = {}
    for annotation in data["annotations"]:
        if annotation["category_id"] == person:
            counts[annotation["image_id"]] = counts.get(annotation["image_id"], 0) + (3 if annotation["iscrowd"] else 1)
    return [counts.get(ids[name], 0) for name in file_names]


def caption_count(caption: str) -> int:
    """How many people a caption counts, 3 standing for three or more: a number word's ("two"), else 3 for a word
    of a group ("people", "crowd"), else 1 when it names a person, else 0. A rough count: a number counts whatever
    it is said of ("two dogs and a man" is two)."""
    words = re.findall(r"[a-z]+", caption.lower())
    numbers = [NUMBERS[word] for word in words if word in NUMBERS]
    if numbers:
        return numbers[0]
    if GROUPS & set(words):
        return 3
    return int("person" in mentioned_objects(caption))


def count_agreement(captions: Sequence[str], counts: Sequence[int]) -> dict:
    """On the photos with two or more people annotated, how many captions count them right (two: 2, three or more:
    3, caption_count), in all and for each of the two."""
    result = {}
    for label, wanted in (("two", 2), ("three_or_more", 3)):
        photos = [caption for caption, count in zip(captions, counts, strict=True) if min(count, 3) == wanted]
        right = sum(caption_count(caption) == wanted for caption in photos)
        result[label] = {"photos": len(photos), "right": right}
    photos = sum(part["photos"] for part in result.values())
    right = sum(part["right"] for part in result.values())
    return {"photos": photos, "right": right, "share": round(100 * right / max(photos, 1), 2), **result}
