#!/usr/bin/env python3
"""4-bit methods side by side on the shipped example: ours (RTN, search, GPTQ self-calibrated, GPTQ on data,
each size budget) beside onnxruntime's MatMulNBitsQuantizer (default RTN, INC RTN, HQQ, k_quant, GPTQ) on the
same fp32 export. Size, top-1, KL and greedy = fp32 on the default prompts and on held-out prompts.

    .venv/bin/python benchmarks/quantization.py [--calibration train.jsonl] [--heldout validation.jsonl]

Reference: the fp32 export (= PyTorch within 1e-4, tests/test_golden.py), greedy 32 tokens per prompt, variants
teacher-forced over it. Held-out prompts: the user turns of --heldout (default: the example's
validation.jsonl beside the adapter if present, else golden/prompts.json) — never used for calibration.
Calibration: --calibration (default: the example's train.jsonl if present); without one the data rows are left
out. onnxruntime's quantizers run with block_size 32 (their k_quant/RTN need an even block count at 128 on
this model); onnxruntime's GPTQ gets the same calibration sequences.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

Q4_BODY = "matmul-nbits(bits=4,block_size=128,symmetric=false,accuracy_level=4{m})"
Q4_HEAD = "tied-embedding(bits=8,block_size=128,accuracy_level=4)"
Q4F16_BODY = "matmul-nbits(bits=4,block_size=32,accuracy_level=4{m})"
Q4F16_HEAD = "tied-embedding(bits=4,block_size=16,symmetric=false,accuracy_level=4)"


def ort_variant(src: str, out: str, algo: str, seqs: list | None = None) -> dict:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig, GPTQWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, KQuantWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig)
    t0 = time.perf_counter()
    if algo == "gptq":
        import numpy as np
        from onnxruntime.quantization import CalibrationDataReader
        from graphkit.ortrun import DecoderRunner

        class Reader(CalibrationDataReader):
            def __init__(self):
                r = DecoderRunner.from_file(src)
                self.items = []
                for s in seqs:
                    ids = np.array([s], np.int64)
                    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                    if "position_ids" in r.inputs:
                        feed["position_ids"] = np.arange(len(s), dtype=np.int64)[None]
                    feed.update(r.empty_past(1))
                    self.items.append(feed)
                self.it = iter(self.items)

            def get_next(self):
                return next(self.it, None)

            def rewind(self):
                self.it = iter(self.items)

            def __deepcopy__(self, memo):
                new = Reader.__new__(Reader)
                new.items, new.it = self.items, iter(self.items)
                return new
        cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=32)
    else:
        cfg = {"default": DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True), "rtn": RTNWeightOnlyQuantConfig(),
               "hqq": HQQWeightOnlyQuantConfig(block_size=32), "k_quant": KQuantWeightOnlyQuantConfig()}[algo]
    q = MatMulNBitsQuantizer(onnx.load(src), block_size=32, algo_config=cfg)
    q.process()
    q.model.save_model_to_file(out, use_external_data_format=False)
    return {"seconds": time.perf_counter() - t0}


def ours_variant(src: str, out: str, spec: str) -> dict:
    from graphkit.modelio import load_model, save_model
    from graphkit.pipeline import parse_spec, run_passes
    t0 = time.perf_counter()
    m, _ = run_passes(load_model(src), parse_spec(spec))
    save_model(m, Path(out))
    return {"seconds": time.perf_counter() - t0}


def stats(src: str, out: str, seqs: list | None, tokenizer: str) -> dict:
    from graphkit.calibration import chat_prefix, collect_stats, self_generated_sequences
    from graphkit.convert import SELF_CALIBRATION_SAMPLES, SELF_CALIBRATION_TOKENS
    t0 = time.perf_counter()
    if seqs is None:
        seqs = self_generated_sequences(Path(src), chat_prefix(Path(tokenizer)), SELF_CALIBRATION_SAMPLES,
                                        SELF_CALIBRATION_TOKENS)
    meta = collect_stats(Path(src), seqs, Path(out))
    return {"seconds": time.perf_counter() - t0, "tokens": meta["tokens"]}


def mixed_spec(src: str, stats_path: str, budget: float, head: str, body: str, fp16: bool) -> str:
    from graphkit.convert import _mixed_spec
    spec = f"{head},{body.format(m=',method=gptq,calibration=' + stats_path)}" + (",fp16" if fp16 else "")
    return _mixed_spec(spec, Path(src), Path(stats_path), budget, lambda m: None)[0] if budget > 1 else spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=Path, default=C.EXAMPLE / "train.jsonl")
    ap.add_argument("--heldout", type=Path, default=C.EXAMPLE / "validation.jsonl")
    ap.add_argument("--budgets", default="1.15,1.3")
    args = ap.parse_args()
    from graphkit.prompts import DEFAULT_PROMPTS, encode_prompts
    from graphkit.verify import OnnxReference, check_variant, reference_runs
    work = C.WORK / "quantization"
    C.fresh_dir(work)
    C.log("fp32 export (graphkit convert --dtypes fp32)")
    r = C.run_cmd([C.PY, "-m", "graphkit", "convert", "-o", str(work / "fp32"), "--dtypes", "fp32", "--no-agreement",
                   "--overwrite", "--json"])
    if r["rc"] != 0:
        raise SystemExit(r["stderr"][-2000:])
    folder = work / "fp32"
    src = str(folder / "onnx" / "model.onnx")
    base = C.EXAMPLE / "base"
    data_seqs = None
    if args.calibration.exists():
        from graphkit.dataset import calibration_sequences
        data_seqs = calibration_sequences(args.calibration, base, limit=64)
    if args.heldout.exists():
        from graphkit.dataset import verification_examples
        held_prompts = [e.prompt_ids for e in verification_examples(args.heldout, base)]
        held_name = args.heldout.name
    else:
        golden = json.loads((C.ROOT / "golden" / "prompts.json").read_text())
        held_prompts = [p["prompt_ids"] for p in golden["prompts"]]
        held_name = "golden/prompts.json"
    sets = {"default": encode_prompts(folder, DEFAULT_PROMPTS), "held-out": held_prompts}
    ref = OnnxReference(Path(src))
    runs = {k: reference_runs(ref, v, 32) for k, v in sets.items()}

    times: dict[str, float] = {}
    C.log("calibration statistics: self-generated" + (" and data" if data_seqs else ""))
    times["stats self"] = stats(src, str(work / "self.npz"), None, str(base))["seconds"]
    if data_seqs:
        times["stats data"] = stats(src, str(work / "data.npz"), data_seqs, str(base))["seconds"]
    variants: dict[str, tuple[str, str]] = {}  # label -> (kind, spec or algo)
    for dtype, head, body, f16 in (("q4", Q4_HEAD, Q4_BODY, False), ("q4f16", Q4F16_HEAD, Q4F16_BODY, True)):
        tail = ",fp16" if f16 else ""
        variants[f"ours {dtype} RTN"] = ("ours", f"{head},{body.format(m='')}{tail}")
        variants[f"ours {dtype} search"] = ("ours", f"{head},{body.format(m=',method=search')}{tail}")
        variants[f"ours {dtype} GPTQ self (default)"] = ("ours", mixed_spec(src, str(work / "self.npz"), 1.0, head, body, f16))
        for b in [float(x) for x in args.budgets.split(",") if x]:
            variants[f"ours {dtype} GPTQ self, budget {b:g}x"] = ("ours", mixed_spec(src, str(work / "self.npz"), b, head, body, f16))
        if data_seqs:
            variants[f"ours {dtype} GPTQ data"] = ("ours", mixed_spec(src, str(work / "data.npz"), 1.0, head, body, f16))
            for b in [float(x) for x in args.budgets.split(",") if x]:
                variants[f"ours {dtype} GPTQ data, budget {b:g}x"] = ("ours", mixed_spec(src, str(work / "data.npz"), b, head, body, f16))
    for algo in ("default", "rtn", "hqq", "k_quant", "gptq"):
        variants[f"onnxruntime {algo} (block 32, float table)"] = ("ort", algo)

    rows = []
    for i, (label, (kind, what)) in enumerate(variants.items()):
        out = str(work / f"v{i}.onnx")
        C.log(f"{label}")
        try:
            if kind == "ours":
                t = ours_variant(src, out, what)["seconds"]
            else:
                t = ort_variant(src, out, what, data_seqs or None)["seconds"] if (what != "gptq" or data_seqs) else None
                if t is None:
                    continue
        except Exception as exc:  # a contender that fails is reported, not fatal
            rows.append([label, "—", f"failed: {str(exc).splitlines()[0][:80]}"] + ["—"] * 6)
            continue
        cells = [label, C.mb(C.file_bytes(Path(out))), f"{t:.1f}"]
        for k in ("default", "held-out"):
            rep = check_variant("q4", Path(out), runs[k])
            cells += [f"{rep.top1_agreement:.3f}", f"{rep.kl_mean:.4f}", f"{rep.greedy_equal}/{len(runs[k])}"]
        rows.append(cells)
    head = ["variant", "size", "quantize s", "top-1 default", "KL default", "greedy default",
            f"top-1 held-out", "KL held-out", "greedy held-out"]
    body = f"""## Quantization methods, shipped example (issue 17)

{C.machine()}

Command: `.venv/bin/python benchmarks/quantization.py`. Reference: the fp32 export, greedy 32 tokens; variants
teacher-forced over it (KL(fp32 ‖ variant) in nats, top-1 agreement, greedy = fp32 over 32 tokens).
Default prompts: graphkit/prompts.py (4). Held-out: {held_name} ({len(held_prompts)} prompts, never used for
calibration). Calibration: {'self-generated only (no data file)' if not data_seqs else f'{args.calibration.name}, {len(data_seqs)} samples; and self-generated'}.
Statistics: self {times['stats self']:.1f} s{f", data {times['stats data']:.1f} s" if 'stats data' in times else ''}.
Ours q4 = `{Q4_HEAD}` + body block 128 with zero points; q4f16 = `{Q4F16_HEAD}` + body block 32 symmetric + fp16.
onnxruntime's files keep the tied table in float (their size includes it).

{C.table(head, rows)}
"""
    C.write_section("quantization-methods", body)


if __name__ == "__main__":
    main()
