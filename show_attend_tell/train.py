"""Training: cross-entropy with teacher forcing or self-critical (SCST), real-decoding validation, exact
resume, torchrun. Plain functions over a `Run` (what a run holds), shaped like torchvision's reference scripts:
`new_run` / `resume_run`, then `fit`, which calls one `cross_entropy_step` or `self_critical_step` per batch
and `validate` each epoch.

A run directory holds `config.json` (the resolved configuration), `log.jsonl` (one JSON object per logged
step and per validation), TensorBoard scalars under `tensorboard/`, the resumable state under `last/` and the
best checkpoint (by the early-stopping metric) under `best/`, loadable by `checkpoint.load_model`.

Batches are groups of whole images with all their captions, so each image's attention projection is shared
by its captions. Their cached features come from a store held in memory, or one read from disk batch by batch
(`training_data.cached_batches`) when it does not fit (DataConfig.feature_loading). The data order of epoch e
is a permutation seeded by (seed, e) (`training_data.epoch_order`); with the step within the epoch, the model,
optimizer, scheduler and RNG states, that is everything needed to continue exactly.
Under torchrun each rank takes every world_size-th image of a batch, the loss is normalised by the global
batch and the gradients are averaged over ranks (`distributed.average_gradients`), so the result matches one process.
The data and its order live in `training_data.py`, the process group in `distributed.py`; here is the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from show_attend_tell import training_data
from show_attend_tell.checkpoint import check_model_config, load_encoder_state, model_tensors, save_model
from show_attend_tell.config import (
    CALIBRATION_IMAGES,
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_train_config,
    from_dict,
    save_json,
    to_dict,
    write_atomically,
)
from show_attend_tell.decoder import TeacherForced
from show_attend_tell.distributed import average_gradients, distributed, end_process_group, global_sums
from show_attend_tell.errors import InputError
from show_attend_tell.fast_encoder import AUTO, supported_precisions
from show_attend_tell.features import photo_features
from show_attend_tell.locks import hold, release
from show_attend_tell.model import (
    EXPECTED_CONTEXT_PROBABILITY,
    CaptionModel,
    Encoder,
    LocationSampling,
    caption_log_likelihood,
    caption_loss,
    decoder_class,
    hard_attention_loss,
    moving_average,
)
from show_attend_tell.prepare import PreparedDataset
from show_attend_tell.stages import run_from
from show_attend_tell.training_data import TrainingData, load_features

STATE_DIR = "last"
BEST_DIR = "best"
LOCK_FILE = ".lock"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# Write failures that are the run directory's, not a bug: one line, and the last saved state stays as it was
# (every file of it is written under a temporary name and renamed).
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def writing_to(run_dir: Path):
    """Turn a write refused by the file system (read-only, permissions, full) into one InputError line."""
    try:
        yield
    except OSError as error:
        if error.errno not in UNWRITABLE:
            raise
        where = error.filename or run_dir
        raise InputError(
            f"{where}: cannot write ({error.strerror}); the run directory {run_dir} must be writable. "
            "Its last saved state is intact"
        ) from None


def check_writable(run_dir: Path) -> None:
    """Fail now, not at the first checkpoint an hour from now, when the run directory cannot be written."""
    with writing_to(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----- what a run holds ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Progress:
    """Where a run is; saved in last/state.json."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = float("-inf")
    best_step: int = -1
    bad_validations: int = 0
    saved_step: int = -1  # the global step of the state in last/ (-1: none yet)
    reward_baseline: float | None = None  # hard attention's moving average of log p(y | s, a) (None: no batch yet)


@dataclasses.dataclass
class Run:
    """One training run: its directory and configuration, the data, the model and its optimisation state."""

    run_dir: Path
    model_config: ModelConfig
    config: TrainConfig
    data_config: DataConfig
    data: TrainingData
    model: CaptionModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    encoder_sha256: str
    rank: int = 0
    world_size: int = 1
    java: bool | None = None  # None: use Java (PTB tokenizer, METEOR) when it works
    cider: object = None  # scst.CiderD over the training references, for self-critical training
    progress: Progress = dataclasses.field(default_factory=Progress)
    console: bool = False  # progress bars and a line per validation on the terminal (rank 0)
    writer: object = None  # TensorBoard SummaryWriter, opened at the first log line
    lock: IO | None = None  # rank 0's lock on run_dir (locks.hold), from new_run/resume_run until fit ends

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.config.precision, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' autocast region for config.precision (nothing for fp32)."""
        dtype = self.autocast_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    @property
    def steps_per_epoch(self) -> int:
        return len(batches_of_epoch(self, 0))

    @property
    def last_step_epoch(self) -> int:
        """The epoch of the last step taken, counting from 1: what log.jsonl and the console call the epoch."""
        return -(-self.progress.global_step // self.steps_per_epoch)


def batches_of_epoch(run: Run, epoch: int) -> list[list[int]]:
    return run.data.batches(run.config, epoch)


def new_run(
    run_dir: str | Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    data_config: DataConfig,
    *,
    pretrained_encoder: bool = True,
    device: str = "cpu",
    java: bool | None = None,
) -> Run:
    """A new run in `run_dir` (refused if it already holds one, or another process writes there); rank 0 writes
    its config.json."""
    run_dir = Path(run_dir)
    if (run_dir / STATE_DIR).exists():
        raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
    # the precision `auto` picks here is the run's: its config says it, and a resume elsewhere keeps it
    precision = training_precision(train_config.precision, device, self_critical=train_config.self_critical)
    train_config = dataclasses.replace(train_config, precision=precision)
    run = _build(run_dir, model_config, train_config, data_config, pretrained_encoder, device, java)
    run.lock = lock_run_dir(run_dir)
    if run.rank == 0:
        with writing_to(run_dir):
            save_json(resolved_config(run), run_dir / "config.json")
    return run


def lock_run_dir(run_dir: Path) -> IO | None:
    """Rank 0 checks that it can write `run_dir` and locks it for the life of the run (None on other ranks):
    two runs writing one directory would interleave their logs and replace each other's checkpoints."""
    if distributed()[0] != 0:
        return None
    check_writable(run_dir)
    return hold(run_dir / LOCK_FILE, str(run_dir), "wait for it to end, or use another --run-dir")


def resume_run(run_dir: str | Path, *, pretrained_encoder: bool = True, device: str = "cpu", java=None) -> Run:
    """The run in `run_dir` exactly where its last/ state left it."""
    run_dir = Path(run_dir)
    state_dir = run_dir / STATE_DIR
    if not (state_dir / "state.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no resumable state ({STATE_DIR}/state.json missing)")
    if distributed()[0] == 0:
        check_writable(run_dir)
    config_path = run_dir / "config.json"
    try:
        resolved = json.loads(config_path.read_text(encoding="utf-8"))
        # a run saved before batches were bucketed by default took random ones; it resumes as it trained
        train = {"bucket_by_length": False, **resolved["train"]}
        configs = (
            check_model_config(resolved["model"], str(config_path)),
            from_dict(TrainConfig, train),
            from_dict(DataConfig, resolved["data"]),
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{config_path}: not a readable JSON file ({error})") from None
    except (TypeError, ValueError, KeyError) as error:
        raise InputError(f"{config_path}: not the config of a run ({type(error).__name__}: {error})") from None
    check_train_config(configs[1], str(config_path))
    if configs[1].precision == AUTO:
        # saved before runs recorded the precision `auto` picked: then it was fp16 on CUDA and fp32 on the CPU
        legacy = "fp16" if torch.device(device).type == "cuda" else "fp32"
        configs = (configs[0], dataclasses.replace(configs[1], precision=legacy), configs[2])
    run = _build(run_dir, *configs, pretrained_encoder, device, java)
    run.lock = lock_run_dir(run_dir)
    load_state(run, state_dir)
    return run


def training_precision(
    precision: str, device: str | torch.device, flags: frozenset[str] | None = None, *, self_critical: bool = False
) -> str:
    """TrainConfig.precision as trained on `device`: `auto` is fp16 (loss-scaled) on CUDA and, on the CPU, bf16
    where the CPU has it natively (`flags`: /proc/cpuinfo's, by default; the encoder's test,
    fast_encoder.supported_precisions), else fp32 (results/train_precision_seeds.json); others are themselves.
    Self-critical training stays in fp32 on the CPU: the seeds that chose bf16 trained with cross-entropy, and the
    shipped model's self-critical run (recipes/flickr8k_scst.sh, which it reproduces) was fp32."""
    if precision != AUTO:
        return precision
    if torch.device(device).type == "cuda":
        return "fp16"
    return "bf16" if "bf16" in supported_precisions("cpu", flags) and not self_critical else "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype training autocasts to for TrainConfig.precision on `device` (None: fp32, no autocast)."""
    precision = training_precision(precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 trains on CUDA only; on the CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _build(run_dir, model_config, train_config, data_config, pretrained_encoder, device, java) -> Run:
    rank, world_size = distributed()
    device = torch.device(device)
    dataset = PreparedDataset.load(data_config.prepared, limit=data_config.limit)
    positions = decoder_class(model_config).max_positions(model_config)
    if positions is not None:
        # one position per word read: <start> and the words of the longest training caption; validation's captions
        needed = max(int(dataset.lengths.max()) - 1, train_config.max_caption_length)
        if needed > positions:
            raise InputError(
                f"--transformer-max-positions {positions} is too few: the training "
                f"captions and --max-caption-length {train_config.max_caption_length} need {needed} positions"
            )
    torch.manual_seed(train_config.seed)
    from show_attend_tell.features import store_stage
    from show_attend_tell.weights import ENCODER_WEIGHTS

    encoder = None
    # a store of a block's output (not grid features) leaves the rest of the trunk to run in training
    if not data_config.features or model_config.fine_tune_blocks or store_stage(data_config.features):
        encoder = Encoder(model_config, pretrained=pretrained_encoder)
    encoder_sha256 = ENCODER_WEIGHTS[model_config.encoder].sha256() if pretrained_encoder else "untrained"
    model = CaptionModel(model_config, encoder=encoder).to(device)
    if train_config.compile:
        # the state dict keeps its names. Compiled, training steps through `step` as decoding does: inductor
        # cannot compile soft attention's rearranged pass with its dynamic row counts (torch 2.14)
        model.decoder.step = torch.compile(model.decoder.step, dynamic=True)
        if hasattr(model.decoder, "teacher_forced_steps"):
            model.decoder.teacher_forced = model.decoder.teacher_forced_steps
    features, stage = load_features(dataset, data_config, model_config, encoder_sha256, encoder, progress=rank == 0)
    if train_config.init_from:
        _initialise_from(model, train_config.init_from, pretrained_encoder)
    cider = None
    if train_config.self_critical and train_config.scst_document_frequency == "train":
        from show_attend_tell.scst import CiderD
        from show_attend_tell.text import tokenize

        # rows of the CIDEr-D corpus are the training images, in dataset.indices("train") order
        cider = CiderD([[tokenize(c) for c in dataset.images[i].captions] for i in dataset.indices("train")])
    groups = [{"params": list(model.decoder.parameters()), "lr": train_config.decoder_lr}]
    if encoder is not None and model_config.fine_tune_blocks:
        groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": train_config.encoder_lr})
    # one fused kernel over all parameters: 2.4x as fast as the per-parameter loop on this CPU
    # (results/train_speed_fused/adam.json); the same update up to rounding
    optimizer = torch.optim.Adam(groups, weight_decay=train_config.weight_decay, fused=True)
    data = TrainingData.of(dataset, features, stage, data_config.captions_per_image)
    total_steps = len(data.batches(train_config, 0)) * train_config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, train_config))
    # fp16's narrow exponent needs the loss scaled; bf16 has fp32's range
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(train_config.precision, device) == torch.float16)
    return Run(
        run_dir=run_dir,
        model_config=model_config,
        config=train_config,
        data_config=data_config,
        data=data,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        device=device,
        encoder_sha256=encoder_sha256,
        rank=rank,
        world_size=world_size,
        java=java,
        cider=cider,
    )


def _initialise_from(model: CaptionModel, directory: str, pretrained_encoder: bool) -> None:
    """Start from a checkpoint's decoder, and its fine-tuned blocks (which this run must go on tuning)."""
    from show_attend_tell.checkpoint import load_model, read_config

    inherited = tuple(read_config(directory)["model"].get("fine_tune_blocks", ()))
    if not set(inherited) <= set(model.config.fine_tune_blocks):
        raise InputError(
            f"{directory}: its decoder learned on an encoder with {' '.join(inherited)} "
            f"fine-tuned; fine-tune them here too (--fine-tune-blocks {' '.join(inherited)})"
        )
    initial, _, _ = load_model(directory, with_encoder=bool(inherited), pretrained_encoder=pretrained_encoder)
    if initial.config.vocab_size != model.config.vocab_size:
        raise InputError(
            f"{directory}: its decoder knows {initial.config.vocab_size} words but this run's vocabulary has "
            f"{model.config.vocab_size}: start from a checkpoint trained on the same prepared dataset"
        )
    try:
        model.decoder.load_state_dict(initial.decoder.state_dict())
    except RuntimeError as error:  # another architecture: size mismatches, missing or unexpected weights
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise InputError(f"{directory}: its decoder does not fit this run's model ({first})") from None
    if inherited:
        prefixes = tuple(initial.encoder.tuned_prefixes())
        tuned = {k: v for k, v in initial.encoder.state_dict().items() if k.startswith(prefixes)}
        model.encoder.load_state_dict(tuned, strict=False)


def resolved_config(run: Run) -> dict:
    return {
        "model": to_dict(run.model_config),
        "train": to_dict(run.config),
        "data": to_dict(run.data_config),
        "encoder_sha256": run.encoder_sha256,
        "world_size": run.world_size,
    }


# ----- state --------------------------------------------------------------------------------------------------
def save_state(run: Run) -> None:
    """All that is needed to continue exactly, atomically: tensors as safetensors, the rest JSON (rank 0)."""
    run.progress.saved_step = run.progress.global_step
    if run.rank != 0:
        return
    directory = run.run_dir / STATE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_tensors(run.model).items()}
    optimizer = run.optimizer.state_dict()
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    state = {
        **dataclasses.asdict(run.progress),
        "param_groups": optimizer["param_groups"],
        "scheduler": {k: v for k, v in run.scheduler.state_dict().items() if k != "lr_lambdas"},
        "scaler": run.scaler.state_dict(),
    }
    write_atomically(directory / "state.safetensors", lambda p: save_file(tensors, p))
    write_atomically(directory / "state.json", lambda p: save_json(state, p))


def load_state(run: Run, directory: Path) -> None:
    tensors = load_file(directory / "state.safetensors")
    state = json.loads((directory / "state.json").read_text())
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    run.model.decoder.load_state_dict({k[len("decoder.") :]: v for k, v in model.items() if k.startswith("decoder.")})
    if run.model.encoder is not None and run.model_config.fine_tune_blocks:
        load_encoder_state(
            run.model.encoder,
            {k[len("encoder.") :]: v for k, v in model.items() if k.startswith("encoder.")},
            directory / "state.safetensors",
        )
    optimizer_state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            optimizer_state.setdefault(int(index), {})[key] = value
    run.optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["param_groups"]})
    run.scheduler.load_state_dict({**run.scheduler.state_dict(), **state["scheduler"]})
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    fields = {field.name for field in dataclasses.fields(Progress)}
    run.progress = Progress(**{k: v for k, v in state.items() if k in fields})
    run.progress.saved_step = run.progress.global_step
    _truncate_log(run)


def _truncate_log(run: Run) -> None:
    """Drop log lines written after the state we resume from, so the log tells one consistent story."""
    path = run.run_dir / "log.jsonl"
    if run.rank != 0 or not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= run.progress.global_step]
    path.write_text("".join(line + "\n" for line in kept))


# ----- data ---------------------------------------------------------------------------------------------------
def cached_batches(run: Run, batches: list[list[int]]) -> Iterator[torch.Tensor | None]:
    """This rank's cached features of each batch, read ahead from a streamed store (training_data.cached_batches)."""
    return training_data.cached_batches(
        run.data,
        batches,
        workers=run.data_config.loader_workers,
        device=run.device,
        rank=run.rank,
        world_size=run.world_size,
    )


def batch_features(run: Run, rows: list[int], *, train: bool, cached: torch.Tensor | None = None) -> torch.Tensor:
    """(B, P, E) float features for image rows: `cached` (read ahead by `cached_batches`), from the store, or
    by running the encoder on images."""
    data, model = run.data, run.model
    if data.features is not None:
        cached = data.features[rows] if cached is None else cached
        cached = cached.to(run.device, non_blocking=True).float()
        return run_from(model.encoder, cached, data.stage) if data.stage else cached
    paths = [data.dataset.images[i].path for i in rows]
    if train and run.model_config.fine_tune_blocks:
        from show_attend_tell.images import load_image
        from show_attend_tell.weights import image_transform

        augment = image_transform(run.model_config, augment=True)
        images = torch.stack([augment(load_image(path)) for path in paths]).to(run.device)
        if run.autocast_dtype is not None:
            images = images.to(memory_format=torch.channels_last)
        return model.encoder(images)
    return photo_features(model.encoder, run.model_config, paths, run.device)


def batch_captions(run: Run, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captions of the image rows -> tokens (N, T), lengths (N,), image_index (N,) into `rows`."""
    captions, owners = [], []
    for position, image in enumerate(rows):
        captions += run.data.caption_rows[image]
        owners += [position] * len(run.data.caption_rows[image])
    index = torch.tensor(captions)
    lengths = run.data.dataset.lengths[index]
    tokens = run.data.dataset.tokens[index][:, : int(lengths.max())].long()
    return tokens.to(run.device), lengths.to(run.device), torch.tensor(owners, device=run.device)


# ----- one step -----------------------------------------------------------------------------------------------
def _no_mark(phase: str) -> None:
    pass


def cross_entropy_step(
    run: Run, rows: list[int], mark: Callable[[str], None] = _no_mark, *, cached: torch.Tensor | None = None
) -> dict:
    """One teacher-forced optimisation step on a global batch of image rows (this rank takes its share;
    `cached`: its rows' features, read ahead).

    `mark(phase)` is called as each phase ends (data, encoder, decoder_forward, loss; then _optimise's):
    benchmarks/train_speed.py times this very function with it."""
    run.model.train()
    local = rows[run.rank :: run.world_size]
    tokens, lengths, owners = batch_captions(run, local)
    words_here = float((lengths - 1).sum())
    words, captions = global_sums(run.world_size, run.device, words_here, float(len(lengths)))
    hard = run.model_config.attention == "hard"
    mark("data")
    with run.autocast():
        features = batch_features(run, local, train=True, cached=cached)
        mark("encoder")
        sampling = location_sampling(run, local) if hard else None
        forced = run.model(features, tokens, lengths, owners, sampling=sampling)
        forced = TeacherForced(forced.log_probs.float(), forced.alphas.float(), forced.locations)
        mark("decoder_forward")
        loss, cross_entropy = caption_loss(
            forced.log_probs,
            forced.alphas,
            tokens,
            doubly_stochastic=run.config.doubly_stochastic,
            label_smoothing=run.config.label_smoothing,
            words=words / run.world_size,
            captions_count=captions / run.world_size,
        )
        hard_stats = {}
        if hard:
            hard_loss, hard_stats = _hard_attention_terms(run, forced, tokens, words)
            loss = loss + hard_loss
    mark("loss")
    _optimise(run, loss, mark, inputs=(local, features))
    loss_sum, cross_entropy_sum = global_sums(
        run.world_size, run.device, float(loss.detach()), float(cross_entropy) * words_here
    )
    return {
        "loss": loss_sum / run.world_size,
        "cross_entropy": cross_entropy_sum / words,
        "captions": int(captions),
        "lr": run.scheduler.get_last_lr()[0],
        **hard_stats,
    }


def location_sampling(run: Run, rows: list[int]) -> LocationSampling:
    """Hard attention's locations for a step's images: each image's generator seeded by (seed, step, image row),
    so its draws are the same on any rank and after a resume; each image takes the expected context instead with
    the paper's probability 0.5."""
    seeds = [((run.config.seed * 1_000_003 + run.progress.global_step) * 1_000_003 + row) % 2**63 for row in rows]
    return LocationSampling.seeded(seeds, expected_probability=EXPECTED_CONTEXT_PROBABILITY)


def _hard_attention_terms(run: Run, forced: TeacherForced, tokens: torch.Tensor, words: float):
    """The REINFORCE and entropy terms of hard attention's loss, with the baseline before this batch (the first
    batch: its own mean), then the baseline moved by this batch's mean log p(y | s, a) over every rank."""
    rewards = caption_log_likelihood(forced.log_probs.detach(), tokens)  # (N,) log p(y | s, a)
    sampled = (forced.locations >= 0).any(dim=1)  # (N,) captions whose locations were sampled
    reward_sum, count = global_sums(run.world_size, run.device, float(rewards[sampled].sum()), float(sampled.sum()))
    progress = run.progress
    mean = reward_sum / count if count else progress.reward_baseline
    baseline = progress.reward_baseline if progress.reward_baseline is not None else mean
    loss = hard_attention_loss(
        forced,
        tokens,
        baseline=0.0 if baseline is None else baseline,  # None: nothing sampled yet, so no REINFORCE term
        reinforce=run.config.reinforce_weight,
        entropy=run.config.entropy_weight,
        words=words / run.world_size,
    )
    if count:
        progress.reward_baseline = moving_average(progress.reward_baseline, mean)
    return loss, {"reward": mean, "baseline": baseline, "sampled_captions": int(count)}


def self_critical_step(run: Run, rows: list[int], *, cached: torch.Tensor | None = None) -> dict:
    """One SCST step: sample `scst_samples` captions per image (all of the batch's images at once), reward
    CIDEr-D, REINFORCE against the baseline (`scst_baseline`: the mean of the image's other samples, or its
    greedy caption's reward).

    Sampling runs without dropout: the policy improved is the one decoding uses (with dropout on, a Flickr8k
    model's samples were mostly word salad). The gradient is that of the sampling policy itself, the model
    renormalised over the words allowed at each step (see `rollout`); before that fix plain SCST collapsed
    on Flickr8k within ~100 steps. `scst_xe_weight` > 0 mixes in the references' cross-entropy
    (results/flickr8k_val_selection.json). A hard-attention model samples its words with the expected context,
    which is how it decodes: SCST improves that policy, and samples no locations.

    Besides the loss and mean reward it returns the samples' mean length in words and `sample_entropy`, the mean
    of -log p of the sampled words: a Monte Carlo estimate of the sampling policy's entropy per word (nats),
    which falls as the policy sharpens."""
    from show_attend_tell.decoding import once_mask, rollout
    from show_attend_tell.scst import CiderD, self_critical_loss
    from show_attend_tell.text import PAD_ID, tokenize

    run.model.eval()
    local = rows[run.rank :: run.world_size]
    samples, config = run.config.scst_samples, run.config
    if config.scst_document_frequency == "batch":  # the step's own references, as pycocoevalcap's scorer
        dataset = run.data.dataset
        cider = CiderD([[tokenize(c) for c in dataset.images[i].captions] for i in local])
        corpus_row = {image: n for n, image in enumerate(local)}
    else:  # the CIDEr-D corpus of every training image, in dataset.indices("train") order
        cider = run.cider
        corpus_row = {image: n for n, image in enumerate(run.data.dataset.indices("train"))}
    max_length = config.scst_max_length or config.max_caption_length
    once = once_mask(run.data.dataset.vocab).to(run.device) if config.once_words else None
    greedy_rewards = None
    with run.autocast():
        features = batch_features(run, local, train=True, cached=cached)
        encoded = run.model.decoder.encode(features)  # the `samples` rows of an image share its features
        tokens, log_probs, _, _ = rollout(
            run.model.decoder, encoded, max_length=max_length, sample=True, per_image=samples, once=once
        )  # (N, T) each
        captions = [run.data.dataset.vocab.decode(row) for row in tokens.tolist()]
        images = [corpus_row[image] for image in local for _ in range(samples)]
        rewards = torch.tensor([cider.score(w, i) for w, i in zip(captions, images, strict=True)])
        if config.scst_baseline == "greedy":
            with torch.no_grad():
                greedy = rollout(run.model.decoder, encoded, max_length=max_length, sample=False, once=once).tokens
            greedy_rewards = torch.tensor(
                [
                    cider.score(run.data.dataset.vocab.decode(row), corpus_row[image])
                    for row, image in zip(greedy.tolist(), local, strict=True)
                ]
            )
        mask = tokens != PAD_ID
        words, count, reward_sum, length_sum, surprise = global_sums(
            run.world_size,
            run.device,
            float(mask.sum()),
            float(len(captions)),
            float(rewards.sum()),
            float(sum(map(len, captions))),
            float(-(log_probs.detach().float() * mask).sum()),
        )
        loss = self_critical_loss(
            log_probs.float(),
            tokens,
            rewards.to(run.device),
            samples,
            words=words / run.world_size,
            baseline=None if greedy_rewards is None else greedy_rewards.to(run.device),
        )
        if config.scst_xe_weight > 0:
            references, lengths, owners = batch_captions(run, local)
            reference_words, reference_count = global_sums(
                run.world_size, run.device, float((lengths - 1).sum()), float(len(lengths))
            )
            forced = run.model(features, references, lengths, owners)
            cross_entropy, _ = caption_loss(
                forced.log_probs.float(),
                forced.alphas.float(),
                references,
                doubly_stochastic=config.doubly_stochastic,
                words=reference_words / run.world_size,
                captions_count=reference_count / run.world_size,
            )
            loss = loss + config.scst_xe_weight * cross_entropy
    _optimise(run, loss, inputs=(local, features))
    stats = {
        "loss": float(loss.detach()),
        "reward": reward_sum / count,
        "captions": int(count),
        "sample_length": length_sum / count,
        "sample_entropy": surprise / words,
        "lr": run.scheduler.get_last_lr()[0],
    }
    if greedy_rewards is not None:
        (greedy_sum,) = global_sums(run.world_size, run.device, float(greedy_rewards.sum()))
        stats["greedy_reward"] = greedy_sum / (count / samples)
    return stats


def _optimise(
    run: Run,
    loss: torch.Tensor,
    mark: Callable[[str], None] = _no_mark,
    *,
    inputs: tuple[list[int], torch.Tensor] | None = None,
) -> None:
    """Backward (scaled under AMP), gradients averaged over the ranks, clipped, one optimizer step. `inputs`:
    the step's image rows and their features, looked at when the loss is not finite."""
    if not torch.isfinite(loss):
        if inputs is not None:
            _check_features(run, *inputs)
        kept = (
            f"the last good checkpoint is kept in {run.run_dir / STATE_DIR}"
            if run.progress.saved_step >= 0
            else "nothing was saved yet"
        )
        raise NonFiniteLossError(
            f"loss is {loss.item()} at step {run.progress.global_step} (epoch {run.progress.epoch}); {kept}. "
            "Lower --decoder-lr or enable --grad-clip."
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    average_gradients(run.model.parameters(), run.world_size)
    mark("backward")
    run.scaler.unscale_(run.optimizer)
    if run.config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    mark("optimizer")


def _check_features(run: Run, rows: list[int], features: torch.Tensor) -> None:
    """A feature store holding nan or infinity is why a loss is not finite, whatever the learning rate."""
    bad = (~torch.isfinite(features.detach())).flatten(1).any(dim=1)  # (B,)
    if run.data_config.features and bool(bad.any()):
        names = [run.data.dataset.images[rows[i]].path.name for i in bad.nonzero().flatten().tolist()]
        raise InputError(
            f"{run.data_config.features}: the features of {len(names)} image(s) of step {run.progress.global_step} "
            f"are not finite (nan or infinity), e.g. {', '.join(names[:3])}: the store is corrupt; rebuild it "
            "with `sat features --overwrite`"
        )


# ----- validation ---------------------------------------------------------------------------------------------
def validate(run: Run) -> dict:
    """Decode the val split for real (each rank its share, through evaluate.decode) and score it with the
    coco-caption metrics on rank 0, beside what the captions are like (scst.caption_stats: distinct captions,
    vocabulary, length, repeated and dangling words); every rank gets the metrics."""
    from show_attend_tell.decoding import once_mask
    from show_attend_tell.evaluate import decode
    from show_attend_tell.metrics import score_captions
    from show_attend_tell.scst import caption_stats

    rows = run.data.dataset.indices("val")
    if run.config.val_max_images:
        rows = rows[: run.config.val_max_images]
    run.model.eval()
    mine = decode(
        run.model,
        lambda batch: batch_features(run, batch, train=False),
        rows[run.rank :: run.world_size],
        beam_size=run.config.val_beam_size,
        max_length=run.config.max_caption_length,
        progress=run.console and run.rank == 0,
        description="validation",
        once=once_mask(run.data.dataset.vocab).to(run.device) if run.config.once_words else None,
    )
    captions = {i: " ".join(run.data.dataset.vocab.decode(h.tokens)) for i, h in mine.items()}
    if run.world_size > 1:
        gathered: list[dict] = [{} for _ in range(run.world_size)]
        dist.all_gather_object(gathered, captions)
        captions = {k: v for part in gathered for k, v in part.items()}
    metrics = [None]
    if run.rank == 0:
        references = {i: run.data.dataset.images[i].captions for i in captions}
        metrics[0] = {**score_captions(captions, references, java=run.java), **caption_stats(list(captions.values()))}
    if run.world_size > 1:
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]


def log(run: Run, record: dict) -> None:
    if run.rank != 0:
        return
    # a train and a val record of the same step agree (progress.epoch has already moved on when the epoch-end
    # validation is logged)
    record = {"step": run.progress.global_step, "epoch": run.last_step_epoch, "time": round(time.time(), 3), **record}
    with open(run.run_dir / "log.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    if run.writer is None:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.run_dir / "tensorboard"))
    prefix = "val" if record.get("kind") == "val" else "train"
    for key, value in record.items():
        if isinstance(value, (int, float)) and key not in ("step", "epoch", "time"):
            run.writer.add_scalar(f"{prefix}/{key}", value, run.progress.global_step)
    run.writer.flush()


def after_validation(run: Run, metrics: dict) -> bool:
    """Log (and show) the metrics, keep the best checkpoint, and say whether to stop early."""
    progress, metric = run.progress, run.config.early_stop_metric
    value = float(metrics[metric])
    log(run, {"kind": "val", **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    if value > progress.best_metric:
        progress.best_metric, progress.best_step, progress.bad_validations = value, progress.global_step, 0
        if run.rank == 0:
            save_model(
                run.model,
                run.data.dataset.vocab,
                run.run_dir / BEST_DIR,
                encoder_sha256=run.encoder_sha256,
                extra={"train": to_dict(run.config), "step": progress.global_step, "val": metrics},
            )
            calibrate_int8_of(run, run.run_dir / BEST_DIR)
    else:
        progress.bad_validations += 1
    if run.console and run.rank == 0:
        shown = " ".join(f"{k} {metrics[k]:.1f}" for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if k in metrics)
        tqdm.write(
            f"epoch {run.last_step_epoch} step {progress.global_step} val: {shown} "
            f"(best {metric} {progress.best_metric:.1f} at step {progress.best_step})"
        )
    return progress.bad_validations >= run.config.patience


def calibrate_int8_of(run: Run, directory: Path) -> None:
    """Measure the int8 decoder's input ranges of the model as it is now (just saved in `directory` as the best)
    on CALIBRATION_IMAGES training photos, and store them there: `sat caption` then decodes the best checkpoint
    in int8 on CPU, as it does the shipped model, with no `sat calibrate` step. The Transformer decoder has no
    int8 version yet: it decodes in fp32."""
    from show_attend_tell.calibration import calibrate_decoder, calibration_sample
    from show_attend_tell.inference import int8_available

    if not int8_available(run.model.decoder):
        return
    rows = calibration_sample(run.data.train_rows, CALIBRATION_IMAGES, run.config.seed)

    def features(batch: list[int]) -> torch.Tensor:
        return batch_features(run, batch, train=False)

    calibrate_decoder(directory, run.model.decoder, rows, features, split="train", seed=run.config.seed)


# ----- the loop -----------------------------------------------------------------------------------------------
def fit(run: Run, *, max_steps: int | None = None, progress: bool = True) -> dict:
    """Train until the epochs are done, patience runs out, or the run has made `max_steps` steps in all
    (resumed ones included); the state is saved where it stops."""
    run.console = progress
    if run.lock is None:  # fitted before: its lock was let go when that ended
        run.lock = lock_run_dir(run.run_dir)
    try:
        with writing_to(run.run_dir):
            summary = _fit(run, max_steps)
    finally:
        if run.writer is not None:
            run.writer.close()
            run.writer = None
        if run.lock is not None:
            release(run.lock)
            run.lock = None
    end_process_group(run.world_size)
    return summary


def _fit(run: Run, max_steps: int | None) -> dict:
    state, config = run.progress, run.config
    stop = False
    if config.val_at_start and state.global_step == 0 and state.best_step < 0:  # not yet done (resume)
        after_validation(run, validate(run))
        save_state(run)
    while state.epoch < config.epochs and not stop:
        batches = batches_of_epoch(run, state.epoch)
        bar = tqdm(
            total=len(batches),
            initial=state.step_in_epoch,
            desc=f"epoch {state.epoch + 1}",
            disable=not run.console or run.rank != 0,
            unit="batch",
        )
        started, captions_seen = time.perf_counter(), 0
        step = self_critical_step if config.self_critical else cross_entropy_step
        cached = cached_batches(run, batches[state.step_in_epoch :])
        while state.step_in_epoch < len(batches):
            if max_steps is not None and state.global_step >= max_steps:
                bar.close()
                del cached  # stops the loader's processes
                if state.saved_step != state.global_step:
                    save_state(run)
                return {"stopped": "max_steps", "global_step": state.global_step}
            stats = step(run, batches[state.step_in_epoch], cached=next(cached))
            state.step_in_epoch += 1
            state.global_step += 1
            captions_seen += stats["captions"]
            stats["captions_per_second"] = captions_seen / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", cps=f"{stats['captions_per_second']:.0f}")
            if state.global_step % config.log_every_steps == 0:
                log(run, {"kind": "train", **stats})
            if config.val_every_steps and state.global_step % config.val_every_steps == 0:
                stop = after_validation(run, validate(run))
            if state.global_step % config.checkpoint_every_steps == 0:
                save_state(run)
            if stop:
                break
        bar.close()
        del cached
        if not stop:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if not config.val_every_steps:
                stop = after_validation(run, validate(run))
            save_state(run)
    save_state(run)
    return {"stopped": "early" if stop else "epochs", "global_step": state.global_step, "best": state.best_metric}
