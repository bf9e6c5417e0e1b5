// graphkit serve: try a converted folder with Transformers.js. Everything is loaded from the local server.
// window.__serve holds the state for scripts and tests: {ready, caps, running, runs: [...], agreement, error}.
const $ = (id) => document.getElementById(id);
const state = { ready: false, caps: null, running: false, runs: [], agreement: null, error: null };
window.__serve = state;
const now = () => performance.now();

// dtypes whose kernels need the WebGPU feature shader-f16 (float16 weights / activations / KV cache)
const F16_DTYPES = new Set(['fp16', 'q4f16']);

function setStatus(text, cls = '') {
  $('status').textContent = text;
  $('status').className = cls;
  console.log(`[serve] ${text}`);
}

async function capabilities() {
  const caps = {
    cross_origin_isolated: self.crossOriginIsolated, hardware_threads: navigator.hardwareConcurrency ?? 1,
    webgpu: false, adapter: null, shader_f16: false,
  };
  if ('gpu' in navigator) {
    try {
      const adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
      if (adapter) {
        const i = adapter.info ?? {};
        caps.webgpu = true;
        // subgroup sizes: WebGPU kernels (e.g. flash attention) behave differently on subgroup-4 adapters
        caps.adapter = { vendor: i.vendor, architecture: i.architecture, description: i.description,
          subgroup_min_size: i.subgroupMinSize ?? null, subgroup_max_size: i.subgroupMaxSize ?? null };
        caps.features = [...adapter.features].sort();
        caps.shader_f16 = adapter.features.has('shader-f16');
      }
    } catch (e) { caps.webgpu_error = String(e?.message ?? e); }
  }
  return caps;
}

/** Why `dtype` cannot run on `device` in this browser, or null. Checked before loading so nothing hangs. */
export function cannotRun(device, dtype, caps) {
  if (device !== 'webgpu') return null;
  if (!caps.webgpu) return 'this browser has no WebGPU adapter (navigator.gpu missing or no adapter); choose wasm';
  if (F16_DTYPES.has(dtype) && !caps.shader_f16) {
    return `${dtype} needs the WebGPU feature shader-f16, which this adapter (${caps.adapter?.vendor || '?'} / ${caps.adapter?.architecture || '?'}) lacks; choose wasm, or fp32 / q4 / q8 on webgpu`;
  }
  return null;
}

const models = new Map(); // `${device}/${dtype}` -> {model, load_ms}
let T;
let tokenizer;
let info;

async function getModel(device, dtype) {
  const key = `${device}/${dtype}`;
  if (!models.has(key)) {
    const t0 = now();
    let options = { device, dtype };
    if (dtype === 'w4') {
      // graphkit's 4-bit download (docs/w4.md): the folder's w4.mjs expands model_w4.w4bin into the int8 weights of
      // model_w4.onnx, handed to onnxruntime-web as external data (the documented Transformers.js path)
      const base = `/models/${info.model_id}`;
      const { w4ExternalData } = await import(`${base}/w4.mjs`);
      const externalData = await w4ExternalData(`${base}/onnx/model_w4.w4bin`);
      options = { device, dtype: 'fp32', model_file_name: 'model_w4', session_options: { externalData } };
    }
    const model = await T.AutoModelForCausalLM.from_pretrained(info.model_id, options);
    models.set(key, { model, load_ms: now() - t0 });
  }
  return models.get(key);
}

/** The device and dtype the page starts with, per adapter (RESULTS.md browser-0.5b-defaults): q4f16 on WebGPU where
 * the adapter has shader-f16 (its kernels need it); else wasm with q8 (the fastest to load from a local folder:
 * w4 decodes at q8's speed from a smaller download but expands its weights first), w4, then q4. */
export function defaultChoice(caps, names) {
  if (caps?.webgpu && caps.shader_f16 && names.includes('q4f16')) return { device: 'webgpu', dtype: 'q4f16' };
  const dtype = ['q8', 'w4', 'q4'].find((d) => names.includes(d)) ?? names[0];
  return { device: 'wasm', dtype };
}

function makePane(dtype, device) {
  const pane = document.createElement('div');
  pane.className = 'pane';
  pane.innerHTML = '<h2></h2><div class="stats"></div><pre class="out"></pre>';
  pane.querySelector('h2').textContent = `${dtype} · ${device}`;
  $('panes').appendChild(pane);
  return { stats: pane.querySelector('.stats'), out: pane.querySelector('pre.out'), pane };
}

async function runOne(device, dtype, text, maxNewTokens) {
  const ui = makePane(dtype, device);
  const run = { device, dtype, text: '', ids: [], prompt_ids: [], load_ms: null, prefill_ms: null, decode_tok_s: null, pieces: 0, error: null };
  state.runs.push(run);
  const why = cannotRun(device, dtype, state.caps);
  if (why) {
    run.error = why;
    ui.out.className = 'err';
    ui.out.textContent = why;
    return run;
  }
  try {
    ui.stats.textContent = 'loading…';
    const { model, load_ms } = await getModel(device, dtype);
    run.load_ms = load_ms;
    const prompt = tokenizer.apply_chat_template([{ role: 'user', content: text }], { add_generation_prompt: true, tokenize: false });
    const inputs = tokenizer(prompt, { add_special_tokens: false });
    run.prompt_ids = Array.from(inputs.input_ids.data, Number);
    const stamps = [];
    const streamer = new T.TextStreamer(tokenizer, {
      skip_prompt: true, skip_special_tokens: true,
      callback_function: (piece) => { run.text += piece; run.pieces += 1; ui.out.textContent = run.text; },
    });
    const put = streamer.put.bind(streamer);
    streamer.put = (value) => { stamps.push(now()); put(value); }; // stamps[0]: the prompt, then one per token
    const t0 = now();
    const out = await model.generate({ ...inputs, max_new_tokens: maxNewTokens, do_sample: false, streamer });
    const t1 = now();
    run.ids = Array.from(out.data, Number).slice(run.prompt_ids.length);
    run.text = tokenizer.decode(run.ids, { skip_special_tokens: true });
    ui.out.textContent = run.text;
    run.prefill_ms = stamps.length > 1 ? stamps[1] - t0 : t1 - t0;
    run.decode_tok_s = stamps.length > 2 ? (stamps.length - 2) / ((stamps.at(-1) - stamps[1]) / 1000) : null;
    run.gen_ms = t1 - t0;
    ui.stats.textContent = `load ${load_ms.toFixed(0)} ms · prefill ${run.prefill_ms.toFixed(0)} ms (${run.prompt_ids.length} tokens) · `
      + `decode ${run.decode_tok_s ? run.decode_tok_s.toFixed(1) : '-'} tokens/s · ${run.ids.length} tokens`;
  } catch (e) {
    run.error = String(e?.message ?? e);
    ui.out.className = 'err';
    ui.out.textContent = `failed: ${run.error}`;
  }
  return run;
}

/** Token agreement of two greedy runs: positions equal / the longer length, and the first divergence. */
export function agreement(a, b) {
  const n = Math.max(a.length, b.length);
  let same = 0;
  let first = null;
  for (let k = 0; k < n; ++k) {
    if (a[k] === b[k]) same += 1;
    else if (first === null) first = k;
  }
  return { same, total: n, fraction: n ? same / n : 1, first_divergence: first };
}

async function generate() {
  if (state.running) return;
  state.running = true;
  state.error = null;
  state.runs = [];
  state.agreement = null;
  $('go').disabled = true;
  $('panes').textContent = '';
  $('agreement').textContent = '';
  const device = $('device').value;
  const dtypes = [$('dtypeA').value, $('dtypeB').value].filter((d, i) => d && (i === 0 || d !== $('dtypeA').value));
  const text = $('prompt').value;
  const maxNewTokens = Math.max(1, Math.min(2048, Number.parseInt($('maxTokens').value, 10) || 64));
  try {
    for (const dtype of dtypes) {
      setStatus(`generating with ${dtype} on ${device}…`);
      await runOne(device, dtype, text, maxNewTokens);
    }
    const [a, b] = state.runs;
    if (b && !a.error && !b.error) {
      state.agreement = agreement(a.ids, b.ids);
      const g = state.agreement;
      $('agreement').textContent = `token agreement ${a.dtype} vs ${b.dtype}: ${g.same}/${g.total} (${(100 * g.fraction).toFixed(1)} %)`
        + (g.first_divergence === null ? ', identical' : `, first divergence at token ${g.first_divergence}`);
    }
    const failed = state.runs.filter((r) => r.error);
    if (failed.length) {
      state.error = failed.map((r) => `${r.dtype}: ${r.error}`).join('; ');
      setStatus(state.error, 'err');
    } else setStatus('done', 'ok');
  } finally {
    state.running = false;
    $('go').disabled = false;
  }
}

function showCaps(caps) {
  const gpu = caps.webgpu
    ? `webgpu: ${caps.adapter.vendor || '?'} / ${caps.adapter.architecture || '?'}, shader-f16: ${caps.shader_f16 ? 'yes' : 'no'}`
      + (caps.adapter.subgroup_min_size ? `, subgroup size: ${caps.adapter.subgroup_min_size}-${caps.adapter.subgroup_max_size}` : '')
    : `webgpu: not available${caps.webgpu_error ? ` (${caps.webgpu_error})` : ''}`;
  const n = T.env.backends.onnx.wasm.numThreads ?? Math.min(4, Math.ceil((navigator.hardwareConcurrency || 1) / 2));
  caps.wasm_threads = caps.cross_origin_isolated ? n : 1;
  $('caps').textContent = `${gpu} · wasm threads: ${caps.wasm_threads} (crossOriginIsolated: ${caps.cross_origin_isolated})`
    + ` · transformers.js ${info.transformers_version}, onnxruntime-web ${info.onnxruntime_web_version}`;
}

try {
  info = await (await fetch('/api/info.json', { cache: 'no-store' })).json();
  $('model').textContent = `${info.model_id} (${info.targets.join(', ')})`;
  for (const d of info.dtypes) {
    const label = `${d.dtype} (${(d.bytes / 2 ** 20).toFixed(1)} MB)`;
    $('dtypeA').add(new Option(label, d.dtype));
    $('dtypeB').add(new Option(label, d.dtype));
  }
  const names = info.dtypes.map((d) => d.dtype);
  T = await import('@huggingface/transformers');
  T.env.allowLocalModels = true;
  T.env.allowRemoteModels = false;
  T.env.localModelPath = '/models/';
  T.env.useBrowserCache = false;
  const wasm = T.env.backends.onnx.wasm;
  wasm.wasmPaths = {
    mjs: `${location.origin}/ort/ort-wasm-simd-threaded.asyncify.mjs`,
    wasm: `${location.origin}/ort/ort-wasm-simd-threaded.asyncify.wasm`,
  };
  // wasm threads need cross-origin isolation (the server sends COOP/COEP); ?threads=N overrides
  // onnxruntime-web's default (half the cores, at most 4)
  const threads = Number.parseInt(new URLSearchParams(location.search).get('threads') ?? '', 10);
  if (threads > 0) wasm.numThreads = self.crossOriginIsolated ? threads : 1;
  state.caps = await capabilities();
  state.default_choice = defaultChoice(state.caps, names);
  $('device').value = state.default_choice.device;
  $('dtypeA').value = state.default_choice.dtype;
  showCaps(state.caps);
  tokenizer = await T.AutoTokenizer.from_pretrained(info.model_id);
  $('go').addEventListener('click', generate);
  for (const id of ['device', 'dtypeA', 'dtypeB']) {
    $(id).addEventListener('change', () => {
      const why = [$('dtypeA').value, $('dtypeB').value].filter(Boolean).map((d) => cannotRun($('device').value, d, state.caps)).find(Boolean);
      setStatus(why ?? 'ready', why ? 'err' : '');
    });
  }
  state.ready = true;
  setStatus('ready');
} catch (e) {
  state.error = String(e?.message ?? e);
  setStatus(`ERROR: ${state.error}`, 'err');
}
