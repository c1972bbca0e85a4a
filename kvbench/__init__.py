"""kvbench: a benchmarking harness for KV-cache eviction in LLM inference.

``kvbench.evaluate`` and ``kvbench.generate`` (the library API, ``kvbench/api.py``) load on first use, so that
``import kvbench`` (plots, reports) stays free of torch. The engine's ``generate``:
``from kvbench.engine.generate import generate``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("evaluate", "generate"):
        from kvbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'kvbench' has no attribute {name!r}")
