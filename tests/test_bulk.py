"""`sat caption --out`: records as --json prints them, resumed after a kill, file lists, subfolders, torchrun."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, ColourGrid, tiny_model_config

from show_attend_tell import bulk
from show_attend_tell.bulk import RECORD_FIELDS, merge, part_path, read_rows
from show_attend_tell.captioner import Captioner
from show_attend_tell.cli import main


def tiny_captioner(prepared: Path) -> Captioner:
    """A random tiny decoder over mean-colour features (conftest.ColourGrid): the same one in every process."""
    from show_attend_tell.model import CaptionModel
    from show_attend_tell.prepare import PreparedDataset

    vocab = PreparedDataset.load(prepared).vocab
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config(len(vocab)), encoder=ColourGrid()).eval()
    return Captioner(model, vocab, {}, guidance_threshold=None)


@pytest.fixture
def photos(tiny_prepared, tmp_path) -> Path:
    """The 12 tiny photos in a folder of their own (red0.jpg ... blue11.jpg)."""
    folder = tmp_path / "photos"
    shutil.copytree(tiny_prepared.parent / "images", folder)
    return folder


@pytest.fixture
def sat(tiny_prepared, monkeypatch):
    """`sat caption` with the tiny captioner in place of the shipped model."""
    captioner = tiny_captioner(tiny_prepared)
    monkeypatch.setattr(Captioner, "load", classmethod(lambda cls, *args, **kwargs: captioner))
    return captioner


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_out_holds_the_records_json_prints_with_a_progress_bar(photos, sat, tmp_path, capsys):
    assert main(["caption", str(photos), "--json", "--beam", "2", "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 12 and json.loads(printed[0])["image"] == str(photos / "blue11.jpg")
    out = tmp_path / "captions.jsonl"
    assert main(["caption", str(photos), "--beam", "2", "--batch-size", "5", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert lines(out) == printed  # one conversion, caption_record, for both
    summary = json.loads(captured.out)
    assert summary == {"out": str(out), "photos": 12, "skipped": 0, "captioned": 12, "missing": 0}
    assert "12/12" in captured.err and "photo/s" in captured.err  # tqdm's count and rate on stderr


def test_a_rerun_after_a_kill_skips_what_the_file_holds_and_loses_nothing(photos, sat, tmp_path, capsys):
    whole = tmp_path / "whole.jsonl"
    assert main(["caption", str(photos), "--batch-size", "2", "--out", str(whole)]) == 0
    out = tmp_path / "captions.jsonl"
    caption_batch, calls = sat.caption_batch, []

    def killed_in_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return caption_batch(*args, **kwargs)

    sat.caption_batch = killed_in_the_third_batch
    assert main(["caption", str(photos), "--batch-size", "2", "--out", str(out)]) == 130
    assert lines(out) == lines(whole)[:4]  # the two batches written, the third lost
    with open(out, "a") as file:  # and a kill inside the next write: half a line
        file.write(lines(whole)[4][:30])
    sat.caption_batch = caption_batch
    capsys.readouterr()
    assert main(["caption", str(photos), "--batch-size", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"{out} holds 4 of these 12 photos already: skipped" in captured.err
    assert json.loads(captured.out)["skipped"] == 4 and json.loads(captured.out)["captioned"] == 8
    assert out.read_text() == whole.read_text()
    assert main(["caption", str(photos), "--out", str(out)]) == 0  # all done: nothing captioned, nothing changed
    assert json.loads(capsys.readouterr().out)["captioned"] == 0 and out.read_text() == whole.read_text()


def test_csv_out_has_the_record_fields_as_columns_and_resumes(photos, sat, tmp_path, capsys):
    jsonl, table = tmp_path / "c.jsonl", tmp_path / "c.csv"
    assert main(["caption", str(photos), "--out", str(jsonl)]) == 0
    assert main(["caption", str(photos / "red0.jpg"), str(photos / "green1.jpg"), "--out", str(table)]) == 0
    assert main(["caption", str(photos), "--out", str(table)]) == 0
    assert "holds 2 of these 12 photos already" in capsys.readouterr().err
    with open(table, newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert tuple(reader.fieldnames) == RECORD_FIELDS
    records = [json.loads(line) for line in lines(jsonl)]
    assert [row["image"] for row in rows] == [record["image"] for record in records]  # merged in input order
    for row, record in zip(rows, records, strict=True):
        assert row["caption"] == record["caption"] and json.loads(row["words"]) == record["words"]
        assert float(row["score"]) == record["score"] and json.loads(row["template"]) is False


def test_from_list_and_recursive_folders(photos, sat, tmp_path, capsys, monkeypatch):
    nested = tmp_path / "nested"
    (nested / "b" / "c").mkdir(parents=True)
    (nested / ".hidden").mkdir()
    shutil.copy(photos / "red0.jpg", nested / "z.jpg")
    shutil.copy(photos / "green1.jpg", nested / "b" / "c" / "y.jpg")
    shutil.copy(photos / "blue2.jpg", nested / "b" / "x.jpg")
    shutil.copy(photos / "red3.jpg", nested / ".hidden" / "w.jpg")
    (nested / "b" / "up").symlink_to(nested)  # a loop, were links followed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text("photos/red0.jpg\n\nnested/b/x.jpg\r\nphotos/red0.jpg\n")
    assert main(["caption", "--from-list", "list.txt", "nested", "--recursive"]) == 0
    printed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    # the folder's photos, then each subfolder's; .hidden and the link are not entered; a photo named twice
    # is captioned once
    assert printed == ["nested/z.jpg", "nested/b/x.jpg", "nested/b/c/y.jpg", "photos/red0.jpg"]
    assert main(["caption", "nested"]) == 0  # not recursive: the folder's own photos
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["nested/z.jpg"]
    assert main(["caption", "--from-list", "nope.txt"]) == 2
    assert "sat caption: error: --from-list nope.txt: cannot read it (No such file or directory)" in (
        capsys.readouterr().err
    )
    assert main(["caption"]) == 2
    assert "give image files or folders, or --from-list FILE" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sub").mkdir()
    assert main(["caption", "empty", "--recursive"]) == 1
    assert "empty: folder and its subfolders have no images" in capsys.readouterr().err


def test_an_out_file_sat_did_not_write_is_refused_in_one_line(photos, sat, tmp_path, capsys):
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"image": "a.jpg"}\nmy notes\n')
    assert main(["caption", str(photos), "--out", str(notes)]) == 2
    assert f"{notes}: line 2: not a caption record (a JSON object with an image path)" in capsys.readouterr().err
    table = tmp_path / "t.csv"
    table.write_text("name,text\na.jpg,hello\n")
    assert main(["caption", str(photos), "--out", str(table)]) == 2
    assert "its columns are not those `sat caption --out` writes" in capsys.readouterr().err
    assert table.read_text() == "name,text\na.jpg,hello\n"


def test_merge_takes_out_and_parts_in_input_order_each_photo_once(tmp_path):
    out = tmp_path / "c.jsonl"

    def record(image: str) -> str:
        return json.dumps({"image": image, "caption": "x"})

    out.write_text(record("old.jpg") + "\n" + record("b.jpg") + "\n")
    part_path(out, 1, 2).write_text(record("d.jpg") + "\n" + record("c.jpg") + "\n" + '{"image": "e.j')  # torn
    part_path(out, 0, 2).write_text(record("a.jpg") + "\n" + record("b.jpg") + "\n")
    other = tmp_path / "c.part-00000-of-00002.csv"  # another output's part
    other.write_text("")
    assert merge(out, ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "old.jpg"]
    assert [image for image, _ in read_rows(out)] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "old.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "c.part-00000-of-00002.csv"]


def test_ranks_share_whole_batches_of_one_process_run():
    for photos, world_size, batch_size in [(12, 2, 5), (1000, 3, 16), (3, 4, 2), (0, 2, 16), (7, 1, 16)]:
        blocks = [bulk.share(photos, rank, world_size, batch_size) for rank in range(world_size)]
        assert blocks[0][0] == 0 and blocks[-1][1] == photos
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))  # contiguous, in rank order
        assert all(start % batch_size == 0 for start, _ in blocks)
    assert [bulk.share(12, rank, 2, 5) for rank in (0, 1)] == [(0, 5), (5, 12)]


TORCHRUN_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_bulk import tiny_captioner
from show_attend_tell.bulk import caption_collection
from show_attend_tell.images import iter_image_paths
from show_attend_tell.distributed import distributed, exit_worker
rank, world_size = distributed()
paths = iter_image_paths([sys.argv[2]])
options = dict(beam_size=3, max_length=8)
summary = caption_collection(tiny_captioner(Path(sys.argv[1])), paths, sys.argv[3], options=options, batch_size=2,
                             max_pixels=10**7, rank=rank, world_size=world_size, progress=False)
if rank == 0:
    print(summary)
if world_size > 1:
    exit_worker()
"""


@pytest.mark.slow  # torchrun
def test_two_gloo_processes_write_what_one_writes_and_resume_a_killed_rank(tiny_prepared, photos, tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "bulk.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(processes: int, out: Path) -> str:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        ran = subprocess.run([*torchrun, str(script), tiny_prepared, photos, out], env=env, capture_output=True)
        assert ran.returncode == 0, ran.stderr.decode()[-5000:]
        return ran.stdout.decode()

    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    run(1, one)
    assert len(lines(one)) == 12
    run(2, two)
    assert two.read_text() == one.read_text()
    assert sorted(p.name for p in tmp_path.glob("two*")) == ["two.jsonl"]  # the parts are merged and removed
    # rank 1 killed inside a write after its first batch; rank 0 finished its part: the rerun completes both
    resumed = tmp_path / "resumed.jsonl"
    part_path(resumed, 0, 2).write_text("\n".join(lines(one)[:6]) + "\n")
    part_path(resumed, 1, 2).write_text("\n".join(lines(one)[6:8]) + "\n" + lines(one)[8][:20])
    assert "'skipped': 8, 'captioned': 4" in run(2, resumed)
    assert resumed.read_text() == one.read_text()


KILLED_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_bulk import tiny_captioner
from show_attend_tell.bulk import caption_collection
from show_attend_tell.images import iter_image_paths
captioner = tiny_captioner(Path(sys.argv[1]))
caption_batch = captioner.caption_batch
def slow(*args, **kwargs):
    time.sleep(float(sys.argv[4]))
    return caption_batch(*args, **kwargs)
captioner.caption_batch = slow
caption_collection(captioner, iter_image_paths([sys.argv[2]]), sys.argv[3], options={{}}, batch_size=2,
                   max_pixels=10**7, progress=False)
"""


@pytest.mark.slow  # a process killed and run again
def test_a_process_killed_with_sigkill_resumes_without_duplicates_or_losses(tiny_prepared, photos, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT.format(tests=str(REPO / "tests")))
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    subprocess.run([sys.executable, str(script), tiny_prepared, photos, whole, "0"], check=True)
    process = subprocess.Popen([sys.executable, str(script), tiny_prepared, photos, out, "0.5"])
    deadline = time.monotonic() + 60
    while not (out.exists() and len(lines(out)) >= 4) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = lines(out)
    assert 4 <= len(written) < 12 and written == lines(whole)[: len(written)]
    subprocess.run([sys.executable, str(script), tiny_prepared, photos, out, "0"], check=True)
    assert out.read_text() == whole.read_text()
    assert bulk.read_rows(out)[-1][0] == str(photos / "red9.jpg")
