"""Show, Attend and Tell: image captioning with a ResNet encoder, soft attention and an LSTM decoder."""

__version__ = "0.1.0"
