// Shared generation logic for the Transformers.js harness.
//
// This module is environment-agnostic: generate_node.mjs imports it in Node, and page.html imports it in
// Chromium (served by generate_browser.mjs). Both pass in the Transformers.js module they loaded, so the
// tokenisation, generation settings and result shape are identical in both clients.

const now = () => globalThis.performance.now();

/**
 * Validate the parsed prompts file: a JSON list whose items are either already chat-formatted strings or
 * objects {"messages": [{role, content}, ...]} (formatted with the tokenizer's chat template).
 * @param {unknown} prompts
 * @returns {(string|{messages: object[]})[]}
 */
export function validatePrompts(prompts) {
  if (!Array.isArray(prompts) || prompts.length === 0) {
    throw new Error('prompts file must contain a non-empty JSON list');
  }
  prompts.forEach((p, i) => {
    const ok = typeof p === 'string' || (p !== null && typeof p === 'object' && Array.isArray(p.messages));
    if (!ok) throw new Error(`prompts[${i}] must be a string or an object with a "messages" list`);
  });
  return prompts;
}

/**
 * The generation kwargs used for every prompt: pure greedy decoding of exactly `maxNewTokens` tokens.
 * `min_new_tokens` makes Transformers.js set the EOS logits to -Infinity until N tokens exist
 * (MinNewTokensLengthLogitsProcessor), so generation never stops early. repetition_penalty and
 * no_repeat_ngram_size are forced to their neutral values so a model's generation_config.json cannot turn
 * greedy argmax into something a plain onnxruntime loop would not reproduce.
 */
export function greedyKwargs(maxNewTokens) {
  return {
    do_sample: false,
    max_new_tokens: maxNewTokens,
    min_new_tokens: maxNewTokens,
    num_beams: 1,
    repetition_penalty: 1.0,
    no_repeat_ngram_size: 0,
  };
}

function toNumberArray(tensor) {
  return Array.from(tensor.data, (v) => Number(v));
}

/**
 * A logits processor (plain function; Transformers.js appends user processors after its own, so EOS is already
 * suppressed) that records, per generated token, the gap between the best and second-best logit. Greedy ids
 * from two runtimes can legitimately differ where this margin is ~0 (near-tie), so tests can use it.
 */
export function marginRecorder(margins) {
  return (inputIds, logits) => {
    const data = logits.data;
    const vocab = logits.dims.at(-1);
    if (data.length !== vocab) return logits; // batch > 1: not used by this harness
    let b1 = -Infinity;
    let b2 = -Infinity;
    for (let k = 0; k < vocab; ++k) {
      const v = data[k];
      if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
    }
    margins.push(Math.round((b1 - b2) * 1e5) / 1e5);
    return logits;
  };
}

/**
 * Load tokenizer + model and run greedy generation for each prompt (batch size 1).
 *
 * @param {object} T the imported '@huggingface/transformers' module
 * @param {object} opts
 * @param {string} opts.modelId model id relative to env.localModelPath
 * @param {string} opts.dtype e.g. 'fp32', 'q4', 'q4f16'
 * @param {string} opts.device e.g. 'cpu' (Node), 'wasm' / 'webgpu' (browser)
 * @param {Array} opts.prompts validated prompts
 * @param {number} opts.maxNewTokens
 * @param {boolean} [opts.addSpecialTokens=false] add the tokenizer's special tokens to plain-string prompts
 * @param {object} [opts.sessionOptions] passed to from_pretrained as session_options
 * @param {(msg: string) => void} [opts.log]
 * @param {(result: object, index: number) => void} [opts.onResult] called after each prompt finishes
 */
export async function runGeneration(T, opts) {
  const {
    modelId, dtype, device, prompts, maxNewTokens,
    addSpecialTokens = false, log = () => {}, onResult = () => {}, w4ExternalData,
  } = opts;
  let { sessionOptions } = opts;

  const tLoad0 = now();
  const tokenizer = await T.AutoTokenizer.from_pretrained(modelId);
  const modelOptions = { dtype, device };
  let w4_expand_ms = null;
  if (dtype === 'w4') {
    // graphkit's 4-bit download (passes/matmul_w4.py): onnx/model_w4.onnx loaded as a plain file name; its int8
    // weights come from the folder's w4.mjs (browser: externalData; Node: the data file it wrote beside it)
    modelOptions.dtype = 'fp32';
    modelOptions.model_file_name = 'model_w4';
    if (w4ExternalData) {
      const t0 = now();
      sessionOptions = { ...(sessionOptions ?? {}), externalData: await w4ExternalData() };
      w4_expand_ms = now() - t0;
      log(`w4: 4-bit weights fetched and expanded to int8 in ${w4_expand_ms.toFixed(0)} ms`);
    }
  }
  if (sessionOptions) modelOptions.session_options = sessionOptions;
  const model = await T.AutoModelForCausalLM.from_pretrained(modelId, modelOptions);
  const load_ms = now() - tLoad0;
  log(`loaded ${modelId} (dtype=${dtype}, device=${device}) in ${load_ms.toFixed(0)} ms`);

  const eos = model.generation_config?.eos_token_id ?? model.config?.eos_token_id ?? null;
  const kwargs = greedyKwargs(maxNewTokens);
  const results = [];
  let gen_ms = 0;

  for (let i = 0; i < prompts.length; ++i) {
    const p = prompts[i];
    let prompt;
    let inputs;
    if (typeof p === 'string') {
      prompt = p;
      inputs = tokenizer(prompt, { add_special_tokens: addSpecialTokens });
    } else {
      prompt = tokenizer.apply_chat_template(p.messages, { add_generation_prompt: true, tokenize: false });
      // Same as Python transformers' apply_chat_template(tokenize=True): the template already holds the specials.
      inputs = tokenizer(prompt, { add_special_tokens: false });
    }
    const prompt_ids = toNumberArray(inputs.input_ids);

    // Duck-typed streamer: Transformers.js calls put() once with the prompt, then once per new token.
    const stamps = [];
    const streamer = { put() { stamps.push(now()); }, end() {} };
    const margins = [];

    const t0 = now();
    const out = await model.generate({
      ...inputs, ...kwargs, streamer, logits_processor: [marginRecorder(margins)],
    });
    const t1 = now();
    gen_ms += t1 - t0;

    const all = toNumberArray(out);
    const head = all.slice(0, prompt_ids.length);
    if (head.length !== prompt_ids.length || head.some((v, j) => v !== prompt_ids[j])) {
      throw new Error(`prompts[${i}]: generate() output does not start with the prompt ids`);
    }
    const new_ids = all.slice(prompt_ids.length);
    if (new_ids.length !== maxNewTokens) {
      throw new Error(`prompts[${i}]: expected ${maxNewTokens} new tokens, got ${new_ids.length}`);
    }
    const text = tokenizer.decode(new_ids, { skip_special_tokens: true });
    // stamps[0] = prompt put (≈ t0); stamps[1] = first new token; stamps[k] = k-th new token.
    const first_token_ms = stamps.length > 1 ? stamps[1] - t0 : null;
    const decode_ms_per_token = stamps.length > 2
      ? (stamps[stamps.length - 1] - stamps[1]) / (stamps.length - 2) : null;
    const result = {
      prompt, prompt_ids, new_ids, text,
      gen_ms: t1 - t0, first_token_ms, decode_ms_per_token, margins,
    };
    results.push(result);
    log(`prompt ${i}: ${prompt_ids.length} prompt tokens, ${new_ids.length} new tokens in ${(t1 - t0).toFixed(0)} ms`);
    onResult(result, i);
  }

  try { await model.dispose?.(); } catch { /* ignore */ }

  return {
    dtype,
    device,
    results,
    load_ms,
    w4_expand_ms,
    gen_ms,
    generation: { ...kwargs, eos_token_id: eos },
    transformers_version: T.env?.version ?? null,
  };
}

/**
 * runGeneration once per dtype (same prompts), in one process or page: a failing dtype is recorded with its
 * error and the others still run. Returns {by_dtype: {dtype: runGeneration's result | {error}}, errors: n}.
 * One process for all dtypes shares the runtime start-up and, on lavapipe, the shader compilations.
 */
export async function runDtypes(T, opts) {
  const by_dtype = {};
  let errors = 0;
  for (const dtype of opts.dtypes) {
    const log = opts.log ?? (() => {});
    try {
      by_dtype[dtype] = await runGeneration(T, { ...opts, dtype, onResult: (r, i) => opts.onResult?.(r, i, dtype) });
    } catch (e) {
      errors += 1;
      by_dtype[dtype] = { dtype, error: String(e?.message ?? e) };
      log(`${dtype}: ERROR ${by_dtype[dtype].error}`);
    }
  }
  return { by_dtype, errors };
}
