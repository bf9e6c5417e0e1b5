"""`graphkit inspect`, `diff` and `bench` on small decoders built here with onnx.helper (and one real export)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from graphkit.cli import app
from graphkit.diff import diff_models
from graphkit.errors import GraphkitError
from graphkit.inspect import inspect_path
from graphkit.modelio import save_model
from tiny_decoder import make_model, vi

ROOT = Path(__file__).resolve().parents[1]
LAYERS, KVH, HD, VOCAB = 2, 2, 8, 64
H = KVH * HD


def _quant4(w: np.ndarray, block: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit MatMulNBits packing of W [K, N]: (B [N, blocks, block/2] uint8, scales [N*blocks])."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // block, block)
    scale = np.abs(blocks).max(-1) / 7 + 1e-8
    q = np.clip(np.round(blocks / scale[..., None]) + 8, 0, 15).astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scale.astype(np.float32).reshape(-1)


def toy_decoder(past="past_key_values.{i}.{kv}", present="present.{i}.{kv}", batch="batch_size", head_dim=HD,
                quant=False, tied=True, seed=0) -> onnx.ModelProto:
    """A tiny attention decoder with the Transformers.js I/O: runs in onnxruntime and with DecoderRunner."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, outs, name, **kw):
        nodes.append(helper.make_node(op, ins, outs, name=name, **kw))
        return outs[0]

    def linear(x, name, k=H, n=H):
        w = (rng.standard_normal((k, n)) * 0.3).astype(np.float32)
        if not quant:
            return node("MatMul", [x, init(name + ".weight", w)], [name + "_out"], name)
        b, s = _quant4(w)
        return node("MatMulNBits", [x, init(name + ".qweight", b), init(name + ".scales", s)], [name + "_out"], name,
                    domain="com.microsoft", K=k, N=n, bits=4, block_size=16)

    emb = (rng.standard_normal((VOCAB, H)) * 0.5).astype(np.float32)
    init("embed.weight", emb)
    init("heads_shape", np.array([0, 0, KVH, HD], np.int64))
    init("hidden_shape", np.array([0, 0, H], np.int64))
    init("scale", np.array(HD ** -0.5, np.float32))
    h = node("Gather", ["embed.weight", "input_ids"], ["h0"], "embed")
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, "sequence_length"]),
           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, "total_sequence_length"]),
           helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, "sequence_length"])]
    kv_outs = []
    for i in range(LAYERS):
        p = f"l{i}"
        heads = {}
        for which in ("q", "k", "v"):
            r = node("Reshape", [linear(h, f"{p}.{which}_proj"), "heads_shape"], [f"{p}_{which}_r"], f"{p}_{which}_reshape")
            heads[which] = node("Transpose", [r], [f"{p}_{which}_t"], f"{p}_{which}_transpose", perm=[0, 2, 1, 3])
        for kv in ("key", "value"):
            pin, pout = past.format(i=i, kv=kv), present.format(i=i, kv=kv)
            ins.append(helper.make_tensor_value_info(pin, TensorProto.FLOAT, [batch, KVH, "past_sequence_length", head_dim]))
            kv_outs.append(helper.make_tensor_value_info(pout, TensorProto.FLOAT, [batch, KVH, "total_sequence_length", head_dim]))
            node("Concat", [pin, heads["k" if kv == "key" else "v"]], [pout], f"{p}_{kv}_concat", axis=2)
        kt = node("Transpose", [present.format(i=i, kv="key")], [f"{p}_kT"], f"{p}_kT", perm=[0, 1, 3, 2])
        sc = node("MatMul", [heads["q"], kt], [f"{p}_scores"], f"{p}_qk")
        sm = node("Softmax", [node("Mul", [sc, "scale"], [f"{p}_scaled"], f"{p}_scale")], [f"{p}_probs"], f"{p}_softmax", axis=-1)
        ctx = node("MatMul", [sm, present.format(i=i, kv="value")], [f"{p}_ctx"], f"{p}_av")
        ctx = node("Transpose", [ctx], [f"{p}_ctx_t"], f"{p}_ctx_transpose", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "hidden_shape"], [f"{p}_ctx_r"], f"{p}_ctx_reshape")
        h = node("Add", [h, linear(ctx, f"{p}.o_proj")], [f"{p}_h"], f"{p}_residual")
    head = emb.T.copy() if tied else (rng.standard_normal((H, VOCAB)) * 0.3).astype(np.float32)
    node("MatMul", [h, init("lm_head.weight", head)], ["logits"], "lm_head")
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, "sequence_length", VOCAB])] + kv_outs
    model = make_model(nodes, ins, outs, inits, opset=17, ir_version=8, name="toy")
    model.producer_name = "toy"
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path, **kw)
    return path


def codes(report: dict) -> dict[str, dict]:
    every = report["findings"] + [f for m in report.get("models", []) for f in m["findings"]]
    return {f["code"]: f for f in every}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def cli_json(*args: str) -> dict:
    res = cli(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# ------------------------------------------------------------------------------------------ inspect

@pytest.fixture(scope="module")
def toy_path(tmp_path_factory) -> Path:
    return save(toy_decoder(), tmp_path_factory.mktemp("toy") / "model.onnx")


@pytest.fixture(scope="module")
def toy_q4_path(tmp_path_factory) -> Path:
    return save(toy_decoder(quant=True), tmp_path_factory.mktemp("toyq4") / "model.onnx")


def test_inspect_json_fields_and_counts(toy_path):
    r = cli_json("inspect", str(toy_path))
    assert r["kind"] == "model" and r["opsets"] == {"ai.onnx": 17} and r["ir_version"] == 8
    assert r["ops"]["ai.onnx"]["MatMul"] == LAYERS * 6 + 1 and r["ops"]["ai.onnx"]["Gather"] == 1
    assert r["nodes"] == sum(sum(c.values()) for c in r["ops"].values())
    ins = {e["name"]: e for e in r["inputs"]}
    assert ins["past_key_values.1.value"] == {"name": "past_key_values.1.value", "dtype": "float",
                                              "shape": ["batch_size", KVH, "past_sequence_length", HD]}
    assert r["initializers"]["by_dtype"]["float"]["bytes"] == 4 * (2 * VOCAB * H + LAYERS * 4 * H * H + 1)
    assert r["external_data"] == [] and r["total_bytes"] == r["file_bytes"] == toy_path.stat().st_size
    q = r["quantization"]
    assert q["float"]["tied_head"]["count"] == 1 and q["float"]["tied_head"]["nodes"] == ["lm_head"]
    assert q["float"]["non_constant_b"]["count"] == 2 * LAYERS and q["float"]["other"]["count"] == 4 * LAYERS
    assert q["quantized_param_share"] == 0.0 and r["detected_dtype"] == "fp32"
    assert r["findings"] == [] and r["errors"] == 0


def test_inspect_quantization_coverage(toy_q4_path):
    r = inspect_path(toy_q4_path)
    q = r["quantization"]
    nbits = q["quantized"]["MatMulNBits"]
    assert nbits["count"] == 4 * LAYERS and nbits["bits"] == [4] and nbits["block_sizes"] == [16]
    assert nbits["params"] == 4 * LAYERS * H * H and nbits["accuracy_levels"] == [0]
    assert nbits["nodes_by_bits"] == {"4": 4 * LAYERS}
    assert q["quantized_param_share"] == pytest.approx(4 * LAYERS * H * H / (4 * LAYERS * H * H + H * VOCAB), abs=1e-4)
    assert q["float"]["tied_head"]["count"] == 1 and q["float"]["other"]["count"] == 0
    assert r["detected_dtype"] == "q4" and r["ops"]["com.microsoft"] == {"MatMulNBits": 4 * LAYERS}


def test_inspect_untied_head_is_other(tmp_path):
    q = inspect_path(save(toy_decoder(tied=False), tmp_path / "model.onnx"))["quantization"]["float"]
    assert q["tied_head"]["count"] == 0 and q["other"]["count"] == 4 * LAYERS + 1 and "lm_head" in q["other"]["nodes"]


@pytest.mark.parametrize("kwargs, code", [
    (dict(past="past_{kv}_{i}"), "kv-names"),            # past_key_0 …
    (dict(present="present_{kv}_{i}"), "kv-names"),
    (dict(head_dim="kv_cache_dim"), "kv-symbolic-dim"),
    (dict(batch="batch"), "batch-dim"),
])
def test_inspect_finds_kv_incompatibilities(tmp_path, kwargs, code):
    r = inspect_path(save(toy_decoder(**kwargs), tmp_path / "model.onnx"))
    f = codes(r)[code]
    assert f["level"] == "error" and f["fix"] == "kv-rename"
    if code == "kv-names" and "past" in kwargs:
        assert "past_key_0" in f["message"]


def test_inspect_logits_and_extra_inputs(tmp_path):
    m = toy_decoder()
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    m.graph.input.append(helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, []))
    m.graph.input.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, []))
    f = codes(inspect_path(save(m, tmp_path / "model.onnx")))
    assert f["fp16-logits"]["level"] == "warning" and f["fp16-logits"]["fix"] == "fp16(keep_logits_fp32=true)"
    assert f["num-logits-to-keep"]["level"] == "warning"
    assert f["unknown-input"]["level"] == "error" and "logits_to_keep" in f["unknown-input"]["message"]
    m2 = toy_decoder()
    m2.graph.output[0].name = "lm_logits"
    m2.graph.node[-1].output[0] = "lm_logits"
    assert codes(inspect_path(save(m2, tmp_path / "b" / "model.onnx")))["missing-io"]["fix"] == "kv-rename"


def test_inspect_external_data(tmp_path):
    good = inspect_path(save(toy_decoder(), tmp_path / "good" / "model.onnx", external_data=True))
    assert [e["name"] for e in good["external_data"]] == ["model.onnx_data"]
    assert good["total_bytes"] > good["file_bytes"] and "external-data-location" not in codes(good)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    onnx.save(toy_decoder(), bad_dir / "model.onnx", save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    f = codes(inspect_path(bad_dir / "model.onnx"))["external-data-location"]
    assert f["level"] == "error" and "weights.bin" in f["message"] and "graphkit apply" in f["fix"]


@pytest.mark.parametrize("name, quant, bad", [("model_q4f16.onnx", True, True), ("model_quantized.onnx", False, True),
                                              ("model_q4.onnx", True, False), ("model_fp16.onnx", False, True),
                                              ("model.onnx", True, True)])
def test_inspect_dtype_file_name(tmp_path, name, quant, bad):
    r = inspect_path(save(toy_decoder(quant=quant), tmp_path / "onnx" / name))
    assert ("dtype-mismatch" in codes(r)) == bad
    if name == "model_quantized.onnx":
        assert "matmul-int8" in codes(r)["dtype-mismatch"]["fix"]


def _folder(root: Path, external: bool = False) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": LAYERS,
                                                  "num_attention_heads": 4, "num_key_value_heads": KVH,
                                                  "hidden_size": 4 * HD}))
    (root / "tokenizer.json").write_text("{}")
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    save(toy_decoder(), root / "onnx" / "model.onnx", external_data=external)
    return root


def test_inspect_folder(tmp_path):
    ok = cli_json("inspect", str(_folder(tmp_path / "ok")))
    assert ok["kind"] == "folder" and ok["errors"] == 0 and ok["dtypes"] == {"fp32": "model.onnx"}
    assert ok["files"]["tokenizer_config.json"] and not ok["files"]["generation_config.json"]

    missing = _folder(tmp_path / "missing")
    (missing / "tokenizer_config.json").unlink()
    f = codes(inspect_path(missing))["missing-file"]
    assert f["level"] == "error" and "tokenizer_config.json" in f["message"]

    jinja = _folder(tmp_path / "jinja", external=True)
    (jinja / "tokenizer_config.json").write_text("{}")
    (jinja / "chat_template.jinja").write_text("{{ messages }}")
    f = codes(inspect_path(jinja))
    assert f["chat-template"]["level"] == "error" and "chat_template.jinja" in f["chat-template"]["message"]
    assert f["external-data-config"]["level"] == "error" and "use_external_data_format" in f["external-data-config"]["fix"]

    half = _folder(tmp_path / "fp16kv")
    m = onnx.load(half / "onnx" / "model.onnx")
    for io in list(m.graph.input) + list(m.graph.output):
        if "key" in io.name or "value" in io.name:
            io.type.tensor_type.elem_type = TensorProto.FLOAT16
    save(m, half / "onnx" / "model_fp16.onnx")
    f = codes(inspect_path(half))
    assert f["kv-cache-dtype"]["level"] == "warning" and "kv_cache_dtype" in f["kv-cache-dtype"]["fix"]


def test_inspect_human_output(tmp_path):
    res = cli("inspect", str(save(toy_decoder(batch="batch"), tmp_path / "model.onnx")))
    assert res.exit_code == 0
    assert "batch-dim" in res.stdout and "kv-rename" in res.stdout and "MatMul" in res.stdout


def test_inspect_starts_without_torch(toy_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "graphkit", "inspect", str(toy_path), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "onnx" in imported and not imported & {"torch", "transformers", "onnxruntime"}
    assert json.loads(proc.stdout)["kind"] == "model"


# --------------------------------------------------------------------------------------------- diff

def test_diff_structure_and_sizes(tmp_path, toy_path):
    m = toy_decoder()
    w = next(t for t in m.graph.initializer if t.name == "l0.o_proj.weight")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float16), w.name))
    mm = next(n for n in m.graph.node if n.name == "l0.o_proj")
    mm.input[1] = "l0.o_proj.weight_f32"
    m.graph.node.insert(0, helper.make_node("Cast", [w.name], ["l0.o_proj.weight_f32"], name="cast_w", to=TensorProto.FLOAT))
    next(n for n in m.graph.node if n.name == "l1_qk").name = "renamed_qk"
    next(n for n in m.graph.node if n.name == "l1_softmax").name = ""
    b = save(m, tmp_path / "b.onnx")
    r = cli_json("diff", str(toy_path), str(b))
    assert r["ops"] == {"Cast": {"a": 0, "b": 1, "delta": 1}}
    assert r["nodes"]["added_count"] == 1 and r["nodes"]["added"][0]["name"] == "cast_w"
    assert r["nodes"]["removed_count"] == 0
    changed = {c["b"] or c["a"]: c for c in r["nodes"]["changed"]}
    assert changed["l0.o_proj"]["changes"] == ["inputs"] and changed["renamed_qk"]["matched_by"] == "structure"
    assert changed["renamed_qk"]["changes"] == ["renamed"]
    ini = r["initializers"]
    assert ini["changed"] == [{"name": "l0.o_proj.weight", "a": {"dtype": "float", "shape": [H, H], "bytes": 4 * H * H},
                               "b": {"dtype": "float16", "shape": [H, H], "bytes": 2 * H * H},
                               "changes": ["dtype", "bytes"], "bytes_delta": -2 * H * H}]
    assert ini["bytes_delta"] == -2 * H * H and r["size"]["delta"] == b.stat().st_size - toy_path.stat().st_size
    assert r["io"] == {s: {"added": [], "removed": [], "changed": []} for s in ("inputs", "outputs")}
    assert r["run"] is None


def test_diff_io_and_position_match(tmp_path, toy_path):
    m = toy_decoder(batch="batch")
    for n in m.graph.node:
        n.name = ""
    r = diff_models(toy_path, save(m, tmp_path / "b.onnx"))
    assert {c["name"] for c in r["io"]["inputs"]["changed"]} == {i.name for i in m.graph.input}
    assert r["io"]["inputs"]["changed"][0]["what"] == ["shape"]
    assert r["nodes"]["added_count"] == r["nodes"]["removed_count"] == 0
    assert r["ops"] == {} and r["initializers"]["changed_count"] == 0


def test_diff_matches_by_position(tmp_path, toy_path):
    m = toy_decoder()
    for n in m.graph.node:
        n.name = ""
        n.input[:] = [{"l0_scores": "s0", "l0_scaled": "t0"}.get(x, x) for x in n.input]
        n.output[:] = [{"l0_scores": "s0", "l0_scaled": "t0"}.get(x, x) for x in n.output]
    r = diff_models(toy_path, save(m, tmp_path / "b.onnx"))
    assert r["nodes"]["matched"] == {"structure": 41, "position": 1}
    pos = next(c for c in r["nodes"]["changed"] if c["matched_by"] == "position")
    assert pos["a"] == "l0_scale" and pos["changes"] == ["renamed", "inputs", "outputs"]


def test_diff_run_decoder(tmp_path, toy_path, toy_q4_path):
    same = diff_models(toy_path, toy_path, run=True)["run"]
    assert same["mode"] == "decoder" and same["top1_agreement"] == 1.0 and same["top1_positions"] == [9, 9]
    assert set(same["max_abs_diff"]) == {"logits (prefill)", "logits (decode)"} | {
        f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")}
    assert all(v == 0.0 for v in same["max_abs_diff"].values())
    res = cli("diff", str(toy_path), str(toy_q4_path), "--run")
    assert res.exit_code == 0 and "top-1 agreement" in res.stdout and "MatMulNBits" in res.stdout
    q = diff_models(toy_path, toy_q4_path, run=True)["run"]
    assert 0 < q["max_abs_diff"]["logits (prefill)"] < 10 and 0 <= q["top1_agreement"] <= 1


def test_diff_run_generic(tmp_path):
    def graph(scale):
        return make_model([helper.make_node("Mul", ["x", "s"], ["y"], name="mul")],
                          [vi("x", TensorProto.FLOAT, ["n", 3])], [vi("y", TensorProto.FLOAT, ["n", 3])],
                          {"s": np.array(scale, np.float32)}, opset=17)
    a, b = save(graph(1.0), tmp_path / "a.onnx"), save(graph(1.5), tmp_path / "b.onnx")
    r = diff_models(a, b, run=True)
    assert r["initializers"]["changed"][0]["changes"] == ["values"]
    run = r["run"]
    assert run["mode"] == "generic" and run["dims"] == {"n": 2} and run["max_abs_diff"]["y"] > 0


# -------------------------------------------------------------------------------------------- bench

BENCH = ("--prompt-tokens", "8", "--new-tokens", "3", "--repeats", "1", "--threads", "1")


def test_bench_json_and_vs(toy_path, toy_q4_path):
    r = cli_json("bench", str(toy_path), *BENCH, "--vs", str(toy_q4_path))
    assert r["provider"] == "CPUExecutionProvider" and r["settings"]["new_tokens"] == 3
    assert len(r["models"]) == 2
    for m in r["models"]:
        for key in ("file_bytes", "load_s", "prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_rss_bytes"):
            assert m[key] > 0, key
        assert len(m["runs"]) == 1 and m["providers"][0] == "CPUExecutionProvider"
    a, b = r["models"]
    ratios = r["ratios"]
    assert ratios["file_bytes"] == pytest.approx(b["file_bytes"] / a["file_bytes"], rel=1e-3)
    assert ratios["decode_ms_per_token"] > 0 and "B / A" in ratios["definition"]


def test_bench_folder_dtype_and_human_output(tmp_path):
    folder = _folder(tmp_path / "f")
    save(toy_decoder(quant=True), folder / "onnx" / "model_q4.onnx")
    res = cli("bench", str(folder), "--dtype", "q4", *BENCH)
    assert res.exit_code == 0, res.output
    assert "model_q4.onnx" in res.stdout and "decode / token" in res.stdout
    res = cli("bench", str(folder), "--dtype", "q4f16", *BENCH)
    assert res.exit_code == 2 and "available dtypes" in res.output


def test_bench_unavailable_provider(toy_path):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    res = cli("bench", str(toy_path), "--provider", "cuda")
    assert res.exit_code == 2
    assert "CUDAExecutionProvider" in res.output and "not available" in res.output and "cpu (CPUExecutionProvider)" in res.output


def test_bench_rejects_non_decoder(tmp_path):
    m = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [1])],
                   [vi("y", TensorProto.FLOAT, [1])], opset=17)
    path = save(m, tmp_path / "id.onnx")
    res = cli("bench", str(path), *BENCH)
    assert res.exit_code == 2 and "input_ids" in res.output


# --------------------------------------------------------------------------------- a real export

@pytest.fixture(scope="module")
def qwen2_export(tiny_decoder) -> Path:
    """The shared tiny Qwen2 export (tests/tiny_decoder.py), in its model folder's onnx/."""
    return tiny_decoder("qwen2", "torchscript").path


def test_real_export_inspect_and_self_diff(qwen2_export):
    r = inspect_path(qwen2_export)
    assert r["errors"] == 0, r["findings"]
    assert r["quantization"]["float"]["tied_head"]["count"] == 1
    assert r["quantization"]["float"]["non_constant_b"]["count"] >= 2 * 2
    run = diff_models(qwen2_export, qwen2_export, run=True)["run"]
    assert run["mode"] == "decoder" and run["top1_agreement"] == 1.0


def test_cli_errors_are_one_line(tmp_path):
    res = cli("inspect", str(tmp_path / "nope.onnx"))
    assert res.exit_code == 2 and "no such file" in res.output
    with pytest.raises(GraphkitError):
        inspect_path(tmp_path / "nope.onnx")
