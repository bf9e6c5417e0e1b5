#!/usr/bin/env node
// Speed of Transformers.js greedy generation on a model folder, in Node (onnxruntime-node) or in headless
// Debian Chromium (onnxruntime-web: wasm or webgpu), fully offline. Used by benchmarks/browser.py.
//
// One process = one model: load (timed), one untimed warm-up generation, then --runs timed generations of
// exactly --new-tokens greedy tokens after the --prompt-ids prompt. Prints exactly one JSON object on stdout
// (all logs on stderr): {client, device, dtype, load_ms, warmup_ms, runs: [{prefill_ms, decode_ms_per_token,
// e2e_ms, new_ids, margins}], ...} or the same identifying fields plus "error" (exit 1; 3 on timeout).
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { fileURLToPath } from 'node:url';
import {
  Cleanups, chromiumVersion, closeServer, launchChromium, resolvePackages, startServer,
} from './chromium_common.mjs';
import {
  HarnessError, UsageError, emitJson, fail, importTransformers, log, modelIdOf, ortNodeModule, parseOptions, routeConsoleToStderr,
} from './cli_common.mjs';
import { runBenchmark, runOps } from './bench_core.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));

const USAGE = `usage: node bench_tjs.mjs --client node|chromium --model-dir DIR --dtype q8 --prompt-ids ids.json
         [--device cpu|wasm|webgpu] [--new-tokens 32] [--runs 1] [--warmup-tokens 2] [--threads 2]
         [--timeout-s 900] [--chromium /usr/bin/chromium] [--adapter default|lavapipe]

  --client         node (onnxruntime-node, device cpu) or chromium (onnxruntime-web, device wasm or webgpu)
  --prompt-ids     JSON list of token ids (the prompt; fed as input_ids with an all-ones attention_mask)
  --threads        node: intraOpNumThreads; chromium: env.backends.onnx.wasm.numThreads (>1 serves the page
                   with COOP/COEP so it is cross-origin isolated, which multi-threaded wasm needs)
  --adapter        chromium webgpu: default (Chromium's own adapter) or lavapipe (Mesa lavapipe with shader-f16,
                   webgpu_route.mjs; the page refuses any other adapter)
  --warmup-tokens  new tokens of the untimed warm-up generation (same prompt); 0 = none
  --ops            diagnostics instead of generation: --model-dir holds ops.json ([{name, file, K}]) and one-layer
                   .onnx files; each is run straight in onnxruntime-node / onnxruntime-web (input "A" [M, K]),
                   M = 1 and --prompt-ids' length, --runs timed runs each (no --dtype, no config.json needed)`;

function parse(argv) {
  const values = parseOptions(argv, {
    client: { type: 'string', default: 'node' },
    'model-dir': { type: 'string' },
    dtype: { type: 'string', default: 'q8' },
    device: { type: 'string' },
    'prompt-ids': { type: 'string' },
    'new-tokens': { type: 'string', default: '32' },
    runs: { type: 'string', default: '1' },
    'warmup-tokens': { type: 'string', default: '2' },
    threads: { type: 'string', default: '2' },
    'timeout-s': { type: 'string', default: '900' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    ops: { type: 'boolean', default: false },
    adapter: { type: 'string', default: 'default' },
  }, USAGE);
  if (!['default', 'lavapipe'].includes(values.adapter)) throw new UsageError('--adapter must be default or lavapipe');
  const client = values.client;
  if (!['node', 'chromium'].includes(client)) throw new UsageError(`--client must be node or chromium\n\n${USAGE}`);
  const device = values.device ?? (client === 'node' ? 'cpu' : 'wasm');
  if (client === 'chromium' && !['wasm', 'webgpu'].includes(device)) throw new UsageError('chromium: --device wasm|webgpu');
  if (!values['model-dir'] || !values['prompt-ids']) throw new UsageError(`--model-dir and --prompt-ids are required\n\n${USAGE}`);
  const modelDir = path.resolve(values['model-dir']);
  const need = values.ops ? 'ops.json' : 'config.json';
  if (!fs.existsSync(path.join(modelDir, need))) throw new UsageError(`${modelDir} has no ${need}`);
  const modelId = modelIdOf(modelDir);
  const int = (k, min) => {
    const v = Number.parseInt(values[k], 10);
    if (!Number.isInteger(v) || v < min) throw new UsageError(`--${k} must be an integer >= ${min}`);
    return v;
  };
  let promptIds;
  try {
    promptIds = JSON.parse(fs.readFileSync(values['prompt-ids'], 'utf8'));
  } catch (e) {
    throw new UsageError(`cannot read --prompt-ids ${values['prompt-ids']}: ${e.message}`);
  }
  if (!Array.isArray(promptIds) || !promptIds.length || !promptIds.every(Number.isInteger)) {
    throw new UsageError('--prompt-ids must hold a non-empty JSON list of integers');
  }
  return {
    client, device, modelDir, modelId, dtype: values.dtype, promptIds,
    newTokens: int('new-tokens', 2), runs: int('runs', 1), warmupTokens: int('warmup-tokens', 0),
    threads: int('threads', 1), timeoutS: int('timeout-s', 1), chromiumPath: values.chromium, ops: values.ops,
    adapter: values.adapter,
    opsList: values.ops ? JSON.parse(fs.readFileSync(path.join(modelDir, 'ops.json'), 'utf8')) : null,
  };
}

async function benchNode(a) {
  const T = await importTransformers();
  const { env } = T;
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = path.dirname(a.modelDir) + path.sep;
  env.useFSCache = false;
  env.useBrowserCache = false;
  let w4_materialize_ms = null;
  if (a.dtype === 'w4') { // onnxruntime-node reads external data from disk: the folder's w4.mjs writes it once
    const { materializeW4 } = await import(pathToFileURL(path.join(a.modelDir, 'w4.mjs')).href);
    const t0 = performance.now();
    await materializeW4(path.join(a.modelDir, 'onnx', 'model_w4.onnx'));
    w4_materialize_ms = performance.now() - t0;
  }
  const out = await runBenchmark(T, {
    modelId: a.modelId, dtype: a.dtype, device: a.device, promptIds: a.promptIds, newTokens: a.newTokens,
    runs: a.runs, warmupTokens: a.warmupTokens, log,
    sessionOptions: { intraOpNumThreads: a.threads, interOpNumThreads: 1 },
  });
  return { ...out, w4_materialize_ms, threads: a.threads, node_version: process.version, peak_rss_bytes: process.resourceUsage().maxRSS * 1024 };
}

async function opsNode(a) {
  const ort = ortNodeModule();
  const runs = await runOps(ort, {
    models: a.opsList, load: (f) => path.join(a.modelDir, f), ms: [1, a.promptIds.length], iters: a.runs, log,
    sessionOptions: { intraOpNumThreads: a.threads, interOpNumThreads: 1, executionProviders: ['cpu'] },
  });
  return { ops: runs, onnxruntime_node_version: ort.env?.versions?.node ?? null };
}

// Chromium, its profile folder and the server: closed in reverse order on success, failure, timeout or a signal.
const cleanups = new Cleanups();
const cleanup = () => cleanups.run();
for (const sig of ['SIGINT', 'SIGTERM']) process.once(sig, () => { cleanup().finally(() => process.exit(130)); });

async function benchChromium(a, record) {
  if (!fs.existsSync(a.chromiumPath)) throw new UsageError(`Chromium not found at ${a.chromiumPath} (apt-get install -y chromium)`);
  const coi = a.threads > 1;
  const config = {
    modelId: a.modelId, dtype: a.dtype, device: a.device, threads: a.threads, promptIds: a.promptIds,
    newTokens: a.newTokens, runs: a.runs, warmupTokens: a.warmupTokens, ops: a.opsList,
    ...(a.adapter === 'lavapipe' ? { expectAdapter: (await import('./webgpu_route.mjs')).EXPECTED } : {}),
  };
  try {
    const { tjsDist, ortDist } = resolvePackages();
    const server = await startServer({
      coi,
      staticFiles: {
        '/': path.join(HERE, 'bench_page.html'),
        '/harness/bench_core.mjs': path.join(HERE, 'bench_core.mjs'),
        '/harness/harness_core.mjs': path.join(HERE, 'harness_core.mjs'),
        '/harness/page_common.mjs': path.join(HERE, 'page_common.mjs'),
        '/harness/config.json': { type: 'application/json; charset=utf-8', data: JSON.stringify(config) },
      },
      routes: [[`/models/${a.modelId}/`, a.modelDir], ['/tjs/', tjsDist], ['/ort/', ortDist]],
    });
    cleanups.push(() => closeServer(server));
    const origin = `http://127.0.0.1:${server.address().port}`;
    record.chromium_version = chromiumVersion(a.chromiumPath);
    const context = await launchChromium({ executable: a.chromiumPath, device: a.device, cleanups, adapter: a.adapter });
    const page = context.pages()[0] ?? await context.newPage();
    let fatal = null;
    page.on('console', (m) => log(`console.${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => { fatal ??= `uncaught error in page: ${e.message}`; });
    page.on('crash', () => { fatal ??= 'the page crashed (renderer process died; out of memory?)'; });
    await page.goto(`${origin}/`, { waitUntil: 'load', timeout: 60_000 });
    while (!fatal) {
      const done = await page.evaluate(() => window.__done === true).catch((e) => { fatal ??= e.message; return false; });
      if (done) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    const got = fatal ? {} : await page.evaluate(() => ({ result: window.__result ?? null, error: window.__error ?? null, info: window.__info ?? null }));
    Object.assign(record, got.result ?? got.info ?? {});
    record.page_workers = page.workers().length;
    if (fatal) throw new HarnessError(fatal);
    if (got.error) throw new HarnessError(`page reported: ${got.error}`);
    if (!got.result) throw new HarnessError('page finished without a result');
    return record;
  } finally {
    await cleanup();
  }
}

async function main() {
  routeConsoleToStderr();
  const a = parse(process.argv.slice(2));
  const record = {
    client: a.client, device: a.device, adapter_route: a.adapter, dtype: a.dtype, model_dir: a.modelDir, prompt_tokens: a.promptIds.length,
    new_tokens: a.newTokens, threads: a.threads,
  };
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new HarnessError(`timed out after ${a.timeoutS} s`, 3)), a.timeoutS * 1000);
  });
  try {
    const work = a.client === 'node'
      ? (a.ops ? opsNode(a) : benchNode(a)).then((o) => Object.assign(record, o)) : benchChromium(a, record);
    await Promise.race([work, timeout]);
  } catch (e) {
    await emitJson({ ...record, error: String(e?.message ?? e) });
    throw e;
  } finally {
    clearTimeout(timer);
    await cleanup();
  }
  await emitJson(record);
}

main().then(() => process.exit(0), (e) => fail(e, e?.exitCode ?? 1));
