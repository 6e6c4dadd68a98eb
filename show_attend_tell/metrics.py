"""Caption metrics as coco-caption computes them (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D), and COCO results I/O.

With Java, captions go through the Stanford PTB tokenizer and pycocoevalcap's scorers, so the numbers are the
ones papers report (Xu et al. 2015 used coco-caption). Without Java, a Python tokenizer stands in, METEOR is
left out, and the result says it is not comparable with published numbers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from show_attend_tell.errors import InputError

ImageId = int | str

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METRIC_KEYS = (*BLEU_KEYS, "METEOR", "ROUGE-L", "CIDEr")
# Metrics are reported x100, as papers and this project's README, logs and records give them (pycocoevalcap's
# own scorers return fractions: BLEU-4 0.235 is reported as 23.5).
SCALE = 100.0


def score_captions(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, list[str]],
    *,
    java: bool | None = None,
) -> dict[str, float | int | str | bool]:
    """Score one predicted caption per image against that image's reference captions.

    Returns "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L" and "CIDEr" x100 (pycocoevalcap's fractions times SCALE, as
    reported everywhere in this project) with "n_images", "tokenizer" ("ptb" or "python") and "comparable".
    `java=None` uses Java when a working `java` is on PATH; `java=False` forces the Python fallback (no METEOR,
    "comparable": False, and a "note" saying why); `java=True` refuses to fall back.
    """
    ids = _check_inputs(predictions, references)
    java_path = _resolve_java(java)
    # One tokenizer run over candidates then references (one JVM start instead of two).
    captions = [predictions[i] for i in ids] + [caption for i in ids for caption in references[i]]
    if java_path is not None:
        tokenized = _ptb_tokenize(java_path, captions)
    else:
        # Lazy: text.py belongs to the data side; only the no-Java fallback needs it.
        from show_attend_tell.text import tokenize

        tokenized = [" ".join(tokenize(caption)) for caption in captions]
    # pycocoevalcap's layout: image id -> list of tokenized captions, one candidate per image.
    res = {image_id: [tokenized[n]] for n, image_id in enumerate(ids)}
    gts = {}
    start = len(ids)
    for image_id in ids:
        gts[image_id] = tokenized[start : start + len(references[image_id])]
        start += len(references[image_id])

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | int | str | bool] = dict(zip(BLEU_KEYS, map(float, bleu), strict=True))
    if java_path is not None:
        scores["METEOR"] = _meteor(gts, res)
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores = {key: SCALE * value for key, value in scores.items()}
    scores["n_images"] = len(ids)
    scores["tokenizer"] = "ptb" if java_path is not None else "python"
    scores["comparable"] = java_path is not None
    if java_path is None:
        reason = "java=False" if java is False else "no working Java on PATH"
        note = (
            f"{reason}: METEOR omitted and captions tokenized in Python instead of the PTB tokenizer, "
            "so BLEU, ROUGE-L and CIDEr are not comparable with published coco-caption numbers"
        )
        scores["note"] = note
        if java is None:
            warnings.warn(note, stacklevel=2)
    return scores


def write_results(path: str | Path, predictions: Mapping[ImageId, str]) -> None:
    """Write predictions in the COCO results format: [{"image_id": ..., "caption": ...}, ...]."""
    items = [{"image_id": image_id, "caption": caption} for image_id, caption in predictions.items()]
    Path(path).write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_results(path: str | Path) -> dict[ImageId, str]:
    """Read a COCO results file into {image_id: caption}, refusing anything that is not exactly that."""
    path = Path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"{path}: cannot read results file ({error.strerror})") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(items, list):
        raise InputError(f"{path}: expected a JSON list of {{'image_id', 'caption'}} objects, got a {_kind(items)}")
    predictions: dict[ImageId, str] = {}
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"{path}: item {n} is a {_kind(item)}, expected an object")
        for field in ("image_id", "caption"):
            if field not in item:
                raise InputError(f"{path}: item {n} has no '{field}' field")
        image_id, caption = item["image_id"], item["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, int | str):
            raise InputError(f"{path}: item {n} 'image_id' must be an integer or a string, got {image_id!r}")
        if not isinstance(caption, str):
            raise InputError(f"{path}: item {n} 'caption' must be a string, got a {_kind(caption)}")
        if image_id in predictions:
            raise InputError(f"{path}: item {n} repeats image_id {image_id!r} (one caption per image)")
        predictions[image_id] = caption
    return predictions


def _check_inputs(predictions: Mapping[ImageId, str], references: Mapping[ImageId, list[str]]) -> list[ImageId]:
    """Validate both sides and return the image ids in a fixed order, so every scorer sees the same one."""
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise InputError(f"prediction for image {image_id!r} must be a string, got a {_kind(caption)}")
    for image_id, captions in references.items():
        if not isinstance(captions, list | tuple) or not captions:
            raise InputError(f"references for image {image_id!r} must be a non-empty list of captions")
        if not all(isinstance(caption, str) for caption in captions):
            raise InputError(f"references for image {image_id!r} must all be strings")
    missing = set(references) - set(predictions)
    extra = set(predictions) - set(references)
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"{len(missing)} image(s) without a prediction (e.g. {_examples(missing)})")
        if extra:
            problems.append(f"{len(extra)} predicted image(s) without references (e.g. {_examples(extra)})")
        message = "predictions and references must cover the same images: " + "; ".join(problems)
        if {str(i) for i in missing} == {str(i) for i in extra}:
            message += " (the ids differ only in type: int vs str)"
        raise InputError(message)
    if not references:
        raise InputError("no images to score: predictions and references are empty")
    for image_id in references:
        if isinstance(image_id, bool) or not isinstance(image_id, int | str):
            raise InputError(f"image ids must be integers or strings, got {image_id!r}")
    return sorted(references, key=_id_order)


def _id_order(image_id: ImageId) -> tuple[bool, ImageId]:
    return isinstance(image_id, str), image_id


def _examples(ids: set[ImageId], count: int = 5) -> str:
    shown = sorted(ids, key=_id_order)[:count]
    return ", ".join(repr(i) for i in shown) + (", ..." if len(ids) > count else "")


def _kind(value: object) -> str:
    return {dict: "JSON object", list: "JSON list", str: "string"}.get(type(value), type(value).__name__)


def _resolve_java(java: bool | None) -> str | None:
    """The `java` executable to use, or None for the Python fallback."""
    if java is False:
        return None
    path = shutil.which("java")
    if path is not None and _java_works(path):
        return path
    if java is True:
        raise InputError(
            "java=True but no working `java` on PATH: install a Java runtime (e.g. openjdk-17-jre-headless) "
            "for comparable scores, or allow the non-comparable Python fallback"
        )
    return None


@functools.cache
def _java_works(path: str) -> bool:
    try:
        subprocess.run([path, "-version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _ptb_tokenize(java_path: str, captions: list[str]) -> list[str]:
    """Tokenize captions as pycocoevalcap's PTBTokenizer does: same jar, flags and punctuation filter.

    Run here rather than through PTBTokenizer because that class writes its temporary file into the
    installed package (fails on a read-only install), lets Java print to our stderr, and silently shifts
    captions onto the wrong image when Java sees a line break Python did not split on (e.g. U+2028).
    """
    # Any Unicode whitespace becomes one space, so each caption is exactly one line for Java.
    lines = [" ".join(caption.split()) for caption in captions]
    jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    jar = os.path.join(jar_dir, ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="sat-ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        # A newline after every caption keeps a trailing empty caption as its own (empty) output line.
        source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        command = [java_path, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines"]
        completed = subprocess.run(command + ["-lowerCase", str(source)], capture_output=True)
    if completed.returncode != 0:
        raise RuntimeError(f"PTB tokenizer (Java) failed: {completed.stderr.decode(errors='replace')[-2000:]}")
    output = completed.stdout.decode("utf-8").split("\n")
    if len(output) != len(lines) + 1 or output[-1] != "":
        raise RuntimeError(f"PTB tokenizer returned {len(output) - 1} lines for {len(lines)} captions")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in output[:-1]]


def _meteor(gts: dict[ImageId, list[str]], res: dict[ImageId, list[str]]) -> float:
    """METEOR 1.5 through pycocoevalcap's Java wrapper, always shutting the Java process down afterwards."""
    meteor = Meteor()
    process = meteor.meteor_p
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, BrokenPipeError) as error:
        # The wrapper reads one float per line; an empty line or a closed pipe means Java died.
        process.kill()
        stderr = process.stderr.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"METEOR (Java) stopped with exit code {process.wait()}: {stderr}") from error
    finally:
        # The wrapper's __del__ takes this lock; a failure mid-score would leave it held and hang there.
        if meteor.lock.locked():
            meteor.lock.release()
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            with contextlib.suppress(BrokenPipeError):
                stream.close()
    return float(score)
