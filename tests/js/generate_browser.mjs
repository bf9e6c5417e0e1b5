#!/usr/bin/env node
// Greedy generation with Transformers.js in headless Debian Chromium (onnxruntime-web, wasm or webgpu),
// fully offline. A tiny static server on 127.0.0.1 serves page.html, the model folder, the transformers.js
// web bundle and onnxruntime-web's dist files from node_modules; playwright-core drives /usr/bin/chromium.
// Prints exactly one JSON object on stdout; all logs go to stderr. See README.md.
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import {
  HarnessError, UsageError, emitJson, fail, log, parseCommon, routeConsoleToStderr,
} from './cli_common.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));

const USAGE = `usage: node generate_browser.mjs --model-dir /abs/path/to/folder --prompts prompts.json
         [--dtype q4] [--device wasm|webgpu] [--max-new-tokens 32] [--threads 1]
         [--screenshot out.png] [--timeout-s 300] [--chromium /usr/bin/chromium] [--add-special-tokens]
         [--verbose]

  --model-dir           model folder (config.json, tokenizer*.json, onnx/model{_q4,_q4f16,...}.onnx)
  --prompts             JSON list of chat-formatted strings, or of {"messages": [...]} objects
  --dtype               Transformers.js dtype (default q4)
  --device              wasm | webgpu (default wasm); webgpu adds --enable-unsafe-webgpu
  --max-new-tokens      exactly this many tokens are generated per prompt (default 32)
  --threads             env.backends.onnx.wasm.numThreads (default 1); >1 makes the server send
                        COOP/COEP headers so the page is cross-origin isolated (needed for wasm threads)
  --screenshot          save a full-page PNG of the rendered prompts/outputs here
  --timeout-s           give up (exit 3) after this many seconds in total (default 300)
  --chromium            Chromium executable (default /usr/bin/chromium; never a downloaded browser)
  --add-special-tokens  add the tokenizer's special tokens to plain-string prompts (default off)
  --verbose             log every HTTP request to stderr`;

const CONTENT_TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.wasm': 'application/wasm',
  '.json': 'application/json; charset=utf-8',
  '.jinja': 'text/plain; charset=utf-8',
  '.txt': 'text/plain; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.onnx': 'application/octet-stream',
  '.onnx_data': 'application/octet-stream',
  '.data': 'application/octet-stream',
  '.png': 'image/png',
};

function contentType(file) {
  const base = path.basename(file);
  if (/\.onnx_data(_\d+)?$/.test(base)) return 'application/octet-stream';
  return CONTENT_TYPES[path.extname(base)] ?? 'application/octet-stream';
}

/** Resolve the installed package folders (exact versions from node_modules). */
function resolvePackages() {
  const require = createRequire(import.meta.url);
  // The 'require' + 'node' conditions resolve to a file in each package's dist/ folder.
  const tjsDist = path.dirname(require.resolve('@huggingface/transformers'));
  const tjsRequire = createRequire(path.join(tjsDist, '..', 'package.json'));
  const ortDist = path.dirname(tjsRequire.resolve('onnxruntime-web'));
  const readVersion = (dir) => JSON.parse(fs.readFileSync(path.join(dir, '..', 'package.json'), 'utf8')).version;
  const need = [
    path.join(tjsDist, 'transformers.web.js'),
    path.join(ortDist, 'ort.webgpu.min.mjs'),
    path.join(ortDist, 'ort-wasm-simd-threaded.asyncify.mjs'),
    path.join(ortDist, 'ort-wasm-simd-threaded.asyncify.wasm'),
  ];
  for (const f of need) {
    if (!fs.existsSync(f)) throw new Error(`missing ${f}: run "ONNXRUNTIME_NODE_INSTALL=skip npm ci" in ${HERE}`);
  }
  return {
    tjsDist, ortDist, tjsVersion: readVersion(tjsDist), ortWebVersion: readVersion(ortDist),
  };
}

/** Map a URL path onto a file inside `root`; null if it escapes root. */
function safeJoin(root, rel) {
  const p = path.resolve(root, `.${path.posix.normalize(`/${rel}`)}`);
  return p === root || p.startsWith(root + path.sep) ? p : null;
}

function startServer({ routes, staticFiles, coi, verbose, stats }) {
  const server = http.createServer((req, res) => {
    const headers = { 'Cache-Control': 'no-store' };
    if (coi) {
      headers['Cross-Origin-Opener-Policy'] = 'same-origin';
      headers['Cross-Origin-Embedder-Policy'] = 'require-corp';
      headers['Cross-Origin-Resource-Policy'] = 'same-origin';
    }
    let urlPath;
    try {
      urlPath = decodeURIComponent(new URL(req.url, 'http://127.0.0.1').pathname);
    } catch {
      res.writeHead(400, headers).end('bad request');
      return;
    }
    const done = (status, bytes = 0) => {
      stats.requests += 1;
      stats.bytes += bytes;
      if (status === 404) stats.not_found.push(urlPath);
      if (verbose || status >= 400) log(`http ${req.method} ${urlPath} -> ${status}${bytes ? ` (${bytes} B)` : ''}`);
    };
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, headers).end();
      done(405);
      return;
    }
    let file = null;
    let body = null;
    if (urlPath in staticFiles) {
      const s = staticFiles[urlPath];
      if (typeof s === 'string') file = s;
      else body = s;
    } else {
      for (const [prefix, root] of routes) {
        if (urlPath.startsWith(prefix)) {
          file = safeJoin(root, urlPath.slice(prefix.length));
          break;
        }
      }
    }
    if (body !== null) {
      const buf = Buffer.from(body.data);
      res.writeHead(200, { ...headers, 'Content-Type': body.type, 'Content-Length': buf.length });
      res.end(req.method === 'HEAD' ? undefined : buf);
      done(200, buf.length);
      return;
    }
    let st = null;
    try { st = file ? fs.statSync(file) : null; } catch { st = null; }
    if (!st || !st.isFile()) {
      res.writeHead(404, { ...headers, 'Content-Type': 'text/plain' }).end('not found');
      done(404);
      return;
    }
    res.writeHead(200, { ...headers, 'Content-Type': contentType(file), 'Content-Length': st.size });
    if (req.method === 'HEAD') {
      res.end();
      done(200);
      return;
    }
    fs.createReadStream(file).on('error', () => res.destroy()).pipe(res);
    done(200, st.size);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

async function main() {
  routeConsoleToStderr();
  const args = parseCommon(process.argv.slice(2), {
    device: { type: 'string', default: 'wasm' },
    threads: { type: 'string', default: '1' },
    screenshot: { type: 'string' },
    'timeout-s': { type: 'string', default: '300' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    verbose: { type: 'boolean', default: false },
  }, USAGE);
  const { values, modelDir, modelId, prompts, maxNewTokens } = args;
  const device = values.device;
  if (!['wasm', 'webgpu'].includes(device)) throw new UsageError(`--device must be wasm or webgpu, got ${device}`);
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
  const { chromium } = await import('playwright-core');

  const cleanups = [];
  const cleanup = async () => {
    while (cleanups.length) {
      const fn = cleanups.pop();
      try { await fn(); } catch (e) { log(`cleanup: ${e.message}`); }
    }
  };

  // Everything learned so far; printed as the JSON record on success, or with "error" on failure.
  const state = {
    page: null,
    stats: null,
    lastStatus: '(page not loaded)',
    record: {
      client: 'chromium', dtype: values.dtype, device, model_dir: modelDir, threads_requested: threads,
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
    };
    const server = await startServer({
      coi,
      verbose: values.verbose,
      stats,
      staticFiles: {
        '/': path.join(HERE, 'page.html'),
        '/page.html': path.join(HERE, 'page.html'),
        '/harness/harness_core.mjs': path.join(HERE, 'harness_core.mjs'),
        '/harness/config.json': { type: 'application/json; charset=utf-8', data: JSON.stringify(config) },
      },
      routes: [
        [`/models/${modelId}/`, modelDir],
        ['/tjs/', pk.tjsDist],
        ['/ort/', pk.ortDist],
      ],
    });
    cleanups.push(() => new Promise((r) => { server.closeAllConnections?.(); server.close(() => r()); }));
    const origin = `http://127.0.0.1:${server.address().port}`;
    log(`serving on ${origin} (COOP/COEP ${coi ? 'on' : 'off'}); transformers.js ${pk.tjsVersion}, onnxruntime-web ${pk.ortWebVersion}`);
    state.stats = stats;
    state.record.http = { requests: 0, bytes: 0, not_found: stats.not_found, coop_coep: coi };

    try {
      state.record.chromium_version = execFileSync(values.chromium, ['--version'], {
        encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 20_000,
      }).trim();
    } catch { state.record.chromium_version = null; }
    const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'graphkit-chromium-'));
    cleanups.push(() => fs.rmSync(userDataDir, { recursive: true, force: true }));
    const chromeArgs = [
      '--headless', '--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync',
      // Resolve nothing but the local server: any other host fails fast, so the run is provably offline.
      '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
    ];
    if (device === 'webgpu') chromeArgs.push('--enable-unsafe-webgpu');
    log(`launching ${values.chromium} ${chromeArgs.join(' ')}`);
    const context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: values.chromium,
      headless: true,
      args: chromeArgs,
      viewport: { width: 1000, height: 800 },
      timeout: 60_000,
    });
    cleanups.push(() => Promise.race([context.close(), new Promise((r) => setTimeout(r, 10_000))]));

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
