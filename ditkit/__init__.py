"""ditkit: train, sample, evaluate and serve Diffusion Transformers."""

__version__ = "0.1.0"
