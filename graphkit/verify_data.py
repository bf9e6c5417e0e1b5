"""`graphkit verify OUT_DIR --data validation.jsonl`: each variant on the user's own examples.

For every example of the JSONL (see :mod:`graphkit.dataset`) and every `onnx/model*.onnx`:

- **teacher-forced top-1 and KL** over the example's *reference answer* (the file's assistant turn):
  the share of answer positions where the variant's argmax equals the reference model's (PyTorch
  with ``--reference``, else the folder's fp32 ``model.onnx``), and KL(reference || variant) in nats;
- **answers equal**: the variant's own greedy answer (until an end-of-turn token, at most the
  reference answer's length + ``--new-tokens`` tokens) against the reference model's greedy answer;
- **facts kept** (:mod:`graphkit.facts`): the numbers with units (ages, days, doses) and the
  sex/diagnosis terms that the reference model's answer takes from the prompt; the variant keeps
  one when its own answer states it too.

A variant passes when its top-1 reaches its dtype's threshold (:data:`graphkit.verify.THRESHOLDS`,
the same as plain ``verify``), its logits are finite, and it keeps at least ``facts_threshold`` of
the facts the reference kept — by default **1.0: every fact**. A clinical answer that changes a
patient's age, sex or dose is wrong however close its distributions are, so one lost fact fails
the variant and the command exits 1.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from graphkit.dataset import (Example, eos_token_ids, load_tokenizer, model_context, read_validation_records,
                              verification_examples)
from graphkit.errors import GraphkitError
from graphkit.facts import extract_facts
from graphkit.ortrun import DecoderRunner, kl_divergence
from graphkit.verify import THRESHOLDS, OnnxReference, TorchReference, variants_in

DEFAULT_FACTS_THRESHOLD = 1.0
DEFAULT_EXTRA_TOKENS = 32


@dataclass
class DataVariantReport:
    dtype: str
    file: str
    top1_agreement: float = 0.0
    kl_mean: float = math.inf
    kl_max: float = math.inf
    answers_equal: int = 0
    first_divergence: list[int | None] = field(default_factory=list)
    facts_kept: int = 0
    facts_total: int = 0
    lost_facts: list[dict] = field(default_factory=list)   # [{"line", "lost": [...], "answer"}]
    answers: list[str] = field(default_factory=list)
    nonfinite: int = 0
    threshold: float = 0.0
    facts_threshold: float = DEFAULT_FACTS_THRESHOLD
    passed: bool = False
    error: str | None = None
    seconds: float = 0.0


def greedy_until_eos(runner: DecoderRunner, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    """Greedy ids with the KV cache, stopping after the first end-of-turn id (kept) or ``max_new`` ids."""
    ids = np.array([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    out = runner.step(ids, mask, runner.empty_past(1))
    generated: list[int] = []
    while len(generated) < max_new:
        nxt = int(np.argmax(out.logits[0, -1]))
        generated.append(nxt)
        if nxt in eos or len(generated) == max_new:
            break
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        out = runner.step(np.array([[nxt]], np.int64), mask, out.present)
    return generated


def _reference_greedy(reference, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    if isinstance(reference, OnnxReference):
        return greedy_until_eos(reference.runner, prompt, max_new, eos)
    import torch  # PyTorch reference: generate() with the cache, greedy, same stop rule
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new, eos_token_id=sorted(eos) or None,
                                       pad_token_id=next(iter(eos), 0))[0, len(prompt):].tolist()
    cut = next((i for i, t in enumerate(out) if t in eos), None)
    return out if cut is None else out[:cut + 1]


@dataclass
class _Run:
    ex: Example
    max_new: int
    ref_logits: np.ndarray
    ref_answer: list[int]
    ref_text: str
    ref_facts: set[str]   # facts the reference's answer takes from the prompt


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def check_variant_on_data(dtype: str, path: Path, runs: list[_Run], tok, eos: set[int],
                          threshold: float | None = None,
                          facts_threshold: float = DEFAULT_FACTS_THRESHOLD) -> DataVariantReport:
    rep = DataVariantReport(dtype, path.name, threshold=THRESHOLDS.get(dtype, 0.85) if threshold is None else threshold,
                            facts_threshold=facts_threshold)
    t0 = time.perf_counter()
    try:
        runner = DecoderRunner.from_file(path)
        agree, total, kls = 0, 0, []
        for r in runs:
            logits = runner.teacher_forced_logits(r.ex.prompt_ids, r.ex.answer_ids)
            rep.nonfinite += int((~np.isfinite(logits)).sum())
            finite = np.where(np.isfinite(logits), logits, 0.0)
            agree += int((finite.argmax(-1) == r.ref_logits.argmax(-1)).sum())
            total += len(r.ex.answer_ids)
            kls.append(kl_divergence(r.ref_logits, finite))
            own = greedy_until_eos(runner, r.ex.prompt_ids, r.max_new, eos)
            div = next((i for i, (a, b) in enumerate(zip(own, r.ref_answer)) if a != b),
                       None if len(own) == len(r.ref_answer) else min(len(own), len(r.ref_answer)))
            rep.first_divergence.append(div)
            rep.answers_equal += div is None
            text = _decode(tok, own)
            rep.answers.append(text)
            lost = sorted(r.ref_facts - extract_facts(text))
            rep.facts_total += len(r.ref_facts)
            rep.facts_kept += len(r.ref_facts) - len(lost)
            if lost:
                rep.lost_facts.append({"line": r.ex.line, "lost": lost, "answer": text})
        rep.top1_agreement = agree / max(total, 1)
        all_kl = np.concatenate(kls) if kls else np.array([math.inf])
        rep.kl_mean, rep.kl_max = float(all_kl.mean()), float(all_kl.max())
        kept_share = rep.facts_kept / rep.facts_total if rep.facts_total else 1.0
        rep.passed = (rep.top1_agreement >= rep.threshold and rep.nonfinite == 0 and kept_share >= facts_threshold)
    except Exception as exc:  # a variant that cannot run is a failed variant, not a crash
        rep.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    rep.seconds = round(time.perf_counter() - t0, 2)
    return rep


def reference_data_runs(reference, examples: list[Example], tok, eos: set[int], extra: int, context: int | None
                        ) -> tuple[list[_Run], int, int]:
    """The reference's greedy answer, teacher-forced logits and facts taken, per example (what
    :func:`check_variant_on_data` compares a variant with); also the facts the file's answers take from the prompts
    and how many of those the reference keeps. Used by verify --data and benchmarks/quantization.py."""
    runs, expected, ref_kept = [], 0, 0
    for ex in examples:
        max_new = len(ex.answer_ids) + extra
        if context:
            max_new = max(1, min(max_new, context - len(ex.prompt_ids)))
        answer = _reference_greedy(reference, ex.prompt_ids, max_new, eos)
        text = _decode(tok, answer)
        prompt_facts = extract_facts(ex.prompt_text)
        taken = prompt_facts & extract_facts(text)
        wanted = prompt_facts & extract_facts(ex.answer_text)  # what the file's own answer takes
        expected += len(wanted)
        ref_kept += len(wanted & taken)
        runs.append(_Run(ex, max_new, reference.logits(ex.prompt_ids, ex.answer_ids), answer, text, taken))
    return runs, expected, ref_kept


def verify_data(folder: Path, data: Path, reference_dir: Path | None = None, adapter_dir: Path | None = None,
                dtypes: list[str] | None = None, samples: int | None = None, extra_tokens: int | None = None,
                facts_threshold: float = DEFAULT_FACTS_THRESHOLD, progress=None) -> dict:
    step = progress or (lambda msg: None)
    folder, data = Path(folder), Path(data)
    if not 0.0 <= facts_threshold <= 1.0:
        raise GraphkitError(f"--facts-threshold {facts_threshold}: give a share of facts between 0 and 1")
    read_validation_records(data)  # the data file is checked before anything is loaded
    variants = variants_in(folder)
    if dtypes:
        variants = [(d, p) for d, p in variants if d in dtypes]
    tok = load_tokenizer(folder)
    examples = verification_examples(data, folder, max_len=model_context(folder), limit=samples, tokenizer=tok)
    if not examples:
        raise GraphkitError(f"{data}: --samples {samples} leaves no example to check; give --samples 1 or more")
    eos = eos_token_ids(folder, tokenizer=tok)
    extra = DEFAULT_EXTRA_TOKENS if extra_tokens is None else extra_tokens
    context = model_context(folder)
    if reference_dir is not None:
        step(f"loading reference {reference_dir}")
        reference = TorchReference(Path(reference_dir), Path(adapter_dir) if adapter_dir else None)
    else:
        fp32 = folder / "onnx" / "model.onnx"
        if not fp32.exists():
            raise GraphkitError(f"{folder}: no onnx/model.onnx to use as reference; pass --reference MODEL_DIR")
        reference = OnnxReference(fp32)
    step(f"reference answers for {len(examples)} examples of {data.name} ({reference.name})")
    runs, expected, ref_kept = reference_data_runs(reference, examples, tok, eos, extra, context)
    reports = []
    for dtype, path in variants:
        step(f"checking {path.name}")
        reports.append(check_variant_on_data(dtype, path, runs, tok, eos, facts_threshold=facts_threshold))
    return {
        "folder": str(folder), "data": str(data), "reference": reference.name, "examples": len(runs),
        "facts_threshold": facts_threshold,
        # How well the reference itself copies: facts the file's answers take from the prompts, and how
        # many of those the reference's answers state (information; variants are judged against the reference).
        "reference_facts": {"in_file_answers": expected, "kept_by_reference": ref_kept,
                            "taken_by_reference": sum(len(r.ref_facts) for r in runs)},
        "reference_answers": [{"line": r.ex.line, "prompt": r.ex.prompt_text, "answer": r.ref_text,
                               "facts": sorted(r.ref_facts)} for r in runs],
        "passed": all(r.passed for r in reports),
        "variants": [asdict(r) for r in reports],
    }


def render_data(result: dict, show: int = 0) -> None:
    from rich.markup import escape
    from rich.table import Table

    from graphkit.console import out
    rf = result["reference_facts"]
    table = Table(title=f"verify {result['folder']} on {result['data']} ({result['examples']} examples) "
                        f"vs {result['reference']}")
    for col in ("dtype", "top-1", "KL mean", "KL max", "answers = ref", "facts kept", "result"):
        table.add_column(col)
    for v in result["variants"]:
        if v["error"]:
            table.add_row(v["dtype"], "-", "-", "-", "-", "-", f"[red]ERROR[/] {escape(v['error'])}")
            continue
        why = [] if v["passed"] else (
            ([f"top-1 < {v['threshold']:.2f}"] if v["top1_agreement"] < v["threshold"] else [])
            + ([f"{v['nonfinite']} NaN/inf"] if v["nonfinite"] else [])
            + ([f"lost {v['facts_total'] - v['facts_kept']} fact(s)"] if v["facts_kept"] < v["facts_total"] else []))
        table.add_row(v["dtype"], f"{v['top1_agreement']:.3f}", f"{v['kl_mean']:.4f}", f"{v['kl_max']:.3f}",
                      f"{v['answers_equal']}/{len(v['first_divergence'])}", f"{v['facts_kept']}/{v['facts_total']}",
                      "[green]pass[/]" if v["passed"] else f"[red]FAIL[/] {escape(', '.join(why))}")
    out.print(table)
    out.print(f"facts: the reference's answers take {rf['taken_by_reference']} facts from the prompts "
              f"(the file's answers state {rf['in_file_answers']}, the reference keeps {rf['kept_by_reference']} "
              f"of those); a variant fails below {result['facts_threshold']:.0%} of the reference's facts kept "
              f"or below its dtype's top-1 threshold.",
              markup=False, soft_wrap=True)
    for v in result["variants"]:
        for lost in v["lost_facts"][:3]:
            out.print(f"  {v['dtype']} line {lost['line']}: lost {', '.join(lost['lost'])}", markup=False)
    # Side by side: the reference's answer and each variant's (fp32 ONNX is left out when it is the reference).
    shown = [v for v in result["variants"] if not v["error"]
             and not (v["dtype"] == "fp32" and result["reference"].startswith("fp32 ONNX"))]
    for i, ref in enumerate(result["reference_answers"][:show]):
        t = Table(title=f"line {ref['line']}: {ref['prompt']}", title_justify="left", show_lines=True)
        t.add_column(f"reference ({result['reference'].split(' (')[0]})", ratio=1)
        row = [escape(ref["answer"])]
        for v in shown:
            same = v["first_divergence"][i] is None
            lost = next((x["lost"] for x in v["lost_facts"] if x["line"] == ref["line"]), [])
            verdict = "[green]same answer[/]" if same else (
                f"[red]lost {escape(', '.join(lost))}[/]" if lost else "[yellow]other words, facts kept[/]")
            t.add_column(f"{v['dtype']}: {verdict}", ratio=1)
            row.append(escape(v["answers"][i]))
        t.add_row(*row)
        t.caption = f"facts the reference takes from the prompt: {', '.join(ref['facts']) or 'none'}"
        out.print(t)
