"""Models: every supported architecture matches HF generate under the full cache; a random-weight model served as a
hub repo by the local stand-in runs with ``model=hf`` and then under ``HF_HUB_OFFLINE=1``; gated, missing and
unsupported repos end in one line before any weight is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvbench.config import model_spec
from kvbench.engine.engine import Engine
from kvbench.engine.generate import Batch, generate
from kvbench.models import SUPPORTED_ARCHITECTURES, load
from kvbench.policies.base import Budget
from kvbench.policies.full import FullCache
from tests.hubserver import Hub

REPO = Path(__file__).resolve().parents[1]
SHAPE = {
    "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}  # fmt: skip
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}  # fmt: skip


def test_every_supported_architecture_is_tested():
    assert sorted(SUPPORTED_ARCHITECTURES) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_engine_full_cache_equals_hf_generate(architecture):
    config = AutoConfig.for_model(ARCHITECTURES[architecture], architectures=[architecture], **SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert type(model).__name__ == architecture
    prompt = torch.randint(3, 1000, (1, 40), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    engine = Engine(FullCache(), Budget(), config.num_hidden_layers, 2)
    batch = Batch(prompt, torch.ones_like(prompt), split=prompt.shape[1])
    tokens = generate(model, engine, batch, 8, stop_ids=set()).tokens
    assert tokens == [expected[0, prompt.shape[1] :].tolist()]


def repo_files(tmp_path: Path, architectures: list[str] | None = None) -> dict[str, bytes]:
    """The tiny random Llama with SmolLM2's tokenizer, as the files of a hub repo."""
    model, tokenizer = load(model_spec("tiny_random_llama"), "cpu", torch.float32)
    folder = tmp_path / "repo"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if architectures is not None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "architectures": architectures}))
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    with Hub() as server:
        files = repo_files(root)
        for name in ("tiny", "gated"):
            server.add("model", f"kvbench-test/{name}", files)
        server.gated.add(("model", "kvbench-test/gated"))
        server.add("model", "kvbench-test/gpt2", repo_files(root / "gpt2", ["GPT2LMHeadModel"]))
        yield server


def kvbench(hub: Hub, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    environ.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "kvbench", "model=hf", "limit=1", *args]
    return subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=600)


def weights_asked(hub: Hub, repo: str) -> int:
    return sum(count for path, count in hub.requests.items() if path.endswith(f"{repo}/resolve/main/model.safetensors"))


def test_hub_model_runs_then_runs_offline_from_the_cache(hub, tmp_path):
    online = kvbench(hub, tmp_path, "model.path=kvbench-test/tiny", f"results_dir={tmp_path / 'online'}")
    assert online.returncode == 0, online.stderr
    asked = sum(hub.requests.values())
    offline = kvbench(
        hub, tmp_path, "model.path=kvbench-test/tiny", f"results_dir={tmp_path / 'offline'}", HF_HUB_OFFLINE="1"
    )
    assert offline.returncode == 0, offline.stderr
    assert sum(hub.requests.values()) == asked
    rows = [json.loads((tmp_path / run / "results.jsonl").read_text()) for run in ("online", "offline")]
    assert rows[0]["model"] == rows[1]["model"] == "hf"
    assert (rows[0]["score"], rows[0]["kv_kept_fraction"]) == (rows[1]["score"], rows[1]["kv_kept_fraction"])


@pytest.mark.parametrize(
    ("repo", "message"),
    [
        ("kvbench-test/gated", "HF_TOKEN"),
        ("kvbench-test/nope", "huggingface-cli login"),
        ("kvbench-test/gpt2", "is a GPT2LMHeadModel; supported: LlamaForCausalLM"),
    ],
)
def test_refused_repo_is_one_line_before_the_weights(repo, message, hub, tmp_path):
    done = kvbench(hub, tmp_path, f"model.path={repo}", f"results_dir={tmp_path / 'results'}")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("kvbench: error: model 'hf'") and message in lines[0]
    assert weights_asked(hub, repo) == 0
    assert not (tmp_path / "results" / "results.jsonl").exists()


def test_no_network_is_one_line_naming_offline_mode_and_path(tmp_path):
    environ = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    environ.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-m", "kvbench", "model=llama2_7b_chat", f"results_dir={tmp_path / 'r'}"]
    done = subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "HF_HUB_OFFLINE" in lines[0] and "model.path" in lines[0]
