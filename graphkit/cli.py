"""The `graphkit` command line. Heavy modules (torch, transformers) load only inside the commands
that need them, so `graphkit inspect` and `graphkit --help` start fast."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from graphkit.errors import GraphkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ONNX graph surgery for LoRA fine-tuned causal LMs, proven in Transformers.js.")


def _fail(exc: GraphkitError) -> None:
    from graphkit.console import err
    from rich.markup import escape
    err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


# ---------------------------------------------------------------- export / apply / passes


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="Local Hugging Face model folder (config.json + *.safetensors)."),
    output: Path = typer.Option(..., "--output", "-o", help="Path of the .onnx file to write."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="peft LoRA adapter folder to merge."),
    exporter: str = typer.Option("dynamo", help="torch.onnx exporter: dynamo or torchscript."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle checkpoints (can run code)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the folder."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Load the whole model in memory (peft merge) instead of tracing without weights and streaming them."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Merge the adapter and export the decoder with KV cache to ONNX."""
    from graphkit.console import emit_json, err
    try:
        from graphkit.extras import require_export
        require_export("export")
        from graphkit.export import export_model
        summary = export_model(model_dir, output, adapter, exporter=exporter, allow_pickle=allow_pickle,
                               trust_remote_code=trust_remote_code, stream=not no_stream,
                               progress=lambda m: err.print(f"• {m}", markup=False))
    except GraphkitError as exc:
        _fail(exc)
    if json_out:
        emit_json(summary)
    else:
        err.print(f"wrote {', '.join(summary['files'])} in {summary['total_s']} s", markup=False)


@app.command()
def apply(
    model: Path = typer.Argument(..., help="Input .onnx file."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .onnx file."),
    passes: str = typer.Option(..., "--passes", "-p", help='Ordered pass spec, e.g. "kv-rename,matmul-nbits(bits=4,block_size=32),fp16".'),
    no_check: bool = typer.Option(False, "--no-check", help="Skip onnx.checker and shape inference after each pass."),
    external_data: Optional[bool] = typer.Option(None, "--external-data/--no-external-data", help="Force external data on/off (default: only above 2 GB)."),
    json_out: bool = typer.Option(False, "--json", help="Print the per-pass reports as JSON."),
) -> None:
    """Run graph passes in order on an ONNX file."""
    from graphkit.console import emit_json, err
    try:
        from graphkit.modelio import load_model, save_model
        from graphkit.pipeline import parse_spec, run_passes
        from graphkit.modelio import check_model
        pass_list = parse_spec(passes)
        m = load_model(model, load_external="lazy")  # weights read one tensor at a time by the passes
        if not no_check:
            check_model(m, model)
        import tempfile

        from graphkit.tensors import spill_to
        scratch = output.parent if output.parent.is_dir() else None
        with tempfile.TemporaryDirectory(prefix=".graphkit-spill-", dir=scratch) as spill_dir, spill_to(spill_dir, f"writing {output}"):
            try:  # new weights are spilled to disk as they are made; the output is written from there
                m, reports = run_passes(m, pass_list, check=not no_check, on_report=lambda r: err.print(r.line(), soft_wrap=True, markup=False))
            except GraphkitError as exc:  # name the input file in errors raised inside a pass
                raise GraphkitError(str(exc) if str(exc).startswith(str(model)) else f"{model}: {exc}") from None
            files = save_model(m, output, external_data=external_data)
    except GraphkitError as exc:
        _fail(exc)
    if json_out:
        emit_json({"input": str(model), "output": str(output), "files": [str(f) for f in files],
                   "passes": [r.as_dict() for r in reports]})
    else:
        err.print(f"wrote {', '.join(map(str, files))}", markup=False)


def _summary(cls) -> str:
    doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or cls.name
    return doc.strip().splitlines()[0]


@app.command("passes")
def list_passes(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List every pass with its options, defaults and tolerance."""
    from graphkit.console import emit_json, out
    from graphkit.pipeline import registry
    reg = registry()
    if json_out:
        emit_json({name: {"doc": _summary(cls), "tolerance": cls.tolerance.as_dict(), "mutates_input": cls.mutates_input,
                          "options": [dict(name=n, type=t, default=d, help=h) for n, t, d, h in cls.option_specs()]}
                   for name, cls in reg.items()})
        return
    for name, cls in reg.items():
        out.print(f"[bold]{name}[/]  {_summary(cls)}")
        out.print(f"    tolerance: {cls.tolerance}")
        for n, t, d, h in cls.option_specs():
            out.print(f"    {n} ({t}, default {d!r}): {h}")


# ---------------------------------------------------------------- convert / verify


@app.command(help="Export the model once and write a Transformers.js folder with one ONNX file per dtype.\n\n"
                  "Pipelines (dtype → passes): fp32: export as is; fp16: fp16; "
                  "q4: tied-embedding(bits=8,block_size=128,accuracy_level=4),matmul-nbits(bits=4,block_size=128,symmetric=false,accuracy_level=4); "
                  "q4f16: tied-embedding(bits=4,block_size=16,symmetric=false,accuracy_level=4),matmul-nbits(bits=4,block_size=32,accuracy_level=4),fp16; "
                  "q8: matmul-int8(quantize_embedding_gather=true) (written as model_quantized.onnx). "
                  "By default (--target transformers.js@4) every pipeline starts with logits-to-keep, and fp16, q4, q4f16, "
                  "q8 and w4 with fuse-rmsnorm,fuse-rotary,pack-matmul (measured fastest and right on every runtime tested); "
                  "with --fuse every pipeline adds fuse-gqa(padding=bias) and pack-gqa, with --no-fuse none.")
def convert(
    model_dir: Optional[Path] = typer.Argument(None, help="Hugging Face model folder (default: the shipped epicrisis-tiny example with its adapter)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="peft LoRA adapter folder to merge."),
    dtypes: str = typer.Option("fp32,fp16,q4,q4f16,q8", "--dtypes", help="Comma-separated dtypes to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    exporter: str = typer.Option("dynamo", help="torch.onnx exporter: dynamo or torchscript."),
    no_agreement: bool = typer.Option(False, "--no-agreement", help="Skip the agreement-with-fp32 check in the summary."),
    fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help="--fuse: every dtype with RMSNorm, rotary and attention (GroupQueryAttention) fused into onnxruntime contrib ops — wrong on the WebGPU adapters measured (graphkit/runtimes.py webgpu-gqa); --no-fuse: none. Default: per dtype, the fusions without GroupQueryAttention for fp16/q4/q4f16/q8/w4, none for fp32 (the reference)."),
    logits_to_keep: Optional[bool] = typer.Option(None, "--logits-to-keep/--no-logits-to-keep", help="The num_logits_to_keep input (Transformers.js 4.x feeds it: a prefill computes lm_head for the last position only). Default: on for --target transformers.js@4, off for @3 (3.x cannot load such a folder)."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Export with the whole model in memory (peft merge) instead of streaming weights one tensor at a time."),
    pipeline: Optional[list[str]] = typer.Option(None, "--pipeline", help="DTYPE=SPEC: replace that dtype's pass pipeline (repeatable; logits-to-keep still goes first for transformers.js@4, the default fusions are left to SPEC), e.g. a 4-bit lm_head for q4: \"q4=tied-embedding(bits=4,block_size=32,symmetric=false,accuracy_level=4),matmul-nbits(bits=4,block_size=128,symmetric=false,accuracy_level=4)\"."),
    calibration: str = typer.Option("self", "--calibration", help="Calibration for the 4-bit dtypes (GPTQ, docs/quantization.md): a JSONL file (the fine-tuning data: {\"messages\": [...]}, {\"text\": ...} or {\"prompt\", \"completion\"} per line); \"self\" (default): sequences the fp32 model samples itself; \"none\": plain round-to-nearest."),
    calibration_samples: Optional[int] = typer.Option(None, "--calibration-samples", min=1, help="How many calibration samples to use (default: 64 from a file, 32 self-generated)."),
    size_budget: str = typer.Option("auto", "--size-budget", help="Mixed precision for q4/q4f16: q4f16's 4-bit tied table at 8 bits first, then the MatMuls whose 4-bit error is largest (on the calibration statistics) at 8 bits (int8 MatMulInteger), until the file is this factor of its all-4-bit size, e.g. 1.5x (docs/quantization.md). auto (default): 1.5x for the calibrated, unfused Transformers.js 4.x folder; 1.0x (all 4-bit) with --fuse, --calibration none or --target transformers.js@3."),
    target: str = typer.Option("transformers.js@4", "--target", help="Runtimes the folder is made for: transformers.js@4 (default: the fastest forms, 4.x only) or transformers.js@3 (every file also loads and runs right in Transformers.js 3.x: q4 with an int8 MatMulInteger head, q4f16 at accuracy_level 0, no --fuse). Recorded in config.json (\"graphkit\"); docs/runtimes.md."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    from graphkit.console import emit_json, err
    try:
        from graphkit.convert import convert as run_convert, parse_dtypes, parse_pipeline_overrides, render
        from graphkit.runtimes import parse_target
        from graphkit.extras import require_export
        require_export("convert")
        if model_dir is None:
            from graphkit.examples import example_dir
            model_dir = example_dir() / "base"
            adapter = adapter or example_dir() / "adapter"
        dtype_list = parse_dtypes(dtypes)
        overrides = parse_pipeline_overrides(pipeline or [])
        from graphkit.mixed import parse_budget
        budget = None if size_budget.strip().lower() == "auto" else parse_budget(size_budget)
        target_key = parse_target(target)
        with err.status("converting") as status:
            def progress(msg: str) -> None:
                err.print(f"• {msg}", soft_wrap=True, markup=False)
                status.update(msg.strip()[:80])
            summary = run_convert(model_dir, output, adapter, dtype_list, overwrite=overwrite, exporter=exporter,
                                  check_agreement=not no_agreement, fuse=fuse, stream=not no_stream,
                                  progress=progress, pipelines=overrides, calibration=calibration,
                                  calibration_samples=calibration_samples, size_budget=budget,
                                  target=target_key, logits_to_keep=logits_to_keep)
    except GraphkitError as exc:
        _fail(exc)
    if json_out:
        emit_json(summary)
    else:
        render(summary)
    if not summary["ok"]:
        raise typer.Exit(1)


@app.command()
def verify(
    folder: Path = typer.Argument(..., help="A Transformers.js model folder (from `graphkit convert`)."),
    reference: Optional[Path] = typer.Option(None, "--reference", "-r", help="Hugging Face model folder to compare against with PyTorch (default: the folder's fp32 model.onnx)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="peft adapter to merge into --reference."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="JSON list of prompts (strings, or chat message lists)."),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", help="Tokens to generate per prompt (default 32; with --data: until the end of turn, at most the reference answer's length + 32)."),
    dtypes: Optional[str] = typer.Option(None, "--dtypes", help="Only these dtypes (comma-separated)."),
    browser: bool = typer.Option(False, "--browser", help="Also run Transformers.js in headless Chromium (wasm and webgpu) and compare its tokens with onnxruntime's."),
    devices: str = typer.Option("wasm,webgpu", "--devices", help="Browser devices for --browser: wasm, webgpu (Chromium's own adapter), webgpu:lavapipe (Mesa lavapipe with shader-f16, set up by scripts/setup.sh)."),
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL of your own examples ({\"messages\": [...]} ending with the reference answer, or {\"prompt\", \"completion\"}): teacher-forced top-1/KL over the reference answers, greedy answers vs the reference model's, and the facts (ages, days, doses, sex, diagnosis) each variant keeps."),
    samples: Optional[int] = typer.Option(None, "--samples", min=1, help="With --data: only the first N examples."),
    facts_threshold: float = typer.Option(1.0, "--facts-threshold", help="With --data: share of the reference's facts a variant must keep (default 1.0: every fact)."),
    show: int = typer.Option(0, "--show", min=0, help="With --data: print the first N examples' answers, reference and each variant."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check each ONNX variant against PyTorch (or fp32 ONNX): top-1 agreement, KL, divergence, NaN/inf; with --data, on your own examples, with the facts each variant keeps."""
    from graphkit.console import emit_json, err
    if data is not None:
        try:
            if prompts is not None or browser:
                raise GraphkitError("--data checks your examples; --prompts and --browser belong to the plain check: "
                                    "run them in a separate `graphkit verify`")
            from graphkit.verify_data import render_data, verify_data
            result = verify_data(folder, data, reference, adapter,
                                 [d.strip() for d in dtypes.split(",")] if dtypes else None, samples, new_tokens,
                                 facts_threshold, progress=lambda m: err.print(f"• {m}", markup=False))
        except GraphkitError as exc:
            _fail(exc)
        emit_json(result) if json_out else render_data(result, show)
        if not result["passed"]:
            raise typer.Exit(1)
        return
    new_tokens = 32 if new_tokens is None else new_tokens
    try:
        from graphkit.verify import render, verify_folder
        from graphkit.extras import require_export
        require_export("verify", ("transformers", "torch") if reference else ("transformers",))
        dtype_list = [d.strip() for d in dtypes.split(",")] if dtypes else None
        result = verify_folder(folder, reference, adapter, prompts, new_tokens, dtype_list,
                               progress=lambda m: err.print(f"• {m}", markup=False))
        if browser:
            from graphkit.verify import browser_check, render_browser
            result["browser"] = browser_check(folder, prompts, new_tokens, dtype_list,
                                              [d.strip() for d in devices.split(",")], progress=lambda m: err.print(f"• {m}", markup=False))
            result["passed"] = result["passed"] and all(r["status"] != "fail" for r in result["browser"])
    except GraphkitError as exc:
        _fail(exc)
    if json_out:
        emit_json(result)
    else:
        render(result)
        if browser:
            render_browser(result["browser"])
    if not result["passed"]:
        raise typer.Exit(1)
# ---------------------------------------------------------------- inspect / diff / bench


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="A .onnx file or a Transformers.js model folder."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Show I/O, ops, sizes, quantization coverage and Transformers.js compatibility problems."""
    from graphkit.console import emit_json, out
    try:
        from graphkit.inspect import inspect_path, render_inspect
        report = inspect_path(path)
    except GraphkitError as exc:
        _fail(exc)
    emit_json(report) if json_out else render_inspect(report, out)


@app.command("diff")
def diff_cmd(
    a: Path = typer.Argument(..., help="First .onnx file."),
    b: Path = typer.Argument(..., help="Second .onnx file."),
    run: bool = typer.Option(False, "--run", help="Run both on the same inputs and compare outputs."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Compare two graphs: I/O, ops, nodes, initializers, size; with --run, their outputs."""
    from graphkit.console import emit_json, out
    try:
        from graphkit.diff import diff_models, render_diff
        report = diff_models(a, b, run=run)
    except GraphkitError as exc:
        _fail(exc)
    emit_json(report) if json_out else render_diff(report, out)
    if report["run"] and report["run"].get("error"):
        raise typer.Exit(2)


@app.command("bench")
def bench_cmd(
    model: Path = typer.Argument(..., help="A decoder .onnx file or a Transformers.js model folder."),
    provider: str = typer.Option("cpu", "--provider", help="cpu, cuda, tensorrt, dml, coreml, webgpu, … or a full ORT provider name."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Which onnx/model{suffix}.onnx of a folder (fp32, fp16, q4, q4f16, q8, …)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=1, help="Prefill length."),
    new_tokens: int = typer.Option(64, "--new-tokens", min=1, help="Greedy decode steps timed."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per model (medians are reported)."),
    vs: Optional[Path] = typer.Option(None, "--vs", help="A second model to run alternately; ratios are printed."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="ORT intra-op threads (default: ORT's)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Measure load time, prefill latency, decode speed, peak RSS and size with onnxruntime."""
    from graphkit.console import emit_json, err, out
    try:
        from graphkit.bench import BenchSettings, bench, render_bench
        settings = BenchSettings(provider=provider, prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch=batch,
                                 repeats=repeats, threads=threads)
        report = bench(model, settings, vs=vs, dtype=dtype, progress=None if json_out else lambda m: err.print(f"• {m}", markup=False))
    except GraphkitError as exc:
        _fail(exc)
    emit_json(report) if json_out else render_bench(report, out)



@app.command("serve")
def serve_cmd(
    folder: Path = typer.Argument(..., help="A Transformers.js model folder (from `graphkit convert`)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default keeps the page on this machine."),
    dtypes: Optional[str] = typer.Option(None, "--dtypes", help="Offer only these dtypes (comma-separated); each must have its file."),
    node_modules: Optional[Path] = typer.Option(None, "--node-modules", help="node_modules holding @huggingface/transformers (default: the checkout's tests/js/node_modules)."),
) -> None:
    """Serve a page to try the folder in the browser: dtype and device, chat, streamed tokens, speed, two dtypes side by side."""
    from graphkit.console import err
    try:
        from graphkit.serve import make_server, url_of
        dtype_list = [d.strip() for d in dtypes.split(",") if d.strip()] if dtypes else None
        server = make_server(folder, host=host, port=port, dtypes=dtype_list, node_modules=node_modules)
    except GraphkitError as exc:
        _fail(exc)
    info = server.info  # type: ignore[attr-defined]
    err.print(f"serving {folder} ({', '.join(d['dtype'] for d in info['dtypes'])}) with Transformers.js "
              f"{info['transformers_version']}; Ctrl-C stops", markup=False, soft_wrap=True)
    sys.stdout.write(url_of(server) + "\n")  # the one line on stdout: scripts read the URL (with --port 0)
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was left half-written at the output path\n")
        sys.exit(130)
    except GraphkitError as exc:  # raised outside a command body
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:  # a command that needs the [export] extra, installed without it
        from graphkit.extras import missing_extra_message
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        msg = missing_extra_message(exc, command)
        if msg is None:
            raise
        sys.stderr.write(f"error: {msg}\n")
        sys.exit(2)
