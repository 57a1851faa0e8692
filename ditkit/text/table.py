"""A training set's captions, encoded once: the text conditions of the training loop.

MNIST's 60,000 captions hold ~5,400 distinct texts (templates x digit forms x attribute words), so each
distinct caption is encoded once (~10 ms each on one core: ~1 minute) into a table, (U, L, 384) float32 with
L the longest caption's tokens, and a batch's condition is an index into it: nothing runs the encoder
during training. The table is kept on disk under $DITKIT_CACHE/text, keyed by the encoder, the token
budget and the captions, so a second run on the same captions starts at once. Encodings are those of
`TextEncoder` (one prompt at a time, no padding), up to the float rounding of the thread count.

Tokens are stored trimmed to the longest caption: the network masks padding out, so a text condition
padded to L or to the sampling-time max_tokens is the same function (tests/test_mmdit.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..condition import Condition, TextNull
from ..utils import atomic_write_bytes, default_cache_dir
from .encoder import TEXT_DIM, TextEncoder, stack_encodings

log = logging.getLogger(__name__)


class CaptionTable:
    """Per image a caption; per distinct caption its encoding. `condition(index)` -> the batch's Condition."""

    def __init__(self, texts: Sequence[str], index: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                 pooled: torch.Tensor, null: TextNull, truncated: int = 0):
        self.texts = list(texts)  # (U,) distinct captions
        self.index = index  # (N,) int64: image i's caption is texts[index[i]]
        self.tokens, self.mask, self.pooled = tokens, mask, pooled  # (U, L, D), (U, L), (U, D)
        self.null = null
        self.truncated = truncated  # distinct captions cut to the encoder's max_tokens

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def caption(self, i: int) -> str:
        return self.texts[int(self.index[i])]

    def condition(self, images: torch.Tensor, device: torch.device | str = "cpu") -> Condition:
        """The text condition of images `images` (B,) (dataset indices)."""
        u = self.index[images]
        return Condition.from_text(self.tokens[u], self.mask[u], self.pooled[u], self.null).to(device)

    @classmethod
    def build(cls, captions: Sequence[str], encoder: TextEncoder,
              cache_dir: Optional[str | Path] = None) -> "CaptionTable":
        """Encode the distinct `captions` once (or read them from the disk cache)."""
        texts = sorted(set(captions))
        where = {t: i for i, t in enumerate(texts)}
        index = torch.tensor([where[t] for t in captions], dtype=torch.long)
        null = encoder.null()
        key = hashlib.sha256("\n".join([encoder.name, str(encoder.max_tokens), *texts]).encode()).hexdigest()[:24]
        path = Path(cache_dir or default_cache_dir()) / "text" / f"captions-{key}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:  # data only, never code
                    tokens, mask, pooled = (torch.from_numpy(z[k]) for k in ("tokens", "mask", "pooled"))
                    truncated = int(z["truncated"])
                if tokens.shape[0] == len(texts) and tokens.shape[2] == TEXT_DIM:
                    log.info("caption encodings read from %s (%d distinct captions)", path, len(texts))
                    return cls(texts, index, tokens, mask, pooled, null, truncated)
            except (OSError, ValueError, KeyError) as e:
                log.warning("caption cache %s unreadable (%s): encoding again", path, e)
        t0 = time.perf_counter()
        # One thread: a prompt of ~10 tokens gives a second thread nothing to share, and on a busy CPU two
        # threads spin against each other (5,402 captions: 875 s with two on a shared 2-core host, where
        # one encodes a caption in ~10-17 ms)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            encs = [encoder._run(t) for t in texts]  # not through the LRU cache: the table is the cache here
        finally:
            torch.set_num_threads(threads)
        longest = max((e.tokens.shape[0] for e in encs), default=2)
        e = stack_encodings(encs, longest)
        truncated = sum(e["truncated"])
        log.info("encoded %d distinct captions (of %d) in %.1f s; %d truncated to %d tokens", len(texts),
                 len(captions), time.perf_counter() - t0, truncated, encoder.max_tokens)
        buf = io.BytesIO()
        np.savez(buf, tokens=e["tokens"].numpy(), mask=e["mask"].numpy(), pooled=e["pooled"].numpy(),
                 truncated=np.int64(truncated))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue())
        except OSError as err:  # a read-only cache costs the next run the encoding, nothing else
            log.warning("could not keep the caption encodings at %s (%s)", path, err)
        return cls(texts, index, e["tokens"], e["mask"], e["pooled"], null, truncated)
