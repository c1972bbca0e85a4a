"""DuoAttention's head patterns estimated on the fly: one pass of the model over synthetic passkey prompts.

The paper (arXiv 2410.10819 §3.2) learns a gate per KV head on synthetic multi-passkey data. kvbench estimates
the pattern instead (no training, an **approximation**): each calibration prompt hides ``passkeys`` random
10-digit passkeys at evenly spread depths of a haystack (the Paul Graham essays of ``data_dir`` when present,
else the passkey task's filler sentences) and ends with a question and the answer listing them. The model runs
over it once with plain causal attention (``kvbench.engine.hooks.capture``); for every layer and query head,
the attention output of the answer tokens' queries is computed twice from the captured q, k, v: over all keys
(full) and over the first ``n_sink`` and the last ``recent`` keys each query sees (streaming). A KV head's
score is ||full - streaming|| / ||full|| (Frobenius, over the answer rows), averaged over its query group and
the prompts: a head that needs its middle keys scores high. The scale is 1/sqrt(D).

Cache: ``<patterns>/<model>/<key>/patterns.safetensors`` (``<model>``: the policy's ``model_name``, kvbench's name of
the model, else its name or path) (``scores`` [L, Hkv], fp32) and ``manifest.json``
(the model's identity, the settings, kvbench's version, the date). ``key`` hashes identity and settings; the
identity is the model's name or path, hub commit, a hash of its config and a fingerprint of its weights
(shapes, dtype, and each tensor's sum and absolute sum to 4 significant digits). A manifest that does not match
(another model, other settings, a damaged file) is recomputed and rewritten, with a note.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvbench.engine.hooks import capture
from kvbench.policies.duoattention import DuoAttentionPolicy
from kvbench.tasks.passkey import FILLER
from kvbench.version import __version__

PROCEDURE = 1  # bump when the estimate changes: patterns cached by another procedure are recomputed
ESSAYS = Path("haystack") / "PaulGrahamEssays"
DIGITS = 10
INSTRUCTION = "There are several passkeys hidden in the text below. Find them and remember them in order.\n\n"
QUESTION = "\n\nWhat are the passkeys, in order? The passkeys are:"


def calibrate(
    policy: DuoAttentionPolicy, model: torch.nn.Module, tokenizer: Any, data_dir: Path | None, store: bool
) -> None:
    """Give ``policy`` its head scores for ``model``: from the cache when its manifest matches, else computed
    (and, with ``store`` and a ``patterns`` folder, written there)."""
    settings = calibration_settings(policy, data_dir)
    manifest = {"identity": identity(model), "settings": settings}
    manifest["key"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    folder = None
    if store and policy.patterns is not None:
        label = policy.model_name or model.config.name_or_path or "model"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(label)).strip("_") or "model"
        folder = Path(policy.patterns).expanduser() / name[-80:] / manifest["key"]
        cached = load(folder, manifest, model)
        if cached is not None:
            policy.use_patterns(cached, manifest)
            return
    scores = estimate(model, tokenizer, settings, data_dir)
    manifest = {**manifest, "kvbench": __version__, "created": datetime.now(UTC).isoformat(timespec="seconds")}
    if folder is not None:
        save(folder, scores, manifest)
    policy.use_patterns(scores, manifest)


def calibration_settings(policy: DuoAttentionPolicy, data_dir: Path | None) -> dict[str, Any]:
    """Everything the estimate depends on besides the model."""
    essays = data_dir is not None and any((Path(data_dir) / ESSAYS).glob("*.txt"))
    return {
        "procedure": PROCEDURE,
        "n_sink": policy.n_sink,
        "recent": policy.recent,
        "prompts": policy.calibration_prompts,
        "tokens": policy.calibration_tokens,
        "passkeys": policy.calibration_passkeys,
        "seed": policy.seed,
        "haystack": "paul_graham_essays" if essays else "passkey_filler",
    }


def identity(model: torch.nn.Module) -> dict[str, Any]:
    """What makes two loaded models the same for the patterns: name or path, hub commit, config, weights."""
    config = model.config
    parameters = [(name, p.detach()) for name, p in model.named_parameters()]
    stats = torch.stack([torch.stack([p.float().sum(), p.float().abs().sum()]) for _, p in parameters])
    weights = [
        [name, list(p.shape), str(p.dtype), *(f"{x:.4g}" for x in row)]
        for (name, p), row in zip(parameters, stats.tolist(), strict=True)
    ]
    return {
        "name_or_path": str(config.name_or_path),
        "commit": config.to_dict().get("_commit_hash"),
        "config_sha256": hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest(),
        "weights_sha256": hashlib.sha256(json.dumps(weights).encode()).hexdigest(),
    }


def load(folder: Path, manifest: dict[str, Any], model: torch.nn.Module) -> torch.Tensor | None:
    """The cached scores when ``folder``'s manifest is this model's and these settings', else None."""
    manifest_path, tensors_path = folder / "manifest.json", folder / "patterns.safetensors"
    if not manifest_path.is_file():
        return None
    shape = [model.config.num_hidden_layers, model.config.num_key_value_heads]
    try:
        saved = json.loads(manifest_path.read_text())
        scores = load_file(str(tensors_path))["scores"]
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        print(f"[kvbench] duoattention: the patterns in {folder} cannot be read ({error}); recomputing")
        return None
    differing = sorted(k for k in ("identity", "settings", "key") if saved.get(k) != manifest[k])
    if differing or list(scores.shape) != shape:
        what = ", ".join(differing) or f"shape {list(scores.shape)} instead of {shape}"
        print(f"[kvbench] duoattention: the patterns in {folder} do not match this run ({what}); recomputing")
        return None
    return scores


def save(folder: Path, scores: torch.Tensor, manifest: dict[str, Any]) -> None:
    """Write scores and manifest, each through a temporary file renamed into place (the manifest last)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in (
        ("patterns.safetensors", lambda path: save_file({"scores": scores.contiguous()}, path)),
        ("manifest.json", lambda path: Path(path).write_text(json.dumps(manifest, indent=2, sort_keys=True))),
    ):
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        os.close(handle)
        write(temporary)
        os.replace(temporary, folder / name)


def prompts(tokenizer: Any, settings: dict[str, Any], data_dir: Path | None, limit: int) -> list[tuple[list[int], int]]:
    """The calibration set: (token ids, answer length) per prompt, ``settings["tokens"]`` tokens (at most
    ``limit``) each; passkeys at depths k / (passkeys + 1), the answer listing them after the question."""
    rng = random.Random(settings["seed"])
    length = min(settings["tokens"], limit)
    if settings["haystack"] == "paul_graham_essays":
        text = "".join(path.read_text() for path in sorted((Path(data_dir) / ESSAYS).glob("*.txt")))
        text = text[: 6 * length * settings["prompts"]]
    else:
        text = FILLER * math.ceil(6 * length / len(FILLER))
    haystack = tokenizer.encode(text, add_special_tokens=False)
    out = []
    for _ in range(settings["prompts"]):
        keys = ["".join(rng.choice("0123456789") for _ in range(DIGITS)) for _ in range(settings["passkeys"])]
        needles = [tokenizer.encode(f" The passkey number {i + 1} is {key}. ", add_special_tokens=False)
                   for i, key in enumerate(keys)]  # fmt: skip
        head = tokenizer.encode(INSTRUCTION, add_special_tokens=True)
        question = tokenizer.encode(QUESTION, add_special_tokens=False)
        answer = tokenizer.encode(" " + ", ".join(keys) + ".", add_special_tokens=False)
        size = max(0, length - len(head) - len(question) - len(answer) - sum(map(len, needles)))
        start = rng.randrange(max(1, len(haystack) - size))
        body = haystack[start : start + size]
        cuts = [round(size * (i + 1) / (len(needles) + 1)) for i in range(len(needles))]
        ids, last = list(head), 0
        for cut, needle in zip(cuts, needles, strict=True):
            ids += body[last:cut] + needle
            last = cut
        out.append((ids + body[last:] + question + answer, len(answer)))
    return out


def deviation(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: int, n_sink: int, recent: int
) -> torch.Tensor:
    """Per KV head [Hkv]: ||full - streaming|| / ||full|| of the attention outputs of the last ``rows`` queries,
    averaged over each KV head's query group. query [1, H, N, D] and key/value [1, Hkv, N, D], post-RoPE."""
    heads, n, dim = query.shape[1], key.shape[2], query.shape[-1]
    group = heads // key.shape[1]
    q = query[0, :, n - rows :].float()  # [H, R, D]
    k = key[0].float().repeat_interleave(group, 0)  # [H, N, D]
    v = value[0].float().repeat_interleave(group, 0)
    at = torch.arange(n - rows, n, device=q.device)[:, None]  # each row's position
    j = torch.arange(n, device=q.device)[None, :]
    causal = j <= at
    streaming = causal & ((j < n_sink) | (j >= at + 1 - recent))
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=dim**-0.5)
    streamed = F.scaled_dot_product_attention(q, k, v, attn_mask=streaming, scale=dim**-0.5)
    ratio = (full - streamed).flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1).clamp(min=1e-12)  # [H]
    return ratio.reshape(-1, group).mean(1)


@torch.no_grad()
def estimate(model: torch.nn.Module, tokenizer: Any, settings: dict[str, Any], data_dir: Path | None) -> torch.Tensor:
    """Scores [L, Hkv] (fp32, CPU) of ``model`` on the calibration set; higher = more of a retrieval head."""
    config = model.config
    n_layers, device = config.num_hidden_layers, next(model.parameters()).device
    scores = torch.zeros(n_layers, config.num_key_value_heads)
    limit = getattr(config, "max_position_embeddings", None) or settings["tokens"]
    calibration = prompts(tokenizer, settings, data_dir, limit)
    rows = 0

    def on_layer(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor) -> None:
        scores[layer] += deviation(query, key, value, rows, settings["n_sink"], settings["recent"]).cpu()

    with capture(model, list(range(n_layers)), on_layer):
        for ids, rows in calibration:  # noqa: B007 (read by ``on_layer``)
            model.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return scores / len(calibration)


__all__ = ["PROCEDURE", "calibrate", "estimate", "identity"]
