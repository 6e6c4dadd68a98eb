"""Attention maps: the upsampled peak sits where alpha peaks, overlays keep the photo size, figures count."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from show_attend_tell.visualize import (
    attention_figure,
    attention_overlay,
    build_attention_figure,
    upsample_attention,
)

GRID = 7


def _one_hot(row: int, column: int, grid: int = GRID) -> np.ndarray:
    alpha = np.zeros((grid, grid), dtype=np.float32)
    alpha[row, column] = 1.0
    return alpha


def _random_alphas(steps: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    weights = rng.random((steps, GRID * GRID)).astype(np.float32)
    return (weights / weights.sum(axis=1, keepdims=True)).reshape(steps, GRID, GRID)


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("cell", [(2, 5), (0, 0), (6, 3)])
def test_upsampled_peak_is_in_the_attended_cell(cell, smooth):
    width, height = 700, 350  # not square, not a multiple of the paper's 224
    heat = upsample_attention(_one_hot(*cell), (width, height), smooth=smooth)
    assert heat.shape == (height, width) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    row, column = cell
    assert row * height / GRID <= y < (row + 1) * height / GRID
    assert column * width / GRID <= x < (column + 1) * width / GRID


def test_smoothing_spreads_and_keeps_relative_weights():
    alpha = np.zeros((GRID, GRID), dtype=np.float32)
    alpha[1, 1], alpha[5, 5] = 0.6, 0.3
    heat = upsample_attention(alpha, (224, 224))
    cell = 224 // GRID
    strong, weak = (
        heat[1 * cell + cell // 2, 1 * cell + cell // 2],
        heat[5 * cell + cell // 2, 5 * cell + cell // 2],
    )
    assert strong == pytest.approx(1.0, abs=0.02)
    assert weak == pytest.approx(0.5, abs=0.05)
    assert 0 < heat[3 * cell, 1 * cell + cell // 2] < 0.5  # blurred into the neighbouring cells
    assert heat[-1, 0] < 0.01  # far corner stays dark


def test_raw_blocks_without_smoothing():
    alpha = _random_alphas(1)[0]
    heat = upsample_attention(alpha, (GRID * 10, GRID * 10), smooth=False)
    expected = np.kron(alpha / alpha.max(), np.ones((10, 10), dtype=np.float32))
    assert np.allclose(heat, expected)


def test_uniform_attention_is_uniform():
    heat = upsample_attention(np.full((GRID, GRID), 1 / GRID**2), (90, 60))
    assert np.allclose(heat, 1.0, atol=1e-4)


def test_upsample_rejects_a_flat_vector():
    with pytest.raises(ValueError, match="shape"):
        upsample_attention(np.ones(GRID * GRID), (10, 10))


def test_overlay_has_the_image_size_and_brightens_the_attended_cell():
    photo = Image.new("RGB", (140, 70), (128, 128, 128))
    overlay = attention_overlay(photo, _one_hot(3, 1))
    assert overlay.mode == "RGBA" and overlay.size == (140, 70)
    attended = overlay.getpixel((30, 35))
    far = overlay.getpixel((130, 5))
    assert attended[0] > 180 and far[0] < 70 and attended[3] == 255

    assert attention_overlay(photo, _one_hot(3, 1), size=(50, 20)).size == (50, 20)


def test_figure_has_one_panel_per_word_plus_the_photo():
    words = ["a", "<unk>", "costs", "$5"]
    figure = build_attention_figure(Image.new("RGB", (64, 48)), words, _random_alphas(4))
    assert len(figure.axes) == 5
    assert [axes.get_title() for axes in figure.axes] == ["", *words]


def test_figure_rejects_mismatched_words_and_alphas():
    with pytest.raises(ValueError, match="3 words"):
        build_attention_figure(Image.new("RGB", (8, 8)), ["a", "b", "c"], _random_alphas(2))


def test_figure_png_grows_by_rows(tmp_path):
    photo = Image.new("RGB", (300, 200), (200, 150, 100))
    one_row = attention_figure(photo, ["a", "dog", "runs"], _random_alphas(3), tmp_path / "short.png")
    two_rows = attention_figure(
        photo, [f"w{i}" for i in range(8)], _random_alphas(8), tmp_path / "out" / "long.png", columns=5
    )
    assert two_rows == tmp_path / "out" / "long.png"
    with Image.open(one_row) as short, Image.open(two_rows) as long:
        assert short.format == long.format == "PNG"
        assert short.width == 4 * 256 and long.width == 5 * 256  # 4 panels in one row; 9 panels, 5 a row
        assert long.height > 1.8 * short.height
        long.load()


def test_tiny_image_figure(tmp_path):
    path = attention_figure(Image.new("RGB", (1, 1)), ["dot"], _random_alphas(1), tmp_path / "dot.png")
    with Image.open(path) as figure:
        assert figure.size[0] >= 2 * 200  # a 1x1 photo is scaled up to a readable panel


def test_sampled_cells_are_outlined_on_their_words_panels():
    from matplotlib.patches import Rectangle

    alphas = _random_alphas(2)
    g = alphas.shape[1]
    figure = build_attention_figure(Image.new("RGB", (64, 48)), ["a", "dog"], alphas, locations=[(0, 1), (g - 1, 0)])
    panel_width, panel_height = 256 / g, 192 / g  # the photo scaled to 256 x 192 pixels
    for axes, (row, column) in zip(figure.axes[1:], [(0, 1), (g - 1, 0)], strict=True):
        (cell,) = [patch for patch in axes.patches if isinstance(patch, Rectangle)]
        assert cell.get_xy() == pytest.approx((column * panel_width - 0.5, row * panel_height - 0.5))
        assert (cell.get_width(), cell.get_height()) == pytest.approx((panel_width, panel_height))
    assert not figure.axes[0].patches  # the photo's own panel
    plain = build_attention_figure(Image.new("RGB", (64, 48)), ["a", "dog"], alphas)
    assert not any(axes.patches for axes in plain.axes)
    with pytest.raises(ValueError, match="one cell per word"):
        build_attention_figure(Image.new("RGB", (8, 8)), ["a", "b"], alphas, locations=[(0, 0)])
