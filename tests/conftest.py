"""Shared fixtures. Flickr8k tests read SAT_FLICKR8K_DIR (default ../shared/data/flickr8k) and skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def flickr8k_dir() -> Path:
    return Path(os.environ.get("SAT_FLICKR8K_DIR", REPO.parent / "shared" / "data" / "flickr8k"))


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    """The real Flickr8k directory; skipped with the reason when it is absent (CI makes it required)."""
    path = flickr8k_dir()
    if not (path / "Flickr8k.token.txt").is_file():
        pytest.skip(f"Flickr8k not found at {path} (set SAT_FLICKR8K_DIR)")
    return path


CAPTIONS = {
    "red": ["a red square", "a big red box", "red color everywhere", "a red picture", "the red square"],
    "green": ["a green square", "a big green box", "green color everywhere", "a green picture", "the green field"],
    "blue": ["a blue square", "a big blue box", "blue color everywhere", "a blue picture", "the blue sky"],
}


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A prepared folder dataset of 12 solid-colour photos with 5 captions each (8 train, 2 val, 2 test)."""
    from PIL import Image

    from show_attend_tell.datasets import read_folder
    from show_attend_tell.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    (root / "images").mkdir()
    rows = ["image,caption,split"]
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for n in range(12):
        name = list(colours)[n % 3]
        shade = tuple(max(0, c - 10 * n) for c in colours[name])
        Image.new("RGB", (40, 32), shade).save(root / "images" / f"{name}{n}.jpg")
        split = "train" if n < 8 else ("val" if n < 10 else "test")
        rows += [f"{name}{n}.jpg,{caption},{split}" for caption in CAPTIONS[name]]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    raw = read_folder(root / "captions.csv", root / "images")
    prepare(raw, root / "prepared", dataset="folder", min_count=1, progress=False)
    return root / "prepared"


def tiny_model_config(vocab_size: int, **overrides):
    values = dict(image_size=64, encoder_dim=12, feature_dim=10, attention_dim=16, decoder_dim=16, embed_dim=8)
    return tiny_decoder_config(vocab_size=vocab_size, **{**values, **overrides})


def tiny_decoder_config(**overrides):
    """A decoder small enough to step by hand: E=8 features on a 2x2 grid, F=7, A=6, D=10, M=5, V=15."""
    from show_attend_tell.config import ModelConfig

    values = dict(
        vocab_size=15,
        encoder_dim=8,
        feature_dim=7,
        attention_dim=6,
        decoder_dim=10,
        embed_dim=5,
        grid_size=2,
        dropout=0.0,
    )
    values.update(overrides)
    return ModelConfig(**values)


def tiny_transformer(**overrides) -> dict:
    """ModelConfig fields of a Transformer decoder to add to a tiny config: two blocks of two heads, D=8."""
    values = dict(
        decoder="transformer",
        decoder_dim=8,
        transformer_layers=2,
        transformer_heads=2,
        transformer_feedforward_dim=12,
        transformer_max_positions=24,
    )
    return {**values, **overrides}


class ColourGrid:
    """A stand-in encoder for fast tests: the image's mean colour on a 2x2 grid, tiled to 12 channels."""

    def to(self, device):
        return self

    def eval(self):
        return self

    def __call__(self, images):
        import torch.nn.functional as F

        return F.adaptive_avg_pool2d(images, 2).flatten(2).transpose(1, 2).repeat(1, 1, 4)  # (B, 4, 12)


@pytest.fixture(scope="session")
def tiny_features(tiny_prepared, tmp_path_factory) -> Path:
    """Features of the tiny dataset: 2x2 grids of mean colours (see ColourGrid)."""
    from show_attend_tell.features import extract_features
    from show_attend_tell.prepare import PreparedDataset

    dataset = PreparedDataset.load(tiny_prepared)
    config = tiny_model_config(len(dataset.vocab))
    out = tmp_path_factory.mktemp("features") / "store"
    extract_features(
        [image.path for image in dataset.images],
        out,
        config=config,
        encoder=ColourGrid(),
        encoder_sha256="untrained",
        progress=False,
    )
    return out


@pytest.fixture
def fixed_encoder_weights(monkeypatch):
    """Stand-in 'pretrained' ResNet-50 weights: the same random network at every build, named 'untrained'."""
    import torch

    from show_attend_tell.weights import EncoderWeights

    build = EncoderWeights.build

    def seeded(self, pretrained: bool = True):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return build(self, pretrained=False)

    monkeypatch.setattr(EncoderWeights, "build", seeded)
    monkeypatch.setattr(EncoderWeights, "sha256", lambda self: "untrained")


@pytest.fixture
def read_only(monkeypatch):
    """Make a directory unwritable: by its permissions, or for root (whom permissions do not stop) by refusing
    the temporary files every write of a run goes through, as a read-only file system would."""
    import errno
    import tempfile
    from pathlib import Path

    changed: list[Path] = []

    def make(directory: Path) -> None:
        directory = Path(directory).resolve()
        if os.geteuid() != 0:
            for path in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
                path.chmod(0o555)
                changed.append(path)
            return

        def refuse(original):
            def wrapper(*args, dir=None, **kwargs):
                if dir is not None and Path(dir).resolve().is_relative_to(directory):
                    raise PermissionError(errno.EACCES, "Permission denied", str(dir))
                return original(*args, dir=dir, **kwargs)

            return wrapper

        monkeypatch.setattr(tempfile, "mkstemp", refuse(tempfile.mkstemp))
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse(tempfile.TemporaryFile))

    yield make
    for path in changed:
        path.chmod(0o755)
