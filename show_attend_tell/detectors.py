"""The one factory of COCO detectors: a `detector.Detector` by name, for the captioner, evaluation and the CLI.

It sits above the implementations (detector.py: the CenterNet and torchvision's; nanodet.py, which builds on
detector.py's pieces) so that none of them imports another's loader.
"""

from __future__ import annotations

import torch

from show_attend_tell.detector import CenterNetDetector, Detector, TorchvisionDetector
from show_attend_tell.errors import InputError
from show_attend_tell.nanodet import NanoDetDetector

DETECTORS = ("centernet", "nanodet", "fasterrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large")


def load_detector(name: str, device: str | torch.device = "cpu", precision: str = "auto") -> Detector:
    """The configured detector by name (DETECTORS): the one place that picks an implementation. precision: the
    CenterNet's and the NanoDet's ("auto": bf16 where the CPU has native bf16, as fast_encoder.resolve_precision
    decides)."""
    if name == "centernet":
        return CenterNetDetector.load(device, precision)
    if name == "nanodet":
        return NanoDetDetector.load(device, precision)
    if name in DETECTORS:
        return TorchvisionDetector.load(name, device)
    raise InputError(f"detector {name!r}: choose one of {', '.join(DETECTORS)}")
