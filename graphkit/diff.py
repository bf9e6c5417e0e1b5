"""`graphkit diff`: what changed between two ONNX graphs, and (with ``--run``) how far their outputs moved.

Nodes are matched by name first, then by structure (same op and the same input/output tensor
names), then by position (the k-th unmatched node of an op type in A pairs with the k-th in B,
both in topological order). ``diff_models`` returns a plain dict; ``render_diff`` prints it.
"""
from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rich.markup import escape

from graphkit.errors import GraphkitError
from graphkit.inspect import PAST_RE, same_values, dtype_name, external_files, io_entry, shape_str, tensor_nbytes
from graphkit.modelio import load_model
from graphkit.modelview import all_initializers, all_nodes, tensor_array
from graphkit.tjs_contract import DECODER_INPUTS, INPUT_IDS, LOGITS, past_to_present

LIST_CAP = 500  # longest node/initializer list kept in the JSON (counts are always complete)


# ---------------------------------------------------------------------------------------- structure

def _io_side(a: list[onnx.ValueInfoProto], b: list[onnx.ValueInfoProto]) -> dict[str, list]:
    ea, eb = {v.name: io_entry(v) for v in a}, {v.name: io_entry(v) for v in b}
    pick = lambda e: {"dtype": e["dtype"], "shape": e["shape"]}  # noqa: E731
    changed = [{"name": n, "a": pick(ea[n]), "b": pick(eb[n]),
                "what": [k for k in ("dtype", "shape") if ea[n][k] != eb[n][k]]}
               for n in ea if n in eb and (ea[n]["dtype"], ea[n]["shape"]) != (eb[n]["dtype"], eb[n]["shape"])]
    return {"added": [eb[n] for n in eb if n not in ea], "removed": [ea[n] for n in ea if n not in eb],
            "changed": changed}


def io_diff(ma: onnx.ModelProto, mb: onnx.ModelProto) -> dict[str, Any]:
    def real_inputs(m):
        inits = {t.name for t in m.graph.initializer}
        return [v for v in m.graph.input if v.name not in inits]
    return {"inputs": _io_side(real_inputs(ma), real_inputs(mb)), "outputs": _io_side(ma.graph.output, mb.graph.output)}


def _op_key(n: onnx.NodeProto) -> str:
    return f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type


def op_delta(na: list[onnx.NodeProto], nb: list[onnx.NodeProto]) -> dict[str, dict[str, int]]:
    ca, cb = Counter(map(_op_key, na)), Counter(map(_op_key, nb))
    return {op: {"a": ca[op], "b": cb[op], "delta": cb[op] - ca[op]}
            for op in sorted(set(ca) | set(cb), key=lambda o: -abs(cb[o] - ca[o])) if ca[op] != cb[op]}


def _unique_pairs(left: list[int], right: list[int], key_a, key_b) -> list[tuple[int, int]]:
    """Pairs whose key occurs exactly once on each side."""
    ka, kb = defaultdict(list), defaultdict(list)
    for i in left:
        ka[key_a(i)].append(i)
    for j in right:
        kb[key_b(j)].append(j)
    return [(v[0], kb[k][0]) for k, v in ka.items() if len(v) == 1 and len(kb.get(k, ())) == 1]


def match_nodes(na: list[onnx.NodeProto], nb: list[onnx.NodeProto]) -> list[tuple[int, int, str]]:
    """(index in A, index in B, how) for every matched pair."""
    pairs: list[tuple[int, int, str]] = []
    left, right = set(range(len(na))), set(range(len(nb)))

    def take(found: list[tuple[int, int]], how: str) -> None:
        for i, j in found:
            if i in left and j in right:
                pairs.append((i, j, how))
                left.discard(i)
                right.discard(j)

    named = lambda nodes: (lambda i: nodes[i].name or None)  # noqa: E731
    take([(i, j) for i, j in _unique_pairs(sorted(left), sorted(right), named(na), named(nb)) if na[i].name], "name")
    op = lambda n: (n.domain or "", n.op_type)  # noqa: E731
    for key in (lambda n: (op(n), tuple(n.input), tuple(n.output)), lambda n: (op(n), tuple(n.output)),
                lambda n: (op(n), tuple(n.input))):
        take(_unique_pairs(sorted(left), sorted(right), lambda i, k=key: k(na[i]), lambda j, k=key: k(nb[j])),
             "structure")
    by_op_a, by_op_b = defaultdict(list), defaultdict(list)
    for i in sorted(left):
        by_op_a[op(na[i])].append(i)
    for j in sorted(right):
        by_op_b[op(nb[j])].append(j)
    take([p for k, ia in by_op_a.items() for p in zip(ia, by_op_b.get(k, []))], "position")
    return sorted(pairs)


def _attrs(n: onnx.NodeProto) -> dict[str, bytes]:
    return {a.name: a.SerializeToString() for a in n.attribute}


def node_diff(na: list[onnx.NodeProto], nb: list[onnx.NodeProto]) -> dict[str, Any]:
    pairs = match_nodes(na, nb)
    ma, mb = {i for i, _, _ in pairs}, {j for _, j, _ in pairs}
    desc = lambda n: {"name": n.name, "op": _op_key(n), "inputs": list(n.input), "outputs": list(n.output)}  # noqa: E731
    changed = []
    for i, j, how in pairs:
        a, b = na[i], nb[j]
        what = []
        if a.name != b.name:
            what.append("renamed")
        if _op_key(a) != _op_key(b):
            what.append("op")
        if list(a.input) != list(b.input):
            what.append("inputs")
        if list(a.output) != list(b.output):
            what.append("outputs")
        aa, ab = _attrs(a), _attrs(b)
        diff_attrs = sorted(k for k in set(aa) | set(ab) if aa.get(k) != ab.get(k))
        if diff_attrs:
            what.append("attributes: " + ", ".join(diff_attrs))
        if what:
            changed.append({"a": a.name, "b": b.name, "op": _op_key(b), "matched_by": how, "changes": what})
    added = [desc(nb[j]) for j in range(len(nb)) if j not in mb]
    removed = [desc(na[i]) for i in range(len(na)) if i not in ma]
    return {"a": len(na), "b": len(nb), "matched": dict(Counter(how for *_, how in pairs)),
            "added_count": len(added), "removed_count": len(removed), "changed_count": len(changed),
            "added": added[:LIST_CAP], "removed": removed[:LIST_CAP], "changed": changed[:LIST_CAP]}


def _tinfo(t: onnx.TensorProto) -> dict[str, Any]:
    return {"dtype": dtype_name(t.data_type), "shape": list(t.dims), "bytes": tensor_nbytes(t)}


def initializer_diff(ma: onnx.ModelProto, mb: onnx.ModelProto, dir_a: Path, dir_b: Path) -> dict[str, Any]:
    ia, ib = all_initializers(ma.graph), all_initializers(mb.graph)
    added = [{"name": n, **_tinfo(t)} for n, t in ib.items() if n not in ia]
    removed = [{"name": n, **_tinfo(t)} for n, t in ia.items() if n not in ib]
    changed = []
    for n in ia.keys() & ib.keys():
        a, b = _tinfo(ia[n]), _tinfo(ib[n])
        what = [k for k in ("dtype", "shape", "bytes") if a[k] != b[k]]
        if not what:
            try:
                same = same_values(tensor_array(ia[n], dir_a), tensor_array(ib[n], dir_b))
            except Exception:  # strings, odd types: compare the proto
                same = ia[n].SerializeToString() == ib[n].SerializeToString()
            if not same:
                what.append("values")
        if what:
            changed.append({"name": n, "a": a, "b": b, "changes": what, "bytes_delta": b["bytes"] - a["bytes"]})
    changed.sort(key=lambda c: -abs(c["bytes_delta"]))
    bytes_a, bytes_b = sum(tensor_nbytes(t) for t in ia.values()), sum(tensor_nbytes(t) for t in ib.values())
    return {"a": len(ia), "b": len(ib), "bytes_a": bytes_a, "bytes_b": bytes_b, "bytes_delta": bytes_b - bytes_a,
            "added_count": len(added), "removed_count": len(removed), "changed_count": len(changed),
            "added": added[:LIST_CAP], "removed": removed[:LIST_CAP], "changed": changed[:LIST_CAP]}


def _total_bytes(path: Path, model: onnx.ModelProto) -> int:
    return path.stat().st_size + sum(e["bytes"] or 0 for e in external_files(model, path.parent))


def diff_models(a: str | Path, b: str | Path, run: bool = False) -> dict[str, Any]:
    a, b = Path(a), Path(b)
    ma, mb = load_model(a, load_external=False), load_model(b, load_external=False)
    na, nb = all_nodes(ma.graph), all_nodes(mb.graph)
    size_a, size_b = _total_bytes(a, ma), _total_bytes(b, mb)
    report = {
        "a": str(a), "b": str(b),
        "io": io_diff(ma, mb),
        "ops": op_delta(na, nb),
        "nodes": node_diff(na, nb),
        "initializers": initializer_diff(ma, mb, a.parent, b.parent),
        "size": {"a": size_a, "b": size_b, "delta": size_b - size_a,
                 "ratio": round(size_b / size_a, 4) if size_a else None},
        "run": None,
    }
    del ma, mb
    if run:
        report["run"] = run_compare(a, b)
    return report


# ------------------------------------------------------------------------------------------- --run

def _session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures are reported once, by us
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise GraphkitError(f"onnxruntime cannot load {path}: {str(exc).strip().splitlines()[0][:200]}") from None


def _maxabs(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.shape != y.shape:
        return None
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))


def vocab_size(session) -> int | None:
    for o in session.get_outputs():
        if o.name == "logits" and o.shape and isinstance(o.shape[-1], int):
            return o.shape[-1]
    return None


def decoder_compare(sa, sb, prompt_len: int = 8, seed: int = 0) -> dict[str, Any]:
    """Prefill a random prompt and take one greedy decode step (A's token) in both models."""
    from graphkit.ortrun import DecoderRunner, kl_divergence
    ra, rb = DecoderRunner(sa), DecoderRunner(sb)
    vocabs = [v for v in (vocab_size(sa), vocab_size(sb)) if v]
    vocab = min(vocabs) if vocabs else 100
    ids = np.random.default_rng(seed).integers(0, vocab, (1, prompt_len), dtype=np.int64)
    mask = np.ones_like(ids)
    pa, pb = ra.step(ids, mask, ra.empty_past(1)), rb.step(ids, mask, rb.empty_past(1))
    nxt = np.array([[int(np.argmax(pa.logits[0, -1]))]], np.int64)
    mask2 = np.ones((1, prompt_len + 1), np.int64)
    da, db = ra.step(nxt, mask2, pa.present), rb.step(nxt, mask2, pb.present)
    outputs = {"logits (prefill)": _maxabs(pa.logits, pb.logits), "logits (decode)": _maxabs(da.logits, db.logits)}
    for name in sorted(da.present.keys() & db.present.keys()):
        outputs[past_to_present(name)] = _maxabs(da.present[name], db.present[name])
    la = np.concatenate([pa.logits[0], da.logits[0]])
    lb = np.concatenate([pb.logits[0], db.logits[0]])
    agree = int(np.sum(la.argmax(-1) == lb.argmax(-1))) if la.shape == lb.shape else 0
    return {"mode": "decoder", "prompt_tokens": prompt_len, "decode_steps": 1, "max_abs_diff": outputs,
            "top1_agreement": round(agree / len(la), 4) if la.shape == lb.shape else None,
            "top1_positions": [agree, len(la)],
            "kl_max": float(kl_divergence(la, lb).max()) if la.shape == lb.shape else None}


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
       "tensor(bool)": np.bool_}


def random_feed(meta, dims: dict[str, int], default_dim: int = 2) -> np.ndarray:
    """A deterministic random input for one session input (same name → same values in both models)."""
    shape = [d if isinstance(d, int) else dims.setdefault(d or "?", default_dim) for d in meta.shape]
    rng = np.random.default_rng(zlib.crc32(meta.name.encode()))
    dtype = _NP.get(meta.type)
    if dtype is None:
        raise GraphkitError(f"--run: cannot make a random input for {meta.name} of type {meta.type}")
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 4, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def generic_compare(sa, sb) -> dict[str, Any]:
    dims: dict[str, int] = {}
    feeds = {}
    for meta in list(sa.get_inputs()) + list(sb.get_inputs()):
        if meta.name not in feeds:
            feeds[meta.name] = random_feed(meta, dims)
    outs = []
    for s, label in ((sa, "A"), (sb, "B")):
        names = [i.name for i in s.get_inputs()]
        try:
            vals = s.run(None, {n: feeds[n] for n in names})
        except Exception as exc:
            raise GraphkitError(f"model {label} failed on random inputs (symbolic dims set to {dims}): "
                                f"{str(exc).strip().splitlines()[0][:200]}") from None
        outs.append(dict(zip([o.name for o in s.get_outputs()], vals)))
    common = [n for n in outs[0] if n in outs[1]]
    result = {"mode": "generic", "dims": dims,
              "max_abs_diff": {n: _maxabs(np.asarray(outs[0][n]), np.asarray(outs[1][n])) for n in common},
              "only_a": [n for n in outs[0] if n not in outs[1]], "only_b": [n for n in outs[1] if n not in outs[0]],
              "top1_agreement": None}
    if "logits" in common and outs[0]["logits"].shape == outs[1]["logits"].shape:
        result["top1_agreement"] = round(float(np.mean(outs[0]["logits"].argmax(-1) == outs[1]["logits"].argmax(-1))), 4)
    return result


def _is_tjs_decoder(session) -> bool:
    ins = [i.name for i in session.get_inputs()]
    return (INPUT_IDS in ins and LOGITS in {o.name for o in session.get_outputs()}
            and all(n in DECODER_INPUTS or PAST_RE.match(n) for n in ins))


def run_compare(a: Path, b: Path) -> dict[str, Any]:
    """Outputs of both models on the same inputs; a failure is reported in the dict, not raised."""
    try:
        sa, sb = _session(a), _session(b)
        if _is_tjs_decoder(sa) and _is_tjs_decoder(sb):
            try:
                return decoder_compare(sa, sb)
            except Exception as exc:
                raise GraphkitError(f"decoder run failed: {str(exc).strip().splitlines()[0][:200]}") from None
        return generic_compare(sa, sb)
    except GraphkitError as exc:
        return {"mode": "error", "error": str(exc), "max_abs_diff": {}, "top1_agreement": None}


# ------------------------------------------------------------------------------------------ render

def render_diff(r: dict, console) -> None:
    from rich.table import Table
    from graphkit.console import fmt_bytes
    size = r["size"]
    sign = "+" if size["delta"] >= 0 else "-"
    console.print(f"[bold]A[/] {escape(r['a'])}  →  [bold]B[/] {escape(r['b'])}")
    console.print(f"size {fmt_bytes(size['a'])} → {fmt_bytes(size['b'])} ({sign}{fmt_bytes(abs(size['delta']))}"
                  + (f", ×{size['ratio']:.3f}" if size["ratio"] else "") + ")")
    io = Table(title="I/O changes", title_justify="left")
    for col in ("", "change", "name", "A", "B"):
        io.add_column(col, overflow="fold")
    for side in ("inputs", "outputs"):
        d = r["io"][side]
        for e in d["added"]:
            io.add_row(side, "[green]added[/]", escape(e["name"]), "", escape(f"{e['dtype']} {shape_str(e['shape'])}"))
        for e in d["removed"]:
            io.add_row(side, "[red]removed[/]", escape(e["name"]), escape(f"{e['dtype']} {shape_str(e['shape'])}"), "")
        for e in d["changed"]:
            io.add_row(side, "[yellow]" + "/".join(e["what"]) + "[/]", escape(e["name"]),
                       escape(f"{e['a']['dtype']} {shape_str(e['a']['shape'])}"),
                       escape(f"{e['b']['dtype']} {shape_str(e['b']['shape'])}"))
    console.print(io if io.row_count else "[green]I/O unchanged[/]")
    if r["ops"]:
        ops = Table(title="Op histogram delta", title_justify="left")
        for col in ("op", "A", "B", "Δ"):
            ops.add_column(col, justify="left" if col == "op" else "right")
        for op, v in r["ops"].items():
            ops.add_row(escape(op), str(v["a"]), str(v["b"]), f"{v['delta']:+d}")
        console.print(ops)
    n = r["nodes"]
    console.print(f"nodes {n['a']} → {n['b']}: [green]+{n['added_count']}[/] added, [red]-{n['removed_count']}[/] "
                  f"removed, [yellow]{n['changed_count']}[/] changed; matched by "
                  + ", ".join(f"{k} {v}" for k, v in n["matched"].items()))
    if n["added_count"] or n["removed_count"] or n["changed_count"]:
        nt = Table(title="Nodes (first 20 of each)", title_justify="left")
        for col in ("", "op", "node", "detail"):
            nt.add_column(col, overflow="fold")
        for e in n["added"][:20]:
            nt.add_row("[green]+[/]", escape(e["op"]), escape(e["name"]), escape(f"{e['inputs']} → {e['outputs']}"))
        for e in n["removed"][:20]:
            nt.add_row("[red]-[/]", escape(e["op"]), escape(e["name"]), escape(f"{e['inputs']} → {e['outputs']}"))
        for e in n["changed"][:20]:
            name = e["a"] if e["a"] == e["b"] else f"{e['a']} → {e['b']}"
            detail = f"{'; '.join(e['changes'])} (by {e['matched_by']})"
            nt.add_row("[yellow]~[/]", escape(e["op"]), escape(name), escape(detail))
        console.print(nt)
    ini = r["initializers"]
    console.print(f"initializers {ini['a']} → {ini['b']}, {fmt_bytes(ini['bytes_a'])} → {fmt_bytes(ini['bytes_b'])}"
                  ": "
                  f"+{ini['added_count']} added, -{ini['removed_count']} removed, {ini['changed_count']} changed")
    if ini["added_count"] or ini["removed_count"] or ini["changed_count"]:
        it = Table(title="Initializers (largest 20 of each)", title_justify="left")
        for col in ("", "name", "A", "B", "Δ bytes"):
            it.add_column(col, overflow="fold", justify="right" if col == "Δ bytes" else "left")
        desc = lambda t: escape(f"{t['dtype']} {t['shape']}")  # noqa: E731
        for e in sorted(ini["added"], key=lambda x: -x["bytes"])[:20]:
            it.add_row("[green]+[/]", escape(e["name"]), "", desc(e), f"+{fmt_bytes(e['bytes'])}")
        for e in sorted(ini["removed"], key=lambda x: -x["bytes"])[:20]:
            it.add_row("[red]-[/]", escape(e["name"]), desc(e), "", f"-{fmt_bytes(e['bytes'])}")
        for e in ini["changed"][:20]:
            d = e["bytes_delta"]
            it.add_row("[yellow]~[/]", escape(f"{e['name']} ({', '.join(e['changes'])})"), desc(e["a"]), desc(e["b"]),
                       f"{'+' if d >= 0 else '-'}{fmt_bytes(abs(d))}")
        console.print(it)
    if r["run"]:
        _render_run(r["run"], console)


def _render_run(run: dict, console) -> None:
    from rich.table import Table
    if run.get("error"):
        console.print(f"[bold red]--run failed:[/] {escape(run['error'])}")
        return
    t = Table(title=f"Outputs on the same inputs ({run['mode']})", title_justify="left")
    t.add_column("output")
    t.add_column("max |Δ|", justify="right")
    for name, v in run["max_abs_diff"].items():
        t.add_row(escape(name), "shape differs" if v is None else f"{v:.3g}")
    console.print(t)
    if run.get("top1_agreement") is not None:
        extra = f" ({run['top1_positions'][0]}/{run['top1_positions'][1]} positions)" if "top1_positions" in run else ""
        console.print(f"top-1 agreement of logits: {run['top1_agreement']:.1%}{extra}"
                      + (f"; max KL(A‖B) {run['kl_max']:.3g} nats" if run.get("kl_max") is not None else ""))
