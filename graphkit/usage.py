"""The app snippet `convert` prints and writes as ``OUT/USAGE.md``: the few lines that load the folder with
Transformers.js in a web app (local model path, no hub, a dtype per device, WebGPU falling back to wasm).

The dtype per device is chosen from the files the folder has: WebGPU with ``shader-f16`` → q4f16 (then fp16),
WebGPU without it → q4 (then fp32), wasm → q8 (the int8 file: onnxruntime-web's wasm build has no 4-bit
kernel, README "Benchmarks"). The runtimes come from ``config.json`` when the folder records them (``convert
--target``), else Transformers.js 4.x. The snippet is an ES module run unchanged by ``graphkit serve``'s test
(the page maps ``@huggingface/transformers`` to the installed build)."""
from __future__ import annotations

import json
from pathlib import Path

from graphkit.tjs_contract import DTYPE_FILES

DEFAULT_TARGETS = ["transformers.js@4"]
# preference per device; the first dtype the folder has wins
PREFERENCE = {
    "webgpu-f16": ["q4f16", "fp16", "q4", "fp32", "q8"],
    "webgpu": ["q4", "fp32", "q8"],
    "wasm": ["q8", "q4", "fp32", "q4f16", "fp16"],
}
NPM_RANGE = {"3": "^3.8.1", "4": "^4.3.1"}


def folder_targets(folder: Path) -> list[str]:
    """The runtimes the folder was made for, as recorded in config.json (several spellings accepted), else 4.x."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return list(DEFAULT_TARGETS)
    for where in (config.get("graphkit") or {}, config.get("transformers.js_config") or {}, config):
        if not isinstance(where, dict):
            continue
        for key in ("targets", "target", "runtimes"):
            val = where.get(key)
            if isinstance(val, str) and val:
                return [val]
            if isinstance(val, list) and val and all(isinstance(v, str) for v in val):
                return list(val)
    return list(DEFAULT_TARGETS)


def _majors(targets: list[str]) -> list[str]:
    majors = []
    for t in targets:
        tail = t.rsplit("@", 1)[-1].lstrip("v^~=")
        major = tail.split(".")[0] if tail[:1].isdigit() else "4"
        if major not in majors:
            majors.append(major)
    return majors or ["4"]


def pick_dtypes(dtypes: list[str]) -> dict[str, str | None]:
    return {dev: next((d for d in prefs if d in dtypes), None) for dev, prefs in PREFERENCE.items()}


def snippet(model_id: str, dtypes: list[str], targets: list[str]) -> str:
    """The ES module (JavaScript) that loads the folder ``/models/<model_id>/`` and streams a chat reply."""
    pick = pick_dtypes(dtypes)
    wasm = pick["wasm"] or dtypes[0]
    gpu16 = pick["webgpu-f16"] or wasm
    gpu = pick["webgpu"] or wasm
    majors = _majors(targets)
    npm = " or ".join(f"@huggingface/transformers@{NPM_RANGE.get(m, '^' + m)}" for m in majors)
    return f"""// {model_id} in Transformers.js ({npm}), fully offline.
// Copy the folder to where your app serves /models/{model_id}/ (e.g. public/models/{model_id}/).
import {{ env, AutoTokenizer, AutoModelForCausalLM, TextStreamer }} from '@huggingface/transformers';

env.allowRemoteModels = false;   // never the Hugging Face hub
env.localModelPath = '/models/'; // the folder's parent URL
const MODEL = '{model_id}';

// dtype per device: the files this folder has ({', '.join(dtypes)})
async function candidates() {{
  const adapter = await globalThis.navigator?.gpu?.requestAdapter();
  const gpu = adapter ? [{{ device: 'webgpu', dtype: adapter.features.has('shader-f16') ? '{gpu16}' : '{gpu}' }}] : [];
  return [...gpu, {{ device: 'wasm', dtype: '{wasm}' }}]; // WebGPU first, wasm as the fallback
}}

export async function load() {{
  const tokenizer = await AutoTokenizer.from_pretrained(MODEL);
  let lastError;
  for (const {{ device, dtype }} of await candidates()) {{
    try {{
      const model = await AutoModelForCausalLM.from_pretrained(MODEL, {{ device, dtype }});
      return {{ tokenizer, model, device, dtype }};
    }} catch (e) {{ lastError = e; }}
  }}
  throw lastError;
}}

export async function chat({{ tokenizer, model }}, content, onText = () => {{}}, maxNewTokens = 256) {{
  const prompt = tokenizer.apply_chat_template([{{ role: 'user', content }}], {{ add_generation_prompt: true, tokenize: false }});
  const inputs = tokenizer(prompt, {{ add_special_tokens: false }});
  const streamer = new TextStreamer(tokenizer, {{ skip_prompt: true, skip_special_tokens: true, callback_function: onText }});
  const out = await model.generate({{ ...inputs, max_new_tokens: maxNewTokens, do_sample: false, streamer }});
  return tokenizer.batch_decode(out.slice(null, [inputs.input_ids.dims[1], null]), {{ skip_special_tokens: true }})[0];
}}
"""


def usage_markdown(folder: Path, dtypes: list[str] | None = None, output: Path | None = None) -> tuple[str, str]:
    """(USAGE.md text, the JavaScript snippet) for a converted folder; ``output``: the path the folder will
    have when it is being built elsewhere (convert's temporary folder)."""
    src = Path(folder)
    if dtypes is None:
        dtypes = [d for d, f in DTYPE_FILES.items() if (src / "onnx" / f).is_file()]
    dtypes = [d for d in dtypes if d in DTYPE_FILES]  # Transformers.js dtypes only (w4 loads as docs/w4.md shows)
    targets = folder_targets(src)
    folder = Path(output) if output else src
    if not dtypes:  # e.g. `convert --dtypes w4`: no file Transformers.js loads by dtype, so no snippet to give
        return (f"""# Using {folder.name} in an app

This folder has no file Transformers.js loads by `dtype` (model.onnx, model_fp16.onnx, model_q4.onnx,
model_q4f16.onnx, model_quantized.onnx). `onnx/model_w4.onnx` + `onnx/model_w4.w4bin` are expanded by `w4.mjs`
before the session is created: see graphkit's docs/w4.md ("How to load it"), or convert with a Transformers.js dtype
beside w4 (`--dtypes q8,w4`) to get the snippet.
""", "")
    code = snippet(folder.name, dtypes, targets)
    pick = pick_dtypes(dtypes)
    md = f"""# Using {folder.name} in an app

Made for: {', '.join(targets)}. Files: {', '.join(f'{d} (onnx/{DTYPE_FILES[d]})' for d in dtypes)}.

1. Copy this folder under your app's static files so that it is served at `/models/{folder.name}/`
   (in Node, set `env.localModelPath` to the folder's parent directory instead).
2. Load it with the module below: WebGPU with `shader-f16` uses `{pick['webgpu-f16']}`, WebGPU without it
   `{pick['webgpu']}`, wasm `{pick['wasm']}`; if WebGPU is missing or fails to load, it falls back to wasm.
3. Try it first in the browser: `graphkit serve path/to/{folder.name}`.

```js
{code}```

Use it:

```js
import {{ load, chat }} from './{folder.name}.js';
const m = await load();
const text = await chat(m, 'your prompt', (t) => console.log(t));
```
"""
    return md, code


def extract_snippet(markdown: str) -> str:
    """The first ```js block of a USAGE.md (what the test runs in the browser)."""
    start = markdown.index("```js\n") + len("```js\n")
    return markdown[start:markdown.index("```", start)]


def write_usage(folder: Path, dtypes: list[str], output: Path | None = None) -> str:
    """Write ``USAGE.md`` into ``folder``; returns the snippet."""
    md, code = usage_markdown(folder, dtypes, output)
    (Path(folder) / "USAGE.md").write_text(md, encoding="utf-8")
    return code
