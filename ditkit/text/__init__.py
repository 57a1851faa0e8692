"""Text for text-to-image models: the frozen prompt encoder (all-MiniLM-L6-v2, with an LRU cache) and the
captions MNIST is trained on."""

from .encoder import (DEFAULT_CACHE_SIZE, DEFAULT_MAX_TOKENS, ENCODER_MAX_TOKENS, PACKAGE, TEXT_DIM, TextEncoder,
                      TextSpec, load_text_encoder)

__all__ = ["DEFAULT_CACHE_SIZE", "DEFAULT_MAX_TOKENS", "ENCODER_MAX_TOKENS", "PACKAGE", "TEXT_DIM", "TextEncoder",
           "TextSpec", "load_text_encoder"]
