"""The Python API a user learns in a minute:

    import ditkit
    m = ditkit.load("runs/demo")                         # a run folder (its latest checkpoint, EMA weights)
    images = m.generate(labels=[3, 7], steps=20, seed=0)  # uint8 (2, 28, 28, 1)
    pics = m.generate(labels=[3, 7], as_pil=True)         # PIL images

`generate`'s keywords beyond labels, prompts, num, seed and batch_size are sampling settings
(`ditkit.SamplingSettings` fields: sampler, steps, cfg_scale, autoguidance, guidance_interval, reject, ...);
those not given come from the run's tuned setting (`ditkit tune`) where it has one, else the untuned default.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from .runs import LoadedModel, load_model, read_tuned_setting
from .sampling import default_settings, generate
from .settings import SamplingSettings


class Model:
    """A trained run, ready to draw images. `.loaded` is the underlying `runs.LoadedModel`."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        tuned = read_tuned_setting(loaded.run_dir) if loaded.run_dir is not None else None
        self.settings: SamplingSettings = tuned or default_settings(loaded)  # what generate() starts from

    @property
    def num_classes(self) -> int:
        return self.loaded.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.loaded.image_shape

    def generate(self, labels: Optional[Sequence[int] | str] = None, *, prompts: Optional[Sequence[str]] = None,
                 num: Optional[int] = None, seed: int = 0, batch_size: int = 100, as_pil: bool = False,
                 settings: Optional[SamplingSettings] = None, **changes: Any) -> np.ndarray | list:
        """Images for `labels` (a list of class ids, one image each; a spec like "all" with `num`) or
        `prompts` (text models). Returns uint8 (N, H, W, C), or a list of PIL images with `as_pil`.
        Image i depends only on (seed, i, its label or prompt, the settings)."""
        if num is None:
            if prompts is not None:
                num = 1 if isinstance(prompts, str) else len(prompts)
            elif labels is not None and not isinstance(labels, str):
                num = len(labels)
            else:
                num = max(self.num_classes, 1)
        res = generate(self.loaded, settings or self.settings, num=num, labels=labels, prompts=prompts, seed=seed,
                       batch_size=batch_size, **changes)
        images = res["images"]
        if not as_pil:
            return images
        from PIL import Image

        return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images]

    def __repr__(self) -> str:
        lm = self.loaded
        return (f"ditkit.Model({str(lm.run_dir)!r}, family={lm.family!r}, step={lm.step}, "
                f"classes={lm.num_classes}, settings={self.settings.describe()!r})")


def load(run: str | os.PathLike, *, weights: str = "ema", device: str = "auto", precision: str = "fp32",
         guide: Optional[str | os.PathLike] = None, compile: bool = False, quantize: str = "none") -> Model:
    """Load a run folder (its latest checkpoint) or one checkpoint folder for sampling; quantize="int8" runs
    the network's token maps in INT8 (`ditkit.quantize`)."""
    return Model(load_model(run, weights=weights, device=device, precision=precision, guide=guide, compile=compile,
                            quantize=quantize))
