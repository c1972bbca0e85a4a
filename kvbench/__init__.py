"""kvbench: a benchmarking harness for KV-cache eviction in LLM inference.

``kvbench.evaluate`` and ``kvbench.generate`` (the library API, ``kvbench/api.py``) run on a loaded model. The
function ``generate`` shadows the submodule of the same name as an attribute; import the engine's
``generate`` with ``from kvbench.generate import generate``.
"""

__version__ = "0.1.0"

from kvbench.api import evaluate, generate  # noqa: E402

__all__ = ["evaluate", "generate", "__version__"]
