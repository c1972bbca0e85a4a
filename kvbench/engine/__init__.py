"""The engine: a policy applied to a batch inside the model's attention.

``kernels`` (masks, SDPA/flash calls, attention rows; below the policies) < ``meters`` (bytes, kept fraction,
attention mass) < ``engine`` (per-batch state, the capacity rule, ``attend``) < ``hooks`` (``attach``: routing
transformers' attention) < ``generate`` (prefill and decode). See docs/engine.md.
"""

from kvbench.engine.engine import Engine, Step, make_engine

__all__ = ["Engine", "Step", "make_engine"]
