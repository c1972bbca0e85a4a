"""Greedy generation (and teacher-forced scoring) under a policy: chunked prefill, then one token per decode
step, explicit positions.

The batch is left-padded; a padding token has position EMPTY and is never attended to. Positions are each
token's index in its own (unpadded) sequence and never change, so they stay right after eviction.
The prompt is ``input_ids[:, :split]`` (compressed) followed by ``input_ids[:, split:]`` (appended after
compression without eviction: the held-out question of the query-agnostic protocol).
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.cache import EMPTY
from kvbench.engine.engine import Engine, Step
from kvbench.engine.hooks import attach
from kvbench.measure import read_peak, reset_peak
from kvbench.policies.base import ALL_ROWS


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] left-padded
    attention_mask: torch.Tensor  # [B, L] 1 = token, 0 = padding
    split: int  # columns [0, split) are compressed, [split, L) appended after compression

    @property
    def positions(self) -> torch.Tensor:
        """Original position of every column, EMPTY for padding: [B, L]."""
        positions = self.attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(self.attention_mask == 0, EMPTY)


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per example, stop token excluded
    prefill_s: float
    decode_s: float
    n_decode_tokens: list[int]  # per example: tokens its decode steps produced (the first token is prefill's)
    prefill_peak_bytes: int
    decode_peak_bytes: int
    score_pass_s: float | None = None  # seconds of the policy's scoring pass, part of prefill_s (KVzip)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, engine: Engine, batch: Batch, chunk_size: int, evict_per_chunk: bool) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns the last position's logits [B, V]."""
    positions = batch.positions
    width = batch.input_ids.shape[1]
    pads = [width - length for length in engine.prompt_lengths_host]  # left padding per example (host)
    spans = [(s, min(s + chunk_size, batch.split)) for s in range(0, batch.split, chunk_size)]
    spans += [(batch.split, width)] if batch.split < width else []
    logits, scored = None, 0
    engine.reserve(chunk_size, evict_per_chunk)
    for start, end in spans:
        step = _prefill_step(engine, batch, positions, (start, end), evict_per_chunk, pads)
        deferred = step.evict and engine.needs.reconstruction > 0  # the scoring pass comes before the eviction
        step = dataclasses.replace(step, evict=False) if deferred else step
        logits = _forward(model, engine, batch.input_ids[:, start:end], step, logits_to_keep=1)
        if deferred:
            _reconstruct(model, engine, [(max(0, scored - pad), max(0, end - pad)) for pad in pads])
            engine.evict_all(dataclasses.replace(step, evict=True))
            scored = end
    for layer in engine.cache.layers:
        engine.fit(layer, 0)
    return logits


def _reconstruct(model, engine: Engine, spans: list[tuple[int, int]]) -> None:
    """The policy's scoring pass (``Needs.reconstruction``) over each example's context positions
    [start, end) (``spans``), in chunks of that many positions: chunk k of every example in one forward pass
    (left-padded), its tokens at the positions after the context; adds its seconds to ``engine.score_pass_s``."""
    device = engine.token_ids.device
    synchronize(device)
    began = time.perf_counter()
    size = engine.needs.reconstruction
    ids = engine.token_ids.tolist()
    chunks = [[(s, min(s + size, end)) for s in range(start, end, size)] for start, end in spans]
    for k in range(max(map(len, chunks), default=0)):
        rows = [
            engine.policy.reconstruction_ids(ids[b][: own[k][1]], *own[k]) if k < len(own) else []
            for b, own in enumerate(chunks)
        ]
        width = max(map(len, rows))
        tokens, positions = [], []
        for row, (_, end) in zip(rows, spans, strict=True):  # left-padded, at the positions after the context
            tokens.append([0] * (width - len(row)) + row)
            positions.append([EMPTY] * (width - len(row)) + list(range(end, end + len(row))))
        step = Step(
            positions=torch.tensor(positions, device=device),
            phase="reconstruct",
            evict=False,
            seen=[end + len(row) for row, (_, end) in zip(rows, spans, strict=True)],
            padded=any(len(row) < width for row in rows),
        )
        _forward(model, engine, torch.tensor(tokens, device=device), step, logits_to_keep=1)
    synchronize(device)
    engine.score_pass_s = (engine.score_pass_s or 0.0) + time.perf_counter() - began


def _prefill_step(
    engine: Engine, batch: Batch, positions: torch.Tensor, span: tuple[int, int], evict_per_chunk: bool, pads: list[int]
) -> Step:
    """The step of prompt columns ``span`` = [start, end) (``positions``: the batch's [B, L]): which rows and
    queries the policy sees, and whether it evicts."""
    start, end = span
    compressed = end <= batch.split
    window_end = end if evict_per_chunk else batch.split
    rows_from, queries_from = (
        _window_from(window, start, end, window_end, compressed)
        for window in (engine.needs.query_rows, engine.needs.queries)
    )
    return Step(
        positions=positions[:, start:end],
        phase="prefill",
        evict=compressed and (end == batch.split or evict_per_chunk),
        rows_from=rows_from,
        queries_from=queries_from,
        seen=[max(0, end - pad) for pad in pads],
        padded=any(pad > start for pad in pads),
        columns_left=batch.input_ids.shape[1] - end,
    )


def _forward(model, engine: Engine, input_ids: torch.Tensor, step: Step, **kwargs) -> torch.Tensor:
    """One forward pass of ``step``'s tokens (the step travels to the attention layers as an argument)."""
    rope = engine.rope_positions(step.positions)
    out = model(
        input_ids=input_ids,
        position_ids=rope,
        attention_mask=_unused_mask(rope),
        use_cache=False,
        kvbench_step=step,
        **kwargs,
    )
    return out.logits[:, -1]


def _window_from(window: int, start: int, end: int, window_end: int, compressed: bool) -> int:
    """Index in the chunk [start, end) from which the last ``window`` queries before ``window_end`` begin
    (ALL_ROWS: every query; the chunk's end when it has none of them or is not compressed)."""
    if not compressed:
        return end - start
    if window == ALL_ROWS:
        return 0
    return max(0, window_end - window - start) if window else end - start


def decode_step(model, engine: Engine, tokens: torch.Tensor, positions: torch.Tensor, seen: list[int]) -> torch.Tensor:
    """Feed one token per example at ``positions`` [B] (host copy: ``seen`` = positions + 1); the policy may
    evict after it. Returns logits [B, V]."""
    engine.add_tokens(positions, tokens)
    step = Step(positions=positions[:, None], phase="decode", evict=True, seen=seen, padded=False)
    return _forward(model, engine, tokens[:, None], step)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder(model, engine: Engine):
    """The model decode steps call: ``model`` itself, or with ``engine.compile`` the model under ``torch.compile``
    (dynamic shapes, built once per model). kvbench's attention (``Engine.attend``) stays eager: the compiled
    graphs are the rest of each layer (norms, projections, RoPE, MLP) and the head."""
    if not engine.compile:
        return model
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=True)
    return _COMPILED[model]


def _unused_mask(positions: torch.Tensor) -> torch.Tensor:
    """An all-true 2-D mask for transformers, which kvbench's attention ignores (positions decide). Given one,
    transformers skips its packed-sequence check of ``position_ids``, a host read per forward."""
    return torch.ones(positions.shape, dtype=torch.bool, device=positions.device)


@torch.inference_mode()
def generate(
    model,
    engine: Engine,
    batch: Batch,
    max_new_tokens: int,
    stop_ids: set[int],
    chunk_size: int = 1024,
    evict_per_chunk: bool = False,
    stopped=None,
) -> Generation:
    """Greedy decoding of ``batch`` under ``engine``'s policy.

    ``stopped(row, tokens) -> bool`` is an extra per-example stop test (stop strings); a row that stops keeps
    decoding padding until every row has stopped, as ``model.generate`` does.
    """
    device = batch.input_ids.device
    lengths = _bind(engine, batch, max_new_tokens)
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    with attach(model, engine):
        logits = prefill(model, engine, batch, chunk_size, evict_per_chunk)
        next_tokens = logits.argmax(-1)
        synchronize(device)
        prefill_s = time.perf_counter() - start
        prefill_peak = read_peak(device)
        reset_peak(device)
        start = time.perf_counter()
        stepper = decoder(model, engine)
        outputs: list[list[int]] = [[] for _ in range(len(lengths))]
        done = [False] * len(lengths)
        n_decode = [0] * len(lengths)
        for step in range(max_new_tokens):
            for row, token in enumerate(next_tokens.tolist()):  # the step's one read of the device
                if done[row]:
                    continue
                if token in stop_ids:
                    done[row] = True
                    continue
                outputs[row].append(token)
                if stopped is not None and stopped(row, outputs[row]):
                    done[row] = True
            if all(done) or step == max_new_tokens - 1:
                break
            seen = [length + step + 1 for length in engine.prompt_lengths_host]
            next_tokens = decode_step(stepper, engine, next_tokens, lengths + step, seen).argmax(-1)
            n_decode = [count + (not stop) for count, stop in zip(n_decode, done, strict=True)]
        synchronize(device)
        decode_s = time.perf_counter() - start
    return Generation(
        tokens=outputs,
        prefill_s=prefill_s,
        decode_s=decode_s,
        n_decode_tokens=n_decode,
        prefill_peak_bytes=prefill_peak,
        decode_peak_bytes=read_peak(device),
        score_pass_s=engine.score_pass_s,
    )


@torch.inference_mode()
def teacher_forced_nll(
    model, engine: Engine, batch: Batch, targets: torch.Tensor, chunk_size: int = 1024, evict_per_chunk: bool = False
) -> torch.Tensor:
    """Negative log-likelihood [B, T] of ``targets`` [B, T] read after the prompt under ``engine``'s policy.

    The prompt is prefilled (and compressed) as in ``generate``; then each target token is fed as one decode
    step, the policy evicting after each, so token t is predicted from the cache the policy kept after t - 1
    (how StreamingLLM and LESS (its Table 2, methods.md §2) measure perplexity, with real per-step eviction).
    """
    lengths = _bind(engine, batch, targets.shape[1])
    nll = []
    with attach(model, engine):
        logits = prefill(model, engine, batch, chunk_size, evict_per_chunk)
        stepper = decoder(model, engine)
        for step in range(targets.shape[1]):
            nll.append(F.cross_entropy(logits.float(), targets[:, step], reduction="none"))
            if step == targets.shape[1] - 1:
                break
            seen = [length + step + 1 for length in engine.prompt_lengths_host]
            logits = decode_step(stepper, engine, targets[:, step], lengths + step, seen)
    return torch.stack(nll, 1)


def _bind(engine: Engine, batch: Batch, max_new_tokens: int) -> torch.Tensor:
    """Give ``engine`` the batch (prompt lengths, token ids, held-out split); returns the lengths [B]."""
    engine.begin(batch.input_ids, batch.attention_mask, batch.split, max_new_tokens)
    return engine.prompt_lengths
