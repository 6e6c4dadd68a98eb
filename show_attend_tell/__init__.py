"""Show, Attend and Tell: image captioning with a ResNet encoder, soft attention and an LSTM decoder.

from show_attend_tell import Captioner
caption = Captioner.load().caption("photo.jpg")
"""

__version__ = "0.1.0"
__all__ = ["Caption", "Captioner", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `sat --help` and light imports do not pay for importing torch.
    if name in ("Caption", "Captioner"):
        from show_attend_tell import captioner

        return getattr(captioner, name)
    raise AttributeError(f"module 'show_attend_tell' has no attribute {name!r}")
