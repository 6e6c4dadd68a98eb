"""Where the model looked for each word: the paper's Figures 2-3 as a PNG, and the overlays behind them.

alpha is one word's attention over the encoder grid, shape (g, g) (rows, columns), summing to 1.
Matplotlib is used through its object API (Figure + Agg canvas), never pyplot, so no global backend
or figure state is touched.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

# The paper's visualisation (arctic-captions, pyramid_expand(upscale=16, sigma=20)) upsampled its 14x14
# maps to the 224-pixel input and blurred them with sigma 20 pixels. Smoothing at that scale keeps the look
# the same whatever the grid size or the photo's size.
PAPER_SIDE = 224
PAPER_SIGMA = 20.0
OVERLAY_OPACITY = 0.6  # the photo stays visible under the map
PANEL_SIDE = 256  # longest side of each figure panel in pixels
DPI = 100
TITLE_INCHES = 0.35  # room above each panel for its word
CHOSEN_CELL_COLOUR = "#e8413c"  # the outline of the cell hard attention sampled for a word


def upsample_attention(alpha: np.ndarray, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """Attention (g, g) stretched to an image of `size` = (width, height) as PIL gives it: (H, W) in [0, 1].

    smooth=True follows the paper (bicubic upsampling, then a Gaussian blur); smooth=False shows the raw
    grid cells as blocks. The map is divided by its maximum so each word's map uses the full range.
    """
    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.ndim != 2 or not np.isfinite(alpha).all():
        raise ValueError(f"alpha must be a finite (g, g) array, got shape {alpha.shape}")
    if smooth:
        work = _resize(alpha, (PAPER_SIDE, PAPER_SIDE), Image.Resampling.BICUBIC)
        blur = _gaussian_matrix(PAPER_SIDE, PAPER_SIGMA)
        heat = _resize(blur @ work @ blur.T, size, Image.Resampling.BICUBIC)
    else:
        heat = _resize(alpha, size, Image.Resampling.NEAREST)
    heat = np.clip(heat, 0.0, None)  # bicubic overshoots below zero next to sharp peaks
    peak = heat.max()
    return heat / peak if peak > 0 else heat


def attention_overlay(
    image: Image.Image,
    alpha: np.ndarray,
    *,
    size: tuple[int, int] | None = None,
    smooth: bool = True,
    opacity: float = OVERLAY_OPACITY,
) -> Image.Image:
    """The photo (resized to `size` = (width, height) if given) under a grey attention map, as RGBA.

    As in the paper's figures, attended regions turn bright and the rest dark.
    """
    photo = image.convert("RGB")
    if size is not None and tuple(size) != photo.size:
        photo = photo.resize(size, Image.Resampling.BICUBIC)
    level = np.round(upsample_attention(alpha, photo.size, smooth) * 255).astype(np.uint8)  # (H, W)
    layer = np.empty((*level.shape, 4), dtype=np.uint8)
    layer[..., :3] = level[..., None]
    layer[..., 3] = round(opacity * 255)
    return Image.alpha_composite(photo.convert("RGBA"), Image.fromarray(layer, "RGBA"))


def build_attention_figure(
    image: Image.Image,
    words: list[str],
    alphas: np.ndarray,
    *,
    smooth: bool = True,
    columns: int = 5,
    locations: list[tuple[int, int]] | None = None,
) -> Figure:
    """A grid of panels: the photo, then one overlay per word titled with the word. alphas: (T, g, g).
    locations (hard attention, sampled): each word's chosen cell (row, column), outlined over its map."""
    alphas = np.asarray(alphas)
    if alphas.ndim != 3 or alphas.shape[0] != len(words):
        raise ValueError(f"alphas must be (T, g, g) with T = {len(words)} words, got shape {alphas.shape}")
    if locations is not None and len(locations) != len(words):
        raise ValueError(f"locations must give one cell per word ({len(words)}), got {len(locations)}")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    scale = PANEL_SIDE / max(image.size)
    photo = image.convert("RGB").resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
    )
    panels = 1 + len(words)
    grid_columns = min(columns, panels)
    rows = math.ceil(panels / grid_columns)
    figure = Figure(
        figsize=(grid_columns * photo.width / DPI, rows * (photo.height / DPI + TITLE_INCHES)),
        dpi=DPI,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(rows, grid_columns, 1)
    axes.imshow(photo)
    axes.set_axis_off()
    for index, (word, alpha) in enumerate(zip(words, alphas, strict=True), start=2):
        axes = figure.add_subplot(rows, grid_columns, index)
        axes.imshow(attention_overlay(photo, alpha, smooth=smooth))
        if locations is not None:
            (row, column), (cells_down, cells_across) = locations[index - 2], alpha.shape
            width, height = photo.width / cells_across, photo.height / cells_down
            # pixel centres are at whole numbers, so the photo spans -0.5 .. width - 0.5
            corner = (column * width - 0.5, row * height - 0.5)
            axes.add_patch(Rectangle(corner, width, height, fill=False, edgecolor=CHOSEN_CELL_COLOUR, linewidth=2))
        # Words are shown verbatim: "<unk>" as is, and "$" must not start matplotlib's maths mode.
        axes.set_title(word, parse_math=False)
        axes.set_axis_off()
    return figure


def attention_figure(
    image: Image.Image,
    words: list[str],
    alphas: np.ndarray,
    path: str | Path,
    *,
    smooth: bool = True,
    columns: int = 5,
    locations: list[tuple[int, int]] | None = None,
) -> Path:
    """Write the photo and its per-word attention maps (alphas: (T, g, g)) as one PNG at `path`; with
    `locations`, each word's sampled cell outlined (see build_attention_figure)."""
    path = Path(path)
    figure = build_attention_figure(image, words, alphas, smooth=smooth, columns=columns, locations=locations)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _resize(values: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize a float map to `size` = (width, height) in float precision (PIL mode F)."""
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize(tuple(size), resample))


def _gaussian_matrix(side: int, sigma: float) -> np.ndarray:
    """Rows are Gaussian weights over positions, renormalised at the borders: `G @ x` blurs x's rows.

    Done in numpy because PIL's GaussianBlur only takes 8-bit images.
    """
    positions = np.arange(side, dtype=np.float32)
    weights = np.exp(-((positions[:, None] - positions[None, :]) ** 2) / (2 * sigma**2))
    return weights / weights.sum(axis=1, keepdims=True)
