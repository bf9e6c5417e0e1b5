"""Make tests/fixtures/optimum/: the shipped example as a user exports it with optimum-onnx (not run by CI).

The user's recipe, followed as a new user would (issue 20):

1. merge the example's LoRA adapter into its base with peft and ``save_pretrained`` with transformers 5
   (this interpreter: the project's .venv) — the saved config.json holds ``rope_parameters`` only;
2. export with **optimum-onnx 0.1.0** (``optimum-cli export onnx --task text-generation-with-past``),
   which runs on transformers 4.x (<4.58): it reads that config with the default rope_theta 10,000
   instead of 1,000,000 — the fp32 export is silently wrong (``rope-mismatch/``);
3. quantize with optimum's ``ORTQuantizer`` (dynamic int8, ``AutoQuantizationConfig.avx512_vnni(
   is_static=False, per_channel=False)``) → ``model_quantized.onnx``: DynamicQuantizeLinear →
   MatMulInteger, one activation scale per tensor (docs/q8.md);
4. the same export from a config that also states ``rope_theta`` (what transformers 4.x reads) →
   ``correct/`` (fp32 only: `graphkit convert` starts from it).

optimum's export cannot save the transformers-5 tokenizer (transformers 4.57 fails on its
``extra_special_tokens`` list), so tokenizer.json / tokenizer_config.json are copied beside the
export by hand, as the user would; the chat template stays in chat_template.jinja, where
transformers 5 saved it (Transformers.js reads it only from tokenizer_config.json).

Run (optimum-onnx in its OWN venv; never in the project's .venv)::

    python3.11 -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install torch==2.13.0 "optimum-onnx[onnxruntime]==0.1.0" "transformers<4.58"
    PYTHONPATH=$PWD .venv/bin/python scripts/make_optimum_fixture.py --optimum-python /tmp/optimum-venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "graphkit" / "examples" / "epicrisis-tiny"
OUT = ROOT / "tests" / "fixtures" / "optimum"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

QUANTIZE = """
import sys
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
quantizer = ORTQuantizer.from_pretrained(sys.argv[1], file_name="model.onnx")
config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
quantizer.quantize(save_dir=sys.argv[2], quantization_config=config)
"""


def merge(dest: Path) -> None:
    import peft
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(EXAMPLE / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, EXAMPLE / "adapter").merge_and_unload()
    model.save_pretrained(dest)
    transformers.AutoTokenizer.from_pretrained(EXAMPLE / "base").save_pretrained(dest)


def export(optimum_python: str, model_dir: Path, out: Path) -> None:
    cli = str(Path(optimum_python).with_name("optimum-cli"))
    subprocess.run([cli, "export", "onnx", "--model", str(model_dir), "--task", "text-generation-with-past", str(out)],
                   check=True)
    for name in TOKENIZER_FILES:  # optimum (transformers 4.57) cannot save the transformers-5 tokenizer
        if (model_dir / name).exists() and not (out / name).exists():
            shutil.copyfile(model_dir / name, out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimum-python", required=True, help="python of a venv with optimum-onnx 0.1.0 installed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        merged = tmp / "merged"
        merge(merged)
        saved = json.loads((merged / "config.json").read_text())
        assert "rope_theta" not in saved, "transformers 5 was expected to save rope_parameters only"

        bad = tmp / "rope-mismatch"
        export(args.optimum_python, merged, bad)
        subprocess.run([args.optimum_python, "-c", QUANTIZE, str(bad), str(tmp / "q8")], check=True)
        shutil.copyfile(tmp / "q8" / "model_quantized.onnx", bad / "model_quantized.onnx")

        fixed = tmp / "merged-fixed"
        shutil.copytree(merged, fixed)
        saved["rope_theta"] = saved["rope_parameters"]["rope_theta"]  # what transformers 4.x reads
        (fixed / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        good = tmp / "correct"
        export(args.optimum_python, fixed, good)

        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir(parents=True)
        for src in (bad, good):
            shutil.copytree(src, OUT / src.name)
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(ROOT)}  {f.stat().st_size:,} B")


if __name__ == "__main__":
    main()
