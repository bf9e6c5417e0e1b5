// Browser-side setup shared by page.html (generation) and bench_page.html (speed): the WebGPU adapter's
// description, Transformers.js configured for this offline server, and the run facts both pages report.
// Served at /harness/page_common.mjs.

/** The adapter onnxruntime-web will get (or why there is none): vendor, subgroup sizes, features. */
export async function webgpuInfo() {
  if (!('gpu' in navigator)) return { available: false, adapter: null, shader_f16: null };
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
  if (!adapter) return { available: true, adapter: null, shader_f16: null };
  const i = adapter.info ?? {};
  return {
    available: true,
    adapter: {
      vendor: i.vendor, architecture: i.architecture, device: i.device, description: i.description,
      subgroup_min_size: i.subgroupMinSize ?? null, subgroup_max_size: i.subgroupMaxSize ?? null,
      features: [...adapter.features].sort(),
      max_storage_buffer_binding_size: adapter.limits?.maxStorageBufferBindingSize ?? null,
      max_buffer_size: adapter.limits?.maxBufferSize ?? null,
    },
    shader_f16: adapter.features.has('shader-f16'),
  };
}

/**
 * Point Transformers.js (module `T`) at this server only: local models under /models/, onnxruntime-web's wasm
 * from /ort/, no caches, `cfg.threads` wasm threads. Returns the run facts: threads, cross-origin isolation,
 * WebGPU adapter (when cfg.device is webgpu), versions, user agent.
 */
export async function configureTransformers(T, cfg) {
  const { env } = T;
  env.allowLocalModels = true;
  env.allowRemoteModels = false;
  env.useBrowserCache = false;
  env.useWasmCache = false;
  env.localModelPath = '/models/';
  const wasm = env.backends.onnx.wasm; // same object as onnxruntime-web's env.wasm
  wasm.wasmPaths = {
    mjs: `${location.origin}/ort/ort-wasm-simd-threaded.asyncify.mjs`,
    wasm: `${location.origin}/ort/ort-wasm-simd-threaded.asyncify.wasm`,
  };
  wasm.numThreads = cfg.threads;
  const gpu = cfg.device === 'webgpu' ? await webgpuInfo() : { available: 'gpu' in navigator, adapter: null, shader_f16: null };
  const want = cfg.expectAdapter; // {feature, subgroup}: the lavapipe route; never run on another adapter
  if (want) {
    const a = gpu.adapter;
    if (!a || !a.features.includes(want.feature) || a.subgroup_min_size !== want.subgroup || a.subgroup_max_size !== want.subgroup) {
      throw new Error(`expected the lavapipe WebGPU adapter (${want.feature}, subgroup size ${want.subgroup}) but got `
        + (a ? `${a.vendor}/${a.architecture}, subgroup sizes ${a.subgroup_min_size}-${a.subgroup_max_size}, features ${a.features.join(' ')}` : 'no adapter'));
    }
  }
  return {
    threads_requested: cfg.threads,
    cross_origin_isolated: self.crossOriginIsolated,
    webgpu_available: gpu.available,
    adapter: gpu.adapter,
    shader_f16: gpu.shader_f16,
    transformers_version: env.version,
    onnxruntime_web_version: env.backends.onnx.versions?.web ?? null,
    user_agent: navigator.userAgent,
  };
}
