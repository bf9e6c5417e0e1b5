#!/usr/bin/env python3
"""What `convert --target transformers.js@3` costs: size, quality and CPU decode speed of the forms Transformers.js
3.x can run, against the default (`transformers.js@4`) forms they replace, plus the alternative not chosen.

    .venv/bin/python benchmarks/targets.py [--size 0.5b] [--repeats 3] [--skip-speed]

Forms (graphkit/convert.py TARGET_PIPELINES; docs/runtimes.md says why):
* q4 @4 (default): 8-bit tied table in 128-blocks as MatMulNBits (the head) + Gather lookup, 4-bit body, acc 4;
* q4 @3: the tied table in int8 per row, read by the lm_head as MatMulInteger (per-token activations) and by the
  lookup, 4-bit body unchanged (`matmul-int8(lm_head=only,quantize_embedding_gather=true)` first);
* q4 4-bit head (not chosen): `tied-embedding(bits=4,block_size=32,symmetric=false)`, 4-bit body;
* q4f16 @4 (default): accuracy_level 4 everywhere; q4f16 @3: accuracy_level 0 everywhere (same weights).

Quality: the shipped trained example (base + LoRA), scored like benchmarks/quality.py (KL(PyTorch ‖ variant),
top-1 vs PyTorch, greedy = golden over the golden continuations). Size: the 0.5B random-weight shape's files.
Speed: `graphkit bench` (onnxruntime CPU, 2 threads, 64-token prompt, 32 new tokens), each pair alternated in
one run (A, B, A, B, … fresh process each), median decode ms/token and the ratio B / A.
Writes the "runtime targets" section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.ROOT))
from graphkit.convert import PIPELINES, TARGET_PIPELINES  # noqa: E402

FORMS = {
    "q4 @4 (default)": PIPELINES["q4"],
    "q4 @3 (int8 MatMulInteger head)": TARGET_PIPELINES["transformers.js@3"]["q4"],
    "q4 4-bit head (not chosen)": "tied-embedding(bits=4,block_size=32,symmetric=false,accuracy_level=4),"
                                  "matmul-nbits(bits=4,block_size=128,symmetric=false,accuracy_level=4)",
    "q4f16 @4 (default)": PIPELINES["q4f16"],
    "q4f16 @3 (accuracy_level 0)": TARGET_PIPELINES["transformers.js@3"]["q4f16"],
}
# the 4-bit head's speed is in docs/accuracy-level.md §4 (13.2 vs 13.4 ms/token at 0.5B, same run)
PAIRS = [("q4 @4 (default)", "q4 @3 (int8 MatMulInteger head)"), ("q4f16 @4 (default)", "q4f16 @3 (accuracy_level 0)")]


def _slug(name: str) -> str:
    return name.split(" (")[0].replace(" ", "_").replace("@", "t")


def build(fp32: Path, out: Path) -> dict[str, Path]:
    files = {}
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in FORMS.items():
        f = out / f"{_slug(name)}.onnx"
        if not f.exists():
            C.log(f"{name}: graphkit apply {spec}")
            r = C.run_cmd([C.PY, "-m", "graphkit", "apply", str(fp32), "-o", str(f), "--passes", spec])
            if r["rc"] != 0:
                raise SystemExit(f"graphkit apply failed for {name}:\n{r['stderr'][-2000:]}")
        files[name] = f
    return files


def quality() -> dict[str, dict]:
    from quality import score
    base, adapter = C.EXAMPLE / "base", C.EXAMPLE / "adapter"
    work = C.WORK / "targets-quality"
    export = work / "export" / "model.onnx"
    if not export.exists():
        C.log("shipped example: graphkit export (base + adapter)")
        r = C.run_cmd([C.PY, "-m", "graphkit", "export", str(base), "-a", str(adapter), "-o", str(export)])
        if r["rc"] != 0:
            raise SystemExit(f"graphkit export failed:\n{r['stderr'][-2000:]}")
    files = build(export, work / "forms")
    golden = json.loads((C.ROOT / "golden" / "prompts.json").read_text())
    cases = [(p["prompt_ids"], p["greedy_ids_adapter"]) for p in golden["prompts"]]
    import torch
    from graphkit.verify import TorchReference
    torch.set_num_threads(2)
    ref = TorchReference(base, adapter)
    refs = [ref.logits(p, c) for p, c in cases]
    return {name: score(f, cases, refs) for name, f in files.items()}


def speed(size: str, repeats: int) -> tuple[dict[str, int], list[dict]]:
    hf = C.WORK / f"qwen2.5-{size}" / "hf"
    if not hf.exists():
        C.run_cmd([C.PY, str(C.ROOT / "benchmarks" / "build_random_model.py"), "--size", size], quiet=False)
    fp32 = C.WORK / f"targets-{size}" / "export" / "model.onnx"
    if not fp32.exists():
        C.log(f"{size}: graphkit export")
        r = C.run_cmd([C.PY, "-m", "graphkit", "export", str(hf), "-o", str(fp32)])
        if r["rc"] != 0:
            raise SystemExit(f"graphkit export failed:\n{r['stderr'][-2000:]}")
    files = build(fp32, C.WORK / f"targets-{size}" / "forms")
    sizes = {name: C.file_bytes(f) for name, f in files.items()}
    rows = []
    for a, b in PAIRS:
        C.log(f"bench {a} vs {b} ({repeats} alternated rounds)")
        C.wait_quiet()
        r = C.run_cmd([C.PY, "-m", "graphkit", "bench", str(files[a]), "--vs", str(files[b]), "--threads", "2",
                       "--repeats", str(repeats), "--prompt-tokens", "64", "--new-tokens", "32", "--json"])
        if r["rc"] != 0:
            raise SystemExit(f"graphkit bench failed:\n{r['stderr'][-2000:]}")
        rep = json.loads(r["stdout"])  # one (indented) JSON object
        rows.append({"a": a, "b": b, "models": rep["models"], "ratios": rep["ratios"]})
    return sizes, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b", choices=["tiny", "0.5b", "1.5b"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    scores = quality()
    sizes, rows = ({}, []) if a.skip_speed else speed(a.size, a.repeats)
    q_rows = [[name, C.mb(sizes[name]) if name in sizes else "—", f"{s['kl_mean']:.2e}", f"{s['kl_max']:.2e}",
               f"{s['top1']:.3f}", f"{s['greedy_eq']}/5"] for name, s in scores.items()]
    s_rows = []
    for r in rows:
        ma, mb_ = r["models"]
        s_rows.append([f"{r['a']} → {r['b']}", f"{ma['decode_ms_per_token']:.2f}", f"{mb_['decode_ms_per_token']:.2f}",
                       f"{r['ratios']['decode_ms_per_token']:.3f}", f"{ma['prefill_ms']:.0f} / {mb_['prefill_ms']:.0f}",
                       f"{r['ratios']['prefill_ms']:.3f}"])
    body = f"""## Runtime targets: what `--target transformers.js@3` costs

{C.machine()}

Command: `.venv/bin/python benchmarks/targets.py --size {a.size} --repeats {a.repeats}`. Forms and why: the
script's docstring and [`docs/runtimes.md`](../docs/runtimes.md). Quality: the shipped trained example, KL(PyTorch ‖
variant) over the golden continuations; size: the {a.size} random-weight shape.

{C.table(["form", f"size ({a.size})", "KL mean", "KL max", "top-1", "greedy = golden"], q_rows)}

CPU decode (onnxruntime, 2 threads, 64-token prompt, 32 new tokens, {a.size}; each row one alternated run of {a.repeats} rounds; ratio = B / A,
below 1 = B faster):

{C.table(["A → B", "A ms/token", "B ms/token", "decode B/A", "prefill ms A / B", "prefill B/A"], s_rows)}
"""
    C.write_section("runtime-targets", body)


if __name__ == "__main__":
    main()
