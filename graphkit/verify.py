"""`graphkit verify`: is each ONNX variant in a Transformers.js folder as good as its reference?

For every `onnx/model*.onnx` it runs, on a set of prompts, the reference's greedy continuation
(PyTorch when a model folder is given, else the folder's fp32 `model.onnx`) and measures:
- top-1 agreement: teacher-forced on the reference continuation, the share of positions where the
  variant's argmax equals the reference's;
- KL(reference || variant) of the next-token distributions, mean and max, in nats;
- the first position where the variant's own greedy generation diverges from the reference's;
- NaN/inf in the logits.
A variant below its dtype's threshold fails, and so does the command (exit status 1).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from graphkit.errors import GraphkitError
from graphkit.ortrun import DecoderRunner, kl_divergence
from graphkit.tjs_contract import DTYPE_FILES

# Minimum teacher-forced top-1 agreement with the reference, per dtype. Measured margins are in the
# README; these are what a variant must reach to ship.
THRESHOLDS = {"fp32": 0.99, "fp16": 0.95, "q8": 0.90, "int8": 0.90, "uint8": 0.90, "q4": 0.85, "q4f16": 0.85, "bnb4": 0.85}


@dataclass
class VariantReport:
    dtype: str
    file: str
    top1_agreement: float = 0.0
    kl_mean: float = math.inf
    kl_max: float = math.inf
    first_divergence: list[int | None] = field(default_factory=list)
    greedy_equal: int = 0
    nonfinite: int = 0
    threshold: float = 0.0
    passed: bool = False
    error: str | None = None
    seconds: float = 0.0


class OnnxReference:
    def __init__(self, path: Path) -> None:
        self.name = f"fp32 ONNX ({path.name})"
        self.runner = DecoderRunner.from_file(path, prepack=False)  # the reference: memory-mapped weights

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        return self.runner.greedy(prompt, n)[0]

    def logits(self, prompt: list[int], cont: list[int]) -> np.ndarray:
        return self.runner.teacher_forced_logits(prompt, cont)


class TorchReference:
    def __init__(self, model_dir: Path, adapter_dir: Path | None) -> None:
        from graphkit.hfmodel import load_causal_lm
        self.name = f"PyTorch ({model_dir}{' + ' + str(adapter_dir) if adapter_dir else ''})"
        self.model, _ = load_causal_lm(model_dir, adapter_dir)

    def logits(self, prompt: list[int], cont: list[int]) -> np.ndarray:
        import torch
        ids = torch.tensor([list(prompt) + list(cont)])
        with torch.no_grad():
            out = self.model(input_ids=ids).logits[0].float().numpy()
        return out[len(prompt) - 1:len(prompt) - 1 + len(cont)]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """Plain argmax for exactly n steps (no EOS handling), like DecoderRunner.greedy."""
        import torch
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(self.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]


def variants_in(folder: Path) -> list[tuple[str, Path]]:
    onnx_dir = folder / "onnx"
    if not onnx_dir.is_dir() and any((folder / f).exists() for f in DTYPE_FILES.values()):
        onnx_dir = folder  # an optimum export: model.onnx / model_quantized.onnx beside config.json
    if not onnx_dir.is_dir():
        raise GraphkitError(f"{folder}: no onnx/ folder; give a Transformers.js model folder (see `graphkit convert`)")
    found = [(dt, onnx_dir / f) for dt, f in DTYPE_FILES.items() if (onnx_dir / f).exists()]
    if not found:
        raise GraphkitError(f"{onnx_dir}: no model*.onnx files with Transformers.js dtype names")
    return found


def reference_runs(reference, prompts: list[list[int]], new_tokens: int) -> list[tuple[list[int], list[int], np.ndarray]]:
    runs = []
    for p in prompts:
        cont = reference.greedy(p, new_tokens)
        runs.append((p, cont, reference.logits(p, cont)))
    return runs


def check_variant(dtype: str, path: Path, runs, threshold: float | None = None) -> VariantReport:
    rep = VariantReport(dtype, path.name, threshold=THRESHOLDS.get(dtype, 0.85) if threshold is None else threshold)
    t0 = time.perf_counter()
    try:
        runner = DecoderRunner.from_file(path)
        agree, total, kls = 0, 0, []
        for prompt, cont, ref_logits in runs:
            logits = runner.teacher_forced_logits(prompt, cont)
            rep.nonfinite += int((~np.isfinite(logits)).sum())
            finite = np.where(np.isfinite(logits), logits, 0.0)
            agree += int((finite.argmax(-1) == ref_logits.argmax(-1)).sum())
            total += len(cont)
            kls.append(kl_divergence(ref_logits, finite))
            own = runner.greedy(prompt, len(cont))[0]
            div = next((i for i, (a, b) in enumerate(zip(own, cont)) if a != b), None)
            rep.first_divergence.append(div)
            rep.greedy_equal += div is None
        rep.top1_agreement = agree / max(total, 1)
        all_kl = np.concatenate(kls) if kls else np.array([math.inf])
        rep.kl_mean, rep.kl_max = float(all_kl.mean()), float(all_kl.max())
        rep.passed = rep.top1_agreement >= rep.threshold and rep.nonfinite == 0
    except Exception as exc:  # a variant that cannot even run is a failed variant, not a crash
        rep.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    rep.seconds = round(time.perf_counter() - t0, 2)
    return rep


def verify_folder(folder: Path, reference_dir: Path | None = None, adapter_dir: Path | None = None,
                  prompts_file: Path | None = None, new_tokens: int = 32, dtypes: list[str] | None = None,
                  progress=None) -> dict:
    from graphkit.prompts import encode_prompts, load_prompts
    step = progress or (lambda msg: None)
    folder = Path(folder)
    variants = variants_in(folder)
    if dtypes:
        variants = [(d, p) for d, p in variants if d in dtypes]
    prompts = encode_prompts(folder, load_prompts(prompts_file))
    if reference_dir is not None:
        step(f"loading reference {reference_dir}")
        reference = TorchReference(Path(reference_dir), Path(adapter_dir) if adapter_dir else None)
    else:
        fp32 = folder / "onnx" / "model.onnx"
        if not fp32.exists() and (folder / "model.onnx").exists():
            fp32 = folder / "model.onnx"  # an optimum export
        if not fp32.exists():
            raise GraphkitError(f"{folder}: no onnx/model.onnx to use as reference; pass --reference MODEL_DIR")
        reference = OnnxReference(fp32)
    step(f"reference greedy runs on {len(prompts)} prompts ({reference.name})")
    runs = reference_runs(reference, prompts, new_tokens)
    reports = []
    for dtype, path in variants:
        step(f"checking {path.name}")
        reports.append(check_variant(dtype, path, runs))
    return {"folder": str(folder), "reference": reference.name, "prompts": len(prompts), "new_tokens": new_tokens,
            "passed": all(r.passed for r in reports), "variants": [asdict(r) for r in reports]}


def render(result: dict) -> None:
    from rich.table import Table

    from graphkit.console import out
    table = Table(title=f"verify {result['folder']} vs {result['reference']} "
                        f"({result['prompts']} prompts × {result['new_tokens']} tokens)")
    for col in ("dtype", "file", "top-1 agree", "threshold", "KL mean", "KL max", "greedy equal", "first divergence", "NaN/inf", "result"):
        table.add_column(col)
    for v in result["variants"]:
        if v["error"]:
            table.add_row(v["dtype"], v["file"], "-", f"{v['threshold']:.2f}", "-", "-", "-", "-", "-", f"[red]ERROR[/] {v['error']}")
            continue
        divs = [d for d in v["first_divergence"] if d is not None]
        table.add_row(v["dtype"], v["file"], f"{v['top1_agreement']:.3f}", f"{v['threshold']:.2f}", f"{v['kl_mean']:.4f}",
                      f"{v['kl_max']:.3f}", f"{v['greedy_equal']}/{len(v['first_divergence'])}",
                      str(min(divs)) if divs else "none", str(v["nonfinite"]),
                      "[green]pass[/]" if v["passed"] else "[red]FAIL[/]")
    out.print(table)


def browser_check(folder: Path, prompts_file: Path | None, new_tokens: int, dtypes: list[str] | None,
                  devices: list[str], progress=None) -> list[dict]:
    """Transformers.js in headless Chromium vs our onnxruntime loop, per device and dtype."""
    import json

    from graphkit.prompts import encode_prompts, load_prompts
    from graphkit.tjs import browser_matrix
    folder = Path(folder)
    messages = [p for p in load_prompts(prompts_file) if not isinstance(p, str)][:2]
    if not messages:
        raise GraphkitError("--browser needs chat-message prompts (the browser formats them with the chat template)")
    ids = encode_prompts(folder, messages)
    gen_path = folder / "generation_config.json"
    eos = json.loads(gen_path.read_text()).get("eos_token_id", []) if gen_path.exists() else []
    eos = eos if isinstance(eos, list) else [eos]
    wanted = [d for d, _ in variants_in(folder) if not dtypes or d in dtypes]
    return browser_matrix(folder, wanted, devices, messages, ids, new_tokens, eos, progress=progress)


def render_browser(rows: list[dict]) -> None:
    from rich.table import Table

    from graphkit.console import out
    table = Table(title="Transformers.js in headless Chromium vs onnxruntime (Python)")
    for col in ("device", "dtype", "result", "detail"):
        table.add_column(col)
    colors = {"pass": "green", "fail": "red", "skipped": "yellow"}
    for r in rows:
        table.add_row(r["device"], r["dtype"], f"[{colors[r['status']]}]{r['status']}[/]", r["detail"])
    out.print(table)
