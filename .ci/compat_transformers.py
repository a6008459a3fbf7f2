"""Saved checkpoints must load as the same model under every transformers the project claims (issue 17).

    python .ci/compat_transformers.py save DIR   # main venv (transformers 5.x, gradmap): write checkpoints
    python .ci/compat_transformers.py load DIR   # second venv (transformers 4.57): load them, compare

`save` writes, for each tiny family of tests/tiny.py (6 layers, layer 2 removed) and for SmolLM2-135M
with 4 layers removed (`gradmap.remove_layers` only, no calibration), a checkpoint through
`gradmap.save_pretrained`, plus reference.json: the prompts, their token ids, last-position logits
and 16 greedy tokens computed by the saving transformers. `load` uses plain transformers only (as a
serving stack would: AutoTokenizer + AutoModelForCausalLM), re-tokenises the prompts, and compares.
Exits non-zero on any difference beyond ATOL or any differing token.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

ATOL = {"tiny": 1e-4, "smollm2": 1e-3}  # fp32 both sides; only kernel order differs between versions
PROMPTS = ["the cat sat on the mat.", "question: what is the answer?"]
SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 16
SMOL_REMOVED = [20, 23, 25, 27]
# non-default RoPE, so a loader that ignores rope_parameters (4.57 falls back to theta 10000) fails
ROPE = {"default": {"rope_type": "default", "rope_theta": 50000.0},
        "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}}


def _outputs(model, tok, prompts):
    torch.manual_seed(0)
    rows = []
    for text in prompts:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 pad_token_id=tok.pad_token_id)
        rows.append({"prompt": text, "ids": ids[0].tolist(), "logits": logits.tolist(),
                     "greedy": gen[0, ids.shape[1]:].tolist()})
    # special tokens and the chat template must survive too (what a chat server relies on)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) \
        if tok.chat_template else None
    rows[0]["tokenizer"] = {"specials": sorted(tok.all_special_tokens), "chat": chat}
    return rows


def save(out: str) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import gradmap
    from tiny import FAMILIES, tiny_model
    from tiny_tokenizer import tiny_tokenizer

    ref = {"transformers": __import__("transformers").__version__, "models": {}}
    cases = [(fam, fam, {} if fam == "gemma3_text" else {"rope_parameters": ROPE["default"]})
             for fam in FAMILIES]  # gemma3's own defaults (1e6 global, 1e4 local) are already not 1e4
    cases.append(("llama-linear-rope", "llama", {"rope_parameters": ROPE["linear"]}))
    cases.append(("llama-chat-tokens", "llama", {}))
    for name, fam, kw in cases:
        model, tok = tiny_model(fam, n_layers=6, **kw), tiny_tokenizer()
        if name == "llama-chat-tokens":  # 5.x saves these as a list 4.x cannot read unless rewritten
            tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
            tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
        gradmap.remove_layers(model, [2])
        gradmap.save_pretrained(model, tok, os.path.join(out, name), overwrite=True)
        ref["models"][name] = {"atol": ATOL["tiny"], "rows": _outputs(model, tok, PROMPTS)}
    if os.environ.get("COMPAT_TINY_ONLY") != "1":  # a quick run while iterating
        _save_smollm2(out, ref, gradmap)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f)


def _save_smollm2(out, ref, gradmap):
    t = time.perf_counter()
    model, tok = gradmap.load_model("smollm2-135m")
    gradmap.remove_layers(model, SMOL_REMOVED)
    gradmap.save_pretrained(model, tok, os.path.join(out, "smollm2"), overwrite=True)
    ref["models"]["smollm2"] = {"atol": ATOL["smollm2"], "rows": _outputs(model, tok, SMOL_PROMPTS)}
    print(f"save: SmolLM2 load+prune+save+reference {time.perf_counter() - t:.1f}s")


def load(out: str) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, __version__

    with open(os.path.join(out, "reference.json")) as f:
        ref = json.load(f)
    failures = []
    for name, entry in ref["models"].items():
        path = os.path.join(out, name)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        got = _outputs(model, tok, [r["prompt"] for r in entry["rows"]])
        worst, same_tokens = 0.0, True
        if entry["rows"][0]["tokenizer"] != got[0]["tokenizer"]:
            failures.append(f"{name}: special tokens / chat template {got[0]['tokenizer']} here, "
                            f"{entry['rows'][0]['tokenizer']} when saved")
        for want, have in zip(entry["rows"], got):
            if want["ids"] != have["ids"]:
                failures.append(f"{name}: {want['prompt']!r} tokenises to {have['ids']} here, "
                                f"{want['ids']} when saved")
                continue
            diff = (torch.tensor(want["logits"]) - torch.tensor(have["logits"])).abs().max().item()
            worst = max(worst, diff)
            if diff > entry["atol"]:
                failures.append(f"{name}: {want['prompt']!r} logits differ by {diff:.2e} > {entry['atol']}")
            if want["greedy"] != have["greedy"]:
                same_tokens = False
                failures.append(f"{name}: {want['prompt']!r} greedy {have['greedy']} != {want['greedy']}")
        print(f"{name:12s} max |dlogit| {worst:.2e} (atol {entry['atol']}), "
              f"{NEW_TOKENS} greedy tokens {'identical' if same_tokens else 'DIFFER'}")
    print(f"saved with transformers {ref['transformers']}, loaded with {__version__}: "
          f"{'OK' if not failures else f'{len(failures)} FAILURES'}")
    for line in failures:
        print("  " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "load"):
        sys.exit("usage: python .ci/compat_transformers.py save|load DIR")
    if sys.argv[1] == "save":
        save(sys.argv[2])
    else:
        sys.exit(load(sys.argv[2]))
