"""The command line's shared parts: one parser class, one set of argument types, and the flag groups that
several commands share (the sampling settings, precision, compile). Every subcommand builds on these."""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from typing import Any, Callable, Optional

from .errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line first (naming the subcommand, with a suggestion for a mistyped
    flag), then where to find the usage; never a traceback (exit code 2)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)  # `--cfg-scal` is a typo to point out, not a flag to guess
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the subcommand that was given, so a mistyped flag is matched against its flags
            self._innermost(ns).error("unrecognized arguments: " + " ".join(extras))
        return ns

    def _innermost(self, ns: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(ns, action.dest, None) or "")
                if sub is not None:
                    return sub._innermost(ns) if isinstance(sub, Parser) else sub
        return self

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = self._suggestion(message)
        self.exit(2, f"{self.prog}: error: {message}{hint}\n(see `{self.prog} --help`)\n")

    def _suggestion(self, message: str) -> str:
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        hints = []
        for word in message.split(":", 1)[1].split():
            flag = word.split("=", 1)[0]
            if flag.startswith("--"):
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
                if close:
                    hints.append(f"{flag}: did you mean {close[0]}?")
        return ("; " + "; ".join(hints)) if hints else ""


def _integer(name: str, v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None


def int_at_least(name: str, lo: int) -> Callable[[str], int]:
    def parse(v: str) -> int:
        x = _integer(name, v)
        if x < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {x}")
        return x
    return parse


def positive_int(name: str) -> Callable[[str], int]:
    return int_at_least(name, 1)


def nonneg_int(name: str) -> Callable[[str], int]:
    return int_at_least(name, 0)


SEED_MAX = 2 ** 63 - 1  # torch generators take a signed 64-bit seed


def seed_int(name: str = "--seed") -> Callable[[str], int]:
    def parse(v: str) -> int:
        x = _integer(name, v)
        if not 0 <= x <= SEED_MAX:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 2**63 - 1], got {v}")
        return x
    return parse


def finite_float(name: str, lo: Optional[float] = None, lo_open: bool = False) -> Callable[[str], float]:
    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {v!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {v!r}")
        if lo is not None and (x < lo or (lo_open and x == lo)):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {x}")
        return x
    return parse


def or_auto(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, or None for the word auto (the setting chosen when the run starts)."""
    def parse_or_auto(v: str):
        if v == "auto":
            return None
        try:
            return parse(v)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}; or give auto") from None
    return parse_or_auto


def sampler_option(v: str) -> tuple[str, object]:
    """--sampler-option KEY=VALUE: a number when it reads as one (s_churn=10), else the text (diffusion=sigma)."""
    key, eq, value = v.partition("=")
    if not eq or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"--sampler-option {v!r}: give KEY=VALUE, e.g. s_churn=10")
    try:
        x = float(value)
    except ValueError:
        return key.strip(), value.strip()
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"--sampler-option {v!r}: the value must be finite")
    return key.strip(), x


def guidance_interval(v: str) -> tuple[float, float]:
    """--guidance-interval LO,HI: the noise levels (sigma) where guidance acts; HI may be inf."""
    from .samplers.guidance import parse_interval

    try:
        return parse_interval(v)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -----------------------------------------------------------------------------------------------
# the sampling settings' flags: `ditkit sample`, `ditkit eval`, `ditkit report`
# -----------------------------------------------------------------------------------------------
def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `SamplingSettings`. Each defaults to None, "not given": the run's tuned setting (where it
    has one, see `ditkit tune`) or the untuned default fills it (`sampling_settings_from_args`)."""
    from .samplers import SAMPLERS
    from .samplers.implicit import SIGMAS
    from .settings import DEFAULT_SAMPLER, DEFAULT_STEPS, REJECT_TRIES

    g = p.add_argument_group("sampling (default: the run's tuned setting, else the untuned default)")
    g.add_argument("--setting", choices=["tuned", "plain"], default="tuned",
                   help="tuned: the setting the run chose for itself (`ditkit tune`), where it has one; plain: "
                        f"the untuned default ({DEFAULT_SAMPLER}, {DEFAULT_STEPS} steps, no guidance)")
    g.add_argument("--sampler", default=None, choices=list(SAMPLERS), help=f"the solver (untuned: {DEFAULT_SAMPLER})")
    g.add_argument("--steps", type=positive_int("--steps"), default=None, help=f"solver steps (untuned: {DEFAULT_STEPS})")
    g.add_argument("--spacing", default=None,
                   help="sigma grid: ddpm: trailing|leading|uniform|karras|logsnr; interpolants: uniform|karras|"
                        "logsnr (default: the sampler's or the objective's)")
    g.add_argument("--sampler-option", type=sampler_option, action="append", default=None, metavar="KEY=VALUE",
                   help="a sampler option, repeatable: heun s_churn=10 s_tmin=0.05 s_tmax=50 (EDM's stochastic "
                        "Heun), ddim eta=0.5, dpm++2m-sde s_noise=1, euler-maruyama diffusion=sigma; "
                        "unknown ones are refused with the sampler's list")
    g.add_argument("--cfg-scale", type=finite_float("--cfg-scale", 0), default=None,
                   help="classifier-free guidance (untuned: 1 = off)")
    g.add_argument("--autoguidance", type=finite_float("--autoguidance", 0), default=None,
                   help="autoguidance scale (Karras et al. 2024), 1 = off: extrapolate away from a weak model, "
                        "by default the run's own early EMA (RUN/guide)")
    g.add_argument("--guidance-interval", type=guidance_interval, default=None, metavar="LO,HI",
                   help="guide (classifier-free and autoguidance) only at noise levels sigma in [LO, HI], the "
                        "model's own prediction elsewhere (Kynkaanniemi et al. 2024), e.g. 0.6,inf; the "
                        "interpolants' sigma is t / (1 - t)")
    g.add_argument("--reject", type=finite_float("--reject", 0), default=None, metavar="M",
                   help=f"draw an image again (new seed, up to {REJECT_TRIES} draws) unless the model's own conditional "
                        "denoisers explain it best by its asked class, by a margin M in [0, 1) (0.08: the asked "
                        f"class's error 8%% below every other's); costs {len(SIGMAS)} network evaluations per "
                        "class per verdict")
    g.add_argument("--cache-interval", type=positive_int("--cache-interval"), default=None, metavar="K",
                   help="dynamic compute: the whole network every K-th evaluation, only its front quarter of "
                        "blocks in between, reusing the back blocks' last contribution (Δ-DiT-style caching); 1 = off")
    g.add_argument("--best-of", type=positive_int("--best-of"), default=None, metavar="N",
                   help="draw each image N times and keep the one --verifier scores best (N x the draws); 1 = off")
    g.add_argument("--verifier", default=None, choices=["implicit", "classifier"],
                   help="--best-of's judge: implicit (the model's own class evidence, as --reject; "
                        f"{len(SIGMAS)} network evaluations per class per candidate) or classifier (ditkit's MNIST "
                        "classifier: cheap, but the same network that ditkit eval scores with)")
    g.add_argument("--guide", help="the weak model for --autoguidance: a run or checkpoint folder "
                                   "(default: the run's RUN/guide)")


def sampling_settings_from_args(args: argparse.Namespace, model: Any = None) -> Any:
    """The SamplingSettings the flags ask for: the flags given, over the run's tuned setting (unless
    `--setting plain`, or the run has none), over the untuned defaults. Validated against `model` if given."""
    from .settings import SamplingSettings

    base = None
    if getattr(args, "setting", "tuned") == "tuned" and model is not None and getattr(model, "run_dir", None):
        from .runs import read_tuned_setting

        base = read_tuned_setting(model.run_dir)
    if base is None and model is not None:
        from .sampling import default_settings

        base = default_settings(model)  # a family's own sampler (a masked image model: maskgit)
    st = SamplingSettings.from_args(args, base)
    return st.validate(model) if model is not None else st


def add_precision_flag(p: argparse.ArgumentParser, *, auto: bool = False) -> None:
    """--precision; with `auto` (the server), "auto" is offered and is the default."""
    from .runs import PRECISIONS

    p.add_argument("--precision", default="auto" if auto else "fp32",
                   choices=(["auto"] if auto else []) + list(PRECISIONS),
                   help="the network's arithmetic: bf16 is ~1.6x faster in large batches on CPUs with bf16 "
                        "matrix units, ~2x slower for one image; its images differ slightly from fp32's"
                        + ("; auto (default) = bf16 where native and --max-batch-size > 1, else fp32" if auto else ""))


def add_quantize_flag(p: argparse.ArgumentParser) -> None:
    """--quantize: INT8 inference of the network's per-token linear maps (`ditkit.quantize`)."""
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: PyTorch's dynamic INT8 for the network's token maps (CPU, fp32 weights, no "
                        "--compile): half the weight bytes, faster where the maps are wide (DiT-S and up; none at "
                        "DiT-T's width 128); images differ slightly; fp32 with a warning where the CPU has no "
                        "INT8 kernels")


def add_compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (needs a C++ compiler): 10-25%% faster on the "
                        "CPU after ~25 s of compilation; its images differ slightly from eager ones")


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
