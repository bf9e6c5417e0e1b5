// The browser side shared by generate_browser.mjs, bench_tjs.mjs and ort_run.mjs (Node only): the installed
// Transformers.js / onnxruntime-web packages, a static server on 127.0.0.1, and headless Debian Chromium
// (never a downloaded browser) launched through playwright-core so that it can reach nothing but that server.
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { log } from './cli_common.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));

const CONTENT_TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.wasm': 'application/wasm',
  '.json': 'application/json; charset=utf-8',
  '.jinja': 'text/plain; charset=utf-8',
  '.txt': 'text/plain; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.png': 'image/png',
};

function contentType(file) {
  return CONTENT_TYPES[path.extname(path.basename(file))] ?? 'application/octet-stream';
}

/** The installed package folders (exact versions from node_modules), checked for the files the pages load. */
export function resolvePackages() {
  const require = createRequire(import.meta.url);
  // The 'require' + 'node' conditions resolve to a file in each package's dist/ folder.
  const tjsDist = path.dirname(require.resolve('@huggingface/transformers'));
  const ortDist = path.dirname(createRequire(path.join(tjsDist, '..', 'package.json')).resolve('onnxruntime-web'));
  const readVersion = (dir) => JSON.parse(fs.readFileSync(path.join(dir, '..', 'package.json'), 'utf8')).version;
  for (const f of [path.join(tjsDist, 'transformers.web.js'), path.join(ortDist, 'ort.webgpu.min.mjs'),
    path.join(ortDist, 'ort-wasm-simd-threaded.asyncify.mjs'), path.join(ortDist, 'ort-wasm-simd-threaded.asyncify.wasm')]) {
    if (!fs.existsSync(f)) throw new Error(`missing ${f}: run "ONNXRUNTIME_NODE_INSTALL=skip npm ci" in ${HERE}`);
  }
  return { tjsDist, ortDist, tjsVersion: readVersion(tjsDist), ortWebVersion: readVersion(ortDist) };
}

/** Map a URL path onto a file inside `root`; null if it escapes root. */
function safeJoin(root, rel) {
  const p = path.resolve(root, `.${path.posix.normalize(`/${rel}`)}`);
  return p === root || p.startsWith(root + path.sep) ? p : null;
}

/**
 * Static server on 127.0.0.1 (random port). `staticFiles`: {urlPath: filePath | {type, data}}; `routes`:
 * [[urlPrefix, folder]]; `coi`: send COOP/COEP (cross-origin isolation, needed for wasm threads); `stats`
 * (optional) collects {requests, bytes, not_found}. Resolves to the listening http.Server.
 */
export function startServer({ routes = [], staticFiles = {}, coi = false, verbose = false, stats = null }) {
  const st = stats ?? { requests: 0, bytes: 0, not_found: [] };
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
      st.requests += 1;
      st.bytes += bytes;
      if (status === 404) st.not_found.push(urlPath);
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
      const buf = Buffer.isBuffer(body.data) ? body.data : Buffer.from(body.data);
      res.writeHead(200, { ...headers, 'Content-Type': body.type, 'Content-Length': buf.length });
      res.end(req.method === 'HEAD' ? undefined : buf);
      done(200, buf.length);
      return;
    }
    let stat = null;
    try { stat = file ? fs.statSync(file) : null; } catch { stat = null; }
    if (!stat || !stat.isFile()) {
      res.writeHead(404, { ...headers, 'Content-Type': 'text/plain' }).end('not found');
      done(404);
      return;
    }
    res.writeHead(200, { ...headers, 'Content-Type': contentType(file), 'Content-Length': stat.size });
    if (req.method === 'HEAD') {
      res.end();
      done(200);
      return;
    }
    fs.createReadStream(file).on('error', () => res.destroy()).pipe(res);
    done(200, stat.size);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

/** Closers run in reverse order on success, failure, timeout or a signal (Chromium, its profile, the server). */
export class Cleanups {
  constructor() { this.fns = []; }

  push(fn) { this.fns.push(fn); }

  async run() {
    while (this.fns.length) {
      try { await this.fns.pop()(); } catch (e) { log(`cleanup: ${e.message}`); }
    }
  }
}

export function closeServer(server) {
  return new Promise((r) => { server.closeAllConnections?.(); server.close(() => r()); });
}

export function chromiumVersion(executable) {
  try {
    return execFileSync(executable, ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 20_000 }).trim();
  } catch { return null; }
}

/**
 * Headless Chromium in a fresh profile folder; every host but 127.0.0.1 fails to resolve, so a run is provably
 * offline. `device === 'webgpu'` adds --enable-unsafe-webgpu; GRAPHKIT_CHROMIUM_FLAGS appends more. Registers its own closers on `cleanups`.
 * `adapter === 'lavapipe'` (webgpu only): the lavapipe route (webgpu_route.mjs) — its Chromium copy, ICD shim and flags.
 */
export async function launchChromium({ executable, device, cleanups, viewport = null, adapter = 'default' }) {
  let env;
  const extra = [];
  if (adapter === 'lavapipe') {
    if (device !== 'webgpu') throw new Error(`--adapter lavapipe needs --device webgpu (got ${device})`);
    const { lavapipeChromium } = await import('./webgpu_route.mjs');
    const lvp = lavapipeChromium();
    executable = lvp.executable;
    extra.push(...lvp.args);
    env = { ...process.env, ...lvp.env };
  }
  if (!fs.existsSync(executable)) throw new Error(`Chromium not found at ${executable} (apt-get install -y chromium)`);
  const { chromium } = await import('playwright-core');
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'graphkit-chromium-'));
  cleanups.push(() => fs.rmSync(userDataDir, { recursive: true, force: true }));
  const args = [
    '--headless', '--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync',
    '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
  ];
  if (device === 'webgpu') args.push('--enable-unsafe-webgpu', ...extra);
  // Diagnostics only (e.g. V8's wasm tiering flags): extra switches, space-separated, appended last.
  if (process.env.GRAPHKIT_CHROMIUM_FLAGS) args.push(...process.env.GRAPHKIT_CHROMIUM_FLAGS.trim().split(/\s+/));
  log(`launching ${executable} ${args.join(' ')}`);
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: executable, headless: true, args, timeout: 60_000, ...(viewport ? { viewport } : {}),
    ...(env ? { env } : {}),
  });
  cleanups.push(() => Promise.race([context.close(), new Promise((r) => setTimeout(r, 10_000))]));
  return context;
}
