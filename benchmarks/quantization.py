#!/usr/bin/env python3
"""4-bit methods side by side on the shipped example: ours (RTN, search, GPTQ self-calibrated, GPTQ on data,
each size budget, q4f16's table at 8 bits) beside onnxruntime's MatMulNBitsQuantizer (default RTN, INC RTN, HQQ,
k_quant, GPTQ; and through its float16 converter, q4f16's class) on the same fp32 export. Size, top-1, KL and
greedy = fp32 on the default prompts; on the held-out validation set as `verify --data`: top-1, KL, answers = fp32
and facts kept.

    .venv/bin/python benchmarks/quantization.py [--calibration train.jsonl] [--heldout validation.jsonl]

Reference: the fp32 export (= PyTorch within 1e-4, tests/test_golden.py), greedy 32 tokens per prompt, variants
teacher-forced over it. Held-out: --heldout (default: the example's data/validation.jsonl), never used for
calibration or tuning. Calibration: --calibration (default: the example's data/train.jsonl, 64 samples); without
one the data rows are left out. --only runs a subset (printed, RESULTS.md untouched). onnxruntime's quantizers run with block_size 32 (their k_quant/RTN need an even block count at 128 on
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
        cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=C.ort_gptq_reader(src, seqs), block_size=32)
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


def _row_cells(rep_default, rep_val) -> list[str]:
    cells = [f"{rep_default.top1_agreement:.3f}", f"{rep_default.kl_mean:.2e}",
             f"{rep_default.greedy_equal}/{len(rep_default.first_divergence)}"]
    if rep_val is not None:
        cells += [f"{rep_val.top1_agreement:.3f}", f"{rep_val.kl_mean:.2e}",
                  f"{rep_val.answers_equal}/{len(rep_val.first_divergence)}", f"{rep_val.facts_kept}/{rep_val.facts_total}"]
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=Path, default=C.EXAMPLE / "data" / "train.jsonl")
    ap.add_argument("--heldout", type=Path, default=C.EXAMPLE / "data" / "validation.jsonl")
    ap.add_argument("--budgets", default="1.2,1.3,1.5")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the variants whose label has one "
                                               "(a partial run prints its table and does not write RESULTS.md)")
    args = ap.parse_args()
    import logging
    logging.disable(logging.INFO)  # onnxruntime's quantizers log every node at INFO
    from graphkit.dataset import eos_token_ids, load_tokenizer, model_context, verification_examples
    from graphkit.prompts import DEFAULT_PROMPTS, encode_prompts
    from graphkit.verify import OnnxReference, check_variant, reference_runs
    from graphkit.verify_data import DEFAULT_EXTRA_TOKENS, check_variant_on_data, reference_data_runs
    work = C.WORK / "quantization"
    C.fresh_dir(work)
    C.log("fp32 export (graphkit convert --dtypes fp32,fp16,q8)")
    r = C.run_cmd([C.PY, "-m", "graphkit", "convert", "-o", str(work / "fp32"), "--dtypes", "fp32,fp16,q8", "--no-agreement",
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
    ref = OnnxReference(Path(src))
    default_runs = reference_runs(ref, encode_prompts(folder, DEFAULT_PROMPTS), 32)
    val_runs, tok, eos = None, None, set()
    if args.heldout.exists():
        tok = load_tokenizer(folder)
        eos = eos_token_ids(folder, tokenizer=tok)
        examples = verification_examples(args.heldout, folder, max_len=model_context(folder), tokenizer=tok)
        val_runs, in_file, ref_kept = reference_data_runs(ref, examples, tok, eos, DEFAULT_EXTRA_TOKENS,
                                                          model_context(folder))
        C.log(f"held-out: {len(val_runs)} examples of {args.heldout.name}; fp32 keeps {ref_kept}/{in_file} of the "
              f"facts the file's answers take, {sum(len(r.ref_facts) for r in val_runs)} facts taken in all")

    times: dict[str, float] = {}
    C.log("calibration statistics: self-generated" + (" and data" if data_seqs else ""))
    times["stats self"] = stats(src, str(work / "self.npz"), None, str(base))["seconds"]
    if data_seqs:
        times["stats data"] = stats(src, str(work / "data.npz"), data_seqs, str(base))["seconds"]
    from graphkit.convert import DEFAULT_SIZE_BUDGET
    budgets = [float(x) for x in args.budgets.split(",") if x]
    variants: dict[str, tuple[str, str]] = {}  # label -> (kind, spec or algo)
    for dtype, head, body, f16 in (("q4", Q4_HEAD, Q4_BODY, False), ("q4f16", Q4F16_HEAD, Q4F16_BODY, True)):
        tail = ",fp16" if f16 else ""
        variants[f"ours {dtype} RTN"] = ("ours", f"{head},{body.format(m='')}{tail}")
        variants[f"ours {dtype} search"] = ("ours", f"{head},{body.format(m=',method=search')}{tail}")
        cals = [("self", work / "self.npz")] + ([("data", work / "data.npz")] if data_seqs else [])
        for cname, cpath in cals:
            variants[f"ours {dtype} GPTQ {cname}"] = ("ours", mixed_spec(src, str(cpath), 1.0, head, body, f16))
            for b in budgets:
                default = " (convert's default)" if cname == "self" and b == DEFAULT_SIZE_BUDGET else ""
                variants[f"ours {dtype} GPTQ {cname}, budget {b:g}x{default}"] = (
                    "ours", mixed_spec(src, str(cpath), b, head, body, f16))
        if f16:  # the 4-bit tied table is q4f16's largest error: the same body with q4's 8-bit table
            for cname, cpath in cals:
                variants[f"ours {dtype} GPTQ {cname}, 8-bit table"] = (
                    "ours", mixed_spec(src, str(cpath), 1.0, "tied-embedding(bits=8,block_size=32,accuracy_level=4)", body, f16))
                variants[f"ours {dtype} GPTQ {cname}, GPTQ 4-bit table"] = (
                    "ours", mixed_spec(src, str(cpath), 1.0, head[:-1] + f",method=gptq,calibration={cpath})", body, f16))
    from graphkit.convert import DTYPE_FILES
    variants["ours q8 (default)"] = ("file", str(folder / "onnx" / DTYPE_FILES["q8"]))
    variants["ours fp16 (default)"] = ("file", str(folder / "onnx" / DTYPE_FILES["fp16"]))
    for algo in ("default", "rtn", "hqq", "k_quant", "gptq"):
        variants[f"onnxruntime {algo} (block 32, float table)"] = ("ort", algo)
    # q4f16's class: the same 4-bit file through onnxruntime's float16 converter (the anchor recipe's second step)
    for algo in ("rtn", "hqq", "k_quant"):
        variants[f"onnxruntime {algo} + float16 converter"] = ("ort16", algo)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    if only:
        variants = {k: v for k, v in variants.items() if any(o in k for o in only)}

    measured, figures = [], {}  # (label, size cell, seconds cell, default report, held-out report) or a failure row
    for i, (label, (kind, what)) in enumerate(variants.items()):
        out = str(work / f"v{i}.onnx")
        C.log(f"{label}")
        try:
            if kind == "ours":
                t = ours_variant(src, out, what)["seconds"]
            elif kind == "file":
                out, t = what, None
            else:
                if what == "gptq" and not data_seqs:
                    continue
                t = ort_variant(src, out, what, data_seqs)["seconds"]
                if kind == "ort16":
                    t0 = time.perf_counter()
                    C.anchor_f16(out, out + ".f16.onnx")
                    out, t = out + ".f16.onnx", t + time.perf_counter() - t0
        except Exception as exc:  # a contender that fails is reported, not fatal
            measured.append([label, "—", f"failed: {str(exc).splitlines()[0][:80]}"])
            continue
        size = C.file_bytes(Path(out))
        rep_d = check_variant("q4", Path(out), default_runs)
        rep_v = check_variant_on_data("q4", Path(out), val_runs, tok, eos) if val_runs is not None else None
        figures[label] = {"bytes": size, "kl_default": rep_d.kl_mean, "kl_val": rep_v.kl_mean if rep_v else None,
                          "equal_val": rep_v.answers_equal if rep_v else None,
                          "facts": (rep_v.facts_kept, rep_v.facts_total) if rep_v else None,
                          "greedy_default": rep_d.greedy_equal}
        measured.append((label, C.mb(size), "—" if t is None else f"{t:.1f}", rep_d, rep_v))
        C.log("   " + " | ".join(_row_cells(rep_d, rep_v)))
    (work / "figures.json").write_text(json.dumps(figures, indent=1))
    # The goal's comparator: the best (lowest KL) of onnxruntime's RTN / HQQ / k_quant, per prompt set. For ours q4
    # (fp32 activations) its fp32 files; for ours q4f16 the same files through the float16 converter (q4f16's class),
    # and the fp32 ones as well (the literal bar).
    key = "kl_val" if val_runs is not None else "kl_default"

    def best(suffix: str) -> dict | None:
        c = {k: v for k, v in figures.items() if k.startswith("onnxruntime ") and k.split(" ")[1] in ("rtn", "hqq", "k_quant")
             and k.endswith(suffix)}
        return {m: min(c.values(), key=lambda v: v[m])[m] for m in ("kl_default", key, "bytes")} if c else None
    b32, b16 = best("(block 32, float table)"), best("+ float16 converter")
    rows = []
    for m in measured:
        if len(m) == 3:
            rows.append(list(m) + ["—"] * (len(rows[0]) - 3 if rows else 9))
            continue
        label, size, secs, rep_d, rep_v = m
        cells = [label, size, secs] + _row_cells(rep_d, rep_v)
        cmp = b16 if "q4f16" in label or "float16" in label else b32
        f = figures[label]
        cells.append("—" if not cmp else f"{f['kl_default'] / cmp['kl_default']:.2f}× / {f[key] / cmp[key]:.2f}×"
                     + (f" ({f[key] / b32[key]:.2f}× fp32's)" if cmp is b16 and b32 else ""))
        rows.append(cells)
    head = ["variant", "size", "quantize s", "top-1 default", "KL default", "greedy default"]
    if val_runs is not None:
        head += ["top-1 held-out", "KL held-out", "answers = fp32", "facts kept"]
    head.append("KL ÷ onnxruntime's best (default / held-out)")
    table = C.table(head, rows)
    if only:
        print(table)
        return
    goal_lines = []
    for name, b in (("fp32 files (block 32, float table)", b32), ("through the float16 converter", b16)):
        if b:
            goal_lines.append(f"Best of onnxruntime's RTN / HQQ / k_quant, {name}: KL {b['kl_default']:.2e} default, "
                              f"{b[key]:.2e} held-out, smallest {C.mb(b['bytes'])}.")
    body = f"""## Quantization methods, shipped example (issue 17)

{C.machine()}

Command: `.venv/bin/python benchmarks/quantization.py`. Reference: the fp32 export. Default prompts: graphkit/prompts.py
(4; two outside the example's training distribution), greedy 32 tokens, variants teacher-forced over them (KL(fp32 ‖
variant) in nats, top-1 agreement, greedy = fp32). Held-out: {args.heldout.name} ({len(val_runs or [])} cases never used for
calibration or tuning), as `graphkit verify --data`: teacher-forced top-1/KL over the file's answers, each variant's greedy
answer = fp32's, and facts kept (the numbers, sex and diagnosis fp32's answer takes from the prompt).
Calibration: {'self-generated only (no data file)' if not data_seqs else f'{args.calibration.name}, {len(data_seqs)} samples; and self-generated'}.
Statistics: self {times['stats self']:.1f} s{f", data {times['stats data']:.1f} s" if 'stats data' in times else ''}.
Ours q4 = `{Q4_HEAD}` + body block 128 with zero points; q4f16 = `{Q4F16_HEAD}` + body block 32 symmetric + fp16.
Budget = `--size-budget` (graphkit/mixed.py). onnxruntime's files keep the tied table in float (their size includes it).
{' '.join(goal_lines)} The last column divides each KL by the best of its class: q4f16
rows and the float16-converted files by the float16-converted best (and, in brackets, the fp32 best), the others by the fp32 files' best.

{table}
"""
    C.write_section("quantization-methods", body)


if __name__ == "__main__":
    main()
