// Speed measurement for Transformers.js generation, shared by the Node and Chromium sides of bench_tjs.mjs.
//
// Environment-agnostic like harness_core.mjs (whose greedy settings it reuses): bench_tjs.mjs imports it in
// Node, bench_page.html imports it in Chromium, and both pass in the Transformers.js module they loaded.
// The prompt is given as token ids (input_ids + an all-ones attention_mask go straight to generate(), no
// tokenizer), so every client and every model sees exactly the same 128 ids.
import { greedyKwargs, marginRecorder } from './harness_core.mjs';

const now = () => globalThis.performance.now();

async function timedGenerate(model, T, promptIds, newTokens) {
  const n = promptIds.length;
  const input_ids = new T.Tensor('int64', BigInt64Array.from(promptIds, (v) => BigInt(v)), [1, n]);
  const attention_mask = new T.Tensor('int64', new BigInt64Array(n).fill(1n), [1, n]);
  // Duck-typed streamer: put() once with the prompt, then once after each forward pass (one new token).
  const stamps = [];
  const streamer = { put() { stamps.push(now()); }, end() {} };
  const margins = [];
  const t0 = now();
  const out = await model.generate({
    input_ids, attention_mask, ...greedyKwargs(newTokens), streamer, logits_processor: [marginRecorder(margins)],
  });
  const t1 = now();
  const all = Array.from(out.data, (v) => Number(v));
  const new_ids = all.slice(n);
  if (new_ids.length !== newTokens) throw new Error(`expected ${newTokens} new tokens, got ${new_ids.length}`);
  // stamps[0] = prompt put (≈ t0); stamps[k] = k-th new token.
  const prefill_ms = stamps.length > 1 ? stamps[1] - t0 : null;
  const decode_ms_per_token = stamps.length > 2 ? (stamps.at(-1) - stamps[1]) / (stamps.length - 2) : null;
  return { new_ids, margins, prefill_ms, decode_ms_per_token, e2e_ms: t1 - t0 };
}

/**
 * Load a model, run an untimed warm-up generation (same prompt, `warmupTokens` new tokens), then `runs`
 * timed greedy generations of exactly `newTokens` tokens.
 *
 * @param {object} T the imported '@huggingface/transformers' module
 * @param {object} opts { modelId, dtype, device, promptIds, newTokens, runs, warmupTokens, sessionOptions, log }
 * @returns {Promise<object>} { load_ms, warmup_ms, runs: [{prefill_ms, decode_ms_per_token, e2e_ms, new_ids,
 *   margins}], transformers_version }
 */
export async function runBenchmark(T, opts) {
  const {
    modelId, dtype, device, promptIds, newTokens, runs = 1, warmupTokens = 2, log = () => {}, w4ExternalData,
  } = opts;
  let { sessionOptions } = opts;
  if (!Array.isArray(promptIds) || promptIds.length === 0) throw new Error('promptIds must be a non-empty list');
  const t0 = now();
  const modelOptions = { dtype, device };
  let w4_expand_ms = null;
  if (dtype === 'w4') { // graphkit's 4-bit download (harness_core.mjs runGeneration says how it loads)
    modelOptions.dtype = 'fp32';
    modelOptions.model_file_name = 'model_w4';
    if (w4ExternalData) {
      const t = now();
      sessionOptions = { ...(sessionOptions ?? {}), externalData: await w4ExternalData() };
      w4_expand_ms = now() - t;
      log(`w4: fetched and expanded in ${w4_expand_ms.toFixed(0)} ms`);
    }
  }
  if (sessionOptions) modelOptions.session_options = sessionOptions;
  const model = await T.AutoModelForCausalLM.from_pretrained(modelId, modelOptions);
  const load_ms = now() - t0;
  log(`loaded ${modelId} (dtype=${dtype}, device=${device}) in ${load_ms.toFixed(0)} ms`);
  let warmup_ms = 0;
  if (warmupTokens > 0) {
    const w = now();
    await timedGenerate(model, T, promptIds, warmupTokens);
    warmup_ms = now() - w;
    log(`warm-up (${warmupTokens} tokens) ${warmup_ms.toFixed(0)} ms`);
  }
  const results = [];
  for (let r = 0; r < runs; ++r) {
    const res = await timedGenerate(model, T, promptIds, newTokens);
    log(`run ${r + 1}/${runs}: prefill ${res.prefill_ms.toFixed(0)} ms, decode ${res.decode_ms_per_token.toFixed(1)} ms/token`);
    results.push(res);
  }
  try { await model.dispose?.(); } catch { /* ignore */ }
  return { dtype, device, load_ms, w4_expand_ms, warmup_ms, runs: results, transformers_version: T.env?.version ?? null };
}

const TYPED = {
  float32: Float32Array, float16: Uint16Array, int64: BigInt64Array, int32: Int32Array, int8: Int8Array,
  uint8: Uint8Array, bool: Uint8Array,
};

/** {name: {type, dims, b64}} (ort_run.mjs's tensor form) → onnxruntime Tensors; works in Node and in pages. */
export function tensorsFromJson(ort, feeds) {
  const out = {};
  for (const [name, t] of Object.entries(feeds)) {
    const bytes = Uint8Array.from(atob(t.b64), (c) => c.charCodeAt(0));
    out[name] = new ort.Tensor(t.type, new TYPED[t.type](bytes.buffer), t.dims);
  }
  return out;
}

/**
 * Single-operator timing (diagnostics for which graph form is fast where): for each model (one linear layer in
 * some graph form, input "A" [M, K] float32), create an onnxruntime session (timed), run it twice untimed per M,
 * then `iters` timed runs; median ms per M. A model given `feeds` ({name: {type, dims, b64}}: e.g. a whole
 * decoder's decode step) is run on exactly those inputs instead and reported as M=1.
 *
 * @param {object} ort onnxruntime-node or onnxruntime-web
 * @param {object} opts { models: [{name, file, K} | {name, file, feeds}], load(file) → path or Uint8Array,
 *   ms: [1, 128], iters, sessionOptions, log }
 */
export async function runOps(ort, opts) {
  const { models, load, ms = [1, 128], iters = 5, sessionOptions = {}, log = () => {} } = opts;
  const out = [];
  for (const m of models) {
    const row = { name: m.name, file: m.file };
    try {
      const t0 = now();
      const session = await ort.InferenceSession.create(await load(m.file), sessionOptions);
      row.session_ms = now() - t0;
      row.ms = {};
      for (const M of m.feeds ? [1] : ms) {
        let feeds;
        if (m.feeds) {
          feeds = tensorsFromJson(ort, m.feeds);
        } else {
          const a = new Float32Array(M * m.K);
          for (let i = 0; i < a.length; ++i) a[i] = Math.sin(i * 0.37) * 2;
          feeds = { A: new ort.Tensor('float32', a, [M, m.K]) };
        }
        for (let w = 0; w < 2; ++w) await session.run(feeds);
        const times = [];
        for (let i = 0; i < iters; ++i) {
          const t = now();
          await session.run(feeds);
          times.push(now() - t);
        }
        times.sort((x, y) => x - y);
        row.ms[M] = times[Math.floor(times.length / 2)];
      }
      await session.release?.();
      log(`${m.name}: session ${row.session_ms.toFixed(0)} ms, ${Object.entries(row.ms).map(([k, v]) => `M=${k} ${v.toFixed(2)} ms`).join(', ')}`);
    } catch (e) {
      row.error = String(e?.message ?? e).slice(0, 400);
      log(`${m.name}: ERROR ${row.error}`);
    }
    out.push(row);
  }
  return out;
}
