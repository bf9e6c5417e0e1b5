#!/usr/bin/env python3
"""Quality on the shipped trained model: file size, KL divergence and top-1 agreement vs PyTorch for
every dtype, ours (`graphkit convert`) vs the anchor recipe's files.

    .venv/bin/python benchmarks/quality.py

Model: graphkit/examples/epicrisis-tiny base + LoRA adapter (merged). Reference: PyTorch fp32 (the
merged model, graphkit.verify.TorchReference). Positions: teacher-forced over the golden adapter
continuations (golden/prompts.json: each held-out prompt + its 32-token greedy adapter output), so
every variant is scored on the same token positions. Metrics per variant: mean and max
KL(PyTorch || variant) in nats, top-1 agreement (variant argmax == PyTorch argmax), and how many
prompts' own greedy 32-token generation equals the golden one exactly.

Anchors (Transformers.js's conversion recipe, applied to the same merged model):
* fp32: legacy ``torch.onnx.export(dynamo=False, opset 17)`` (benchmarks/_common.anchor_export);
* fp16: ``convert_float_to_float16(fp32, keep_io_types=True)``;
* q4: ``MatMulNBitsQuantizer(fp32, block_size=32, is_symmetric=True)``; q4f16: fp16 of that q4;
* q8: optimum-style dynamic int8, ``quantize_dynamic(per_channel=False, reduce_range=False)`` with
  ``weight_type=QUInt8`` (and a QInt8 row), default op types (MatMul and Gather are quantized).

The other tool users pick for speed, scored the same way where it is installed: onnxruntime-genai's builder
``-p int4 -e cpu`` on the merged model (saved as a Hugging Face folder), run by the same onnxruntime loop with
its KV head dim made static (benchmarks/runtime.genai_model).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GOLDEN = Path(__import__("os").environ.get("GK_BENCH_GOLDEN", C.ROOT / "golden" / "prompts.json"))
OURS_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "q4": "model_q4.onnx", "q4f16": "model_q4f16.onnx",
              "q8": "model_quantized.onnx"}


def build_anchor(base: Path, adapter: Path, out: Path) -> dict[str, Path]:
    C.fresh_dir(out)
    f = {"fp32": out / "model.onnx", "fp16": out / "model_fp16.onnx", "q4": out / "model_q4.onnx",
         "q4f16": out / "model_q4f16.onnx", "q8": out / "model_quint8.onnx", "q8 (QInt8)": out / "model_qint8.onnx"}
    steps = [("anchor_export", {"model_dir": str(base), "adapter": str(adapter), "out": str(f["fp32"])}),
             ("anchor_f16", {"src": str(f["fp32"]), "out": str(f["fp16"])}),
             ("anchor_q4", {"src": str(f["fp32"]), "out": str(f["q4"])}),
             ("anchor_f16", {"src": str(f["q4"]), "out": str(f["q4f16"])}),
             ("anchor_q8", {"src": str(f["fp32"]), "out": str(f["q8"]), "weight_type": "QUInt8"}),
             ("anchor_q8", {"src": str(f["fp32"]), "out": str(f["q8 (QInt8)"]), "weight_type": "QInt8"})]
    for fn, args in steps:
        C.log(f"anchor: {fn} → {Path(args['out']).name}")
        C.run_child("_common.py", fn, args, quiet=False)
    return f


def build_genai(base: Path, adapter: Path, work: Path) -> Path | None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        C.log("onnxruntime-genai is not importable: its row is left out")
        return None
    from runtime import genai_model
    merged, out = work / "merged-hf", work / "genai-int4"
    C.log("genai: merged model → onnxruntime_genai.models.builder -p int4 -e cpu")
    C.run_child("_common.py", "merged_hf_folder", {"model_dir": str(base), "adapter": str(adapter), "out": str(merged)})
    C.fresh_dir(out)
    r = C.run_cmd([C.PY, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(out), "-p", "int4",
                   "-e", "cpu", "-c", str(work / "genai-cache")])
    if r["rc"] != 0:
        raise SystemExit(f"genai builder failed:\n{r['stderr'][-3000:]}")
    return genai_model(out)


def score(path: Path, cases, refs) -> dict:
    import numpy as np
    from graphkit.ortrun import DecoderRunner, kl_divergence
    runner = DecoderRunner.from_file(path, threads=2)
    kls, agree, total, greedy_eq, nonfinite = [], 0, 0, 0, 0
    for (prompt, cont), ref in zip(cases, refs):
        logits = runner.teacher_forced_logits(prompt, cont)
        nonfinite += int((~np.isfinite(logits)).sum())
        kls.append(kl_divergence(ref, logits))
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        total += len(cont)
        greedy_eq += runner.greedy(prompt, len(cont))[0] == list(cont)
    kl = np.concatenate(kls)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": agree / total, "greedy_eq": greedy_eq,
            "nonfinite": nonfinite}


def main() -> None:
    import argparse
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and no stray arguments
    base, adapter = C.EXAMPLE / "base", C.EXAMPLE / "adapter"
    if not (adapter / "adapter_model.safetensors").exists() or not GOLDEN.exists():
        raise SystemExit(f"needs {adapter}/adapter_model.safetensors and {GOLDEN} (build the shipped example first)")
    work = C.WORK / "quality"
    work.mkdir(parents=True, exist_ok=True)
    golden = json.loads(GOLDEN.read_text())
    cases = [(p["prompt_ids"], p["greedy_ids_adapter"]) for p in golden["prompts"]]

    C.log("ours: graphkit convert (all dtypes)")
    r = C.run_cmd([C.PY, "-m", "graphkit", "convert", str(base), "-a", str(adapter), "-o", str(work / "ours"),
                   "--no-agreement", "--overwrite", "--json"], quiet=False)
    if r["rc"] != 0:
        raise SystemExit(f"graphkit convert failed:\n{r['stderr'][-3000:]}")
    ours = {d: work / "ours" / "onnx" / f for d, f in OURS_FILES.items()}
    anchor = build_anchor(base, adapter, work / "anchor")
    genai = build_genai(base, adapter, work)

    C.log("PyTorch reference (merged adapter, fp32)")
    from graphkit.verify import TorchReference
    import torch
    torch.set_num_threads(2)
    ref = TorchReference(base, adapter)
    refs = [ref.logits(p, c) for p, c in cases]
    scores = {}
    if genai:
        C.log("scoring genai int4")
        scores[("genai", "int4")] = score(genai, cases, refs)
    for who, files in (("ours", ours), ("anchor", anchor)):
        for dtype, path in files.items():
            C.log(f"scoring {who} {dtype}")
            scores[(who, dtype)] = score(path, cases, refs)

    def cell(who, dtype, key, fmt):
        s = scores.get((who, dtype))
        return fmt(s[key]) if s else "—"

    rows = []
    for dtype in list(OURS_FILES) + ["q8 (QInt8)"]:
        o, a = ours.get(dtype), anchor.get(dtype)
        so, sa = (C.file_bytes(o) if o else None), (C.file_bytes(a) if a else None)
        kl = lambda who: cell(who, dtype, "kl_mean", lambda v: f"{v:.2e}")  # noqa: E731
        rows.append([dtype, C.mb(so) if so else "—", C.mb(sa) if sa else "—", C.ratio(so, sa) if so and sa else "—",
                     kl("ours"), kl("anchor"),
                     cell("ours", dtype, "kl_max", lambda v: f"{v:.2e}") + " / " + cell("anchor", dtype, "kl_max", lambda v: f"{v:.2e}"),
                     cell("ours", dtype, "top1", lambda v: f"{v:.3f}"), cell("anchor", dtype, "top1", lambda v: f"{v:.3f}"),
                     cell("ours", dtype, "greedy_eq", str) + " / " + cell("anchor", dtype, "greedy_eq", str)])
    n_pos = sum(len(c) for _, c in cases)
    head = ["dtype", "size ours", "size anchor", "size ours/anchor", "KL mean ours", "KL mean anchor",
            "KL max ours / anchor", "top-1 ours", "top-1 anchor", f"greedy = golden (of {len(cases)}) ours / anchor"]
    genai_text = ""
    if genai:
        g, o = scores[("genai", "int4")], scores[("ours", "q4")]
        genai_text = (f"\nonnxruntime-genai int4 (`-p int4 -e cpu`, {C.mb(C.file_bytes(genai))}): KL mean {g['kl_mean']:.2e}, "
                      f"max {g['kl_max']:.2e}, top-1 {g['top1']:.3f}, greedy = golden {g['greedy_eq']} of {len(cases)} "
                      f"(ours q4: KL {o['kl_mean']:.2e}, top-1 {o['top1']:.3f}, {o['greedy_eq']} of {len(cases)}).\n")
    cfg = json.loads((base / "config.json").read_text())
    nonfinite = sum(s["nonfinite"] for s in scores.values())
    body = f"""## Quality, shipped example model (epicrisis-tiny base + LoRA adapter)

{C.machine()}

Command: `.venv/bin/python benchmarks/quality.py`. Model: Qwen2 {cfg['num_hidden_layers']} layers, hidden
{cfg['hidden_size']}, vocab {cfg['vocab_size']}, tied embeddings; LoRA merged. Reference: PyTorch fp32. Scored
teacher-forced on {len(cases)} golden prompts × 32 golden adapter tokens = {n_pos} positions; KL(PyTorch ‖ variant)
in nats. Ours: `graphkit convert base -a adapter --no-agreement`. Anchors: see the script's docstring
(q8 anchor = `quantize_dynamic(per_channel=False, reduce_range=False, weight_type=QUInt8)`; extra row QInt8).
Non-finite logits across all variants: {nonfinite}.

{C.table(head, rows)}{genai_text}"""
    C.write_section("quality", body)


if __name__ == "__main__":
    main()
