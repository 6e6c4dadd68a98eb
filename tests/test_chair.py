"""CHAIR object hallucination: which COCO classes a caption names, and the two rates."""

from __future__ import annotations

import json

import pytest

from show_attend_tell.chair import (
    caption_count,
    chair,
    coco_objects,
    count_agreement,
    mentioned_objects,
    people_counts,
    people_without_people,
)
from show_attend_tell.detector import COCO_CLASSES
from show_attend_tell.guidance import coco_words


def test_the_word_list_covers_the_eighty_classes_and_names_each_word_once():
    words = coco_words()
    assert list(words) == list(COCO_CLASSES)
    named = [w for entry in words.values() for w in [*entry["words"], *entry.get("phrases", [])]]
    assert len(named) == len(set(named))  # a word names one class only
    for ambiguous in ("orange", "glass", "glasses", "bag", "couple", "group", "sign"):
        assert ambiguous not in named


@pytest.mark.parametrize(
    ("caption", "objects"),
    [
        ("a man eats a hot dog next to a teddy bear", ["person", "hot dog", "teddy bear"]),
        ("two dogs and a puppy play with a frisbee", ["dog", "dog", "frisbee"]),
        ("a woman in an orange shirt sits at the dining table", ["person", "dining table"]),
        ("a red stop sign on a street", ["stop sign"]),
        ("a girl wearing glasses holds a glass", ["person"]),
        ("A GIRAFFE, standing.", ["giraffe"]),
    ],
)
def test_mentioned_objects_match_phrases_before_words(caption, objects):
    assert mentioned_objects(caption) == objects


def test_chair_counts_mentions_and_captions():
    captions = ["a dog and a man on a bench", "a cat on a bed", "a red building"]
    objects = [{"dog", "bench"}, {"cat", "bed"}, set()]
    result = chair(captions, objects)
    assert result["mentions"] == 5 and result["hallucinated_mentions"] == 1
    assert result["CHAIR-i"] == 20.0
    assert result["CHAIR-s"] == pytest.approx(100 / 3, abs=0.01)
    assert result["hallucinated"] == [["person"], [], []]
    people = people_without_people(captions, objects)
    assert people == {"photos_without_people": 3, "captioned_with_people": 1, "share": pytest.approx(33.33)}


def test_coco_objects_reads_an_instances_file(tmp_path):
    instances = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 1}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    assert coco_objects(path, ["b.jpg", "a.jpg"]) == [set(), {"person", "dog"}]


def test_people_counts_read_person_annotations_and_a_crowd_is_three(tmp_path):
    instances = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"image_id": 1, "category_id": 1, "iscrowd": 0},
            {"image_id": 1, "category_id": 1, "iscrowd": 0},
            {"image_id": 1, "category_id": 18, "iscrowd": 0},
            {"image_id": 3, "category_id": 1, "iscrowd": 1},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    assert people_counts(path, ["a.jpg", "b.jpg", "c.jpg"]) == [2, 0, 3]


@pytest.mark.parametrize(
    ("caption", "count"),
    [
        ("two people are walking", 2),
        ("a couple of men", 2),
        ("three dogs and a group of people", 3),  # the number comes first
        ("a group of people stand in a field", 3),
        ("a crowd watches", 3),
        ("a man in a red shirt", 1),
        ("a dog runs", 0),
    ],
)
def test_a_caption_counts_people_by_number_then_group_words(caption, count):
    assert caption_count(caption) == count


def test_count_agreement_scores_only_photos_with_two_or_more_people():
    captions = ["two men talk", "a man talks", "a crowd", "two people", "a dog", "a man"]
    counts = [2, 2, 5, 3, 0, 1]
    agreement = count_agreement(captions, counts)
    assert agreement["two"] == {"photos": 2, "right": 1} and agreement["three_or_more"] == {"photos": 2, "right": 1}
    assert (agreement["photos"], agreement["right"], agreement["share"]) == (4, 2, 50.0)
