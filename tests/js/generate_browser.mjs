#!/usr/bin/env node
// Greedy generation with Transformers.js in headless Debian Chromium (onnxruntime-web, wasm or webgpu),
// fully offline. A tiny static server on 127.0.0.1 serves page.html, the model folder, the transformers.js
// web bundle and onnxruntime-web's dist files from node_modules; playwright-core drives /usr/bin/chromium.
// Prints exactly one JSON object on stdout; all logs go to stderr. See README.md.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  Cleanups, chromiumVersion, closeServer, launchChromium, resolvePackages, startServer,
} from './chromium_common.mjs';
import {
  HarnessError, UsageError, emitJson, fail, log, parseCommon, routeConsoleToStderr,
} from './cli_common.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));

const USAGE = `usage: node generate_browser.mjs --model-dir /abs/path/to/folder --prompts prompts.json
         [--dtype q4|fp32,fp16,...] [--device wasm|webgpu] [--adapter default|lavapipe] [--max-new-tokens 32] [--threads 1]
         [--screenshot out.png] [--timeout-s 300] [--chromium /usr/bin/chromium] [--add-special-tokens]
         [--verbose]

  --model-dir           model folder (config.json, tokenizer*.json, onnx/model{_q4,_q4f16,...}.onnx)
  --prompts             JSON list of chat-formatted strings, or of {"messages": [...]} objects
  --dtype               Transformers.js dtype (default q4); a comma list runs each in this one page ("by_dtype")
  --device              wasm | webgpu (default wasm); webgpu adds --enable-unsafe-webgpu
  --adapter             webgpu adapter: default (Chromium's own; SwiftShader on a machine without a GPU) or
                        lavapipe (Mesa lavapipe 25 with shader-f16, set up by scripts/setup.sh; the page refuses
                        to run on any other adapter)
  --max-new-tokens      exactly this many tokens are generated per prompt (default 32)
  --threads             env.backends.onnx.wasm.numThreads (default 1); >1 makes the server send
                        COOP/COEP headers so the page is cross-origin isolated (needed for wasm threads)
  --screenshot          save a full-page PNG of the rendered prompts/outputs here
  --timeout-s           give up (exit 3) after this many seconds in total (default 300)
  --chromium            Chromium executable (default /usr/bin/chromium; never a downloaded browser)
  --add-special-tokens  add the tokenizer's special tokens to plain-string prompts (default off)
  --verbose             log every HTTP request to stderr`;

async function main() {
  routeConsoleToStderr();
  const args = parseCommon(process.argv.slice(2), {
    device: { type: 'string', default: 'wasm' },
    adapter: { type: 'string', default: 'default' },
    threads: { type: 'string', default: '1' },
    screenshot: { type: 'string' },
    'timeout-s': { type: 'string', default: '300' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    verbose: { type: 'boolean', default: false },
  }, USAGE);
  const { values, modelDir, modelId, prompts, maxNewTokens } = args;
  const device = values.device;
  if (!['wasm', 'webgpu'].includes(device)) throw new UsageError(`--device must be wasm or webgpu, got ${device}`);
  const adapter = values.adapter;
  if (!['default', 'lavapipe'].includes(adapter)) throw new UsageError(`--adapter must be default or lavapipe, got ${adapter}`);
  if (adapter === 'lavapipe' && device !== 'webgpu') throw new UsageError('--adapter lavapipe needs --device webgpu');
  const dtypes = values.dtype.split(',').map((d) => d.trim()).filter(Boolean);
  const threads = Number.parseInt(values.threads, 10);
  if (!Number.isInteger(threads) || threads < 1) throw new UsageError('--threads must be a positive integer');
  const timeoutS = Number(values['timeout-s']);
  if (!(timeoutS > 0)) throw new UsageError('--timeout-s must be a positive number');
  if (!fs.existsSync(values.chromium)) {
    throw new UsageError(`Chromium not found at ${values.chromium} (apt-get install -y chromium)`);
  }
  const screenshot = values.screenshot ? path.resolve(values.screenshot) : null;
  const coi = threads > 1;

  const pk = resolvePackages();
  const cleanups = new Cleanups();
  const cleanup = () => cleanups.run();

  // Everything learned so far; printed as the JSON record on success, or with "error" on failure.
  const state = {
    page: null,
    stats: null,
    lastStatus: '(page not loaded)',
    record: {
      client: 'chromium', dtype: values.dtype, device, adapter_route: adapter, model_dir: modelDir, threads_requested: threads,
    },
  };

  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new HarnessError(
      `timed out after ${timeoutS} s (device=${device}, dtype=${values.dtype}); last page status: ${state.lastStatus}`,
      3,
    )), timeoutS * 1000);
  });
  const onSignal = (sig) => {
    log(`received ${sig}, cleaning up`);
    cleanup().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  const takeScreenshot = async (page) => {
    if (!screenshot) return;
    fs.mkdirSync(path.dirname(screenshot), { recursive: true });
    await page.screenshot({ path: screenshot, fullPage: true, timeout: 20_000 });
    state.record.screenshot = screenshot;
    log(`screenshot saved to ${screenshot}`);
  };

  const run = async () => {
    const stats = { requests: 0, bytes: 0, not_found: [] };
    const config = {
      modelId, dtype: values.dtype, device, threads, maxNewTokens, prompts,
      addSpecialTokens: values['add-special-tokens'],
      ...(dtypes.length > 1 ? { dtypes } : {}),
      ...(adapter === 'lavapipe' ? { expectAdapter: (await import('./webgpu_route.mjs')).EXPECTED } : {}),
    };
    const server = await startServer({
      coi,
      verbose: values.verbose,
      stats,
      staticFiles: {
        '/': path.join(HERE, 'page.html'),
        '/page.html': path.join(HERE, 'page.html'),
        '/harness/harness_core.mjs': path.join(HERE, 'harness_core.mjs'),
        '/harness/page_common.mjs': path.join(HERE, 'page_common.mjs'),
        '/harness/config.json': { type: 'application/json; charset=utf-8', data: JSON.stringify(config) },
      },
      routes: [
        [`/models/${modelId}/`, modelDir],
        ['/tjs/', pk.tjsDist],
        ['/ort/', pk.ortDist],
      ],
    });
    cleanups.push(() => closeServer(server));
    const origin = `http://127.0.0.1:${server.address().port}`;
    log(`serving on ${origin} (COOP/COEP ${coi ? 'on' : 'off'}); transformers.js ${pk.tjsVersion}, onnxruntime-web ${pk.ortWebVersion}`);
    state.stats = stats;
    state.record.http = { requests: 0, bytes: 0, not_found: stats.not_found, coop_coep: coi };

    state.record.chromium_version = chromiumVersion(values.chromium);
    const context = await launchChromium({
      executable: values.chromium, device, cleanups, viewport: { width: 1000, height: 800 }, adapter,
    });

    const external = [];
    state.record.external_requests = external;
    context.on('request', (r) => {
      const u = r.url();
      if (!u.startsWith(`${origin}/`) && !u.startsWith('blob:') && !u.startsWith('data:')) external.push(u);
    });
    const page = context.pages()[0] ?? await context.newPage();
    state.page = page;
    let fatal = null;
    let wakeUp = () => {};
    page.on('console', (m) => {
      const text = m.text();
      if (text.startsWith('[page] ')) state.lastStatus = text.slice(7);
      log(`console.${m.type()}: ${text}`);
    });
    page.on('pageerror', (e) => {
      log(`pageerror: ${e.stack || e.message}`);
      fatal ??= `uncaught error in page: ${e.message}`;
      wakeUp();
    });
    page.on('crash', () => {
      fatal ??= 'the page crashed (renderer process died; out of memory?)';
      wakeUp();
    });

    await page.goto(`${origin}/`, { waitUntil: 'load', timeout: 60_000 });
    // Poll for completion (the page's main thread is mostly busy in wasm, so keep this cheap).
    while (!fatal) {
      const done = await page.evaluate(() => window.__done === true).catch((e) => { fatal ??= e.message; return false; });
      if (done) break;
      await new Promise((r) => { wakeUp = r; setTimeout(r, 500); });
    }
    if (fatal) throw new HarnessError(fatal);
    const { result, error, info } = await page.evaluate(() => ({
      result: window.__result ?? null, error: window.__error ?? null, info: window.__info ?? null,
    }));
    Object.assign(state.record, result ?? info ?? {});
    // onnxruntime-web's wasm threads are Web Workers; >0 here is direct evidence of multi-threaded wasm.
    state.record.page_workers = page.workers().length;
    await takeScreenshot(page);
    if (external.length) log(`WARNING: requests to non-local URLs were attempted (blocked): ${external.join(', ')}`);
    if (adapter === 'lavapipe' && !error) {
      const { adapterMismatch } = await import('./webgpu_route.mjs');
      const bad = adapterMismatch(state.record.adapter);
      if (bad) throw new HarnessError(`lavapipe route requested but Chromium's WebGPU ${bad}`);
    }
    if (error) throw new HarnessError(`page reported: ${error}`);
    if (!result) throw new HarnessError('page finished without a result');
    return state.record;
  };

  let out;
  let failure = null;
  try {
    out = await Promise.race([run(), timeout]);
  } catch (e) {
    failure = e;
    // Best effort: collect what the page knows (adapter, shader_f16, ...) and a screenshot of the failure.
    if (state.page && !state.record.screenshot) {
      const grab = async () => {
        const info = await state.page.evaluate(() => window.__info ?? null);
        if (info) Object.assign(state.record, info);
        await takeScreenshot(state.page);
      };
      await Promise.race([grab().catch(() => {}), new Promise((r) => setTimeout(r, 5_000))]);
    }
  } finally {
    clearTimeout(timer);
    await cleanup();
  }
  if (state.stats) Object.assign(state.record.http, { requests: state.stats.requests, bytes: state.stats.bytes });
  if (failure) {
    await emitJson({ ...state.record, error: String(failure.message ?? failure) });
    throw failure;
  }
  await emitJson(out);
}

main().then(() => process.exit(0), (e) => fail(e, e?.exitCode ?? 1));
