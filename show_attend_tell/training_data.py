"""What training reads and in which order: the prepared dataset with its cached features (in memory, or
streamed from disk a batch ahead), the captions each image uses, and each epoch's batches of whole images,
seeded by (seed, epoch) so that a resumed run takes the same ones, optionally bucketed by caption length."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from show_attend_tell.config import FEATURE_LOADING, DataConfig, ModelConfig, TrainConfig
from show_attend_tell.errors import InputError
from show_attend_tell.features import FeatureStore, load_for_model
from show_attend_tell.prepare import PreparedDataset

# With TrainConfig.shuffle_block N, the images of this many blocks of N are shuffled together: a stretch of the
# epoch reads from SHUFFLE_WINDOW_BLOCKS * N consecutive rows of the store only.
SHUFFLE_WINDOW_BLOCKS = 8


def epoch_order(image_rows: list[int], epoch: int, seed: int, block: int = 0) -> list[int]:
    """The order epoch `epoch` visits the images in, seeded by (seed, epoch): each image exactly once.

    block 0: a random permutation. block N: the rows sorted, cut into blocks of N consecutive rows, the blocks
    in a random order and the rows of each window of SHUFFLE_WINDOW_BLOCKS blocks shuffled together, so that
    reads from a feature store on a disk that seeks slowly stay within a window of the file."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if not block:
        return [image_rows[i] for i in torch.randperm(len(image_rows), generator=generator).tolist()]
    rows = sorted(image_rows)
    blocks = [rows[start : start + block] for start in range(0, len(rows), block)]
    blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
    order = []
    for start in range(0, len(blocks), SHUFFLE_WINDOW_BLOCKS):
        window = [row for rows_of_block in blocks[start : start + SHUFFLE_WINDOW_BLOCKS] for row in rows_of_block]
        order += [window[i] for i in torch.randperm(len(window), generator=generator).tolist()]
    return order


def epoch_batches(
    image_rows: list[int],
    caption_rows: dict[int, list[int]],
    batch_size: int,
    epoch: int,
    seed: int,
    block: int = 0,
    longest: dict[int, int] | None = None,
) -> list[list[int]]:
    """One epoch's batches: lists of image rows, each list holding about batch_size captions, seeded by
    (seed, epoch) like epoch_order, so a resumed run takes the same batches.

    longest (image row -> tokens in its longest caption): length-bucketed batches (TrainConfig.bucket_by_length).
    The epoch's images are sorted by it (a stable sort: images of one length stay in the epoch's random order),
    cut into batches, and the batches shuffled, so a batch pads its captions to about their own length, not to the
    longest of a random batch. An image's captions stay together, so its features are read and projected once.
    With `block`, the sort and the shuffle are within each stretch of SHUFFLE_WINDOW_BLOCKS * block images of the
    epoch, which keeps the reads of a stretch near each other in the store."""
    order = epoch_order(image_rows, epoch, seed, block)
    if longest is None:
        return _cut(order, caption_rows, batch_size)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + 1)
    pool = max(1, SHUFFLE_WINDOW_BLOCKS * block if block else len(order))
    batches = []
    for start in range(0, len(order), pool):
        ranked = sorted(order[start : start + pool], key=longest.__getitem__)
        cut = _cut(ranked, caption_rows, batch_size)
        batches += [cut[i] for i in torch.randperm(len(cut), generator=generator).tolist()]
    return batches


def _cut(order: list[int], caption_rows: dict[int, list[int]], batch_size: int) -> list[list[int]]:
    """Images in order -> consecutive batches of at least batch_size captions (the last one: what is left)."""
    batches, current, count = [], [], 0
    for image in order:
        current.append(image)
        count += len(caption_rows[image])
        if count >= batch_size:
            batches.append(current)
            current, count = [], 0
    if current:
        batches.append(current)
    return batches


@dataclasses.dataclass
class TrainingData:
    """The prepared dataset, its cached features (if any) and the captions each training image uses."""

    dataset: PreparedDataset
    # (N, P, E) grid features or (N, h*w, C) a block's output, in memory (a tensor) or read from disk as needed
    # (features.FeatureStore); None: images
    features: torch.Tensor | FeatureStore | None
    stage: str  # the block whose output `features` holds ("" for grid features)
    train_rows: list[int]  # training images with at least one caption
    caption_rows: dict[int, list[int]]  # image row -> its caption rows (the first captions_per_image)
    longest: dict[int, int]  # training image row -> tokens in the longest of its caption rows

    @classmethod
    def of(
        cls,
        dataset: PreparedDataset,
        features: torch.Tensor | FeatureStore | None,
        stage: str,
        captions_per_image: int,
    ) -> TrainingData:
        """The training images of `dataset` with their first `captions_per_image` captions."""
        captions_by_image: dict[int, list[int]] = {}
        for caption, image in enumerate(dataset.image_index.tolist()):
            captions_by_image.setdefault(image, []).append(caption)
        caption_rows = {i: rows[:captions_per_image] for i, rows in captions_by_image.items()}
        train_rows = [i for i in dataset.indices("train") if caption_rows.get(i)]
        tokens = dataset.lengths.tolist()
        longest = {i: max(tokens[c] for c in caption_rows[i]) for i in train_rows}
        return cls(dataset, features, stage, train_rows, caption_rows, longest)

    def batches(self, config: TrainConfig, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s batches of image rows under `config` (batch size, seed, shuffle block, bucketing).
        Self-critical steps are not bucketed: their samples are not padded to the references, and bucketing was
        measured only for cross-entropy training."""
        longest = self.longest if config.bucket_by_length and not config.self_critical else None
        return epoch_batches(
            self.train_rows, self.caption_rows, config.batch_size, epoch, config.seed, config.shuffle_block, longest
        )


def load_features(
    dataset: PreparedDataset,
    data_config: DataConfig,
    model_config: ModelConfig,
    encoder_sha256: str,
    encoder: torch.nn.Module | None,
    *,
    progress: bool = False,
) -> tuple[torch.Tensor | FeatureStore | None, str]:
    """DataConfig.features for `dataset`'s images, checked against the model: (features, stage), the features
    in memory or a store read from disk as needed (DataConfig.feature_loading); (None, "") without a store."""
    if not data_config.features:
        return None, ""
    paths = [image.path for image in dataset.images]
    features, stage = load_for_model(data_config.features, model_config, paths, encoder_sha256, encoder)
    if _in_memory(features, data_config):
        features = features.load(progress=progress and features.nbytes > 1 << 30)
    return features, stage


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable; free pages where /proc is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _in_memory(store: FeatureStore, config: DataConfig) -> bool:
    """Whether training holds the store in memory (DataConfig.feature_loading): auto does when the store takes
    under half the memory available to each of this machine's processes."""
    if config.feature_loading not in FEATURE_LOADING:
        raise InputError(f"feature_loading must be one of {', '.join(FEATURE_LOADING)}, got {config.feature_loading!r}")
    if config.loader_workers < 0:
        raise InputError(f"loader_workers (--loader-workers) must be 0 or more, got {config.loader_workers}")
    if config.feature_loading != "auto":
        return config.feature_loading == "memory"
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return store.nbytes * processes <= available_memory() // 2


class StoreRows(torch.utils.data.Dataset):
    """A streamed store as a DataLoader dataset whose items are batches: store[rows] for a list of rows."""

    def __init__(self, store: FeatureStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        return self.store[rows]


def cached_batches(
    data: TrainingData,
    batches: list[list[int]],
    *,
    workers: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor | None]:
    """This rank's cached features of each batch, in order: read ahead from a streamed store by `workers`
    processes (DataConfig.loader_workers; two batches each; pinned memory on CUDA), or None for every batch when
    the store is in memory or there is none (the step reads them itself)."""
    store = data.features
    if not isinstance(store, FeatureStore):
        return itertools.repeat(None, len(batches))
    loader = torch.utils.data.DataLoader(
        StoreRows(store),
        batch_size=None,  # each item is already a batch
        sampler=[rows[rank::world_size] for rows in batches],
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # the workers' seeds come from here, not from the training's RNG state
    )
    return iter(loader)
