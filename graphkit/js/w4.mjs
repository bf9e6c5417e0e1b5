// graphkit w4: expand a 4-bit weight download (model_w4.w4bin) into the int8 weights model_w4.onnx reads
// (passes/matmul_w4.py). No dependencies; runs in browsers and Node. The arithmetic is float32, exactly as
// graphkit computes it in numpy, so the bytes equal the int8 weights graphkit verified.
//
// Browser (Transformers.js 4.x, wasm):
//   import { w4ExternalData } from './w4.mjs';                    // this file, beside config.json
//   const externalData = await w4ExternalData(`${base}/onnx/model_w4.w4bin`);
//   const model = await AutoModelForCausalLM.from_pretrained(id, {
//     dtype: 'fp32', model_file_name: 'model_w4', device: 'wasm', session_options: { externalData } });
// Node (onnxruntime-node reads external data from disk; Node users get the fast native q4 anyway):
//   await materializeW4('/path/to/folder/onnx/model_w4.onnx');   // writes model_w4.onnx_data once

const MAGIC = [0x47, 0x4b, 0x57, 0x34]; // "GKW4"
const VERSION = 1;

function header(bytes) {
  for (let i = 0; i < 4; i++) if (bytes[i] !== MAGIC[i]) throw new Error('not a graphkit 4-bit weight file (.w4bin): bad magic');
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = dv.getUint32(4, true);
  if (version !== VERSION) throw new Error(`.w4bin version ${version}; this w4.mjs reads version ${VERSION}`);
  const len = dv.getUint32(8, true);
  return JSON.parse(new TextDecoder().decode(bytes.subarray(12, 12 + len)));
}

// IEEE half → number (exact)
function fromHalf(h) {
  const e = (h >> 10) & 31;
  const m = h & 1023;
  const v = e === 0 ? m * 2 ** -24 : e === 31 ? (m ? NaN : Infinity) : (1024 + m) * 2 ** (e - 25);
  return h & 0x8000 ? -v : v;
}

// numpy.rint: nearest integer, ties to even
function rint(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** Expand a .w4bin (ArrayBuffer or Uint8Array) → { path, data: Uint8Array } for session_options.externalData. */
export function expandW4(blob) {
  const bytes = blob instanceof Uint8Array ? blob : new Uint8Array(blob);
  const h = header(bytes);
  const out = new Int8Array(h.data_bytes);
  const f32 = Math.fround;
  const view = (sec, Ctor) => (sec ? new Ctor(bytes.buffer, bytes.byteOffset + sec[0], sec[1] / Ctor.BYTES_PER_ELEMENT) : null);
  for (const t of h.tensors) {
    const { K, N, block_size: bs, offset } = t;
    const kb = Math.ceil(K / bs);
    const half = bs >> 1;
    const zpStride = Math.ceil(kb / 2);
    const packed = view(t.packed, Uint8Array);
    const f16 = t.scales_dtype === 'float16';
    const scales = view(t.scales, f16 ? Uint16Array : Float32Array);
    const zp = view(t.zp, Uint8Array);
    const s8 = view(t.s8, Float32Array);
    const table = t.kind === 'table'; // int8 [N, K] (embedding rows) instead of MatMul's [K, N]
    const lut = new Int8Array(16);
    for (let n = 0; n < N; n++) {
      const inv = s8[n] > 0 ? f32(1 / s8[n]) : 0;
      for (let b = 0; b < kb; b++) {
        const s = f16 ? fromHalf(scales[n * kb + b]) : scales[n * kb + b];
        const z = zp ? (zp[n * zpStride + (b >> 1)] >> ((b & 1) * 4)) & 15 : 8;
        // a block's int8 values depend only on its 16 codes: compute them once per block
        for (let q = 0; q < 16; q++) {
          const w4 = f32((q - z) * s);          // dequantize: (q - zp) * scale, float32
          const r = rint(f32(w4 * inv));        // int8 per column: rint(w4 * (1 / s8)), float32
          lut[q] = r > 127 ? 127 : r < -127 ? -127 : r;
        }
        const base = (n * kb + b) * half;
        const kEnd = Math.min(bs, K - b * bs);
        let o = offset + (table ? n * K + b * bs : b * bs * N + n);
        const step = table ? 1 : N;
        for (let j = 0; j < kEnd; j++, o += step) {
          const byte = packed[base + (j >> 1)];
          out[o] = lut[(j & 1) ? byte >> 4 : byte & 15];
        }
      }
    }
  }
  return { path: h.data_file, data: new Uint8Array(out.buffer) };
}

/** Fetch and expand: the session_options.externalData array for Transformers.js / onnxruntime-web. */
export async function w4ExternalData(url, fetchImpl = globalThis.fetch) {
  const res = await fetchImpl(url);
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status} (the 4-bit weights of model_w4.onnx)`);
  return [expandW4(new Uint8Array(await res.arrayBuffer()))];
}

/** Node: write the int8 data file beside model_w4.onnx from its .w4bin (atomic: temp name, then rename). */
export async function materializeW4(onnxPath) {
  const fs = await import('node:fs');
  const path = await import('node:path');
  const blobPath = onnxPath.replace(/\.onnx$/, '') + '.w4bin';
  if (!fs.existsSync(blobPath)) throw new Error(`${blobPath}: missing; the 4-bit weights of ${path.basename(onnxPath)} are stored there`);
  const { path: name, data } = expandW4(fs.readFileSync(blobPath));
  const target = path.join(path.dirname(onnxPath), name);
  const tmp = `${target}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, data);
  fs.renameSync(tmp, target);
  return target;
}

// CLI: node w4.mjs FOLDER/onnx/model_w4.onnx  → writes model_w4.onnx_data
if (typeof process !== 'undefined' && process.argv?.[1] && import.meta.url === (await import('node:url')).pathToFileURL(process.argv[1]).href) {
  const t0 = performance.now();
  const target = await materializeW4(process.argv[2]);
  console.log(JSON.stringify({ written: target, ms: Math.round(performance.now() - t0) }));
}
