"""What recipes/coco2014.sh costs on COCO 2014, per stage: disk, CPU hours here, GPU hours under stated assumptions.

Measured here, per unit of work, with the real code on random weights and inputs of COCO's shapes (448 px
photos, the 14x14 x 2048 grid, a 10,000-word vocabulary, 12-word captions):
- floating-point operations (torch.utils.flop_counter: matrix multiplies and convolutions, 2 per multiply-add),
  which do not depend on the machine: the encoder per photo (ResNet-50 and ResNet-101), a cross-entropy step
  per caption (forward and backward), an SCST step per image (5 sampled captions of up to 20 words, forward
  and backward), beam search per image at beams 1, 3 and 7;
- the operators each batch dispatches, forward and backward (on a GPU, a kernel each);
- seconds on this CPU for the same work (2 threads), and for decoding and resizing a photo (the data loader's
  part of feature extraction, which a GPU does not speed up).
Then each stage's total for COCO's counts, in CPU hours here and in GPU hours assuming a GPU that sustains
--gpu-tflops x --encoder-efficiency on the encoder and x --decoder-efficiency on the decoder (an LSTM's small
sequential matrix multiplies keep a GPU far from its peak), or at least --launch-microseconds per operator
when that is longer (the LSTM's steps launch many small kernels), and the disk each stage writes.

    flock -x /work/bench.lock python benchmarks/coco2014_costs.py --out results/coco2014_costs.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from harness import REPO, begin_record, benchmark_parser, finish, interleaved, median
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from show_attend_tell.config import ModelConfig
from show_attend_tell.decoding import beam_search, rollout
from show_attend_tell.model import CaptionModel, Encoder, caption_loss

# COCO 2014, Karpathy's split (README, Datasets)
COCO = {"images": 123_287, "train_images": 113_287, "val_images": 5_000, "test_images": 5_000, "captions_per_image": 5}
COCO_VOCAB = 10_000  # words seen at least 5 times in Karpathy's train split: about 9,500 (+ 4 special tokens)
CAPTION_WORDS = 12  # COCO captions average about 10.5 words; <start>/<end> and the longest make it 12 tokens read
PHOTO_BYTES = 19e9  # train2014.zip 13 GB + val2014.zip 6 GB as published on the COCO site (JPEGs, unpacked alike)


def flops(work) -> int:
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


class _Operators(TorchDispatchMode):
    """Counts the operators a piece of work dispatches (forward and backward): on a GPU, one kernel each."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operators(work) -> int:
    with _Operators() as counter:
        work()
    return counter.count


def seconds(work, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    return median(interleaved({"work": lambda _: work()}, repeats, warmup=1).seconds["work"])


def main() -> int:
    parser = benchmark_parser(__doc__, record="coco2014_costs.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--xe-epochs", type=int, default=20)
    parser.add_argument("--scst-epochs", type=int, default=10)
    parser.add_argument("--gpu-tflops", type=float, default=312.0, help="peak fp16/bf16 dense: an A100's 312")
    parser.add_argument("--encoder-efficiency", type=float, default=0.35)
    parser.add_argument("--decoder-efficiency", type=float, default=0.10)
    parser.add_argument("--launch-microseconds", type=float, default=10.0, help="GPU time per operator at least")
    examples = REPO / "examples"
    parser.add_argument("--photo", default=str(examples / "flickr8k_2677656448_6b7e7702af.jpg"), help="a 500x375 JPEG")
    args = parser.parse_args()
    torch.set_num_threads(2)
    record = begin_record(args)
    torch.manual_seed(0)
    per_unit: dict[str, dict] = {}

    # the encoder, per photo at 448 px (batches of 4)
    photos = torch.randn(4, 3, 448, 448)
    for name in ("resnet50", "resnet101"):
        config = ModelConfig(vocab_size=COCO_VOCAB, encoder=name, image_size=448, grid_size=14)
        encoder = Encoder(config, pretrained=False).eval()
        with torch.no_grad():
            per_unit[f"encoder_{name}"] = {
                "unit": "photo",
                "flops": flops(lambda encoder=encoder: encoder(photos[:1])),
                "operators_per_batch": operators(lambda encoder=encoder: encoder(photos)),
                "cpu_seconds": seconds(lambda encoder=encoder: encoder(photos), args.repeats) / len(photos),
            }
        print(name, per_unit[f"encoder_{name}"], flush=True)
    from show_attend_tell.images import load_image
    from show_attend_tell.weights import image_transform

    photo = Path(args.photo)
    with Image.open(photo) as opened:
        size = opened.size
    config = ModelConfig(vocab_size=COCO_VOCAB, image_size=448, grid_size=14)
    transform = image_transform(config)
    per_unit["photo_decode_resize"] = {
        "unit": "photo",
        "photo": f"{photo.name} ({size[0]}x{size[1]})",
        "cpu_seconds": seconds(lambda: transform(load_image(photo)), args.repeats * 5),
    }

    # the decoder: cross-entropy step per caption, SCST step per image, beam search per image
    model = CaptionModel(config)
    images = 20
    features = torch.randn(images, 196, 2048).relu()
    captions = torch.randint(4, COCO_VOCAB, (images * 5, CAPTION_WORDS))
    captions[:, 0], captions[:, -1] = 1, 2
    lengths = torch.full((images * 5,), CAPTION_WORDS)
    owners = torch.arange(images).repeat_interleave(5)

    def cross_entropy() -> None:
        forced = model(features, captions, lengths, owners)
        loss, _ = caption_loss(forced.log_probs, forced.alphas, captions)
        loss.backward()

    model.train()
    per_unit["train_xe"] = {
        "unit": "caption",
        "flops": flops(cross_entropy) // len(captions),
        "operators_per_batch": operators(cross_entropy),
        "cpu_seconds": seconds(cross_entropy, args.repeats) / len(captions),
    }
    print("xe", per_unit["train_xe"], flush=True)

    def self_critical() -> None:
        encoded = model.decoder.encode(features)
        _, log_probs, _, _ = rollout(model.decoder, encoded, max_length=20, sample=True, per_image=5)
        log_probs.sum().backward()

    model.eval()
    per_unit["train_scst"] = {
        "unit": "image (5 samples)",
        "flops": flops(self_critical) // images,
        "operators_per_batch": operators(self_critical),
        "cpu_seconds": seconds(self_critical, args.repeats) / images,
    }
    print("scst", per_unit["train_scst"], flush=True)
    for beam in (1, 3, 7):

        def decode(beam=beam) -> None:
            with torch.no_grad():
                beam_search(model.decoder, model.decoder.encode(features), beam_size=beam, max_length=20)

        per_unit[f"decode_beam{beam}"] = {
            "unit": "image",
            "flops": flops(decode) // images,
            "operators_per_batch": operators(decode),
            "cpu_seconds": seconds(decode, args.repeats) / images,
        }
        print(f"beam {beam}", per_unit[f"decode_beam{beam}"], flush=True)

    # each stage's totals on COCO
    def hours(unit: str, count: float, efficiency: float, batch: int) -> dict:
        """CPU hours here; GPU hours: per batch of `batch` units the longer of its operations at the assumed rate
        and its kernels at the assumed launch time (an LSTM's small steps are bound by the launches)."""
        cost = per_unit[unit]
        batches = count / batch
        compute = cost["flops"] * batch / (args.gpu_tflops * 1e12 * efficiency)
        launches = cost["operators_per_batch"] * args.launch_microseconds * 1e-6
        return {
            "cpu_hours_here": round(cost["cpu_seconds"] * count / 3600, 2),
            "gpu_hours": round(batches * max(compute, launches) / 3600, 3),
            "gpu_bound_by": "kernel launches" if launches > compute else "arithmetic",
        }

    def combined(*parts: dict) -> dict:
        totals = {key: round(sum(part[key] for part in parts), 3) for key in ("cpu_hours_here", "gpu_hours")}
        return {**totals, "gpu_bound_by": parts[0]["gpu_bound_by"]}

    train_captions = COCO["train_images"] * COCO["captions_per_image"]
    val = COCO["val_images"]
    store = {
        "14x14_fp16": COCO["images"] * 196 * 2048 * 2,
        "14x14_fp32": COCO["images"] * 196 * 2048 * 4,
        "7x7_fp16": COCO["images"] * 49 * 2048 * 2,
        "14x14_projected_512_fp16": COCO["images"] * 196 * 512 * 2,
    }
    enc, dec = args.encoder_efficiency, args.decoder_efficiency
    stages = {
        "features_resnet101": {
            **hours("encoder_resnet101", COCO["images"], enc, 64),
            "photo_decoding_cpu_core_hours": round(
                per_unit["photo_decode_resize"]["cpu_seconds"] * COCO["images"] / 3600, 2
            ),
            "disk_gb": round(store["14x14_fp16"] / 1e9, 1),
        },
        "features_resnet50": {**hours("encoder_resnet50", COCO["images"], enc, 64)},
        "train_xe": {
            **combined(
                hours("train_xe", train_captions * args.xe_epochs, dec, 500),
                hours("decode_beam1", val * args.xe_epochs, dec, 50),
            ),
            "epochs": args.xe_epochs,
            "note": "with a beam-1 validation of 5,000 images per epoch",
        },
        "train_scst": {
            **combined(
                hours("train_scst", COCO["train_images"] * args.scst_epochs, dec, 50),
                hours("decode_beam1", val * args.scst_epochs, dec, 50),
            ),
            "epochs": args.scst_epochs,
        },
        "evaluate_test_beams_3_and_7": combined(
            hours("decode_beam3", COCO["test_images"], dec, 50), hours("decode_beam7", COCO["test_images"], dec, 50)
        ),
    }
    record.update(
        assumptions={
            "coco": COCO,
            "vocabulary": COCO_VOCAB,
            "tokens_per_training_caption": CAPTION_WORDS,
            "scst_samples": "5 per image, each the full 20 words (an upper bound: real samples end sooner)",
            "gpu": f"{args.gpu_tflops} TFLOP/s peak (fp16/bf16 dense, an A100), sustaining {enc:.0%} of it on the "
            f"encoder and {dec:.0%} on the decoder; each operator (kernel) takes at least "
            f"{args.launch_microseconds} microseconds (eager PyTorch's launch and dispatch cost), and a batch "
            "takes the longer of its arithmetic and its launches",
            "gpu_batches": "encoder 64 photos, cross-entropy 500 captions, SCST 50 images, decoding 50 images "
            "(recipes/coco2014.sh, evaluate.decode); operators counted at smaller batches (their number does not "
            "depend on the batch)",
            "photos_on_disk_gb": PHOTO_BYTES / 1e9,
            "flops": "torch.utils.flop_counter: matrix multiplies and convolutions only (2 per multiply-add)",
        },
        per_unit=per_unit,
        stages=stages,
        disk_gb={name: round(size / 1e9, 1) for name, size in store.items()} | {"photos": PHOTO_BYTES / 1e9},
    )
    return finish(record, args.out)


if __name__ == "__main__":
    sys.exit(main())
