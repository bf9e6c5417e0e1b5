#!/usr/bin/env node
// Run one ONNX model once in a Transformers.js runtime — onnxruntime-web in headless Debian Chromium (wasm or
// webgpu) or onnxruntime-node — with the given input tensors, and print every output tensor. Used by tests and
// diagnostics that compare a runtime node by node with Python onnxruntime (graphkit/ortweb.py drives it).
//
// Tensors travel as JSON: {name: {type: "float32"|"float16"|"int64"|"int32"|..., dims: [...], b64: "<raw
// little-endian bytes>"}}. Prints exactly one JSON object on stdout: {outputs: {...same form...}, device,
// onnxruntime_version, adapter} or {error} (exit 1).
import fs from 'node:fs';
import { Cleanups, closeServer, launchChromium, resolvePackages, startServer } from './chromium_common.mjs';
import {
  HarnessError, UsageError, emitJson, fail, log, ortNodeModule, parseOptions, routeConsoleToStderr,
} from './cli_common.mjs';

const USAGE = `usage: node ort_run.mjs --model FILE.onnx --feeds FEEDS.json [--device webgpu|wasm|node]
         [--hide-features subgroups,...] [--adapter default|lavapipe] [--timeout-s 600] [--chromium /usr/bin/chromium]

  --hide-features  WebGPU features the page hides from onnxruntime-web (removed from GPUAdapter.features and
                   from requestDevice's requiredFeatures), e.g. subgroups: its kernels then take their
                   subgroup-free paths
  --adapter        webgpu: default (Chromium's own, SwiftShader here) or lavapipe (webgpu_route.mjs; fails
                   unless the adapter has shader-f16 and subgroup size 8)`;

const TYPED = {
  float32: Float32Array, float16: Uint16Array, int64: BigInt64Array, int32: Int32Array, int8: Int8Array,
  uint8: Uint8Array, bool: Uint8Array,
};

function parse(argv) {
  const values = parseOptions(argv, {
    model: { type: 'string' }, feeds: { type: 'string' }, device: { type: 'string', default: 'webgpu' },
    'hide-features': { type: 'string', default: '' }, adapter: { type: 'string', default: 'default' },
    'timeout-s': { type: 'string', default: '600' }, chromium: { type: 'string', default: '/usr/bin/chromium' },
  }, USAGE);
  if (!values.model || !values.feeds) throw new UsageError(`--model and --feeds are required\n\n${USAGE}`);
  if (!['webgpu', 'wasm', 'node'].includes(values.device)) throw new UsageError(`--device must be webgpu, wasm or node\n\n${USAGE}`);
  for (const f of [values.model, values.feeds]) if (!fs.existsSync(f)) throw new UsageError(`no such file: ${f}`);
  return { ...values, timeoutS: Number(values['timeout-s']) };
}

async function runNode(a, feeds) {
  const ort = ortNodeModule();
  const session = await ort.InferenceSession.create(a.model);
  const inputs = {};
  for (const [name, t] of Object.entries(feeds)) {
    const buf = Buffer.from(t.b64, 'base64');
    const Ctor = TYPED[t.type];
    const data = new Ctor(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length));
    inputs[name] = new ort.Tensor(t.type, data, t.dims);
  }
  const res = await session.run(inputs);
  const outputs = {};
  for (const [name, t] of Object.entries(res)) {
    const d = t.data;
    outputs[name] = { type: t.type, dims: t.dims, b64: Buffer.from(d.buffer, d.byteOffset, d.byteLength).toString('base64') };
  }
  return { outputs, device: 'node', onnxruntime_version: ort.env?.versions?.node ?? null };
}

async function runChromium(a, feeds) {
  const cleanups = new Cleanups();
  try {
    const { ortDist } = resolvePackages();
    const server = await startServer({
      staticFiles: {
        '/': { type: 'text/html; charset=utf-8', data: '<!doctype html><title>ort_run</title>' },
        '/model.onnx': a.model,
      },
      routes: [['/ort/', ortDist]],
    });
    cleanups.push(() => closeServer(server));
    const origin = `http://127.0.0.1:${server.address().port}`;
    const context = await launchChromium({ executable: a.chromium, device: a.device, cleanups, adapter: a.adapter });
    const page = context.pages()[0] ?? await context.newPage();
    page.on('console', (m) => log(`console.${m.type()}: ${m.text()}`));
    await page.goto(`${origin}/`);
    const got = await page.evaluate(async ({ feeds, device, hide }) => {
      const TYPED = {
        float32: Float32Array, float16: Uint16Array, int64: BigInt64Array, int32: Int32Array, int8: Int8Array,
        uint8: Uint8Array, bool: Uint8Array,
      };
      const b64ToBytes = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
      const bytesToB64 = (u8) => {
        let s = '';
        for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode.apply(null, u8.subarray(i, i + 0x8000));
        return btoa(s);
      };
      try {
        if (hide.length && globalThis.GPUAdapter) {
          const featuresOf = Object.getOwnPropertyDescriptor(GPUAdapter.prototype, 'features').get;
          Object.defineProperty(GPUAdapter.prototype, 'features', {
            get() { const s = new Set(featuresOf.call(this)); for (const f of hide) s.delete(f); return s; },
          });
          const requestDevice = GPUAdapter.prototype.requestDevice;
          GPUAdapter.prototype.requestDevice = function (desc) {
            const d = desc ? { ...desc } : {};
            if (d.requiredFeatures) d.requiredFeatures = [...d.requiredFeatures].filter((f) => !hide.includes(f));
            return requestDevice.call(this, d);
          };
        }
        const ort = await import('/ort/ort.webgpu.min.mjs');
        ort.env.wasm.wasmPaths = {
          mjs: `${location.origin}/ort/ort-wasm-simd-threaded.asyncify.mjs`,
          wasm: `${location.origin}/ort/ort-wasm-simd-threaded.asyncify.wasm`,
        };
        ort.env.wasm.numThreads = 1;
        let adapter = null;
        if (device === 'webgpu') {
          const ad = await navigator.gpu?.requestAdapter();
          adapter = ad ? {
            description: ad.info?.description ?? null, vendor: ad.info?.vendor ?? null,
            subgroup_min_size: ad.info?.subgroupMinSize ?? null, subgroup_max_size: ad.info?.subgroupMaxSize ?? null,
            features: [...ad.features].sort(),
          } : null;
        }
        const model = new Uint8Array(await (await fetch('/model.onnx')).arrayBuffer());
        const session = await ort.InferenceSession.create(model, { executionProviders: [device] });
        const inputs = {};
        for (const [name, t] of Object.entries(feeds)) {
          const bytes = b64ToBytes(t.b64);
          inputs[name] = new ort.Tensor(t.type, new TYPED[t.type](bytes.buffer), t.dims);
        }
        const res = await session.run(inputs);
        const outputs = {};
        for (const [name, t] of Object.entries(res)) {
          const d = t.location && t.location !== 'cpu' ? await t.getData() : t.data;
          outputs[name] = { type: t.type, dims: t.dims, b64: bytesToB64(new Uint8Array(d.buffer, d.byteOffset, d.byteLength)) };
        }
        return { outputs, device, adapter, onnxruntime_version: ort.env?.versions?.web ?? null };
      } catch (e) {
        return { error: String(e?.message ?? e) };
      }
    }, { feeds, device: a.device, hide: a['hide-features'] ? a['hide-features'].split(',') : [] });
    if (got.error) throw new HarnessError(`page reported: ${got.error}`);
    if (a.adapter === 'lavapipe') {
      const { adapterMismatch } = await import('./webgpu_route.mjs');
      const bad = adapterMismatch(got.adapter);
      if (bad) throw new HarnessError(`lavapipe route requested but Chromium's WebGPU ${bad}`);
    }
    return got;
  } finally {
    await cleanups.run();
  }
}

async function main() {
  routeConsoleToStderr();
  const a = parse(process.argv.slice(2));
  const feeds = JSON.parse(fs.readFileSync(a.feeds, 'utf8'));
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new HarnessError(`timed out after ${a.timeoutS} s`, 3)), a.timeoutS * 1000);
  });
  try {
    const out = await Promise.race([a.device === 'node' ? runNode(a, feeds) : runChromium(a, feeds), timeout]);
    await emitJson(out);
  } finally {
    clearTimeout(timer);
  }
}

main().then(() => process.exit(0), (e) => fail(e, e?.exitCode ?? 1));
