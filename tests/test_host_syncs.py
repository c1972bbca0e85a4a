"""Host syncs per decode step: at most 2 for every policy, whatever the number of layers (issue #16).

Counted with ``HostSyncCounter`` (a TorchFunctionMode) around whole generations of a padded batch of two that
differ only in the number of decode steps: the difference per extra step is what a decode step costs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvbench.batching import collate
from kvbench.calibration import prepare
from kvbench.engine import make_engine
from kvbench.engine.generate import generate
from kvbench.measure import HostSyncCounter
from kvbench.policies.base import Budget
from kvbench.policies.full import FullCache

from .policies.cases import POLICIES
from .policies.test_matrix import essay_ids, make_policy

STEPS = (3, 9)


@pytest.fixture(scope="module")
def layered(tiny):
    """Random-weight models of the tiny model's shape with 2 and 6 layers (its tokenizer)."""
    model, tokenizer = tiny
    models = {}
    for n_layers in (2, 6):
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = n_layers
        torch.manual_seed(0)
        models[n_layers] = AutoModelForCausalLM.from_config(config).eval()
    return models, tokenizer


def syncs_per_decode_step(model, tokenizer, make, budget, ids) -> float:
    counts = []
    for steps in STEPS:
        policy = make()
        policy.bind(tokenizer)
        prepare(policy, model, tokenizer, store=False)
        engine = make_engine(model, policy, budget)
        batch = collate(ids, tokenizer.pad_token_id or 0, "cpu")
        with HostSyncCounter() as counter:
            generate(model, engine, batch, steps + 1, set(), chunk_size=64)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / (STEPS[1] - STEPS[0])


CASES = {name: (lambda name=name: make_policy(name), Budget("fraction", 0.3)) for name in POLICIES}
CASES["full"] = (FullCache, Budget())
CASES["fastgen"] = (lambda: make_policy("fastgen", recovery=0.5), Budget())
CASES["corm (native)"] = (lambda: make_policy("corm", w=4, r=8), Budget())


@pytest.mark.parametrize("case", sorted(CASES))
def test_at_most_two_host_syncs_per_decode_step_at_any_depth(case, layered, data_dir):
    models, tokenizer = layered
    make, budget = CASES[case]
    ids = essay_ids(data_dir, tokenizer, [(0, 700), (300, 450)])
    per_step = {n: syncs_per_decode_step(model, tokenizer, make, budget, ids) for n, model in models.items()}
    assert per_step[2] <= 2 and per_step[6] <= 2, per_step


def test_the_counter_sees_host_reads():
    x = torch.ones(3)
    with HostSyncCounter() as counter:
        bool(x.any()), int(x.sum()), x.tolist(), x[0].item(), x.cpu()
    assert counter.count == 5


def test_diagnostics_are_off_by_default_and_part_of_the_config_hash(make_config):
    from kvbench.runner import plan
    from kvbench.schema import config_hash

    default, on = make_config(), make_config("diagnostics=true")
    assert default.diagnostics is False
    task = plan(default).tasks[0]
    assert config_hash(default, task) != config_hash(on, task)


def test_sampled_diagnostics_measure_the_attention_mass(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 400)])
    policy = make_policy("streaming_llm")
    engine = make_engine(model, policy, Budget("fraction", 0.3), diagnostics=True)
    engine.meters.diagnostics_every = 4
    generate(model, engine, collate(ids, tokenizer.pad_token_id or 0, "cpu"), 10, set(), chunk_size=64)
    assert engine.meters.mass_steps == 3  # decode steps 0, 4 and 8 of 9
    mass = float(engine.meters.attention_mass()[0])
    assert 0 < mass < 1
