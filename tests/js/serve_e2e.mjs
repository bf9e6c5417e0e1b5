#!/usr/bin/env node
// Drive the page of `graphkit serve` in headless Debian Chromium (playwright-core): choose device and dtypes, type a
// prompt, press Generate, wait for the page's window.__serve state, screenshot the page, optionally run a USAGE.md
// snippet (ES module) in the same page. Prints exactly one JSON object on stdout; logs go to stderr.
// --adapter lavapipe: Chromium on the Mesa lavapipe WebGPU route (webgpu_route.mjs: shader-f16, subgroup size 8);
// the run fails, before generating, when the page's adapter is not that one (never a quiet SwiftShader fallback).
import fs from 'node:fs';
import path from 'node:path';
import { Cleanups, chromiumVersion, launchChromium } from './chromium_common.mjs';
import { HarnessError, emitJson, fail, log, parseOptions, routeConsoleToStderr } from './cli_common.mjs';

const USAGE = `usage: node serve_e2e.mjs --url http://127.0.0.1:PORT/ [--device wasm|webgpu] [--adapter default|lavapipe] [--dtype q8] [--compare q4]
         [--prompt TEXT] [--max-new-tokens 48] [--screenshot out.png] [--snippet usage.js] [--timeout-s 300]
         [--chromium /usr/bin/chromium]`;

async function main() {
  routeConsoleToStderr();
  const v = parseOptions(process.argv.slice(2), {
    url: { type: 'string' }, device: { type: 'string', default: 'wasm' }, adapter: { type: 'string', default: 'default' }, dtype: { type: 'string', default: 'q8' },
    compare: { type: 'string', default: '' }, prompt: { type: 'string' }, 'max-new-tokens': { type: 'string', default: '48' },
    screenshot: { type: 'string' }, snippet: { type: 'string' }, 'timeout-s': { type: 'string', default: '300' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
  }, USAGE);
  if (!v.url) throw new HarnessError(`--url is required\n${USAGE}`, 2);
  if (!['default', 'lavapipe'].includes(v.adapter)) throw new HarnessError(`--adapter must be default or lavapipe, got ${v.adapter}`, 2);
  if (v.adapter === 'lavapipe' && v.device !== 'webgpu') throw new HarnessError('--adapter lavapipe needs --device webgpu', 2);
  const origin = new URL(v.url).origin;
  const cleanups = new Cleanups();
  const record = { url: v.url, device: v.device, adapter_route: v.adapter, chromium_version: chromiumVersion(v.chromium), external_requests: [] };
  const deadline = Date.now() + Number(v['timeout-s']) * 1000;
  try {
    const context = await launchChromium({ executable: v.chromium, device: v.device, cleanups, viewport: { width: 1280, height: 900 },
      adapter: v.adapter });
    context.on('request', (r) => {
      const u = r.url();
      if (!u.startsWith(`${origin}/`) && !u.startsWith('blob:') && !u.startsWith('data:')) record.external_requests.push(u);
    });
    const page = context.pages()[0] ?? await context.newPage();
    page.on('console', (m) => log(`console.${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => log(`pageerror: ${e.stack || e.message}`));
    const responses = [];
    page.on('response', (r) => responses.push({ url: r.url(), status: r.status(), coep: r.headers()['cross-origin-embedder-policy'] ?? null }));
    await page.goto(v.url, { waitUntil: 'load', timeout: 60_000 });
    const waitFor = async (fn, what) => {
      while (Date.now() < deadline) {
        const got = await page.evaluate(fn);
        if (got) return got;
        await new Promise((r) => setTimeout(r, 300));
      }
      throw new HarnessError(`timed out waiting for ${what}; page status: ${await page.textContent('#status')}`, 3);
    };
    await waitFor(() => window.__serve?.ready || window.__serve?.error, 'the page to be ready');
    Object.assign(record, await page.evaluate(() => ({ caps: window.__serve.caps, load_error: window.__serve.error,
      default_choice: window.__serve.default_choice ?? null,
      selected: { device: document.getElementById('device').value, dtype: document.getElementById('dtypeA').value },
      caps_text: document.getElementById('caps').textContent,
      dtype_options: [...document.querySelectorAll('#dtypeA option')].map((o) => o.value),
      threads: window.__serve.caps && Number((document.getElementById('caps').textContent.match(/wasm threads: (\d+)/) ?? [])[1]) })));
    if (record.load_error) throw new HarnessError(`page failed to start: ${record.load_error}`);
    if (v.adapter === 'lavapipe') {
      const { adapterMismatch } = await import('./webgpu_route.mjs');
      const c = record.caps;
      const bad = adapterMismatch(c?.webgpu ? { ...c.adapter, features: c.features } : null);
      if (bad) throw new HarnessError(`lavapipe route requested but the page's WebGPU ${bad}`);
    }
    await page.selectOption('#device', v.device);
    await page.selectOption('#dtypeA', v.dtype);
    await page.selectOption('#dtypeB', v.compare);
    if (v.prompt) await page.fill('#prompt', v.prompt);
    await page.fill('#maxTokens', v['max-new-tokens']);
    record.status_before = await page.textContent('#status');
    await page.click('#go');
    await waitFor(() => window.__serve.runs.length > 0 && !window.__serve.running, 'generation to finish');
    Object.assign(record, await page.evaluate(() => ({ runs: window.__serve.runs, agreement: window.__serve.agreement,
      error: window.__serve.error, status: document.getElementById('status').textContent,
      agreement_text: document.getElementById('agreement').textContent,
      pane_texts: [...document.querySelectorAll('#panes pre')].map((p) => p.textContent),
      pane_stats: [...document.querySelectorAll('#panes .stats')].map((p) => p.textContent) })));
    record.page_workers = page.workers().length;
    if (v.screenshot) {
      fs.mkdirSync(path.dirname(path.resolve(v.screenshot)), { recursive: true });
      await page.screenshot({ path: v.screenshot, fullPage: true });
      // the first output box alone: the test checks that the generated text was painted (non-blank pixels)
      const box = page.locator('#panes pre').first();
      const shot = v.screenshot.replace(/\.png$/, '') + '-output.png';
      await box.screenshot({ path: shot });
      record.screenshot = v.screenshot;
      record.output_screenshot = shot;
      record.output_box = await box.boundingBox();
      record.output_visible = await box.isVisible();
    }
    if (v.snippet) {
      // the USAGE.md module, unchanged: the page's import map resolves '@huggingface/transformers' to the local build
      const code = fs.readFileSync(v.snippet, 'utf8');
      record.snippet = await page.evaluate(async ({ code, prompt }) => {
        const url = URL.createObjectURL(new Blob([code], { type: 'text/javascript' }));
        try {
          const mod = await import(url);
          const m = await mod.load();
          let streamed = '';
          const text = await mod.chat(m, prompt, (t) => { streamed += t; }, 24);
          return { device: m.device, dtype: m.dtype, text, streamed };
        } catch (e) {
          return { error: String(e?.stack ?? e) };
        }
      }, { code, prompt: v.prompt ?? 'Redacta la epicrisis del paciente: varón de 67 años, ingresa por neumonía.' });
    }
    record.http = { responses: responses.length, errors: responses.filter((r) => r.status >= 400),
      coep_missing: responses.filter((r) => r.url.startsWith(origin) && r.coep !== 'require-corp').map((r) => r.url) };
  } finally {
    await cleanups.run();
  }
  await emitJson(record);
}

main().then(() => process.exit(0), (e) => fail(e, e?.exitCode ?? 1));
