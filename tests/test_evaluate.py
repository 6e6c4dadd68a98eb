"""`sat evaluate`: decodes once per image, scores several beams, and re-scores its own results file identically."""

from __future__ import annotations

import json

import pytest
from helpers import make_trainer

from show_attend_tell.cli import main
from show_attend_tell.config import DEFAULT_LENGTH_PENALTY, DEFAULT_MAX_LENGTH
from show_attend_tell.train import fit


@pytest.fixture(scope="module")
def trained(tiny_prepared, tiny_features, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    fit(make_trainer(run, tiny_prepared, tiny_features, epochs=15, patience=15), progress=False)
    return run / "best"


def test_evaluate_scores_beams_and_rescoring_its_results_file_agrees(trained, tiny_prepared, tiny_features, tmp_path):
    out = tmp_path / "out"
    args = ["--data", str(tiny_prepared), "--split", "val", "--no-java"]
    code = main(
        ["evaluate", str(trained), *args, "--features", str(tiny_features), "--beam", "1", "2", "--out", str(out)]
    )
    assert code == 0
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["command"].startswith("sat evaluate") and "date" in recorded and "machine" in recorded
    results = recorded["results"]
    assert set(results) == {"beam1", "beam2"}
    # the decoding settings are part of the record
    assert results["beam2"]["length_penalty"] == DEFAULT_LENGTH_PENALTY and results["beam1"]["length_penalty"] is None
    assert results["beam2"]["max_length"] == DEFAULT_MAX_LENGTH
    for beam in ("beam1", "beam2"):
        assert results[beam]["n_images"] == 2 and results[beam]["comparable"] is False
        captions = json.loads((out / f"captions_val_{beam}.json").read_text())
        assert sorted(c["image_id"] for c in captions) == ["blue8.jpg", "red9.jpg"]
        assert (
            main(
                ["evaluate", *args, "--captions", str(out / f"captions_val_{beam}.json"), "--out", str(tmp_path / beam)]
            )
            == 0
        )
        rescored = json.loads((tmp_path / beam / "metrics.json").read_text())["results"]
        for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
            assert rescored[key] == pytest.approx(results[beam][key], abs=1e-12)


def test_evaluate_refuses_features_from_another_encoder(trained, tiny_prepared, tmp_path, capsys):
    from conftest import ColourGrid, tiny_model_config

    from show_attend_tell.features import extract_features
    from show_attend_tell.prepare import PreparedDataset

    dataset = PreparedDataset.load(tiny_prepared)
    config = tiny_model_config(len(dataset.vocab))
    paths = [image.path for image in dataset.images]
    extract_features(
        paths, tmp_path / "other", config=config, encoder=ColourGrid(), encoder_sha256="other", progress=False
    )
    code = main(
        ["evaluate", str(trained), "--data", str(tiny_prepared), "--features", str(tmp_path / "other"), "--no-java"]
    )
    assert code == 2
    assert "encoder_sha256 is 'other' but 'untrained' was expected" in capsys.readouterr().err


def test_evaluate_decodes_as_sat_caption_no_word_twice_unless_repeat_words(
    trained, tiny_prepared, tiny_features, tmp_path, monkeypatch
):
    from show_attend_tell import evaluate
    from show_attend_tell.text import FUNCTION_WORDS

    seen = []
    search = evaluate.best_captions

    def spy(*args, once=None, **options):
        seen.append(once)
        return search(*args, once=once, **options)

    monkeypatch.setattr(evaluate, "best_captions", spy)
    args = ["--data", str(tiny_prepared), "--split", "val", "--no-java", "--features", str(tiny_features)]
    for flags in ([], ["--repeat-words"]):
        assert main(["evaluate", str(trained), *args, "--no-guidance", "--out", str(tmp_path / "out"), *flags]) == 0
        recorded = json.loads((tmp_path / "out" / "metrics.json").read_text())["results"]["beam7"]
        assert recorded["repeat_words"] is bool(flags)
    held, free = seen
    assert free is None
    words = json.loads((trained / "vocab.json").read_text())["words"]
    assert [w for w, once in zip(words, held.tolist(), strict=True) if not once][4:] == sorted(
        (w for w in words[4:] if w in FUNCTION_WORDS), key=words.index
    )
