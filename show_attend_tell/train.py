"""Training: cross-entropy with teacher forcing, real-decoding validation, exact resume, torchrun DDP.

A run directory holds `config.json` (the resolved configuration), `log.jsonl` (one JSON object per logged
step and per validation), TensorBoard scalars under `tensorboard/`, the resumable state under `last/` and the
best checkpoint (by the early-stopping metric) under `best/`, loadable by `checkpoint.load_model`.

Batches are groups of whole images with all their captions, so each image's attention projection is shared
by its captions. The data order of epoch e is a permutation seeded by (seed, e); with the step within the
epoch, the model, optimizer, scheduler and RNG states, that is everything needed to continue exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from show_attend_tell.checkpoint import _atomic, check_model_config, load_encoder_state, model_tensors, save_model
from show_attend_tell.config import ModelConfig, TrainConfig, check_train_config, from_dict, save_json, to_dict
from show_attend_tell.errors import InputError
from show_attend_tell.evaluate import evaluate
from show_attend_tell.model import CaptionModel, Encoder, caption_loss
from show_attend_tell.prepare import PreparedDataset

STATE_DIR = "last"
BEST_DIR = "best"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class DataConfig:
    """Where the training data is: a prepared dataset and (for a frozen encoder) its feature store."""

    prepared: str
    # empty: read images and run the encoder; else a `sat features` store: grid features (frozen encoder), or
    # the output of a block (--stage) when fine-tuning the blocks after it
    features: str = ""
    captions_per_image: int = 5  # how many of each image's captions a batch uses (the first ones)
    limit: int = 0  # > 0: only the first `limit` images of each split (`--limit`, quick experiments)


def distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise; initialises the process group once."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def exit_worker(code: int = 0):
    """End a torchrun worker whose work is saved, skipping the interpreter's teardown.

    DDP's reducer keeps the process group, and gloo's threads with it, alive past destroy_process_group. Their
    destruction during teardown aborted a worker now and then (SIGABRT, "terminate called without an active
    exception"; 3 of about 60 runs of the two-process test on 2026-11-26) after training had finished, and
    torchrun then reported the run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def epoch_batches(image_rows: list[int], caption_rows: dict[int, list[int]], batch_size: int, epoch: int, seed: int):
    """One epoch's batches: lists of image rows, each list holding about batch_size captions."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = [image_rows[i] for i in torch.randperm(len(image_rows), generator=generator).tolist()]
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


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """One training run. Build with `Trainer.create` (new run) or `Trainer.resume` (existing run)."""

    def __init__(
        self,
        run_dir: Path,
        model_config: ModelConfig,
        train_config: TrainConfig,
        data: DataConfig,
        *,
        pretrained_encoder: bool = True,
        device: str = "cpu",
        java: bool | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.java = java  # None: use Java (PTB tokenizer, METEOR) when it works
        self.model_config, self.config, self.data = model_config, train_config, data
        self.rank, self.world_size = distributed()
        self.device = torch.device(device)
        self.dataset = PreparedDataset.load(data.prepared, limit=data.limit)
        self.vocab = self.dataset.vocab
        torch.manual_seed(train_config.seed)
        from show_attend_tell.features import load_for_model, store_stage

        encoder = None
        # a store of a block's output (not grid features) leaves the rest of the trunk to run in training
        if not data.features or model_config.fine_tune_blocks or store_stage(data.features):
            encoder = Encoder(model_config, pretrained=pretrained_encoder)
        from show_attend_tell.weights import ENCODER_WEIGHTS

        self.encoder_sha256 = ENCODER_WEIGHTS[model_config.encoder].sha256() if pretrained_encoder else "untrained"
        self.model = CaptionModel(model_config, encoder=encoder).to(self.device)
        self.features, self.stage = None, ""
        if data.features:
            paths = [image.path for image in self.dataset.images]
            self.features, self.stage = load_for_model(data.features, model_config, paths, self.encoder_sha256, encoder)
        if train_config.init_from:
            from show_attend_tell.checkpoint import load_model, read_config

            # a decoder that learned on fine-tuned blocks starts with them, and goes on tuning them
            inherited = tuple(read_config(train_config.init_from)["model"].get("fine_tune_blocks", ()))
            if not set(inherited) <= set(model_config.fine_tune_blocks):
                raise InputError(
                    f"{train_config.init_from}: its decoder learned on an encoder with {' '.join(inherited)} "
                    f"fine-tuned; fine-tune them here too (--fine-tune-blocks {' '.join(inherited)})"
                )
            initial, _, _ = load_model(
                train_config.init_from, with_encoder=bool(inherited), pretrained_encoder=pretrained_encoder
            )
            self.model.decoder.load_state_dict(initial.decoder.state_dict())
            if inherited:
                prefixes = tuple(initial.encoder.tuned_prefixes())
                tuned = {k: v for k, v in initial.encoder.state_dict().items() if k.startswith(prefixes)}
                self.model.encoder.load_state_dict(tuned, strict=False)
        self.cider = None
        if train_config.self_critical:
            from show_attend_tell.scst import CiderD
            from show_attend_tell.text import tokenize

            # rows of the CIDEr-D corpus are the training images, in train_rows order
            self.cider_row = {image: n for n, image in enumerate(self.dataset.indices("train"))}
            self.cider = CiderD(
                [[tokenize(c) for c in self.dataset.images[i].captions] for i in self.dataset.indices("train")]
            )
        groups = [{"params": list(self.model.decoder.parameters()), "lr": train_config.decoder_lr}]
        if encoder is not None and model_config.fine_tune_blocks:
            tuned = [p for p in encoder.parameters() if p.requires_grad]
            groups.append({"params": tuned, "lr": train_config.encoder_lr})
        self.optimizer = torch.optim.Adam(groups, weight_decay=train_config.weight_decay)
        self.train_rows = self.dataset.indices("train")
        captions_by_image: dict[int, list[int]] = {}
        for caption, image in enumerate(self.dataset.image_index.tolist()):
            captions_by_image.setdefault(image, []).append(caption)
        self.caption_rows = {i: rows[: data.captions_per_image] for i, rows in captions_by_image.items()}
        self.train_rows = [i for i in self.train_rows if self.caption_rows.get(i)]
        self.steps_per_epoch = len(
            epoch_batches(self.train_rows, self.caption_rows, train_config.batch_size, 0, train_config.seed)
        )
        self.total_steps = self.steps_per_epoch * train_config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, train_config)
        )
        self.ddp_model = self.model
        if self.world_size > 1 and not train_config.self_critical:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model)
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_metric, self.bad_validations = float("-inf"), 0
        self.writer = None

    # ----- construction -------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        run_dir: str | Path,
        model_config: ModelConfig,
        train_config: TrainConfig,
        data: DataConfig,
        **kwargs,
    ) -> Trainer:
        run_dir = Path(run_dir)
        if (run_dir / STATE_DIR).exists():
            raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
        trainer = cls(run_dir, model_config, train_config, data, **kwargs)
        if trainer.rank == 0:
            check_writable(run_dir)
            with writing_to(run_dir):
                save_json(trainer.resolved_config(), run_dir / "config.json")
        return trainer

    @classmethod
    def resume(cls, run_dir: str | Path, **kwargs) -> Trainer:
        run_dir = Path(run_dir)
        state_dir = run_dir / STATE_DIR
        if not (state_dir / "state.json").is_file():
            raise FileNotFoundError(f"{run_dir}: no resumable state ({STATE_DIR}/state.json missing)")
        if distributed()[0] == 0:
            check_writable(run_dir)
        config_path = run_dir / "config.json"
        try:
            resolved = json.loads(config_path.read_text(encoding="utf-8"))
            parts = (resolved["model"], resolved["train"], resolved["data"])
            configs = (
                check_model_config(parts[0], str(config_path)),
                from_dict(TrainConfig, parts[1]),
                from_dict(DataConfig, parts[2]),
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{config_path}: not a readable JSON file ({error})") from None
        except (TypeError, ValueError, KeyError) as error:
            raise InputError(f"{config_path}: not the config of a run ({type(error).__name__}: {error})") from None
        check_train_config(configs[1], str(config_path))
        trainer = cls(run_dir, *configs, **kwargs)
        trainer.load_state(state_dir)
        return trainer

    def resolved_config(self) -> dict:
        return {
            "model": to_dict(self.model_config),
            "train": to_dict(self.config),
            "data": to_dict(self.data),
            "encoder_sha256": self.encoder_sha256,
            "world_size": self.world_size,
        }

    # ----- state --------------------------------------------------------------------------------------------
    def save_state(self) -> None:
        """All that is needed to continue exactly, atomically: tensors as safetensors, the rest JSON."""
        if self.rank != 0:
            return
        with writing_to(self.run_dir):
            self._save_state()

    def _save_state(self) -> None:
        directory = self.run_dir / STATE_DIR
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_tensors(self.model).items()}
        optimizer = self.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            for key, value in values.items():
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        state = {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "bad_validations": self.bad_validations,
            "param_groups": optimizer["param_groups"],
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "scaler": self.scaler.state_dict(),
        }
        _atomic(directory / "state.safetensors", lambda p: save_file(tensors, p))
        _atomic(directory / "state.json", lambda p: save_json(state, p))

    def load_state(self, directory: Path) -> None:
        tensors = load_file(directory / "state.safetensors")
        state = json.loads((directory / "state.json").read_text())
        model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.decoder.load_state_dict(
            {k[len("decoder.") :]: v for k, v in model.items() if k.startswith("decoder.")}
        )
        if self.model.encoder is not None and self.model_config.fine_tune_blocks:
            load_encoder_state(
                self.model.encoder,
                {k[len("encoder.") :]: v for k, v in model.items() if k.startswith("encoder.")},
                directory / "state.safetensors",
            )
        optimizer_state: dict[int, dict] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                optimizer_state.setdefault(int(index), {})[key] = value
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["param_groups"]})
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **state["scheduler"]})
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best_metric, self.bad_validations = state["best_metric"], state["bad_validations"]
        self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop log lines written after the state we resume from, so the log tells one consistent story."""
        path = self.run_dir / "log.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.global_step]
        path.write_text("".join(line + "\n" for line in kept))

    # ----- data ---------------------------------------------------------------------------------------------
    def batch_features(self, rows: list[int], *, train: bool) -> torch.Tensor:
        """(B, P, E) float features for image rows: from the cache, or by running the encoder on images."""
        if self.features is not None:
            cached = self.features[rows].to(self.device, non_blocking=True).float()
            if not self.stage:
                return cached
            return self.model.encoder.forward_from(cached, self.stage)
        from show_attend_tell.evaluate import image_features

        paths = [self.dataset.images[i].path for i in rows]
        if train and self.model_config.fine_tune_blocks:
            images = torch.stack([self.augment(path) for path in paths]).to(self.device)
            if self.amp:
                images = images.to(memory_format=torch.channels_last)
            return self.model.encoder(images)
        return image_features(self.model, paths, self.device)

    def augment(self, path: Path) -> torch.Tensor:
        """Light augmentation for encoder fine-tuning: a mild random crop and colour jitter (no flips: they
        swap 'left' and 'right')."""
        from torchvision import transforms

        from show_attend_tell.images import load_image
        from show_attend_tell.weights import ENCODER_WEIGHTS

        weights = ENCODER_WEIGHTS[self.model_config.encoder]
        size = self.model_config.image_size
        transform = transforms.Compose(
            [
                transforms.RandomResizedCrop((size, size), scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                transforms.ColorJitter(0.1, 0.1, 0.1),
                transforms.ToTensor(),
                transforms.Normalize(weights.mean, weights.std),
            ]
        )
        return transform(load_image(path))

    def batch_captions(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions of the image rows -> tokens (N, T), lengths (N,), image_index (N,) into `rows`."""
        captions, owners = [], []
        for position, image in enumerate(rows):
            captions += self.caption_rows[image]
            owners += [position] * len(self.caption_rows[image])
        index = torch.tensor(captions)
        lengths = self.dataset.lengths[index]
        tokens = self.dataset.tokens[index][:, : int(lengths.max())].long()
        return tokens.to(self.device), lengths.to(self.device), torch.tensor(owners, device=self.device)

    # ----- loop ---------------------------------------------------------------------------------------------
    def train_step(self, rows: list[int]) -> dict:
        """One optimisation step on a global batch of image rows (this rank takes its share)."""
        self.ddp_model.train()
        local = rows[self.rank :: self.world_size]
        tokens, lengths, owners = self.batch_captions(local)
        words_here = float((lengths - 1).sum())
        totals = torch.tensor([words_here, float(len(lengths))])
        if self.world_size > 1:
            dist.all_reduce(totals)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            features = self.batch_features(local, train=True)
            log_probs, alphas = self.ddp_model(features, tokens, lengths, owners)
            loss, cross_entropy = caption_loss(
                log_probs.float(),
                alphas.float(),
                tokens,
                doubly_stochastic=self.config.doubly_stochastic,
                label_smoothing=self.config.label_smoothing,
                words=float(totals[0]) / self.world_size,
                captions_count=float(totals[1]) / self.world_size,
            )
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.global_step} (epoch {self.epoch}); the last good "
                f"checkpoint is kept in {self.run_dir / STATE_DIR}. Lower --lr or enable --grad-clip."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        stats = torch.tensor([float(cross_entropy) * words_here, float(loss.detach())])
        if self.world_size > 1:
            dist.all_reduce(stats)
        return {
            "loss": float(stats[1]) / self.world_size,
            "cross_entropy": float(stats[0]) / float(totals[0]),
            "captions": int(totals[1]),
            "lr": self.scheduler.get_last_lr()[0],
        }

    def self_critical_step(self, rows: list[int]) -> dict:
        """One SCST step: sample `scst_samples` captions per image, reward CIDEr-D, REINFORCE.

        Sampling runs without dropout: the policy improved is the one decoding uses (with dropout on, a Flickr8k
        model's samples were mostly word salad). The gradient is that of the sampling policy itself, the model
        renormalised over the words allowed at each step (see `rollout`); before that fix plain SCST collapsed
        on Flickr8k within ~100 steps. `scst_xe_weight` > 0 mixes in the references' cross-entropy
        (results/flickr8k_val_selection.json)."""
        from show_attend_tell.decoding import rollout
        from show_attend_tell.scst import self_critical_loss

        self.model.eval()
        local = rows[self.rank :: self.world_size]
        samples = self.config.scst_samples
        features = self.batch_features(local, train=True)
        encoded = self.model.decoder.encode(features)  # the `samples` rows of an image share its features
        tokens, log_probs, _ = rollout(
            self.model.decoder, encoded, max_length=self.config.max_caption_length, sample=True, per_image=samples
        )  # (N, T) each
        captions = [self.vocab.decode(row) for row in tokens.tolist()]
        images = [self.cider_row[image] for image in local for _ in range(samples)]
        rewards = torch.tensor([self.cider.score(w, i) for w, i in zip(captions, images, strict=True)])
        words_here = float((tokens != 0).sum())
        totals = torch.tensor([words_here, float(len(captions)), float(rewards.sum())])
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss = self_critical_loss(
            log_probs, tokens, rewards.to(self.device), samples, words=float(totals[0]) / self.world_size
        )
        if self.config.scst_xe_weight > 0:
            references, lengths, owners = self.batch_captions(local)
            reference_totals = torch.tensor([float((lengths - 1).sum()), float(len(lengths))])
            if self.world_size > 1:
                dist.all_reduce(reference_totals)
            cross_entropy, _ = caption_loss(
                *self.model(features, references, lengths, owners),
                references,
                doubly_stochastic=self.config.doubly_stochastic,
                words=float(reference_totals[0]) / self.world_size,
                captions_count=float(reference_totals[1]) / self.world_size,
            )
            loss = loss + self.config.scst_xe_weight * cross_entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:
            # SCST decodes outside forward(), so gradients (tuned encoder blocks' too) are averaged by hand
            for parameter in self.model.parameters():
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= self.world_size
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return {
            "loss": float(loss.detach()),
            "reward": float(totals[2]) / float(totals[1]),
            "captions": int(totals[1]),
            "lr": self.scheduler.get_last_lr()[0],
        }

    def validate(self) -> dict:
        """Decode the val split for real (split across ranks) and score it with the coco-caption metrics."""
        from show_attend_tell.evaluate import decode

        rows = self.dataset.indices("val")
        if self.config.val_max_images:
            rows = rows[: self.config.val_max_images]

        def features(batch_rows: list[int]) -> torch.Tensor:
            return self.batch_features(batch_rows, train=False)

        self.model.eval()
        if self.world_size == 1:
            metrics, _ = evaluate(
                self.model,
                self.vocab,
                features,
                rows,
                {i: self.dataset.images[i].captions for i in rows},
                beam_size=self.config.val_beam_size,
                max_length=self.config.max_caption_length,
                progress=False,
                java=self.java,
            )
            return metrics
        from show_attend_tell.metrics import score_captions

        mine = decode(
            self.model,
            features,
            rows[self.rank :: self.world_size],
            beam_size=self.config.val_beam_size,
            max_length=self.config.max_caption_length,
            progress=False,
        )
        captions = {i: " ".join(self.vocab.decode(h.tokens)) for i, h in mine.items()}
        gathered: list[dict] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, captions)
        metrics = [None]
        if self.rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            metrics[0] = score_captions(merged, {i: self.dataset.images[i].captions for i in merged}, java=self.java)
        dist.broadcast_object_list(metrics, src=0)
        return metrics[0]

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        # "epoch" counts from 1 and is the epoch of the last step taken, so a train and a val record of the same
        # step agree (self.epoch has already moved on when the epoch-end validation is logged)
        epoch = -(-self.global_step // self.steps_per_epoch)
        record = {"step": self.global_step, "epoch": epoch, "time": round(time.time(), 3), **record}
        with open(self.run_dir / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        prefix = "val" if record.get("kind") == "val" else "train"
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch", "time"):
                self.writer.add_scalar(f"{prefix}/{key}", value, self.global_step)
        self.writer.flush()

    def after_validation(self, metrics: dict) -> bool:
        """Log, keep the best checkpoint, and say whether to stop early."""
        value = float(metrics[self.config.early_stop_metric])
        self.log({"kind": "val", **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        if value > self.best_metric:
            self.best_metric, self.bad_validations = value, 0
            if self.rank == 0:
                save_model(
                    self.model,
                    self.vocab,
                    self.run_dir / BEST_DIR,
                    encoder_sha256=self.encoder_sha256,
                    extra={"train": to_dict(self.config), "step": self.global_step, "val": metrics},
                )
        else:
            self.bad_validations += 1
        return self.bad_validations >= self.config.patience

    def fit(self, *, max_steps: int | None = None, progress: bool = True) -> dict:
        """Train until the epochs are done, patience runs out, or `max_steps` more steps have run."""
        with writing_to(self.run_dir):
            summary = self._fit(max_steps=max_steps, progress=progress)
        if self.world_size > 1:  # a rank that exits while another still saves can abort in gloo's teardown
            dist.barrier()
            dist.destroy_process_group()
        return summary

    def _fit(self, *, max_steps: int | None, progress: bool) -> dict:
        steps_run = 0
        stop = False
        while self.epoch < self.config.epochs and not stop:
            batches = epoch_batches(
                self.train_rows, self.caption_rows, self.config.batch_size, self.epoch, self.config.seed
            )
            bar = tqdm(
                total=len(batches),
                initial=self.step_in_epoch,
                desc=f"epoch {self.epoch + 1}",
                disable=not progress or self.rank != 0,
                unit="batch",
            )
            started, captions_seen = time.perf_counter(), 0
            while self.step_in_epoch < len(batches):
                if max_steps is not None and steps_run >= max_steps:
                    bar.close()
                    return {"stopped": "max_steps", "global_step": self.global_step}
                step = self.self_critical_step if self.config.self_critical else self.train_step
                stats = step(batches[self.step_in_epoch])
                self.step_in_epoch += 1
                self.global_step += 1
                steps_run += 1
                captions_seen += stats["captions"]
                stats["captions_per_second"] = captions_seen / (time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", cps=f"{stats['captions_per_second']:.0f}")
                if self.global_step % self.config.log_every_steps == 0:
                    self.log({"kind": "train", **stats})
                if self.config.val_every_steps and self.global_step % self.config.val_every_steps == 0:
                    stop = self.after_validation(self.validate())
                if self.global_step % self.config.checkpoint_every_steps == 0:
                    self.save_state()
                if stop:
                    break
            bar.close()
            if not stop:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                if not self.config.val_every_steps:
                    stop = self.after_validation(self.validate())
                self.save_state()
        self.save_state()
        if self.writer is not None:
            self.writer.close()
        return {
            "stopped": "early" if stop else "epochs",
            "global_step": self.global_step,
            "best": self.best_metric,
        }
