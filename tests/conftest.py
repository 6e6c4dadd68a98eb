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
