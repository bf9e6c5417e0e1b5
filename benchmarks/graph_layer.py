#!/usr/bin/env python3
"""Which graph layer the passes share: onnx-ir vs graphkit's own (`passes/_graph.py`), measured.

    nice -n 10 .venv/bin/python benchmarks/graph_layer.py [--model PATH/model.onnx] [--repeats 1] [--out-dir DIR]

Input: a random-weight 1.5B-shape fp32 export (`graphkit convert /tmp/gk-bench/qwen2.5-1.5b/hf -o DIR
--dtypes fp32 --no-agreement`; the HF folder is benchmarks/build_random_model.py's). Each contender runs in a
fresh child process, contenders alternating; measured: the child's peak RSS (wait4 ru_maxrss), wall time, and
the time of each phase inside it:

* ``onnx-ir``  ``onnx_ir.load`` (external tensors stay lazy, memory-mapped) → the rewrite below written with
  ``Value.uses()`` / ``replace_all_uses_with`` / ``Value.name`` → ``onnx_ir.save`` with one external data file;
* ``ours``     ``modelio.load_model(path, "lazy")`` → the same rewrite on the ``ModelProto`` through
  ``passes._graph.Graph`` → ``modelio.save_model(external_data=True)`` (untouched tensors copied file to file).

The rewrite is a prototype of what the passes do most (never shipped as a pass): (1) a MatMul-consumer
walk: every MatMul whose weight is a constant 2-D float initializer (not an overridable graph input) gets a
``Mul`` by a shared scalar after it and every reader of its output, graph outputs included, reads the
``Mul`` instead (a graph output is renamed to the ``Mul``'s output; fresh, unique names); (2) kv-rename-like: every ``past_key_values.*`` input and
``present.*`` output is renamed. Both contenders must produce the same node and initializer counts (checked).
"Lines" is the prototype's source lines (no blank lines, no comments), i.e. the code a pass needs in each
layer. Writes the RESULTS.md section ``graph-layer-choice``.
"""
from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_MODEL = C.WORK / "qwen2.5-1.5b" / "layer-fp32" / "onnx" / "model.onnx"


def _rename(name: str) -> str | None:
    if name.startswith("past_key_values."):
        return "past." + name[len("past_key_values."):]
    if name.startswith("present."):
        return "present_" + name[len("present."):]
    return None


# ----------------------------------------------------------------------------- prototype: onnx-ir
def rewrite_ir(model) -> int:
    import numpy as np
    import onnx_ir as ir
    g = model.graph
    taken = {v.name for n in g for v in n.outputs} | set(g.initializers) | {v.name for v in g.inputs}
    taken |= {n.name for n in g if n.name}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    one, count = None, 0
    for node in list(g):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.is_graph_input() or w.dtype != ir.DataType.FLOAT \
                or w.shape is None or len(w.shape) != 2:
            continue
        if one is None:
            one = ir.Value(name=fresh("layer_bench_one"), const_value=ir.tensor(np.array(1.0, np.float32)))
            g.register_initializer(one)
        out = node.outputs[0]
        scaled = ir.Value(name=fresh(out.name + "_scaled"))
        out.replace_all_uses_with(scaled, replace_graph_outputs=True)
        g.insert_after(node, ir.Node("", "Mul", [out, one], outputs=[scaled], name=fresh(node.name + "_scale")))
        count += 1
    for v in list(g.inputs) + list(g.outputs):
        new = _rename(v.name)
        if new:
            v.name = new
    return count


def run_ir(model_path: str, out_dir: str) -> dict:
    import onnx_ir as ir
    t0 = time.perf_counter()
    model = ir.load(model_path)
    t1 = time.perf_counter()
    count = rewrite_ir(model)
    t2 = time.perf_counter()
    out = Path(out_dir) / "model.onnx"
    ir.save(model, out, external_data="model.onnx_data")
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "rewrite_s": t2 - t1, "save_s": t3 - t2, "rewritten": count,
            "nodes": model.graph.num_nodes(), "initializers": len(model.graph.initializers),
            "bytes": sum(f.stat().st_size for f in Path(out_dir).iterdir())}


# ----------------------------------------------------------------------------- prototype: ours
def rewrite_ours(model) -> int:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from passes._graph import ONNX_DOMAINS, Graph
    G = Graph(model, with_info=False)
    g = model.graph
    one, count, plan = None, 0, []
    for node in g.node:
        if node.op_type != "MatMul" or node.domain not in ONNX_DOMAINS:
            continue
        w = G.initializer(node.input[1])
        if w is None or w.data_type != TensorProto.FLOAT or len(w.dims) != 2:
            continue
        if one is None:
            one = G.fresh_name("layer_bench_one")
            g.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
        plan.append((node, G.fresh_name(node.output[0] + "_scaled"), G.fresh_name(node.name + "_scale")))
    for node, scaled, name in plan:
        G.replace_all_uses_with(node.output[0], scaled)
        G.insert_after(node, helper.make_node("Mul", [node.output[0], one], [scaled], name=name))
        count += 1
    for v in list(g.input) + list(g.output):
        new = _rename(v.name)
        if new:
            G.rename(v.name, new)
    return count


def run_ours(model_path: str, out_dir: str) -> dict:
    from graphkit import modelio
    t0 = time.perf_counter()
    model = modelio.load_model(model_path, "lazy")
    t1 = time.perf_counter()
    count = rewrite_ours(model)
    t2 = time.perf_counter()
    written = modelio.save_model(model, Path(out_dir) / "model.onnx", external_data=True)
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "rewrite_s": t2 - t1, "save_s": t3 - t2, "rewritten": count,
            "nodes": len(model.graph.node), "initializers": len(model.graph.initializer),
            "bytes": sum(p.stat().st_size for p in written)}


CHILDREN = {"onnx-ir": run_ir, "ours": run_ours}


def code_lines(fn) -> int:
    return sum(1 for ln in inspect.getsource(fn).splitlines() if ln.strip() and not ln.strip().startswith("#"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out-dir", default=str(C.WORK), help="where each contender writes its copy (deleted after)")
    a = ap.parse_args()
    model = Path(a.model)
    if not model.exists():
        sys.exit(f"{model}: no such file; export one first: graphkit convert /tmp/gk-bench/qwen2.5-1.5b/hf "
                 f"-o {model.parent.parent} --dtypes fp32 --no-agreement")
    for f in model.parent.iterdir():
        C.warm_page_cache(f)

    def one(c: str, _r: int) -> dict:
        out = C.fresh_dir(Path(a.out_dir) / f"graph-layer-{c}")
        try:
            return C.run_child("graph_layer.py", c, {"model_path": str(model), "out_dir": str(out)})
        finally:
            shutil.rmtree(out, ignore_errors=True)  # 6 GB each: keep the disk free

    runs = C.alternate(list(CHILDREN), a.repeats, one)
    counts = {c: (rs[-1]["rewritten"], rs[-1]["nodes"], rs[-1]["initializers"]) for c, rs in runs.items()}
    if len(set(counts.values())) != 1:
        raise SystemExit(f"the contenders disagree on the rewrite: {counts}")
    lines = {"onnx-ir": code_lines(rewrite_ir), "ours": code_lines(rewrite_ours)}
    rows = [[c, C.mb(C.med(rs, "peak_rss")), f"{C.med(rs, 'wall_s'):.1f}", f"{C.med(rs, 'load_s'):.1f}",
             f"{C.med(rs, 'rewrite_s'):.2f}", f"{C.med(rs, 'save_s'):.1f}", C.mb(rs[-1]["bytes"]), lines[c],
             " / ".join(f"{r['others_cores']:.2f}" for r in rs)] for c, rs in runs.items()]
    ref = runs["ours"]
    ratio = {k: C.ratio(C.med(runs["onnx-ir"], k), C.med(ref, k)) for k in ("peak_rss", "wall_s")}
    rewritten, nodes, inits = counts["ours"]
    body = f"""## graph-layer-choice

{C.machine()}

Command: `nice -n 10 .venv/bin/python benchmarks/graph_layer.py --repeats {a.repeats}` on `{model}` (random-weight
Qwen2.5-1.5B shape, fp32, {C.mb(sum(f.stat().st_size for f in model.parent.iterdir()))}). Each contender a fresh child,
alternating; peak RSS = the child's wait4 ru_maxrss; medians of {a.repeats}. Rewrite: {rewritten} MatMuls get a Mul after
them with every use redirected, KV inputs/outputs renamed; result {nodes} nodes, {inits} initializers (same for both,
checked). Lines: the prototype rewrite's non-blank, non-comment source lines (`rewrite_ir` / `rewrite_ours`).

{C.table(["layer", "peak RSS", "wall s", "load s", "rewrite s", "save s", "written", "lines", "others (cores)"], rows)}

onnx-ir / ours: peak RSS {ratio['peak_rss']}, wall {ratio['wall_s']}. Decision and reasons: `docs/graph-layer.md`.
"""
    C.write_section("graph-layer-choice", body)
    print(body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        C.child_main(CHILDREN)
    else:
        main()
