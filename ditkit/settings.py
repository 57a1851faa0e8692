"""How to draw images: one `SamplingSettings` object, built once from CLI flags, an HTTP body, a run's tuned
setting or Python keywords, validated in one place against the model, and passed whole to `generate`, the
evaluation, the trajectory plot and the server's jobs.

Errors are `SettingsError`s: each names the settings field, so the CLI can say `--cfg-scale` and the server
`guidance_scale` without rewriting the message.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from .errors import UsageError

DEFAULT_SAMPLER = "dpm++2m-sde"  # measured: unguided FID 15 vs 35 for the ODE form at 20 NFE (docs/BENCHMARKS.md)
DEFAULT_STEPS = 20
REJECT_TRIES = 4  # draws of an image in all under `reject`
# Euler and Heun run on the Karras grid by default (EDM, Alg. 1-2); the other samplers on the objective's.
SAMPLER_SPACING = {"euler": "karras", "heun": "karras"}

# settings field -> its command-line flag, where the two names differ
FLAGS = {"cfg_scale": "--cfg-scale", "options": "--sampler-option", "guidance_interval": "--guidance-interval",
         "reject_tries": "--reject-tries", "cfg_schedule": "cfg_schedule"}

Scale = Union[float, Sequence[float]]


class SettingsError(UsageError):
    """A bad sampling setting. `field` is the settings field (e.g. "cfg_scale"), `message` says what is
    allowed; str() reads as the command line names it (`--cfg-scale 3: ...`)."""

    def __init__(self, field_name: str, message: str, value: Any = dataclasses.MISSING):
        self.field = field_name
        self.message = message
        self.value = value
        flag = FLAGS.get(field_name, "--" + field_name.replace("_", "-"))
        shown = "" if value is dataclasses.MISSING else f" {_show(value)}"
        super().__init__(f"{flag}{shown}: {message}")


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"{value[0]},{value[1]}"
    return str(value)


def _number(name: str, value: Any, *, lo: float = 0.0, what: str) -> None:
    """A finite number >= lo (or a sequence of them, one per image)."""
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if not vals:
        raise SettingsError(name, f"must be a number ({what}), got an empty list", value)
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            raise SettingsError(name, f"must be a finite number >= {lo:g} ({what})", value)


def _is_one(value: Scale) -> bool:
    return all(float(v) == 1.0 for v in (value if isinstance(value, (list, tuple)) else [value]))


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that decides how a trained model draws an image, besides its label, prompt and seed.

    sampler, steps, spacing: the solver, its step count and its noise-level grid (None: the sampler's or
    the objective's default); options: the sampler's own options (s_churn, eta, temperature, ...).
    cfg_scale: classifier-free guidance (1 = off), a float or one value per image; cfg_schedule: the scale
    along the noise levels ("constant"; "ramp" is experimental). autoguidance: the scale of guidance by the
    model's weak model (Karras et al. 2024; 1 = off). guidance_interval: (sigma_lo, sigma_hi), guide only
    there (Kynkaanniemi et al. 2024). reject: None, or the margin by which the model's own class evidence
    must favour the asked class, else the image is drawn again with a new seed, up to reject_tries draws.
    cache_interval: k > 1 runs the whole network every k-th evaluation and its front blocks only in between,
    reusing the back blocks' last contribution (samplers.cache; 1 = off). best_of: N > 1 draws each image N
    times and keeps the one its verifier ("implicit": the model's own class evidence; "classifier": ditkit's
    MNIST classifier) scores best (ditkit.bestof; 1 = off).
    """

    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    spacing: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    cfg_scale: Scale = 1.0
    cfg_schedule: str = "constant"
    autoguidance: Scale = 1.0
    guidance_interval: Optional[tuple[float, float]] = None
    reject: Optional[float] = None
    reject_tries: int = REJECT_TRIES
    cache_interval: int = 1
    best_of: int = 1
    verifier: str = "implicit"

    # ---- building -------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "SamplingSettings":
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise UsageError(f"unknown sampling setting(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(self.field_names())}")
        return dataclasses.replace(self, **changes)

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(SamplingSettings))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["options"] = dict(self.options)
        if self.guidance_interval is not None:  # JSON has no inf: None stands for "no upper end"
            lo, hi = self.guidance_interval
            d["guidance_interval"] = [lo, None if math.isinf(hi) else hi]
        for k in ("cfg_scale", "autoguidance"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "settings") -> "SamplingSettings":
        """From `to_dict`'s form (a run's recorded setting, a JSON body); a SettingsError naming the field."""
        if not isinstance(d, dict):
            raise UsageError(f"{where}: must be a JSON object of sampling settings, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise UsageError(f"{where}: unknown sampling setting(s) {', '.join(map(str, unknown))}; allowed: "
                             f"{', '.join(cls.field_names())}")
        kw = dict(d)
        gi = kw.get("guidance_interval")
        if gi is not None:
            if not isinstance(gi, (list, tuple)) or len(gi) != 2:
                raise SettingsError("guidance_interval", "must be a pair [sigma_lo, sigma_hi]", gi)
            kw["guidance_interval"] = (gi[0], math.inf if gi[1] is None else gi[1])
        for k in ("cfg_scale", "autoguidance"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        if "options" in kw and not isinstance(kw["options"], dict):
            raise SettingsError("options", "must be an object of sampler options", kw["options"])
        return cls(**kw).check()

    @classmethod
    def from_args(cls, args: Any, base: Optional["SamplingSettings"] = None) -> "SamplingSettings":
        """From parsed command-line flags (see `cli_args.add_sampling_flags`): a flag the user gave overrides
        `base` (e.g. the run's tuned setting); a flag left out keeps base's value."""
        base = base or cls()
        given = {}
        for name in cls.field_names():
            value = getattr(args, "sampler_option" if name == "options" else name, None)
            if name == "options":
                value = dict(value) if value else None
            if value is not None:
                given[name] = value
        return base.replace(**given).check()

    # ---- checking -------------------------------------------------------------------------------
    def check(self) -> "SamplingSettings":
        """The checks that need no model: types and ranges. Returns self."""
        from .samplers import SAMPLERS
        from .samplers.guidance import SCHEDULES

        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise SettingsError("sampler", f"allowed: {', '.join(SAMPLERS)}", self.sampler)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise SettingsError("steps", "must be an integer >= 1", self.steps)
        if self.spacing is not None and not isinstance(self.spacing, str):
            raise SettingsError("spacing", "must be the name of a noise-level grid", self.spacing)
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise SettingsError("options", "must map option names to values", self.options)
        _number("cfg_scale", self.cfg_scale, what="1 = no guidance")
        if self.cfg_schedule not in SCHEDULES:
            raise SettingsError("cfg_schedule", f"allowed: {', '.join(SCHEDULES)}", self.cfg_schedule)
        _number("autoguidance", self.autoguidance, what="1 = off")
        if self.guidance_interval is not None:
            gi = self.guidance_interval
            try:
                lo, hi = (float(v) for v in gi)
            except (TypeError, ValueError):
                raise SettingsError("guidance_interval", "must be a pair SIGMA_LO,SIGMA_HI", gi) from None
            if not 0 <= lo < hi:
                raise SettingsError("guidance_interval", "needs 0 <= SIGMA_LO < SIGMA_HI (HI may be inf), "
                                    "e.g. 0.6,inf", gi)
            if (lo, hi) != tuple(gi):
                object.__setattr__(self, "guidance_interval", (lo, hi))
        if self.reject is not None:
            r = self.reject
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and 0 <= r < 1):
                raise SettingsError("reject", "must be a number in [0, 1) (the asked class's denoising error must "
                                    "lie this fraction below every other class's; 0 = the asked class is the best)",
                                    r)
        if isinstance(self.reject_tries, bool) or not isinstance(self.reject_tries, int) or self.reject_tries < 2:
            raise SettingsError("reject_tries", "must be an integer >= 2 (the first draw and at least one redraw)",
                                self.reject_tries)
        from .bestof import VERIFIERS

        for name in ("cache_interval", "best_of"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SettingsError(name, "must be an integer >= 1 (1 = off)", v)
        if self.verifier not in VERIFIERS:
            raise SettingsError("verifier", f"allowed: {', '.join(VERIFIERS)}", self.verifier)
        if self.best_of > 1 and self.reject is not None:
            raise SettingsError("best_of", "give one of --best-of and --reject (both spend draws on the model's "
                                "class evidence)", self.best_of)
        return self

    def validate(self, model: Any) -> "SamplingSettings":
        """Every check, the model's included (its objective, classes, weak model). Returns self."""
        from .samplers import get_sampler

        self.check()
        spec = get_sampler(self.sampler)
        obj = model.objective
        kind = getattr(obj, "kind", "continuous")
        if getattr(spec, "kind", "continuous") != kind:
            raise SettingsError("sampler", f"a {spec.kind} sampler; this model ({model.family}) needs a {kind} one",
                                self.sampler)
        own_check = getattr(obj, "check_settings", None)
        if own_check is not None:  # a family that samples its own way refuses what it cannot honour, by field
            own_check(self)
        unknown = sorted(set(self.options) - set(spec.options))
        if unknown:
            raise SettingsError("options", f"sampler {self.sampler!r} has no option {', '.join(unknown)}; "
                                f"allowed options: {', '.join(spec.options) or 'none'}", ",".join(unknown))
        limit = getattr(obj, "num_timesteps", None)
        if limit is not None and self.steps > limit:
            raise SettingsError("steps", f"must be between 1 and {limit} (the model's {limit} training steps)",
                                self.steps)
        if kind == "continuous":
            try:
                obj.sigma_grid(min(self.steps, 2), self.spacing or SAMPLER_SPACING.get(self.sampler,
                                                                                   obj.default_spacing))
            except UsageError as e:
                raise SettingsError("spacing", str(e).split(": ", 1)[-1], self.spacing) from None
        guided_by_text = getattr(model, "text_encoder", None) is not None
        if not _is_one(self.cfg_scale) and model.num_classes == 0 and not guided_by_text:
            raise SettingsError("cfg_scale", "this model is unconditional; guidance needs a class or text model "
                                "(use 1)", self.cfg_scale)
        if not _is_one(self.autoguidance) and getattr(model, "guide", None) is None:
            where = f" ({model.run_dir}/guide is missing)" if getattr(model, "run_dir", None) is not None else ""
            raise SettingsError("autoguidance", f"this model has no weak model to guide with{where}; train with "
                                "--guide-at > 0 (the default keeps one), or pass --guide RUN_OR_CHECKPOINT",
                                self.autoguidance)
        if self.reject is not None and model.num_classes < 2:
            raise SettingsError("reject", "this model is unconditional; rejection by the model's own class evidence needs a class model",
                                self.reject)
        if spec.needs_path and getattr(obj, "path", None) is None:
            raise SettingsError("sampler", "needs a continuous-time objective (linear, gvp, vp); this model's "
                                f"objective is {obj.config()['name']!r}", self.sampler)
        from .bestof import check_best_of
        from .samplers.cache import check_cache_interval

        for name, check in (("cache_interval", lambda: check_cache_interval(model.net, self.cache_interval)),
                            ("best_of", lambda: check_best_of(model, self.best_of, self.verifier))):
            try:
                check()
            except SettingsError:
                raise
            except UsageError as e:
                raise SettingsError(name, str(e).split(": ", 1)[-1], getattr(self, name)) from None
        return self

    def describe(self) -> str:
        """One line for logs and reports, e.g. `dpm++2m, 20 steps, autoguidance 2 at sigma in [0.6, inf)`."""
        parts = [self.sampler, f"{self.steps} steps"]
        if self.spacing:
            parts.append(f"{self.spacing} spacing")
        parts += [f"{k}={v}" for k, v in self.options.items()]
        if not _is_one(self.cfg_scale):
            parts.append(f"CFG {self.cfg_scale}" + ("" if self.cfg_schedule == "constant" else f" ({self.cfg_schedule})"))
        if not _is_one(self.autoguidance):
            parts.append(f"autoguidance {self.autoguidance}")
        if self.guidance_interval is not None and (not _is_one(self.cfg_scale) or not _is_one(self.autoguidance)):
            parts.append(f"guided at sigma in [{self.guidance_interval[0]:g}, {self.guidance_interval[1]:g}]")
        if self.reject is not None:
            parts.append(f"rejection {self.reject:g}")
        if self.cache_interval > 1:
            parts.append(f"front blocks only at {self.cache_interval - 1} of {self.cache_interval} evaluations")
        if self.best_of > 1:
            parts.append(f"best of {self.best_of} by the {self.verifier} verifier")
        return ", ".join(parts)
