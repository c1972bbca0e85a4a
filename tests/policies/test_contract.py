"""The policy contract: one ``Needs`` declaration, the query hook, one budget check, one ``evict``, one factory."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvbench.policies
from kvbench.batching import collate
from kvbench.engine import make_engine
from kvbench.engine.generate import generate
from kvbench.errors import UserError
from kvbench.policies import build
from kvbench.policies.base import ALL_ROWS, Budget, Needs, Policy
from kvbench.policies.full import FullCache

REPO = Path(__file__).resolve().parents[2]
WINDOW = 20
CHUNK = 40


@dataclass
class RecordingPolicy(Policy):
    """Keeps everything; records the queries the engine hands it, per layer, in call order."""

    needs = Needs(queries=lambda p: p.window, decode_queries=True, budget="optional")
    window: int = WINDOW

    def __post_init__(self) -> None:
        self.calls: dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}

    def observe_queries(self, layer, queries, query_positions, ctx) -> None:
        self.calls.setdefault(ctx.layer_idx, []).append((ctx.phase, queries.clone(), query_positions.clone()))


def policy_classes() -> list[type[Policy]]:
    found = set()
    for info in pkgutil.iter_modules(kvbench.policies.__path__):
        module = importlib.import_module(f"kvbench.policies.{info.name}")
        found |= {c for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, Policy)}
    return sorted(found, key=lambda c: c.__qualname__)


def hand_queries(model):
    """Forward pre-hooks that compute each attention layer's post-RoPE queries from its own inputs, by hand:
    q_proj, split into heads, RoPE with the position embeddings the layer receives."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for layer in model.model.layers:
        attention = layer.self_attn

        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim).transpose(1, 2)
            seen.setdefault(module.layer_idx, []).append(apply_rotary_pos_emb(q, q, cos, sin)[0])

        handles.append(attention.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def test_the_query_hook_receives_the_models_queries(tiny, data_dir):
    model, tokenizer = tiny
    essay = (data_dir / "haystack" / "PaulGrahamEssays" / "worked.txt").read_text()
    ids = [[tokenizer.encode(essay[a : a + n], add_special_tokens=False), []] for a, n in [(0, 400), (300, 260)]]
    batch = collate(ids, tokenizer.pad_token_id, "cpu")
    width = batch.input_ids.shape[1]
    assert 0 < width % CHUNK < WINDOW  # the window spans the last two prefill chunks
    policy = RecordingPolicy()
    config = model.config
    engine = make_engine(model, policy, Budget())
    expected, handles = hand_queries(model)
    try:
        out = generate(model, engine, batch, 4, set(), chunk_size=CHUNK)
    finally:
        for handle in handles:
            handle.remove()
    n_chunks = -(-width // CHUNK)
    for layer_idx in range(config.num_hidden_layers):
        calls, hand = policy.calls[layer_idx], expected[layer_idx]
        prefill = [c for c in calls if c[0] == "prefill"]
        decode = [c for c in calls if c[0] == "decode"]
        assert len(prefill) == 2 and len(decode) == len(out.tokens[0]) - 1 == len(hand) - n_chunks
        received = torch.cat([c[1] for c in prefill], dim=2)
        positions = torch.cat([c[2] for c in prefill], dim=1)
        assert torch.equal(positions, batch.positions[:, width - WINDOW :])  # the last W prompt queries
        prompt_queries = torch.cat(hand[:n_chunks], dim=2)  # [B, H, width, D]
        assert torch.allclose(received, prompt_queries[:, :, width - WINDOW :], atol=1e-6)
        lengths = batch.attention_mask.sum(-1)
        for step, (call, queries) in enumerate(zip(decode, hand[n_chunks:], strict=True)):
            assert call[1].shape[2] == 1 and torch.allclose(call[1], queries, atol=1e-6)
            assert torch.equal(call[2][:, 0], lengths + step)


def test_all_rows_passes_every_prompt_query_once(tiny):
    model, tokenizer = tiny
    ids = [[list(range(5, 75)), []], [list(range(9, 40)), []]]
    batch = collate(ids, tokenizer.pad_token_id, "cpu")
    policy = RecordingPolicy(window=ALL_ROWS)
    engine = make_engine(model, policy, Budget())
    generate(model, engine, batch, 1, set(), chunk_size=16)
    positions = torch.cat([c[2] for c in policy.calls[0] if c[0] == "prefill"], dim=1)
    assert torch.equal(positions, batch.positions)


def test_a_policy_without_query_needs_gets_no_queries(tiny):
    model, tokenizer = tiny

    @dataclass
    class Quiet(RecordingPolicy):
        needs = Needs(budget="optional")

    policy = Quiet()
    engine = make_engine(model, policy, Budget())
    generate(model, engine, collate([[list(range(5, 40)), []]], tokenizer.pad_token_id, "cpu"), 3, set())
    assert policy.calls == {}


def test_needs_follow_hyper_parameters_and_reject_unknown_values():
    snapkv, corm = build("snapkv", window=5), build("corm", prefill="none")
    assert snapkv.needed() == Needs(phase="prefill", query_rows=5)
    assert corm.needed().query_rows == 0 and corm.needed().decode_rows and corm.needed().budget == "optional"
    assert build("streaming_llm", position_shift=True).needed().position_shift
    assert build("less", kernels=None, model=None, base="lambda").needed().query_rows == 0
    with pytest.raises(ValueError, match="Needs.budget must be one of required, optional, refused, full"):
        Needs(budget="maybe")


@pytest.mark.parametrize(
    ("name", "budget", "message"),
    [
        ("snapkv", Budget(), "policy 'snapkv' needs a budget: add budget=<fraction in (0, 1]> or budget_tokens=<n>"),
        ("fastgen", Budget("fraction", 0.5), "policy 'fastgen' sets its own compression; remove budget/budget_tokens"),
        ("full", Budget("fraction", 0.5), "the full cache keeps everything: use budget=1.0 (or none) with it"),
    ],
)
def test_check_budget_refuses_what_the_policy_cannot_take(name, budget, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build(name).check_budget(budget)


@pytest.mark.parametrize(
    ("name", "budget"),
    [("snapkv", Budget("tokens", 64)), ("corm", Budget()), ("fastgen", Budget()), ("full", Budget("fraction", 1.0))],
)
def test_check_budget_accepts_what_the_policy_can_take(name, budget):
    build(name).check_budget(budget)


def test_build_without_a_config_is_the_full_cache():
    assert type(build(None)) is FullCache and type(build("full")) is FullCache


def test_every_policy_declares_its_needs_one_way_and_shares_evict():
    for cls in policy_classes():
        assert isinstance(cls.needs, Needs), cls
        if cls is not Policy:
            assert "evict" not in vars(cls), f"{cls.__qualname__} re-implements evict: use select/before_keep"
        for name in ("phase", "query_rows", "decode_rows", "needs_budget", "budget_free", "kv_masked"):
            assert name not in vars(cls), f"{cls.__qualname__}.{name}: declare it in needs = Needs(...)"


def test_nothing_outside_the_policies_inspects_a_policy():
    pattern = re.compile(r"\b(getattr|isinstance|hasattr|type)\(\s*[\w.]*(policy|chosen)\s*[,)]")
    offenders = []
    for folder in ("kvbench", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "policies" in path.relative_to(REPO).parts:
                continue
            offenders += [f"{path.relative_to(REPO)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                          if pattern.search(line)]  # fmt: skip
    assert offenders == []
