// The lavapipe WebGPU route (Node only): Mesa's lavapipe 25, a CPU Vulkan driver with shader-f16 and subgroup
// size 8, set up by scripts/webgpu/setup_lavapipe.sh in build/lavapipe/ (route.json says where everything is, or
// why it is unavailable). `--adapter lavapipe` in the harness scripts uses it:
//   - Node (onnxruntime-node's own Dawn): the environment points the Vulkan loader at lavapipe's ICD only;
//   - Chromium: build/lavapipe/chromium (no bundled SwiftShader), the ICD shim that gives Dawn SwiftShader's ids
//     (the only CPU adapter Chromium's WebGPU accepts), --use-angle=vulkan.
// Either way the run asserts the adapter it got and fails — never falls back — when it is not lavapipe.
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { HarnessError } from './cli_common.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const ROUTE_FILE = process.env.GRAPHKIT_LAVAPIPE_ROUTE
  ?? path.resolve(HERE, '..', '..', 'build', 'lavapipe', 'route.json');
export const ADAPTERS = ['default', 'lavapipe'];
// What the lavapipe adapter must show (Mesa 25.0, llvmpipe): the tests' reason to exist is shader-f16 and
// subgroups of 8 (SwiftShader has neither: subgroup 4, no shader-f16).
export const EXPECTED = { feature: 'shader-f16', subgroup: 8 };

/** The ready route from route.json, or a HarnessError saying what is missing and how to get it. */
export function lavapipeRoute() {
  let route;
  try {
    route = JSON.parse(fs.readFileSync(ROUTE_FILE, 'utf8'));
  } catch {
    throw new HarnessError(`lavapipe WebGPU route is not set up (${ROUTE_FILE} missing): run "bash scripts/setup.sh" `
      + '(scripts/webgpu/setup_lavapipe.sh extracts Mesa lavapipe 25 from Debian bookworm-backports into build/lavapipe/)');
  }
  if (route.status !== 'ready') {
    throw new HarnessError(`lavapipe WebGPU route unavailable: ${route.reason ?? JSON.stringify(route)}`);
  }
  return route;
}

/** Environment variables for a process that must see lavapipe (and only it) through the Vulkan loader. */
export function lavapipeEnv(route, client) {
  const icd = client === 'chromium' ? route.chromium_icd : route.node_icd;
  fs.mkdirSync(route.shader_cache, { recursive: true });
  return {
    VK_ICD_FILENAMES: icd,
    VK_DRIVER_FILES: icd,
    // lavapipe needs libdrm 2.4.123 from backports; the extracted Vulkan loader serves onnxruntime-node's Dawn
    LD_LIBRARY_PATH: [route.lib_dir, process.env.LD_LIBRARY_PATH].filter(Boolean).join(':'),
    // shaders compile on the CPU (~30-50 s for a first prompt); Mesa's disk cache makes later runs fast
    MESA_SHADER_CACHE_DIR: route.shader_cache,
    GRAPHKIT_LAVAPIPE_ACTIVE: icd,
  };
}

/** The Vulkan devices a process with `env` sees (build/lavapipe/vk_probe), checked to be lavapipe only. */
export function probeLavapipe(route, env) {
  let probe;
  try {
    probe = JSON.parse(execFileSync(route.probe, { env: { ...process.env, ...env }, encoding: 'utf8', timeout: 60_000 }));
  } catch (e) {
    throw new HarnessError(`lavapipe route: ${route.probe} failed (${e.message.split('\n')[0]}); rerun "bash scripts/setup.sh"`);
  }
  const devs = probe.devices ?? [];
  const d = devs[0];
  if (devs.length !== 1 || d.driver !== 'llvmpipe' || !d.shader_float16 || d.subgroup_min_size !== EXPECTED.subgroup
      || d.subgroup_max_size !== EXPECTED.subgroup) {
    throw new HarnessError('lavapipe route requested but the Vulkan devices are not the expected lavapipe '
      + `(one llvmpipe device, shaderFloat16, subgroup size ${EXPECTED.subgroup}): ${JSON.stringify(probe)}`);
  }
  return {
    vendor: 'mesa', architecture: 'llvmpipe', device: d.name, description: d.driver_info,
    subgroup_min_size: d.subgroup_min_size, subgroup_max_size: d.subgroup_max_size,
    features: d.shader_float16 ? [EXPECTED.feature] : [], max_storage_buffer_binding_size: d.max_storage_buffer_range,
    source: 'vk_probe in the same environment (onnxruntime-node does not describe its adapter)',
  };
}

/** A WebGPU adapter description (page_common.webgpuInfo) that is not lavapipe's: the reason, else null. */
export function adapterMismatch(adapter) {
  if (!adapter) return 'no WebGPU adapter';
  const f = adapter.features ?? [];
  if (!f.includes(EXPECTED.feature) || adapter.subgroup_min_size !== EXPECTED.subgroup
      || adapter.subgroup_max_size !== EXPECTED.subgroup) {
    return `adapter ${adapter.vendor}/${adapter.architecture} has subgroup sizes ${adapter.subgroup_min_size}-`
      + `${adapter.subgroup_max_size} and ${f.includes(EXPECTED.feature) ? '' : 'no '}${EXPECTED.feature}`;
  }
  return null;
}

/** Chromium launch settings for the route: executable, extra flags, environment. */
export function lavapipeChromium() {
  const route = lavapipeRoute();
  if (!route.chromium || !fs.existsSync(route.chromium)) {
    throw new HarnessError(`lavapipe route: no Chromium copy at ${route.chromium} (install Debian's chromium, then rerun "bash scripts/setup.sh")`);
  }
  // --use-angle=vulkan: without it Chromium's GPU process does not bring up Vulkan for Dawn (measured)
  return { executable: route.chromium, args: ['--use-angle=vulkan'], env: lavapipeEnv(route, 'chromium'), route };
}
