#!/usr/bin/env node
// Greedy generation with Transformers.js in Node (onnxruntime-node), fully offline.
// Prints exactly one JSON object on stdout; all logs go to stderr. See README.md.
import {
  UsageError, emitJson, fail, log, parseCommon, routeConsoleToStderr,
} from './cli_common.mjs';
import { runGeneration } from './harness_core.mjs';

const USAGE = `usage: node generate_node.mjs --model-dir /abs/path/to/folder --prompts prompts.json
         [--dtype q4] [--device cpu] [--max-new-tokens 32] [--threads N] [--add-special-tokens]

  --model-dir           model folder (config.json, tokenizer*.json, onnx/model{_q4,_q4f16,...}.onnx)
  --prompts             JSON list of chat-formatted strings, or of {"messages": [...]} objects
  --dtype               Transformers.js dtype: fp32 | fp16 | q8 | int8 | uint8 | q4 | q4f16 | bnb4 ... (default q4)
  --device              Transformers.js device in Node (default cpu)
  --max-new-tokens      exactly this many tokens are generated per prompt (default 32)
  --threads             onnxruntime intraOpNumThreads (default: onnxruntime's own default)
  --add-special-tokens  add the tokenizer's special tokens to plain-string prompts (default off)`;

async function main() {
  routeConsoleToStderr();
  const args = parseCommon(process.argv.slice(2), {
    device: { type: 'string', default: 'cpu' },
    threads: { type: 'string' },
  }, USAGE);
  const { values, modelId, localModelPath, prompts, maxNewTokens } = args;

  let sessionOptions;
  let threads = null;
  if (values.threads !== undefined) {
    threads = Number.parseInt(values.threads, 10);
    if (!Number.isInteger(threads) || threads < 1) throw new UsageError('--threads must be a positive integer');
    sessionOptions = { intraOpNumThreads: threads, interOpNumThreads: 1 };
  }

  const T = await import('@huggingface/transformers');
  const { env } = T;
  env.allowRemoteModels = false; // never contact the Hub
  env.allowLocalModels = true;
  env.localModelPath = localModelPath; // files are read from <localModelPath>/<modelId>/...
  env.useFSCache = false; // a cached Hub download must never shadow the local folder
  env.useBrowserCache = false;

  log(`transformers.js ${env.version}, model ${localModelPath}${modelId}, dtype=${values.dtype}, device=${values.device}`);
  const record = {
    client: 'node', dtype: values.dtype, device: values.device, model_dir: args.modelDir, threads,
    transformers_version: env.version, node_version: process.version,
  };
  let out;
  try {
    if (values.dtype === 'w4') {
      // onnxruntime-node reads external data from disk: the folder's w4.mjs writes model_w4.onnx_data once
      const path = await import('node:path');
      const { pathToFileURL } = await import('node:url');
      const folder = path.resolve(args.modelDir);
      const { materializeW4 } = await import(pathToFileURL(path.join(folder, 'w4.mjs')).href);
      const t0 = performance.now();
      await materializeW4(path.join(folder, 'onnx', 'model_w4.onnx'));
      record.w4_materialize_ms = performance.now() - t0;
    }
    out = await runGeneration(T, {
      modelId,
      dtype: values.dtype,
      device: values.device,
      prompts,
      maxNewTokens,
      addSpecialTokens: values['add-special-tokens'],
      sessionOptions,
      log,
    });
  } catch (e) {
    // Still print a JSON record (with "error") so callers can log what failed; exit code stays non-zero.
    await emitJson({ ...record, error: String(e?.message ?? e) });
    throw e;
  }
  await emitJson({ ...record, ...out });
}

main().then(() => process.exit(0), (e) => fail(e));
