"""ditkit: train, sample, evaluate and serve Diffusion Transformers.

    import ditkit
    m = ditkit.load("runs/demo")
    images = m.generate(labels=[3, 7], steps=20, seed=0)   # uint8 (2, 28, 28, 1)
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load", "Model", "SamplingSettings"]


def __getattr__(name: str):
    # the API loads torch; importing ditkit alone (the CLI's --help) stays light
    if name in ("load", "Model"):
        from . import api

        return getattr(api, name)
    if name == "SamplingSettings":
        from .settings import SamplingSettings

        return SamplingSettings
    raise AttributeError(f"module 'ditkit' has no attribute {name!r}")
