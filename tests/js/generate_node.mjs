#!/usr/bin/env node
// Greedy generation with Transformers.js in Node (onnxruntime-node), fully offline.
// Prints exactly one JSON object on stdout; all logs go to stderr. See README.md.
import {
  UsageError, emitJson, fail, importTransformers, log, parseCommon, routeConsoleToStderr,
} from './cli_common.mjs';
import { spawnSync } from 'node:child_process';
import { runDtypes, runGeneration } from './harness_core.mjs';

const USAGE = `usage: node generate_node.mjs --model-dir /abs/path/to/folder --prompts prompts.json
         [--dtype q4|fp32,fp16,...] [--device cpu|webgpu] [--adapter default|lavapipe] [--max-new-tokens 32]
         [--threads N] [--add-special-tokens]

  --model-dir           model folder (config.json, tokenizer*.json, onnx/model{_q4,_q4f16,...}.onnx)
  --prompts             JSON list of chat-formatted strings, or of {"messages": [...]} objects
  --dtype               Transformers.js dtype: fp32 | fp16 | q8 | int8 | uint8 | q4 | q4f16 | bnb4 ... (default q4);
                        a comma list runs each in this one process (result "by_dtype")
  --device              Transformers.js device in Node (default cpu; webgpu = onnxruntime-node's own Dawn)
  --adapter             with --device webgpu: default (whatever Vulkan driver the system has) or lavapipe (Mesa
                        lavapipe 25 from build/lavapipe, set up by scripts/setup.sh): the Vulkan loader sees only
                        it, and the run fails unless it is lavapipe with shaderFloat16 and subgroup size 8
  --max-new-tokens      exactly this many tokens are generated per prompt (default 32)
  --threads             onnxruntime intraOpNumThreads (default: onnxruntime's own default)
  --add-special-tokens  add the tokenizer's special tokens to plain-string prompts (default off)`;

async function main() {
  routeConsoleToStderr();
  const args = parseCommon(process.argv.slice(2), {
    device: { type: 'string', default: 'cpu' },
    adapter: { type: 'string', default: 'default' },
    threads: { type: 'string' },
  }, USAGE);
  const { values, modelId, localModelPath, prompts, maxNewTokens } = args;
  if (!['default', 'lavapipe'].includes(values.adapter)) throw new UsageError(`--adapter must be default or lavapipe, got ${values.adapter}`);
  if (values.adapter === 'lavapipe' && values.device !== 'webgpu') throw new UsageError('--adapter lavapipe needs --device webgpu');
  let adapter = null;
  if (values.adapter === 'lavapipe') {
    try {
      const { lavapipeRoute, lavapipeEnv, probeLavapipe } = await import('./webgpu_route.mjs');
      const route = lavapipeRoute();
      const env = lavapipeEnv(route, 'node');
      if (process.env.GRAPHKIT_LAVAPIPE_ACTIVE !== env.GRAPHKIT_LAVAPIPE_ACTIVE) {
        // The loader paths (LD_LIBRARY_PATH) are read at process start: run this script again in that environment.
        const child = spawnSync(process.execPath, process.argv.slice(1), { stdio: 'inherit', env: { ...process.env, ...env } });
        process.exit(child.status ?? 1);
      }
      adapter = probeLavapipe(route, env); // throws unless the only Vulkan device is lavapipe with f16 + subgroup 8
    } catch (e) {
      await emitJson({ client: 'node', dtype: values.dtype, device: values.device, adapter_route: values.adapter,
        error: String(e?.message ?? e) });
      throw e;
    }
  }
  const dtypes = values.dtype.split(',').map((d) => d.trim()).filter(Boolean);

  let sessionOptions;
  let threads = null;
  if (values.threads !== undefined) {
    threads = Number.parseInt(values.threads, 10);
    if (!Number.isInteger(threads) || threads < 1) throw new UsageError('--threads must be a positive integer');
    sessionOptions = { intraOpNumThreads: threads, interOpNumThreads: 1 };
  }

  const T = await importTransformers();
  const { env } = T;
  env.allowRemoteModels = false; // never contact the Hub
  env.allowLocalModels = true;
  env.localModelPath = localModelPath; // files are read from <localModelPath>/<modelId>/...
  env.useFSCache = false; // a cached Hub download must never shadow the local folder
  env.useBrowserCache = false;

  log(`transformers.js ${env.version}, model ${localModelPath}${modelId}, dtype=${values.dtype}, device=${values.device}`);
  const record = {
    client: 'node', dtype: values.dtype, device: values.device, model_dir: args.modelDir, threads,
    transformers_version: env.version, node_version: process.version, adapter_route: values.adapter,
    ...(adapter ? { adapter, shader_f16: adapter.features.includes('shader-f16') } : {}),
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
    out = await (dtypes.length > 1 ? runDtypes : runGeneration)(T, {
      modelId,
      dtype: values.dtype,
      dtypes,
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
