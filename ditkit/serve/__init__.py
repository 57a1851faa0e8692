"""Serving: a FastAPI app over the library's `sample_batch`, with dynamic batching and limits.

    from ditkit.serve import ServeSettings, create_app
    app = create_app(model=load_model("runs/mnist"), settings=ServeSettings(max_batch_size=32))

`ditkit serve --ckpt RUN` runs it under uvicorn (see `ditkit.serve.cli`). Names load lazily, so the
main CLI can import `ditkit.serve.cli` without importing FastAPI.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ServeSettings": "app", "create_app": "app", "Service": "app", "ModelInfo": "app",
    "build_request_model": "app", "parse_prompt": "app", "make_server": "app", "DrainingServer": "app",
    "Batch": "batcher", "Batcher": "batcher", "Job": "batcher", "QueueFull": "batcher", "ServiceStopping": "batcher",
    "ApiKeys": "limits", "GuardMiddleware": "limits", "RateLimiter": "limits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
