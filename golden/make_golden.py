#!/usr/bin/env python3
"""Write the golden reference outputs of the example model (see golden/README.md).

For each held-out golden case (new patient data, never a training example) this records,
for the base model alone and for base + LoRA adapter (peft, not merged), in float32 PyTorch:
the prompt, its token ids, the exact 32-token greedy continuation (no EOS stop), the
last-position prefill logits, and per-step top-1 probability / top1-top2 logit margin.

Deterministic; runs in a few seconds on CPU.  Run:  .venv/bin/python golden/make_golden.py
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "golden"
EXAMPLE_DIR = ROOT / "graphkit" / "examples" / "epicrisis-tiny"
N_NEW = 32
ATTN = "eager"


def _load_generator():
    """Import scripts/make_example_model.py for GOLDEN_CASES and the prompt formatter."""
    spec = importlib.util.spec_from_file_location("make_example_model", ROOT / "scripts" / "make_example_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def greedy(model, prompt_ids: list[int], n_new: int):
    """Manual greedy loop (full recompute each step, no cache, no EOS stop)."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    prefill_last = None
    out, top1p, margin = [], [], []
    for step in range(n_new):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
        if step == 0:
            prefill_last = logits.clone()
        probs = torch.softmax(logits, -1)
        top2 = torch.topk(logits, 2)
        nxt = int(top2.indices[0])
        out.append(nxt)
        top1p.append(float(probs[nxt]))
        margin.append(float(top2.values[0] - top2.values[1]))
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, prefill_last.numpy(), np.array(top1p, np.float32), np.array(margin, np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=EXAMPLE_DIR)
    ap.add_argument("--out", type=Path, default=GOLDEN_DIR)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gen = _load_generator()
    base_dir, adapter_dir = args.model_dir / "base", args.model_dir / "adapter"
    tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        base_dir, local_files_only=True, dtype=torch.float32, attn_implementation=ATTN).eval()
    base = load()
    lora = PeftModel.from_pretrained(load(), adapter_dir, local_files_only=True).eval()
    merged = PeftModel.from_pretrained(load(), adapter_dir, local_files_only=True).merge_and_unload().eval()

    records, arrays = [], {k: [] for k in (
        "greedy_ids_base", "greedy_ids_adapter", "prefill_last_logits_base", "prefill_last_logits_adapter",
        "greedy_top1_prob_base", "greedy_top1_prob_adapter", "greedy_margin_base", "greedy_margin_adapter")}
    prompt_ids_all = []
    for i, case in enumerate(gen.GOLDEN_CASES):
        messages = [{"role": "user", "content": gen.epicrisis_request(case)}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == tok(text)["input_ids"], "tokenizer unexpectedly adds special tokens"
        prompt_ids_all.append(ids)
        rec = {"index": i, "case": case, "messages": messages, "prompt_text": text, "prompt_ids": ids}
        for name, model in (("base", base), ("adapter", lora)):
            g, pl, p1, mg = greedy(model, ids, N_NEW)
            arrays[f"greedy_ids_{name}"].append(g)
            arrays[f"prefill_last_logits_{name}"].append(pl)
            arrays[f"greedy_top1_prob_{name}"].append(p1)
            arrays[f"greedy_margin_{name}"].append(mg)
            rec[f"greedy_ids_{name}"] = g
            rec[f"greedy_text_{name}"] = tok.decode(g, skip_special_tokens=False)
            rec[f"mean_top1_prob_{name}"] = round(float(p1.mean()), 4)
            rec[f"min_margin_{name}"] = round(float(mg.min()), 4)
        # Cross-checks: generate() with KV cache, and the merged model, give the same ids.
        t = torch.tensor([ids])
        for name, model, ref in (("base", base, "greedy_ids_base"), ("adapter", lora, "greedy_ids_adapter"),
                                 ("merged", merged, "greedy_ids_adapter")):
            with torch.no_grad():
                o = model.generate(input_ids=t, attention_mask=torch.ones_like(t), do_sample=False,
                                   min_new_tokens=N_NEW, max_new_tokens=N_NEW)[0, len(ids):].tolist()
            assert o == rec[ref], f"case {i}: generate() ({name}) differs from the manual greedy loop"
        with torch.no_grad():
            ml = merged(input_ids=t).logits[0, -1].numpy()
        rec["merged_vs_peft_max_abs_logit_diff"] = float(np.abs(ml - arrays["prefill_last_logits_adapter"][-1]).max())
        records.append(rec)

    n, lmax = len(prompt_ids_all), max(map(len, prompt_ids_all))
    prompt_ids = np.full((n, lmax), -1, np.int64)
    for i, ids in enumerate(prompt_ids_all):
        prompt_ids[i, :len(ids)] = ids
    npz = {
        "prompt_ids": prompt_ids,
        "prompt_len": np.array([len(x) for x in prompt_ids_all], np.int64),
        **{k: np.asarray(v, np.int64 if k.startswith("greedy_ids") else np.float32) for k, v in arrays.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "reference.npz", **npz)

    cfg = base.config
    meta = {
        "format_version": 1,
        "model_dir": "graphkit/examples/epicrisis-tiny",
        "attn_implementation": ATTN,
        "dtype": "float32",
        "n_new_tokens": N_NEW,
        "vocab_size": cfg.vocab_size,
        "special_tokens": {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")},
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "peft_version": __import__("peft").__version__,
        "prompts": records,
    }
    (args.out / "prompts.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")

    for r in records:
        print(f"\n[{r['index']}] {r['messages'][0]['content']}")
        print(f"  base    (mean top1 {r['mean_top1_prob_base']:.3f}): {r['greedy_text_base']!r}")
        print(f"  adapter (mean top1 {r['mean_top1_prob_adapter']:.3f}): {r['greedy_text_adapter']!r}")
        print(f"  merged vs peft max |dlogit| {r['merged_vs_peft_max_abs_logit_diff']:.2e}")
    pa, pb = npz["greedy_top1_prob_adapter"], npz["greedy_top1_prob_base"]
    print(f"\nadapter top-1 prob: mean {pa.mean():.4f} median {np.median(pa):.4f} min {pa.min():.4f} "
          f"frac>0.9 {(pa > 0.9).mean():.3f}; min margin {npz['greedy_margin_adapter'].min():.3f}")
    print(f"base    top-1 prob: mean {pb.mean():.4f} median {np.median(pb):.4f} min {pb.min():.4f} "
          f"frac>0.9 {(pb > 0.9).mean():.3f}; min margin {npz['greedy_margin_base'].min():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
