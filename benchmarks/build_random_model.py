#!/usr/bin/env python3
"""Build a random-weight Hugging Face model folder with the exact Qwen2.5-0.5B (or 1.5B) shapes.

    .venv/bin/python benchmarks/build_random_model.py [--size 0.5b|1.5b] [--out DIR]

Default output: /tmp/gk-bench/qwen2.5-<size>/hf (set GK_BENCH_DIR to move /tmp/gk-bench).
``Qwen2ForCausalLM`` under ``torch.manual_seed(0)`` with transformers' default init (normal, std
``initializer_range`` 0.02), saved fp32 as safetensors. Parameter counts equal the real checkpoints
(0.5B: 494,032,768; 1.5B: 1,543,714,304); the weights are random, so these folders are for speed,
memory and size benchmarks only, never for quality.

The tokenizer files are copied from the shipped example (graphkit/examples/epicrisis-tiny/base) so
`graphkit convert` and the genai builder can write a complete folder. Its vocabulary (2048 tokens)
does not match the model's 151,936 rows; that is irrelevant to speed and size (the benchmarks feed
random token ids below 151,936), but the folder is not a usable chat model.
Also writes build.json (seconds, peak RSS, parameter count) next to the weights. Section "build"
of RESULTS.md is written by conversion.py, which records these figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EXAMPLE, WORK, log, proc_status  # noqa: E402

SIZES = {
    # hidden, layers, heads, kv heads, intermediate
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960),
    # a toy shape for testing the scripts quickly (not a real Qwen size)
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def qwen_config(size: str):
    from transformers import Qwen2Config
    return Qwen2Config(
        vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0, max_position_embeddings=32768,
        rms_norm_eps=1e-6, hidden_act="silu", initializer_range=0.02, use_sliding_window=False,
        sliding_window=None, max_window_layers=SIZES[size]["num_hidden_layers"], attention_dropout=0.0,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="float32", **SIZES[size])


def model_dir(size: str) -> Path:
    return WORK / f"qwen2.5-{size}" / "hf"


def build(size: str, out: Path, tokenizer_from: Path = EXAMPLE / "base") -> dict:
    import torch
    from transformers import Qwen2ForCausalLM
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = qwen_config(size)
    model = Qwen2ForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    missing = [f for f in TOKENIZER_FILES if not (tokenizer_from / f).exists()]
    if missing:
        raise SystemExit(f"{tokenizer_from}: missing {', '.join(missing)} (build the shipped example first)")
    for f in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_from / f, tmp / f)
    info = {"size": size, "params": params, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss": proc_status("VmHWM"), "safetensors_bytes": sum(p.stat().st_size for p in tmp.glob("*.safetensors")),
            "tokenizer_from": str(tokenizer_from), "note": "random weights; tokenizer vocab does not match"}
    (tmp / "build.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def ensure(size: str) -> Path:
    """The model folder for ``size``, built if missing (conversion.py calls this)."""
    out = model_dir(size)
    if not (out / "build.json").exists():
        import subprocess
        subprocess.run([sys.executable, __file__, "--size", size], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tokenizer-from", type=Path, default=EXAMPLE / "base")
    a = ap.parse_args()
    out = a.out or model_dir(a.size)
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"building random Qwen2.5-{a.size} shape → {out}")
    info = build(a.size, out, a.tokenizer_from)
    log(f"{info['params']:,} params, {info['safetensors_bytes'] / 1e9:.3f} GB safetensors, {info['seconds']} s, "
        f"peak RSS {info['peak_rss'] / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
