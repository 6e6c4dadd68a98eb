"""The README tells the truth: its results table and claims match the records, its file tree the files."""

from __future__ import annotations

import hashlib
import json
import re

from conftest import REPO

from show_attend_tell.config import (
    DEFAULT_BEAM_SIZE,
    DEFAULT_GUIDANCE_THRESHOLD,
    DEFAULT_TEMPLATE_THRESHOLD,
    INT8_CIDER_TOLERANCE,
    TrainConfig,
)

README = (REPO / "README.md").read_text()
RESULTS = REPO / "results"
METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def test_results_table_equals_the_test_record():
    record = json.loads((RESULTS / "flickr8k_test" / "metrics.json").read_text())["results"]
    rows = {"greedy": "beam1", "beam 3": "beam3", "beam 5": "beam5", "beam 7 (the default)": "beam7"}
    for label, beam in rows.items():
        line = next(line for line in README.splitlines() if line.startswith(f"| this project, {label} |"))
        shown = [float(cell) for cell in line.strip("|").split("|")[1:]]
        assert shown == [round(record[beam][key], 1) for key in METRICS], label


def test_training_time_and_paper_comparison_match_the_records():
    pipeline = json.loads((RESULTS / "flickr8k_pipeline.json").read_text())["shipped_model"]
    study = json.loads((RESULTS / "flickr8k_scst" / "six_epochs" / "study.json").read_text())["runs"]["six_epochs"]
    assert (
        f"took {round(pipeline['total_minutes'])} minutes of cross-entropy and "
        f"{round(study['wall_seconds'] / 60)} of self-critical training on\n2 cores" in README
    )
    assert "beats the paper in under an hour" not in README
    shipped = json.loads((RESULTS / "flickr8k_scst" / "six_epochs" / "test_C" / "metrics.json").read_text())["results"]
    paper_best = {"BLEU-1": 67.0, "BLEU-2": 45.7, "BLEU-3": 31.4, "BLEU-4": 21.3, "METEOR": 20.30}  # Xu et al. Table 1
    assert "beats every BLEU and the METEOR of the paper" in README
    assert all(shipped["beam7"][key] > paper_best[key] for key in paper_best)


def test_ninety_minute_recipe_figures_match_its_record():
    record = json.loads((RESULTS / "flickr8k_90min.json").read_text())
    metrics = json.loads((RESULTS / "flickr8k_90min" / "metrics.json").read_text())["results"]["beam7"]
    test = record["test_beam7"]
    assert all(round(metrics[key], 2) == test[key] for key in test)
    assert record["total_minutes"] == round(sum(record["seconds"].values()) / 60, 1) <= 90
    assert test["CIDEr"] >= 59 and test["BLEU-4"] >= 23.5 and record["target_met"]
    text = " ".join(README.split())
    shown = f"test BLEU-4 {test['BLEU-4']:.1f}, METEOR {test['METEOR']:.1f}, CIDEr {test['CIDEr']:.1f} at beam 7"
    assert f"{shown} (from the store, fp32 decoder) in {record['total_minutes']} minutes" in text


def file_tree() -> list[str]:
    """Paths (globs for a line listing several) named by the README's file tree."""
    block = README.split("## Files", 1)[1].split("```", 2)[1]
    paths, parents = [], []
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        name = re.split(r"\s{2,}", line.strip())[0]
        parents = parents[:depth]
        for part in name.split(", "):
            paths.append("".join(parents) + part)
        if name.endswith("/"):
            parents.append(name)
    return paths


def test_file_tree_names_existing_files_and_every_module():
    paths = file_tree()
    for path in paths:
        assert list(REPO.glob(path.rstrip("/"))), f"README file tree: {path} does not exist"
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "show_attend_tell").glob("*.py")}
    assert modules <= set(paths), f"README file tree misses {sorted(modules - set(paths))}"
    assert "notebooks/show_attend_tell.ipynb" in paths


def table_row(label: str) -> list[str]:
    line = next(line for line in README.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


def test_transformer_comparison_table_equals_its_record():
    record = json.loads((RESULTS / "transformer_vs_lstm.json").read_text())
    assert f"{record['budget_minutes_per_decoder']} minutes" in README
    labels = {"lstm": "LSTM (soft attention)", "transformer": "Transformer (3 blocks)"}
    for decoder, label in labels.items():
        run = record["decoders"][decoder]
        val, test = run["val_beam7"]["beam7"], run["test_beam7"]["beam7"]
        expected = [
            f"{run['parameters'] / 1e6:.1f} M",
            f"{run['train_captions_per_second_alone']:.0f}",
            str(run["best_step"]),
            *(f"{split[key]:.1f}" for split in (val, test) for key in ("BLEU-4", "METEOR", "CIDEr")),
            f"{run['decode_speed']['median_ms_per_image']['end_to_end']:.0f} ms",
        ]
        assert table_row(label) == expected, decoder


def test_hard_attention_table_equals_its_record():
    comparison = json.loads((RESULTS / "flickr8k_hard" / "comparison.json").read_text())
    rows = {"soft attention (cross-entropy)": "_shipped", "hard attention": ""}
    for split in ("val", "test"):
        for label, suffix in rows.items():
            metrics = json.loads((RESULTS / "flickr8k_hard" / f"{split}{suffix}" / "metrics.json").read_text())
            beam7 = metrics["results"]["beam7"]
            expected = [f"{beam7[key]:.1f}" for key in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")]
            assert table_row(f"{split}, {label}") == expected, (split, label)
    assert comparison["ship_hard"] is False and "so it is not shipped" in README


def test_guidance_table_equals_its_records():
    coco = json.loads((RESULTS / "coco_dev.json").read_text())["results"]
    tests = {
        name: json.loads((RESULTS / name / "metrics.json").read_text())["results"]["beam7"]
        for name in ("flickr8k_test", "flickr8k_test_int8_guided_no_templates", "flickr8k_test_int8_guided")
    }
    rows = {
        "coco-dev, 80 everyday photos, unguided": coco["unguided"],
        f"coco-dev, labels, no templates ({coco['labels_alone']['guided_photos']} photos guided)": coco["labels_alone"],
        f"coco-dev, labels and templates, {coco['labels_and_templates']['template_photos']} of them templates": coco[
            "labels_and_templates"
        ],
        "Flickr8k test, the cross-entropy model alone (fp32)": tests["flickr8k_test"],
        "Flickr8k test, labels, no templates": tests["flickr8k_test_int8_guided_no_templates"],
        "Flickr8k test, labels and templates (1 template caption)": tests["flickr8k_test_int8_guided"],
    }
    for label, metrics in rows.items():
        assert table_row(label) == [f"{metrics[key]:.1f}" for key in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")], label
    assert "template_threshold" not in tests["flickr8k_test_int8_guided_no_templates"] or (
        tests["flickr8k_test_int8_guided_no_templates"]["template_threshold"] is None
    )
    fp32 = json.loads((RESULTS / "coco_dev_fp32_encoder.json").read_text())
    assert (
        fp32["encoder_precision"] == "fp32"
        and json.loads((RESULTS / "coco_dev.json").read_text())["encoder_precision"] == "bf16"
    )
    claim = "reads {:.1f} unguided, {:.1f} guided by labels and {:.1f} with templates".format(
        *(fp32["results"][variant]["CIDEr"] for variant in ("unguided", "guided_without_templates", "guided"))
    )
    assert claim in " ".join(README.split())
    speed = json.loads((RESULTS / "guidance_speed.json").read_text())
    ms = speed["ms_per_photo_median"]
    claim = (
        f"costs {ms['one_photo_guided']:.0f} ms guided against {ms['one_photo_unguided']:.0f} ms unguided "
        f"({speed['guided_over_unguided_one_photo']:.2f}×"
    )
    assert claim in " ".join(README.split()) and speed["template_photos"] == 1
    # the defaults are the thresholds the tuning record chose, and the README says which they are
    tuning = json.loads((RESULTS / "guidance_tuning.json").read_text())
    assert tuning["chosen"]["threshold"] == DEFAULT_GUIDANCE_THRESHOLD
    assert tuning["chosen_template"]["template_threshold"] == DEFAULT_TEMPLATE_THRESHOLD
    assert tests["flickr8k_test_int8_guided"]["template_threshold"] == DEFAULT_TEMPLATE_THRESHOLD
    assert f"reaches {DEFAULT_TEMPLATE_THRESHOLD}, its sentence is the" in README
    coco_t, val_t = tuning["chosen_template"]["coco_dev"], tuning["chosen_template"]["flickr8k_val"]
    claim = (
        f"templates at {DEFAULT_TEMPLATE_THRESHOLD} changed {coco_t['chosen']['changed_captions']} coco-dev captions "
        f"and raised its CIDEr from {coco_t['no_templates']['CIDEr']:.1f} to {coco_t['chosen']['CIDEr']:.1f}"
    )
    assert claim in " ".join(README.split())
    claim = (
        f"changed {val_t['chosen']['changed_captions']} of 1,000 Flickr8k val captions at a cost of "
        f"{val_t['no_templates']['CIDEr'] - val_t['chosen']['CIDEr']:.1f} CIDEr ({val_t['chosen']['CIDEr']:.1f} "
        f"against {val_t['no_templates']['CIDEr']:.1f})"
    )
    assert claim in " ".join(README.split())
    assert f"its classes) reaches {DEFAULT_GUIDANCE_THRESHOLD}, the caption" in README


def test_detector_tables_equal_their_records():
    coco = json.loads((RESULTS / "coco_dev.json").read_text())
    test = json.loads((RESULTS / "flickr8k_test_detector" / "metrics.json").read_text())["results"]["beam7"]
    labels = json.loads((RESULTS / "flickr8k_test_int8_guided" / "metrics.json").read_text())["results"]["beam7"]
    assert test["detector"] == coco["detector"] == "centernet"
    for variant, label in DETECTOR_ROWS.items():
        metrics = coco["results"][variant]
        people = metrics["people_without_people"]
        shown = [f"{metrics[key]:.1f}" for key in ("BLEU-4", "METEOR", "CIDEr", "CHAIR-i", "CHAIR-s")]
        assert table_row(label) == [*shown, f"{people['captioned_with_people']} of {people['photos_without_people']}"]
    for label, metrics in {"Flickr8k test, the defaults": test, "Flickr8k test, labels and templates": labels}.items():
        assert table_row(label)[:3] == [f"{metrics[key]:.1f}" for key in ("BLEU-4", "METEOR", "CIDEr")], label
    tuning = json.loads((RESULTS / "detector_tuning" / "round4.json").read_text())["chosen"]["settings"]
    from show_attend_tell import config

    assert tuning == {
        "person_penalty": config.DEFAULT_PERSON_PENALTY,
        "object_penalty": config.DEFAULT_OBJECT_PENALTY,
        "person_presence_threshold": config.DEFAULT_PERSON_PRESENCE_THRESHOLD,
        "presence_threshold": config.DEFAULT_PRESENCE_THRESHOLD,
        "detection_threshold": config.DEFAULT_DETECTION_THRESHOLD,
    }
    speed = json.loads((RESULTS / "guidance_speed.json").read_text())
    assert f"({speed['defaults_over_labels_one_photo']:.2f}× the labels alone" in " ".join(README.split())


def test_counting_and_template_review_match_their_records():
    from show_attend_tell import config
    from show_attend_tell.guidance import LABEL_WORDS

    text = " ".join(README.split())
    records = {
        name: json.loads((RESULTS / "detector_tuning" / f"{name}.json").read_text())
        for name in ("counting", "counting_groups")
    }
    assert all(record["chosen"]["settings"] is None for record in records.values())  # none kept val within the bound
    assert config.DEFAULT_COUNT_THRESHOLD is None
    groups = next(t for t in records["counting_groups"]["tried"] if t["settings"]["count_threshold"] == 0.3)
    counted = groups["coco_dev"]["people_counted"]
    figures = f"{groups['coco_dev']['CIDEr']:.1f} and {counted['right']} of the {counted['photos']} counted"
    assert f"Groups alone at 0.3 give coco-dev CIDEr {figures}" in text
    val = groups["flickr8k_val"]
    assert f"with val CIDEr {val['CIDEr']:.2f} / METEOR {val['METEOR']:.2f}" in text
    buckets = next(r for r in records["counting"]["counts"] if r["threshold"] == 0.3 and not r["suppress_overlaps"])
    assert f"{buckets['right']} of the {buckets['photos']} coco-dev photos in their annotated bucket" in text
    review = json.loads((RESULTS / "detector_tuning" / "templates.json").read_text())["templates"]
    shipped = {c["word"] for c in json.loads(LABEL_WORDS.read_text())["concepts"] if "template" in c}
    assert shipped == set(review)  # every template shipped was reviewed, and none the review removed is shipped
    kept = [word for word, entry in review.items() if entry["decision"] == "keep"]
    assert f"the {len(kept)} that fire" in text.replace("six", "6") and f"({', '.join(kept)})" in text


DETECTOR_ROWS = {
    "unguided": "coco-dev, unguided",
    "labels_and_templates": "coco-dev, labels and templates (the defaults before the detector)",
    "detector_alone": "coco-dev, the detector alone",
    "guided_without_templates": "coco-dev, labels and the detector, no templates",
    "guided": "coco-dev, the defaults: labels, templates and the detector",
}


def test_bulk_captioning_speeds_match_the_record():
    record = json.loads((RESULTS / "bulk_caption.json").read_text())
    one, two = (
        record["results"][way]["photos_per_second"] for way in ("1_process_x_2_threads", "2_processes_x_1_thread")
    )
    text = " ".join(README.split())
    assert f"{record['photos']:,} Flickr8k test photos at the defaults took {one:.1f} photos/s as 1 process" in text
    assert f"and {two:.1f} photos/s as 2 torchrun processes" in text
    assert f"same {record['same_captions']:,} captions" in text and record["same_order"]


def test_training_precision_table_equals_its_record():
    record = json.loads((RESULTS / "train_precision_seeds.json").read_text())
    summary = record["summary"]
    columns = [("val_greedy", key) for key in ("BLEU-4", "METEOR", "CIDEr")]
    columns += [("test_beam7", key) for key in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")]
    for precision in ("fp32", "bf16"):
        expected = [
            f"{summary[s][k][precision + '_mean']:.1f} ± {summary[s][k][precision + '_std']:.1f}" for s, k in columns
        ]
        expected.append(f"{summary['train_captions_per_second'][precision]:.0f}")
        expected.append(f"{summary['train_wall_seconds'][precision] / 60:.1f}")
        assert table_row(f"{precision} training") == expected, precision
    differences = [f"{summary[s][k]['bf16_minus_fp32']:+.2f}" for s, k in columns]
    assert table_row("bf16 − fp32")[: len(columns)] == differences
    # the recipe's own 5-epoch training over three seeds each, within noise on test: `auto` trains in bf16
    assert record["epochs"] == 5 and len(record["seeds"]) == 3 and not record["bucket_by_length"]
    assert record["bf16_within_noise"] and "So `--precision auto` now trains in bf16 on CPUs with native bf16" in README
    ps = [summary[s][k]["welch_p"] for s, k in columns]
    text = " ".join(README.split())
    assert f"(Welch's t-test: p {min(ps):.2f} to {max(ps):.2f})" in text
    speed = summary["train_captions_per_second"]["bf16"] / summary["train_captions_per_second"]["fp32"]
    assert f"it trained {speed:.2f}× as fast" in text


def test_bucketing_scores_hold_as_the_readme_says():
    """Each bucketed run's test BLEU-4, METEOR and CIDEr is at least its precision's random-batch mean less two
    standard deviations (the README's bar), and the README quotes both records."""
    seeds = json.loads((RESULTS / "train_precision_seeds.json").read_text())
    bucketed = json.loads((RESULTS / "train_bucketing_scores.json").read_text())
    assert bucketed["bucket_by_length"] and bucketed["epochs"] == seeds["epochs"]
    text = " ".join(README.split())
    for precision in ("fp32", "bf16"):
        run = bucketed["runs"][f"{precision}_s0"]
        assert "--bucket-by-length" in run["command"]
        scores = [run["test_beam7"][key] for key in ("BLEU-4", "METEOR", "CIDEr")]
        summary = [seeds["summary"]["test_beam7"][key] for key in ("BLEU-4", "METEOR", "CIDEr")]
        for score, random in zip(scores, summary, strict=True):
            assert score >= random[precision + "_mean"] - 2 * random[precision + "_std"], precision
        spread = ", ".join(f"{s[precision + '_mean']:.1f} ± {s[precision + '_std']:.1f}" for s in summary)
        assert f"{spread} ({precision})" in text
    fp32, bf16 = (bucketed["runs"][f"{p}_s0"]["test_beam7"] for p in ("fp32", "bf16"))
    assert f"BLEU-4 {fp32['BLEU-4']:.1f}, METEOR {fp32['METEOR']:.1f}, CIDEr {fp32['CIDEr']:.1f}" in text
    assert f"bucketed bf16 {bf16['BLEU-4']:.1f}, {bf16['METEOR']:.1f} and {bf16['CIDEr']:.1f}" in text
    assert "So `sat train` buckets by default" in text and TrainConfig().bucket_by_length


def cider_list(records) -> str:
    """The records' CIDEr as the README lists them: "60.5, 61.1 and 61.9"."""
    ciders = [f"{record['CIDEr']:.1f}" for record in records]
    return ", ".join(ciders[:-1]) + f" and {ciders[-1]}"


def test_length_penalty_sentence_matches_its_record():
    runs = json.loads((RESULTS / "flickr8k_scst" / "length_penalty.json").read_text())["runs"]
    penalties = sorted(runs, key=float)
    text = " ".join(README.split())
    ciders = cider_list(runs[lp] for lp in penalties)
    assert f"CIDEr {ciders} at 0, 0.25, 0.5 (the default), 0.75, 1.0 and 1.5" in text
    assert penalties == ["0.0", "0.25", "0.5", "0.75", "1.0", "1.5"]
    words = f"({runs['0.0']['mean_words']:.1f} to {runs['1.5']['mean_words']:.1f} words)"
    assert words in text and f"BLEU-4 ({runs['0.5']['BLEU-4']:.1f} at 0.5, {runs['1.5']['BLEU-4']:.1f} at 1.5)" in text
    best = max(runs[lp]["CIDEr"] for lp in penalties)
    assert f"CIDEr moves at most {best - runs['0.5']['CIDEr']:.1f} above the default's" in text


def test_self_critical_tables_equal_their_records():
    selection = json.loads((RESULTS / "flickr8k_scst" / "selection.json").read_text())
    rows = {
        "cross-entropy (start)": "xe",
        "self-critical (main run's best)": "scst",
        "mean 1:1 with cross-entropy": "mean_1_1",
        "mean 2:1 (chosen on val, shipped until 2026-12-06)": "mean_2_1",
    }
    for label, name in rows.items():
        expected = [selection[split][name][key] for split in ("val", "test") for key in ("BLEU-4", "METEOR", "CIDEr")]
        assert [float(cell) for cell in table_row(label)] == [round(value, 1) for value in expected], label
    shipped = json.loads((RESULTS / "flickr8k_scst" / "test_defaults" / "metrics.json").read_text())["results"]["beam7"]
    before = json.loads((RESULTS / "flickr8k_test_int8_guided" / "metrics.json").read_text())["results"]["beam7"]
    keys = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
    for label, record in (
        ("4 epochs 2:1, words could repeat (shipped 2026-12-04; bf16 encoder)", shipped),
        ("the cross-entropy model (shipped until 2026-12-04; bf16 encoder)", before),
    ):
        assert [float(cell) for cell in table_row(label)] == [round(record[key], 1) for key in keys], label
    study = json.loads((RESULTS / "flickr8k_scst" / "study.json").read_text())["runs"]["main_lr2e-5"]
    assert study["best"]["step"] == 1050 and round(study["best"]["CIDEr"], 1) == 60.1
    assert "57.4 → 60.1 (1,050) → 59.8" in table_row("main: 2e-5, leave-one-out baseline")[1]


def test_training_speed_at_the_defaults_matches_its_records():
    runs = {
        g: json.loads((RESULTS / "train_speed_defaults" / f"{g}.json").read_text())["results"] for g in ("14x14", "7x7")
    }
    text = " ".join(README.split())

    def speed(grid, run):
        return runs[grid][f"features_{run}_batch_64"]["captions_per_second_overall"]

    fast, fast7 = speed("14x14", "auto_length"), speed("7x7", "auto_length")
    assert f"it trains at {fast:.0f} captions/s at 14×14 (random batches {speed('14x14', 'auto_random'):.0f}" in text
    assert f"and {fast7:.0f} at 7×7 (random {speed('7x7', 'auto_random'):.0f};" in text
    assert f"{fast / 150:.0%} and {fast7 / 300:.0%} of the issue's targets" in text and fast < 150 and fast7 < 300


def test_ten_sample_run_sentence_matches_its_records():
    folder = RESULTS / "flickr8k_scst" / "samples10_rerun"
    run = json.loads((folder / "study.json").read_text())["runs"]["samples10_2threads"]
    record = json.loads((folder / "candidates.json").read_text())
    study = json.loads((RESULTS / "flickr8k_scst" / "study.json").read_text())
    main = study["runs"]["main_lr2e-5"]["best"]["CIDEr"]
    text = " ".join(README.split())
    best = run["best"]
    assert run["settings"]["scst_samples"] == 10 and run["steps"] == 1200
    assert f"best {best['CIDEr']:.1f} at step {best['step']:,} against the main run's {main:.1f} (in-run)" in text
    assert f"{run['captions_per_second']:.0f} sampled captions/s" in text
    assert re.search(r"\d+\.\d min wall", record["run"]).group(0) in text
    val = {name.split(":")[0]: entry["CIDEr"] for name, entry in record["candidates_val"].items()}
    ratios = json.loads((RESULTS / "flickr8k_scst" / record["shipped_2_1_mean_val"]).read_text())["val"]
    shipped = ratios["2:1 (shipped, S weight 0.667)"]["CIDEr"]
    assert f"2:1 {val['A']:.1f}, the mean of the snapshots at steps 900–1,200 taken 2:1 {val['B']:.1f}" in text
    assert f"3:1 {val['D']:.1f}, and 1:1:1 with the main run's weights {val['C']:.1f}, all below the shipped " in text
    assert max(val.values()) < shipped and f"below the shipped {shipped:.1f}" in text


def test_beam_size_sentence_matches_its_record():
    runs = json.loads((RESULTS / "flickr8k_scst" / "beam_size.json").read_text())["runs"]
    text = " ".join(README.split())
    beams = sorted(runs, key=int)
    ciders = cider_list(runs[b] for b in beams)
    assert f"CIDEr {ciders} at beams 1, 3, 5, 7 (the default) and 10" in text and beams == ["1", "3", "5", "7", "10"]
    assert max(runs, key=lambda b: runs[b]["CIDEr"]) == str(DEFAULT_BEAM_SIZE)


def test_consensus_reranking_sentence_matches_its_record():
    variants = dict(json.loads((RESULTS / "flickr8k_scst" / "consensus_rerank.json").read_text())["variants"])
    unchanged = variants.pop("beam search (unchanged)")["CIDEr"]
    ratios = json.loads((RESULTS / "flickr8k_scst" / "mixing_ratios.json").read_text())["val"]
    assert unchanged == ratios["2:1 (shipped, S weight 0.667)"]["CIDEr"]  # the shipped model, as evaluated
    assert len(variants) == 12 and {name.split(",")[0] for name in variants} == {"7 beams", "20 samples", "60 samples"}
    best = max(variants, key=lambda name: variants[name]["CIDEr"])
    ciders = [variant["CIDEr"] for variant in variants.values()]
    text = " ".join(README.split())
    span = f"CIDEr {min(ciders):.1f} to {max(ciders):.1f} against {unchanged:.1f} for the beam search's own choice"
    assert span in text and best.startswith("60 samples")
    assert f"at most {max(ciders) - unchanged:.1f} more, for 60 sampled captions a photo beside its 7 beams" in text


def test_ensemble_sentence_matches_its_records():
    folder = RESULTS / "flickr8k_scst" / "logit_ensemble"
    records = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json") if path.stem != "members"}
    members = json.loads((folder / "members.json").read_text())
    assert all(set(record["models"]) <= set(members) for record in records.values())
    cider = {name: record["CIDEr"] for name, record in records.items()}
    text = " ".join(README.split())
    assert f"2:1 snapshot mean {cider['shipped_and_B']:.1f} ({cider['shipped_and_B_probs']:.1f} averaging p)" in text
    assert records["shipped_and_B_probs"]["average"] == "probs" and records["shipped_and_B"]["average"] == "log-probs"
    both = f"self-critical weights {cider['S_and_best10']:.1f}, with the cross-entropy model as a third"
    assert both in text and f"as a third {cider['S_best10_and_X']:.1f}" in text
    ratios = json.loads((RESULTS / "flickr8k_scst" / "mixing_ratios.json").read_text())["val"]
    shipped = ratios["2:1 (shipped, S weight 0.667)"]["CIDEr"]
    alone = records.pop("shipped_alone")
    # the shipped model alone through Ensemble is the shipped model, so the ensembles compare like for like
    assert alone["models"] == ["show_attend_tell/pretrained/flickr8k"] and alone["CIDEr"] == shipped
    assert f"(the shipped model alone through the same code: {shipped:.2f}, as `sat evaluate` scores it)" in text
    assert max(r["CIDEr"] for r in records.values()) < shipped
    assert f"Averaging the weights ({shipped:.1f}) does at least as well" in text


def repeating(captions: list[dict]) -> list[str]:
    """The captions that hold a word twice other than the function words."""
    from show_attend_tell.text import FUNCTION_WORDS

    found = []
    for caption in captions:
        words = [w for w in caption["caption"].split() if w not in FUNCTION_WORDS]
        if len(set(words)) < len(words):
            found.append(caption["caption"])
    return found


def test_no_word_twice_paragraph_matches_its_records():
    folder = RESULTS / "flickr8k_scst" / "no_repeats"

    def run(name: str) -> tuple[dict, list[dict]]:
        record = json.loads((folder / name / "metrics.json").read_text())["results"]["beam7"]
        split = "test" if name.startswith("test") else "val"
        return record, json.loads((folder / name / f"captions_{split}_beam7.json").read_text())

    (fp32, fp32_captions), (fp32_free, fp32_free_captions) = run("val_fp32"), run("val_fp32_repeat_words")
    (int8, _), (int8_free, _) = run("val_int8"), run("val_int8_repeat_words")
    test, test_captions = run("test_defaults")
    assert not fp32["repeat_words"] and fp32_free["repeat_words"] and not test["repeat_words"] and test["int8"]
    earlier = RESULTS / "flickr8k_scst" / "test_defaults_fp32_encoder"
    before = json.loads((earlier / "metrics.json").read_text())
    old = json.loads((earlier / "captions_test_beam7.json").read_text())
    assert before["results"]["beam7"]["encoder_precision"] == test["encoder_precision"] == "fp32"
    text = " ".join(README.split())
    assert f"in {len(repeating(fp32_free_captions))} of its 1,000 val captions" in text
    assert not repeating(fp32_captions) and not repeating(test_captions) and repeating(old)
    assert (
        f"Val CIDEr rose from {fp32_free['CIDEr']:.1f} to {fp32['CIDEr']:.1f} with the fp32 decoder and from "
        f"{int8_free['CIDEr']:.1f} to {int8['CIDEr']:.1f} with the int8 one, BLEU-4 from {fp32_free['BLEU-4']:.1f} "
        f"to {fp32['BLEU-4']:.1f}; test at the defaults from {before['results']['beam7']['CIDEr']:.1f} to "
        f"{test['CIDEr']:.1f}, with {sum(a != b for a, b in zip(old, test_captions, strict=True))} of the 1,000"
    ) in text
    keys = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
    row = table_row("4 epochs 2:1, no word twice (2026-12-06; fp32 encoder)")
    assert [float(cell) for cell in row] == [round(test[key], 1) for key in keys]
    assert f"missed the bar's CIDEr by {65 - test['CIDEr']:.1f}" in text
    coco = {
        name: json.loads((folder / f"{name}.json").read_text())["results"]["labels_and_templates"]["CIDEr"]
        for name in ("coco_dev", "coco_dev_repeat_words")
    }
    assert f"read {coco['coco_dev']:.1f} without repeated words ({coco['coco_dev_repeat_words']:.1f} with them" in text
    speed = json.loads((RESULTS / "decoder_precision.json").read_text())
    assert (
        f"one photo {speed['no_repeats_over_repeat_words_one_photo']}×, 32 at once "
        f"{speed['no_repeats_over_repeat_words_batched']}×" in text
    )


def test_int8_check_paragraph_matches_its_records():
    """The int8 ranges of the model shipped before the 6-epoch one, and their check, as recorded and quoted."""
    folder = RESULTS / "flickr8k_scst"
    record = json.loads((folder / "int8_check" / "check.json").read_text())
    assert record["command"].startswith("sat calibrate show_attend_tell/pretrained/flickr8k ")
    ratios = json.loads((folder / "mixing_ratios.json").read_text())["val_no_word_twice"]["runs"]
    weights = "2:1 (the shipped weights) (S weight 0.667)"  # the weights this check calibrated: the same fp32 score
    assert ratios[weights]["CIDEr"] == record["int8_calibration"]["check"]["CIDEr"]["fp32"]
    assert record["int8_calibration"]["features_precision"] == "fp32"  # "Measured again from the fp32 encoder's"
    check = record["int8_calibration"]["check"]
    assert (check["split"], check["images"], check["tolerance"]) == ("val", 1000, INT8_CIDER_TOLERANCE)
    new = check["CIDEr"]
    old = {
        p: json.loads((folder / "no_repeats" / f"val_{p}" / "metrics.json").read_text())["results"]["beam7"]["CIDEr"]
        for p in ("fp32", "int8")
    }
    assert round(old["fp32"], 2) == new["fp32"]  # the same fp32 decoder and store: the same captions

    def scored(path: str) -> tuple[dict, list]:
        run = folder / path
        metrics = json.loads((run / "metrics.json").read_text())["results"]["beam7"]
        return metrics, json.loads((run / "captions_test_beam7.json").read_text())

    (now, now_captions), (before, before_captions) = (
        scored("int8_check/test_defaults"),
        scored("no_repeats/test_defaults"),
    )
    fp32, _ = scored("int8_check/test_fp32")
    assert now["int8"] and not fp32["int8"] and now["encoder_precision"] == fp32["encoder_precision"] == "fp32"
    changed = sum(a != b for a, b in zip(before_captions, now_captions, strict=True))
    assert round(now["CIDEr"], 1) == round(before["CIDEr"], 1)
    coco = json.loads((folder / "int8_check" / "coco_dev.json").read_text())["results"]
    speed = json.loads((RESULTS / "decoder_precision.json").read_text())
    text = " ".join(README.split())
    for claim in (
        f"cost it {old['fp32'] - old['int8']:.1f} val CIDEr ({old['int8']:.1f} against {old['fp32']:.1f})",
        f"they cost {new['fp32'] - new['int8']:.2f} ({new['int8']:.2f} against {new['fp32']:.2f})",
        f"differ by {new['int8'] - old['int8']:.1f} on val",
        f"CIDEr {now['CIDEr']:.1f} with either ({changed} captions differ), and {fp32['CIDEr']:.1f} with the fp32",
        f"costs {speed['fp32_over_int8_one_photo']:.2f}× a photo one at a time and "
        f"{speed['fp32_over_int8_batched']:.2f}× in a batch of 32",
        f"(coco-dev {coco['labels_and_templates']['CIDEr']:.1f} at the defaults, {coco['guided']['CIDEr']:.1f} with",
        f"only within {INT8_CIDER_TOLERANCE} CIDEr of fp32",
        f"and {coco['labels_and_templates']['CIDEr']:.1f} with its new int8 ranges ({coco['guided']['CIDEr']:.1f} with",
    ):
        assert claim in text, claim
    keys = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
    row = table_row("4 epochs 2:1, int8 ranges from fp32 features (2026-12-06; fp32 encoder)")
    assert [float(cell) for cell in row] == [round(now[key], 1) for key in keys]


def test_longer_run_and_the_shipped_model_match_their_records():
    """A longer run: the 6-epoch run's curve, its candidates on val, the shipped model (3:2) being the one chosen,
    its int8 check, test at the defaults and coco-dev, as the README and the results table quote them."""
    from show_attend_tell.captioner import SHIPPED_MODEL
    from show_attend_tell.checkpoint import int8_by_default, read_config

    folder = RESULTS / "flickr8k_scst" / "six_epochs"
    text = " ".join(README.split())
    run = json.loads((folder / "study.json").read_text())["runs"]["six_epochs"]
    assert run["settings"]["scst_samples"] == 10 and run["settings"]["once_words"] and run["settings"]["epochs"] == 6
    curve = {v["step"]: v["CIDEr"] for v in run["validations"]}
    best, last = run["best"], max(curve)
    assert best["CIDEr"] == max(curve.values()) and run["steps"] == last == 1650
    assert f"{curve[0]:.2f} → {best['CIDEr']:.2f} (step {best['step']:,}) → {curve[last]:.2f} at step {last:,}" in text
    assert min(v for step, v in curve.items() if step > 0) > curve[0]  # "It did not dip"
    others = [
        {v["step"]: v["CIDEr"] for v in other["validations"]}
        for name in ("samples10_rerun", "once_words")
        for other in json.loads((RESULTS / "flickr8k_scst" / name / "study.json").read_text())["runs"].values()
    ]
    assert all(other[150] < other[0] for other in others) and curve[0] < curve[150]  # they dipped, this run did not
    earlier = [other[150] for other in others]
    assert (
        f"{curve[150]:.1f} at step 150 (the 10-sample and once-words runs read {earlier[0]:.1f} and {earlier[1]:.1f}"
        in text
    )
    assert f"{run['captions_per_second']} sampled captions/s" in text
    tail = [f"{curve[step]:.1f}" for step in sorted(curve)[-4:]]
    assert f"its last four validations read {', '.join(tail[:3])} and {tail[3]}" in text

    record = json.loads((folder / "candidates.json").read_text())
    candidates = record["candidates_val"]
    start = json.loads((folder / "val_X" / "metrics.json").read_text())["results"]["beam7"]
    before = json.loads((RESULTS / "flickr8k_scst" / "no_repeats" / "val_fp32" / "metrics.json").read_text())
    before = before["results"]["beam7"]
    rows = {
        "the cross-entropy model (the start)": start,
        "the 4-epoch run's best 2:1 with cross-entropy (shipped before)": before,
        "best, 2:1 with cross-entropy": candidates["A: best 2:1 with X"],
        "the 10 snapshots of steps 1,200–1,650, 2:1 with cross-entropy": candidates["B: snapshots 2:1 with X"],
        "best, 3:2 with cross-entropy (shipped)": candidates["C: best 3:2 with X"],
        "best, the 4-epoch run's best and cross-entropy, 1:1:1": candidates["D: best 1:1:1 with S and X"],
    }
    for label, scored in rows.items():  # all under one search: fp32 decoder, no word twice
        assert not scored["int8"] and not scored["repeat_words"], label
        assert [float(cell) for cell in table_row(label)] == [
            round(scored[k], 1) for k in ("BLEU-4", "METEOR", "CIDEr")
        ]
    chosen = candidates["C: best 3:2 with X"]
    assert chosen["CIDEr"] == max(c["CIDEr"] for c in rows.values())
    assert chosen["export"] == "sat export run/best run/best run/best X X --out C"
    assert f"3:2 led the model shipped before by {chosen['CIDEr'] - before['CIDEr']:.1f}" in text
    assert f"rose {chosen['CIDEr'] - start['CIDEr']:.1f} under the same search" in text
    assert f"{chosen['CIDEr'] - 56.9:.1f} above the 56.9 of issue #30's bar" in text and chosen["CIDEr"] - 56.9 >= 4

    # the shipped model is C: its int8 ranges and their check are the recorded ones
    check = json.loads((folder / "int8_check.json").read_text())
    shipped = read_config(SHIPPED_MODEL)
    assert check["int8_calibration"] == shipped["int8_calibration"] and int8_by_default(shipped)
    cross_entropy = "show_attend_tell/pretrained/flickr8k (4450de3)"  # the weights shipped before issue 30
    assert shipped["exported_from"] == ["/work/data/long6/run/best"] * 3 + [cross_entropy] * 2  # 3:2
    cider = check["int8_calibration"]["check"]["CIDEr"]
    assert cider["fp32"] == round(chosen["CIDEr"], 2)  # the same weights, store and search as the candidate
    assert f"scored {cider['int8']:.1f} against {cider['fp32']:.1f} in fp32" in text
    old = json.loads((RESULTS / "flickr8k_scst" / "int8_check" / "check.json").read_text())
    old = old["int8_calibration"]["check"]["CIDEr"]
    assert f"(the model before: {old['int8']:.1f} against {old['fp32']:.1f})" in text

    test = json.loads((folder / "test_C" / "metrics.json").read_text())["results"]["beam7"]
    assert test["int8"] and not test["repeat_words"] and test["encoder_precision"] == "fp32"
    assert test["CIDEr"] >= 65 and test["BLEU-4"] >= 25 and test["METEOR"] >= 21.5  # issue #30's shipping bar
    keys = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
    row = table_row("shipped: 6 epochs, 3:2 (since 2026-12-06; fp32 encoder)")
    assert [float(cell) for cell in row] == [round(test[key], 1) for key in keys]
    assert f"CIDEr {test['CIDEr']:.1f}, BLEU-4 {test['BLEU-4']:.1f}, METEOR {test['METEOR']:.1f} (the table at" in text
    through_caption = json.loads((folder / "sat_caption_test.json").read_text())
    weights = hashlib.sha256((SHIPPED_MODEL / "model.safetensors").read_bytes()).hexdigest()
    assert through_caption["model_sha256"] == shipped["int8_calibration"]["weights_sha256"] == weights
    assert through_caption["same_caption"] == through_caption["photos"] == 1000
    assert "`sat caption` with no flags writes the same 1,000 captions (`sat_caption_test.json`)" in text
    previous = json.loads((RESULTS / "flickr8k_scst" / "int8_check" / "test_defaults" / "metrics.json").read_text())
    gain = {key: test[key] - previous["results"]["beam7"][key] for key in ("CIDEr", "METEOR", "BLEU-4")}
    assert (
        f"{gain['CIDEr']:.1f} CIDEr and {gain['METEOR']:.1f} METEOR above the model shipped before, "
        f"BLEU-4 {-gain['BLEU-4']:.1f} below" in text
    )
    coco = json.loads((folder / "coco_dev_C.json").read_text())
    assert coco["int8"] and not coco["repeat_words"]
    coco_before = json.loads((RESULTS / "flickr8k_scst" / "int8_check" / "coco_dev.json").read_text())["results"]
    now = {mode: coco["results"][mode]["CIDEr"] for mode in ("labels_and_templates", "guided")}
    assert now["labels_and_templates"] >= coco_before["labels_and_templates"]["CIDEr"] - 1  # the bar: not 1 lower
    assert f"CIDEr is {now['labels_and_templates']:.2f} ({now['guided']:.2f} with the detector option" in text

    stats = json.loads((folder / "captions.json").read_text())["models"]
    model = stats["shipped (6-epoch 3:2)"]
    captions = json.loads((folder / "val_C" / "captions_val_beam7.json").read_text())
    assert len(captions) == 1000 and not repeating(captions)  # "no word twice" but the function words
    assert f"{model['vocabulary']} words against {stats['cross-entropy']['vocabulary']} for the cross-entropy" in text
    earlier = stats["previous (4-epoch 2:1)"]
    assert f"and {earlier['vocabulary']} for the model before" in text
    distinct = [f"{stats[name]['distinct_captions']:.1f}%" for name in ("cross-entropy", "previous (4-epoch 2:1)")]
    assert f"{model['distinct_captions']:.1f}% distinct ({distinct[0]}, {distinct[1]})" in text
    lengths = [f"{stats[name]['mean_length']:.1f}" for name in ("shipped (6-epoch 3:2)", "cross-entropy")]
    assert f"{lengths[0]} words long ({lengths[1]}, {earlier['mean_length']:.1f})" in text
    for caption, count in model["most_common"][:2]:
        assert f'"{caption}" for {count}' in text


def test_once_words_training_bullet_matches_its_records():
    folder = RESULTS / "flickr8k_scst"
    run = json.loads((folder / "once_words" / "study.json").read_text())["runs"]["once_words"]
    assert run["settings"]["once_words"] is True
    validations = {v["step"]: v["CIDEr"] for v in run["validations"]}
    best, last = run["best"], validations[max(validations)]
    text = " ".join(README.split())
    assert f"in-run val CIDEr {validations[0]:.1f} → {best['CIDEr']:.1f} (step {best['step']}) → {last:.1f}" in text
    candidates = json.loads((folder / "once_words" / "candidates.json").read_text())["candidates_val"]
    shipped = {
        p: json.loads((folder / "no_repeats" / f"val_{p}" / "metrics.json").read_text())["results"]["beam7"]["CIDEr"]
        for p in ("fp32", "int8")
    }
    assert (
        f"scores val CIDEr {candidates['A fp32']['CIDEr']:.1f} (fp32 decoder) and {candidates['A int8']['CIDEr']:.1f} "
        f"(int8) against the shipped model's {shipped['fp32']:.1f} and {shipped['int8']:.1f} under the same search"
    ) in text
    assert max(c["CIDEr"] for c in candidates.values()) < shipped["fp32"]


def test_mirror_and_mixing_sentences_match_their_records():
    """The levers tried under No word twice: mirror images and the mixing ratio again, and 3:2 on test."""
    folder = RESULTS / "flickr8k_scst"
    mirror = {r["mirror"]: r for r in (json.loads(p.read_text()) for p in (folder / "mirror").glob("*.json"))}
    check = json.loads((folder / "int8_check" / "check.json").read_text())["int8_calibration"]["check"]["CIDEr"]
    assert sorted(mirror) == [0.1, 0.25, 0.5] and all(
        r["models"] == ["show_attend_tell/pretrained/flickr8k"] for r in mirror.values()
    )
    assert max(r["CIDEr"] for r in mirror.values()) < check["fp32"]
    text = " ".join(README.split())
    ciders = cider_list(mirror[w] for w in (0.1, 0.25, 0.5))
    assert f"scores CIDEr {ciders} at W 0.1, 0.25 and 0.5 against {check['fp32']:.1f} alone" in text
    again = json.loads((folder / "mixing_ratios.json").read_text())["val_no_word_twice"]
    runs = list(again["runs"].values())
    assert [name.split(" ")[0] for name in again["runs"]] == ["1:1", "4:3", "3:2", "2:1", "5:2", "3:1"]
    assert runs[3]["CIDEr"] == check["fp32"]  # the shipped weights, scored as int8_check scored them in fp32
    assert f"{cider_list(runs)} at 1:1, 4:3, 3:2, 2:1 (shipped), 5:2 and 3:1" in text
    led = again["int8_checks"]["3:2"]["CIDEr_int8"]
    assert led > check["int8"] and f"defaults ({led:.1f} against {check['int8']:.1f})" in text
    shipped = json.loads((folder / "int8_check" / "test_defaults" / "metrics.json").read_text())["results"]["beam7"]
    test = again["test_3_2"]
    assert test["CIDEr"] < shipped["CIDEr"]
    assert f"CIDEr {test['CIDEr']:.1f} (BLEU-4 {test['BLEU-4']:.1f}) against the shipped {shipped['CIDEr']:.1f}" in text
