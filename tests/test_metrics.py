"""Metrics equal pycocoevalcap's own numbers; id checks; the no-Java fallback; COCO results file I/O."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from show_attend_tell import metrics
from show_attend_tell.errors import InputError
from show_attend_tell.metrics import read_results, score_captions, write_results

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no `java` on PATH")
HAS_TEXT = importlib.util.find_spec("show_attend_tell.text") is not None
needs_text = pytest.mark.skipif(not HAS_TEXT, reason="show_attend_tell/text.py not written yet")

# Flickr8k-style captions: raw case, trailing " .", clitics, hyphens, one empty prediction, int and str ids.
REFERENCES = {
    1: [
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "A girl going into a wooden building .",
        "A little girl climbing into a wooden playhouse .",
        "A little girl climbing the stairs to her playhouse .",
        "A little girl in a pink dress going into a wooden cabin .",
    ],
    2: [
        "A black dog and a spotted dog are fighting",
        "A black dog and a tri-colored dog playing with each other on the road .",
        "A black dog and a white dog with brown spots are staring at each other in the street .",
        "Two dogs of different breeds looking at each other on the road .",
        "Two dogs on pavement moving toward each other .",
    ],
    3: [
        "A man in a red jacket is riding a bike down a dirt path .",
        "A cyclist rides through the woods .",
        "Someone on a mountain bike going downhill on a trail .",
        "A person rides a bicycle on a forest trail .",
    ],
    4: [
        "Two children are playing in the sprinkler on the lawn .",
        "Kids running through water on the grass .",
        "A boy and a girl play in a water sprinkler .",
    ],
    5: [
        "A surfer rides a large wave .",
        "A man surfing on a big blue wave .",
        "Someone in a wetsuit surfs the ocean .",
    ],
    6: [
        "A brown dog is running through the snow .",
        "The dog's paws kick up snow as it runs .",
        "A dog runs in the snow .",
    ],
    7: [
        "Two men are playing soccer on a field .",
        "A soccer player kicks the ball past a defender .",
        "Men in uniforms play football .",
    ],
    8: [
        "A woman sits on a bench reading a book .",
        "A lady is reading on a park bench .",
        "Woman reading outside .",
    ],
    "dog_beach.jpg": [
        "A black dog runs along the beach .",
        "A dog running on the sand by the water .",
        "The black dog is running near the ocean .",
    ],
    "climber.jpg": [
        "A rock climber scales a cliff .",
        "A man is climbing a steep rock wall .",
        "Climber on a rock face , with ropes .",
    ],
}
PREDICTIONS = {
    1: "A little girl in a pink dress is climbing stairs .",
    2: "Two dogs are playing on the road .",
    3: "A man rides a bike on a trail .",
    4: "Two kids are playing in the water .",
    5: "A man is surfing a wave .",
    6: "A dog's running in the snow !",
    7: "A group of men playing soccer .",
    8: "",
    "dog_beach.jpg": "A black dog is running on the beach .",
    "climber.jpg": "A man climbing a rock , wall .",
}
SCORE_KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def child_pids() -> list[int]:
    """Processes whose parent is this test process (Linux /proc), to catch a leaked Java."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Fields after the parenthesised command name: state, ppid, ...
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.append(int(entry.name))
    return children


@pytest.fixture(scope="module")
def ptb_scores() -> tuple[dict, list[int]]:
    """score_captions on the fixtures with Java, and the child processes left right after it."""
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH")
    scores = score_captions(PREDICTIONS, REFERENCES, java=True)
    return scores, child_pids()


@pytest.fixture(scope="module")
def coco_caption_scores() -> dict[str, float]:
    """The fixtures scored the way coco-caption's COCOEvalCap.evaluate does, scorer by scorer."""
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in REFERENCES.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in PREDICTIONS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    meteor_score, _ = meteor.compute_score(gts, res)
    del meteor  # its __del__ stops the Java process
    return {
        **dict(zip(SCORE_KEYS[:4], bleu, strict=True)),
        "METEOR": meteor_score,
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }


def test_scores_equal_pycocoevalcap(ptb_scores, coco_caption_scores):
    scores, _ = ptb_scores
    assert set(scores) == {*SCORE_KEYS, "n_images", "tokenizer", "comparable"}
    assert scores["tokenizer"] == "ptb"
    assert scores["comparable"] is True
    assert scores["n_images"] == len(REFERENCES)
    for key in SCORE_KEYS:
        assert isinstance(scores[key], float)
        assert scores[key] == pytest.approx(100 * coco_caption_scores[key], abs=1e-7), key  # x100, as reported
    # Sanity on the fixtures: decent but imperfect captions.
    assert 20 < scores["BLEU-4"] < 60
    assert 10 < scores["METEOR"] < 50


def test_meteor_java_process_is_closed(ptb_scores):
    _, children = ptb_scores
    assert children == []


@needs_java
def test_ptb_tokenization_equals_ptbtokenizer():
    captions = {
        1: ["A man's bike, parked.", "Un café naïve — “quoted” dog’s bone", "  double  spaces\there "],
        2: ["Kids (two) run-ups; it's fine...", "!?", ""],
        3: [""],
    }
    expected = PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})
    ours = metrics._ptb_tokenize(shutil.which("java"), [c for caps in captions.values() for c in caps])
    assert ours == [c for caps in expected.values() for c in caps]
    assert ours[0] == "a man 's bike parked"


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_captions():
    # Java treats U+2028 and CR as line ends; a caption must still stay one line and one caption.
    tokens = metrics._ptb_tokenize(shutil.which("java"), ["a dog\u2028runs", "a cat\r\nsits", "a bird"])
    assert tokens == ["a dog runs", "a cat sits", "a bird"]


@needs_java
def test_perfect_predictions_score_top_marks():
    perfect = {image_id: refs[0] for image_id, refs in REFERENCES.items()}
    scores = score_captions(perfect, REFERENCES, java=True)
    assert scores["BLEU-4"] == pytest.approx(100, abs=1e-4)
    assert scores["ROUGE-L"] == pytest.approx(100)
    assert scores["CIDEr"] > 300
    assert child_pids() == []


def test_mismatched_ids_are_listed():
    predictions = {i: c for i, c in PREDICTIONS.items() if i not in (1, 2)} | {99: "a cat"}
    with pytest.raises(InputError, match=r"2 image\(s\) without a prediction \(e\.g\. 1, 2\).*1 predicted.*99"):
        score_captions(predictions, REFERENCES, java=False)


def test_ids_differing_only_in_type_say_so():
    predictions = {str(i): c for i, c in PREDICTIONS.items()}
    with pytest.raises(InputError, match="differ only in type"):
        score_captions(predictions, REFERENCES, java=False)


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({1: None}, {1: ["a dog"]}, "prediction for image 1 must be a string"),
        ({1: "a dog"}, {1: []}, "references for image 1 must be a non-empty list"),
        ({1: "a dog"}, {1: "a dog"}, "references for image 1 must be a non-empty list"),
        ({1: "a dog"}, {1: ["a dog", 3]}, "references for image 1 must all be strings"),
        ({}, {}, "no images to score"),
        ({1.5: "a dog"}, {1.5: ["a dog"]}, "integers or strings"),
    ],
)
def test_bad_inputs_are_refused(predictions, references, message):
    with pytest.raises(InputError, match=message):
        score_captions(predictions, references, java=False)


def test_java_true_without_java_is_refused(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(InputError, match="java=True but no working `java`"):
        score_captions(PREDICTIONS, REFERENCES, java=True)


@needs_text
def test_python_fallback_is_marked_not_comparable():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # java=False is deliberate: a note, no warning
        scores = score_captions(PREDICTIONS, REFERENCES, java=False)
    assert "METEOR" not in scores
    assert scores["comparable"] is False
    assert scores["tokenizer"] == "python"
    assert "not comparable" in scores["note"]
    assert {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(scores)


@needs_text
def test_missing_java_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="no working Java"):
        scores = score_captions(PREDICTIONS, REFERENCES)
    assert scores["comparable"] is False
    assert "METEOR" not in scores


@needs_text
def test_python_tokenizer_is_close_to_ptb(ptb_scores):
    ptb, _ = ptb_scores
    python = score_captions(PREDICTIONS, REFERENCES, java=False)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert python[key] == pytest.approx(ptb[key], abs=2), key
    assert python["CIDEr"] == pytest.approx(ptb["CIDEr"], abs=10)


def test_results_round_trip(tmp_path):
    predictions = {391895: "a man riding a bike .", "climber.jpg": "un café , naïve", 7: ""}
    path = tmp_path / "results.json"
    write_results(path, predictions)
    items = json.loads(path.read_text(encoding="utf-8"))
    assert items[0] == {"image_id": 391895, "caption": "a man riding a bike ."}
    assert read_results(path) == predictions
    assert list(read_results(path)) == list(predictions)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{'image_id': 1}]", "not a JSON file"),
        ('{"image_id": 1, "caption": "a dog"}', "expected a JSON list .* got a JSON object"),
        ('[{"image_id": 1, "caption": "a"}, {"caption": "b"}]', "item 1 has no 'image_id' field"),
        ('[{"image_id": 1}]', "item 0 has no 'caption' field"),
        ('[{"image_id": 1, "caption": "a"}, ["b"]]', "item 1 is a JSON list, expected an object"),
        ('[{"image_id": 1, "caption": 5}]', "item 0 'caption' must be a string"),
        ('[{"image_id": null, "caption": "a"}]', "item 0 'image_id' must be an integer or a string"),
        ('[{"image_id": 4, "caption": "a"}, {"image_id": 4, "caption": "b"}]', "item 1 repeats image_id 4"),
    ],
)
def test_bad_results_files_are_refused(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message) as error:
        read_results(path)
    assert str(path) in str(error.value)


def test_missing_results_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="cannot read results file"):
        read_results(tmp_path / "absent.json")
