#!/usr/bin/env node
// Many (folder, dtype) greedy generations in ONE Node process: the Transformers.js version matrix
// (graphkit/tjs.py run_matrix). Which Transformers.js runs: this folder's pinned one, or
// $GRAPHKIT_TJS_CLIENT's (tests/js-tjs3, tests/js-tjs4-latest: see cli_common.mjs clientDir).
// Prints exactly one JSON object on stdout: {transformers_version, onnxruntime_node_version, node_version,
// runs: [{model_dir, dtype, results, load_ms, gen_ms} | {model_dir, dtype, error}]}; a run's failure (a file that
// does not load) is recorded in its entry and the others still run.
import fs from 'node:fs';
import path from 'node:path';
import {
  UsageError, emitJson, fail, importTransformers, log, modelIdOf, ortNodeModule, parseOptions, routeConsoleToStderr,
} from './cli_common.mjs';
import { runGeneration, validatePrompts } from './harness_core.mjs';

const USAGE = `usage: node generate_matrix.mjs --jobs jobs.json --prompts prompts.json [--max-new-tokens 32]

  --jobs     JSON list of {"model_dir": "/abs/folder", "dtype": "q4"}
  --prompts  JSON list of chat-formatted strings or {"messages": [...]} objects (as generate_node.mjs)`;

async function main() {
  routeConsoleToStderr();
  const values = parseOptions(process.argv.slice(2), {
    jobs: { type: 'string' }, prompts: { type: 'string' }, 'max-new-tokens': { type: 'string', default: '32' },
  }, USAGE);
  if (!values.jobs || !values.prompts) throw new UsageError(`--jobs and --prompts are required\n\n${USAGE}`);
  const read = (f) => {
    try { return JSON.parse(fs.readFileSync(path.resolve(f), 'utf8')); } catch (e) { throw new UsageError(`cannot read ${f}: ${e.message}`); }
  };
  const jobs = read(values.jobs);
  const prompts = validatePrompts(read(values.prompts));
  const maxNewTokens = Number.parseInt(values['max-new-tokens'], 10);
  if (!Array.isArray(jobs) || !jobs.length) throw new UsageError('--jobs must be a non-empty JSON list');
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) throw new UsageError('--max-new-tokens must be a positive integer');

  const T = await importTransformers();
  const { env } = T;
  env.allowRemoteModels = false; // never contact the Hub
  env.allowLocalModels = true;
  env.useFSCache = false;
  env.useBrowserCache = false;
  let ortVersion = null;
  try { ortVersion = ortNodeModule().env?.versions?.node ?? null; } catch { /* reported as null */ }
  log(`transformers.js ${env.version}, onnxruntime-node ${ortVersion}: ${jobs.length} run(s)`);

  const runs = [];
  for (const job of jobs) {
    const modelDir = path.resolve(job.model_dir);
    const entry = { model_dir: modelDir, dtype: job.dtype };
    try {
      env.localModelPath = path.dirname(modelDir) + path.sep;
      const out = await runGeneration(T, {
        modelId: modelIdOf(modelDir), dtype: job.dtype, device: 'cpu', prompts, maxNewTokens, log,
      });
      Object.assign(entry, { results: out.results, load_ms: out.load_ms, gen_ms: out.gen_ms });
    } catch (e) {
      entry.error = String(e?.message ?? e);
      log(`${modelDir} ${job.dtype}: ${entry.error.slice(0, 200)}`);
    }
    runs.push(entry);
  }
  await emitJson({
    client: 'node', transformers_version: env.version, onnxruntime_node_version: ortVersion,
    node_version: process.version, runs,
  });
}

main().then(() => process.exit(0), (e) => fail(e));
