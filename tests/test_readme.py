"""The README tells the truth: its results table and claims match the records, its file tree the files."""

from __future__ import annotations

import json
import re

from conftest import REPO

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
    assert f"took {round(pipeline['total_minutes'])} minutes on 2 cores" in README
    assert "beats the paper in under an hour" not in README
    beam7 = json.loads((RESULTS / "flickr8k_test" / "metrics.json").read_text())["results"]["beam7"]
    paper_best = {"BLEU-1": 67.0, "BLEU-2": 45.7, "BLEU-3": 31.4, "BLEU-4": 21.3, "METEOR": 20.30}  # Xu et al. Table 1
    assert "beats the paper's BLEU-2 to BLEU-4 and METEOR but not its BLEU-1" in README
    assert beam7["BLEU-1"] < paper_best["BLEU-1"]
    assert all(beam7[key] > paper_best[key] for key in ("BLEU-2", "BLEU-3", "BLEU-4", "METEOR"))


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
