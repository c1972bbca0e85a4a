"""The kvpress side of ``scripts/parity_kvpress.py``: runs in kvpress's own venv and never imports kvbench.

A persistent worker: it loads the model once (``--model``, a Hugging Face folder), then answers one JSON request
per stdin line with one JSON reply per stdout line. A request is ``{"press": name or null, "ratio": r,
"rows": [{"id", "context", "question", "answer_prefix", "max_new_tokens"}], "kept": bool}``; the reply holds
one ``{"id", "prediction", "seconds"}`` per row (and, with ``kept``, the positions each layer and KV head kept
after prefill). An empty line or end of input stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from typing import Any

import torch


def _press(name: str | None, ratio: float) -> Any:
    """The kvpress press for a parity setting (kvpress's own defaults: SnapKV window 64, kernel 5, avg pooling;
    StreamingLLM 4 sinks; AdaKV alpha_safeguard 0.2 over that SnapKV; Expected Attention 512 future positions,
    4 sinks, covariance and value norms)."""
    import kvpress

    if name is None or ratio == 0:
        return None
    if name == "adakv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio), alpha_safeguard=0.2)
    presses = {
        "snapkv": kvpress.SnapKVPress,
        "tova": kvpress.TOVAPress,
        "streaming_llm": kvpress.StreamingLLMPress,
        "knorm": kvpress.KnormPress,
        "expected_attention": kvpress.ExpectedAttentionPress,
    }
    return presses[name](compression_ratio=ratio)


def _kept_positions(model: Any, tokenizer: Any, press: Any, row: dict[str, Any]) -> list[list[list[int]]]:
    """Positions each (layer, KV head) keeps after kvpress's prefill compression of the row's context: the
    compressed keys matched back to the full prefill's keys (exact equality of the stored key vectors), or, for
    a press that masks rather than removes (AdaKV), the positions its ``masked_key_indices`` leave."""
    from transformers import DynamicCache

    template = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["context"] + "@@sep@@"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer.encode(template.split("@@sep@@")[0], return_tensors="pt", add_special_tokens=False)
    full, kept = DynamicCache(), DynamicCache()
    with torch.inference_mode():
        model.model(input_ids=ids, past_key_values=full)
        with press(model):
            model.model(input_ids=ids, past_key_values=kept)
    if hasattr(press, "alpha_safeguard"):  # AdaKVPress: every key stays, the masked ones are listed
        out = []
        for layer, block in enumerate(model.model.layers):
            heads = [set(range(full.layers[layer].keys.shape[2])) for _ in range(full.layers[layer].keys.shape[1])]
            _, head_index, seq_index = block.self_attn.masked_key_indices
            for head, position in zip(head_index.tolist(), seq_index.tolist(), strict=True):
                heads[head].discard(position)
            out.append([sorted(head) for head in heads])
        return out
    out = []
    for layer in range(len(full.layers)):
        keys, small = full.layers[layer].keys[0], kept.layers[layer].keys[0]  # [H, T, D], [H, k, D]
        heads = []
        for head in range(keys.shape[0]):
            distance = torch.cdist(small[head], keys[head])  # [k, T]
            heads.append(sorted(distance.argmin(-1).tolist()))
        out.append(heads)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import kvpress  # noqa: F401 (registers the kv-press-text-generation pipeline)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    ready = {"ready": True, "versions": {"kvpress": version("kvpress"), "transformers": transformers.__version__}}
    ready["versions"]["torch"] = torch.__version__
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        request = json.loads(line)
        press = _press(request["press"], float(request["ratio"]))
        replies = []
        for row in request["rows"]:
            start = time.perf_counter()
            with torch.inference_mode():
                answer = pipe(
                    row["context"],
                    question=row["question"],
                    answer_prefix=row["answer_prefix"],
                    press=press,
                    max_new_tokens=int(row["max_new_tokens"]),
                )["answer"]
            reply = {"id": row["id"], "prediction": answer, "seconds": time.perf_counter() - start}
            if request.get("kept") and press is not None:
                reply["kept"] = _kept_positions(model, tokenizer, press, row)
            replies.append(reply)
        print(json.dumps({"rows": replies}), flush=True)


if __name__ == "__main__":
    main()
