"""Every registered pass through the same checks (the pass contract, graphkit/passbase.py):

- its spec round-trips (`describe()` parses back to the same pass);
- on the exported shipped decoder (after the passes it declares in ``after``) it either rewrites the graph or
  says why not; run again on its own output it is not applicable (or refuses: fp16 runs once), never a second
  silent rewrite;
- ``mutates_input = False`` passes leave their input byte-identical;
- new tensors of SPILL_MIN_BYTES and more go to disk inside ``spill_to`` (never into the proto);
- the declared Tolerance (data) holds against its reference on the golden continuations;
- `graphkit passes` and README's passes table show the declared tolerance.

Adding a pass adds it here automatically (registry-wide); a registered pass without its own
``tests/test_<module>.py`` fails here (one module + one test module + one registry line).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import ROOT
from graphkit import tensors
from graphkit.errors import PreconditionError
from graphkit.modelio import load_model, save_model
from graphkit.ortrun import DecoderRunner
from graphkit.passbase import Tolerance
from graphkit.pipeline import parse_spec, registry, run_passes

PASSES = sorted(registry())


@pytest.mark.parametrize("name", PASSES)
def test_spec_round_trip_and_declarations(name):
    cls = registry()[name]
    p = cls()
    again = parse_spec(p.spec())
    assert len(again) == 1 and type(again[0]) is cls and again[0].describe() == p.describe(), p.spec()
    assert isinstance(cls.tolerance, Tolerance) and cls.tolerance.reference
    assert isinstance(cls.mutates_input, bool)
    assert cls.__doc__ or sys.modules[cls.__module__].__doc__, "a pass states what it guarantees"
    if cls.after:
        parse_spec(cls.after)


def test_every_registered_pass_has_its_test_module():
    """Adding a pass = one module + one test module + one registry line (docs/adding-a-pass.md): the pass in
    ``passes/<module>.py`` has ``tests/test_<module>.py``, which runs it (names its class or its spec) in tests."""
    missing = []
    for name, cls in sorted(registry().items()):
        module = cls.__module__
        assert module.startswith("passes.") and module.count(".") == 1, f"{name}: one pass = one module in passes/"
        test = ROOT / "tests" / f"test_{module.split('.')[1]}.py"
        if not test.is_file():
            missing.append(f"{name}: no {test.relative_to(ROOT)}")
            continue
        text = test.read_text(encoding="utf-8")
        runs_it = cls.__name__ in text or re.search(rf"[\"']{re.escape(name)}\b", text)
        if not re.search(r"^def test_", text, re.M) or not runs_it:
            missing.append(f"{name}: {test.relative_to(ROOT)} neither names {cls.__name__} nor runs the spec '{name}'")
    assert not missing, "registered passes without their test module: " + "; ".join(missing)
    doc = (ROOT / "docs" / "adding-a-pass.md").read_text(encoding="utf-8")
    assert "One module, one test module, one registry line" in doc and "tests/test_my_pass.py" in doc


def test_readme_and_cli_show_the_declared_tolerance():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Passes"):readme.index("## Why the user's INT8")]
    res = subprocess.run([sys.executable, "-m", "graphkit", "passes", "--json"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    for name, cls in registry().items():
        rows = [re.split(r"(?<!\\)\|", line) for line in table.splitlines() if line.startswith("| `")]
        row = next((r for r in rows if f"`{name}`" in r[1]), None)
        assert row is not None, f"README's passes table has no row for {name}"
        assert cls.tolerance.headline() in row[3], (name, cls.tolerance.headline(), row[3])
        assert listed[name]["tolerance"] == cls.tolerance.as_dict() and listed[name]["mutates_input"] == cls.mutates_input


def _scramble_io(model: onnx.ModelProto) -> onnx.ModelProto:
    """The export with another exporter's KV names (``past_key_0`` / ``present_value_3``) and an unnamed batch dim:
    what kv-rename exists to fix."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    ren = {}
    for vi in list(g.input) + list(g.output):
        m = re.match(r"^(past_key_values|present)\.(\d+)\.(key|value)$", vi.name)
        if m:
            ren[vi.name] = f"{'past' if m.group(1) != 'present' else 'present'}_{m.group(3)}_{m.group(2)}"
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == "batch_size":
                d.dim_param = "b"
    for vi in list(g.input) + list(g.output):
        vi.name = ren.get(vi.name, vi.name)
    for n in g.node:
        n.input[:] = [ren.get(x, x) for x in n.input]
        n.output[:] = [ren.get(x, x) for x in n.output]
    return out


# A pass that has nothing to do on the clean export gets its input made here (and is checked not applicable on
# the clean export itself); its tolerance is measured against the clean export.
SETUP = {"kv-rename": _scramble_io}


def _logits(path, golden) -> list[np.ndarray]:
    """Teacher-forced logits over each golden continuation, then 4 greedy decode steps (the KV cache path)."""
    r = DecoderRunner.from_file(path)
    out = []
    for rec in golden["prompts"][:3]:
        out.append(r.teacher_forced_logits(rec["prompt_ids"], rec["greedy_ids_adapter"]))
        out.extend(r.greedy(rec["prompt_ids"], 4)[1])
    return out


def _holds(tol: Tolerance, ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[bool, str]:
    assert len(ref) == len(got)
    if tol.metric in ("exact", "max_abs", "relative"):
        diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(ref, got))
        scale = max(float(np.max(np.abs(a))) for a in ref)
        bound = 0.0 if tol.metric == "exact" else tol.bound * (scale if tol.metric == "relative" else 1.0)
        return diff <= bound, f"max |Δ| {diff:.3g} (bound {bound:.3g})"
    flat = [(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])) for a, b in zip(ref, got)]
    agree = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in flat])))
    return agree >= tol.bound, f"top-1 {agree:.3f} (bound {tol.bound})"


@pytest.mark.slow
@pytest.mark.parametrize("name", PASSES)
def test_pass_contract_on_the_shipped_decoder(name, exported_example, golden, tmp_path):
    cls = registry()[name]
    base = load_model(exported_example, load_external="lazy")
    with tensors.spill_to(tmp_path / "spill", "pass contract test"):
        if cls.after:
            base, _ = run_passes(base, parse_spec(cls.after))
        ref_path = tmp_path / "ref" / "model.onnx"
        save_model(base, ref_path)
        if name in SETUP:
            clean = cls()(base)
            assert not clean.modified and clean.summary.startswith("not applicable: "), clean.summary
            base = SETUP[name](base)
        before = base.SerializeToString()
        p = cls()
        result = p(base)
        assert result.modified, f"{name} did nothing on the shipped decoder: {result.summary}"
        if not cls.mutates_input:
            assert base.SerializeToString() == before, f"{name} declares mutates_input=False but changed its input"
        old = {t.name for t in onnx.load(str(ref_path), load_external_data=False).graph.initializer}
        big = [t.name for t in result.model.graph.initializer
               if t.name not in old and tensors.nbytes(t) >= tensors.SPILL_MIN_BYTES and not tensors.is_external(t)]
        assert not big, f"{name} kept new large tensors in the proto (use graphkit.tensors.new_tensor): {big[:3]}"
        out_path = tmp_path / "out" / "model.onnx"
        save_model(result.model, out_path)
        try:
            again = cls()(result.model)
            assert not again.modified, f"{name} rewrote its own output again: {again.summary}"
            assert again.summary.startswith("not applicable: ") and len(again.summary) > len("not applicable: ")
        except PreconditionError as exc:  # refuses a second run outright (fp16), with the reason
            assert name in str(exc)
    ok, how = _holds(cls.tolerance, _logits(ref_path, golden), _logits(out_path, golden))
    assert ok, f"{name}: declared tolerance '{cls.tolerance.headline()}' does not hold: {how}"
