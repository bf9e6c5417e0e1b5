// Small helpers shared by generate_node.mjs and generate_browser.mjs (Node only).
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { validatePrompts } from './harness_core.mjs';

// Transformers.js treats an id matching this as "<localModelPath>/<id>" (utils/hub/constants.js REPO_ID_REGEX,
// single-segment form); we always use the folder's basename as the id.
const MODEL_ID_RE = /^\b[\w\-.]{1,96}\b$/;

export class UsageError extends Error {}

/** An expected failure with a self-explanatory message: printed without a Node stack trace. */
export class HarnessError extends Error {
  constructor(message, exitCode = 1) {
    super(message);
    this.exitCode = exitCode;
  }
}

/** Send everything that is not the final JSON to stderr, so stdout holds exactly one JSON object. */
export function routeConsoleToStderr() {
  const toErr = (...a) => console.error(...a);
  console.log = toErr;
  console.info = toErr;
  console.debug = toErr;
}

export function log(msg) {
  process.stderr.write(`[harness] ${msg}\n`);
}

/**
 * node:util parseArgs (strict) with the harness conventions: a parse error is a UsageError carrying `usage`, and
 * -h/--help prints `usage` and exits 0. Returns the parsed values.
 */
export function parseOptions(argv, options, usage) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv, strict: true, options: { help: { type: 'boolean', short: 'h', default: false }, ...options },
    }));
  } catch (e) {
    throw new UsageError(`${e.message}\n\n${usage}`);
  }
  if (values.help) {
    process.stderr.write(`${usage}\n`);
    process.exit(0);
  }
  return values;
}

/** The Transformers.js model id of a folder (its basename), or a UsageError saying how to fix the name. */
export function modelIdOf(modelDir) {
  const modelId = path.basename(modelDir);
  if (!MODEL_ID_RE.test(modelId)) {
    throw new UsageError(`model folder name "${modelId}" is not a valid Transformers.js model id `
      + '(letters, digits, "-", "_", "." only; max 96 chars). Rename or symlink the folder.');
  }
  return modelId;
}

/**
 * Parse argv with the options shared by both scripts plus `extra` (node:util parseArgs option specs).
 * Returns { values, modelDir, modelId, localModelPath, prompts }.
 */
export function parseCommon(argv, extra, usage) {
  const values = parseOptions(argv, {
    'model-dir': { type: 'string' },
    dtype: { type: 'string', default: 'q4' },
    prompts: { type: 'string' },
    'max-new-tokens': { type: 'string', default: '32' },
    'add-special-tokens': { type: 'boolean', default: false },
    ...extra,
  }, usage);
  if (!values['model-dir']) throw new UsageError(`--model-dir is required\n\n${usage}`);
  if (!values.prompts) throw new UsageError(`--prompts is required\n\n${usage}`);

  const modelDir = path.resolve(values['model-dir']);
  if (!fs.existsSync(path.join(modelDir, 'config.json'))) {
    throw new UsageError(`model dir ${modelDir} has no config.json`);
  }
  const modelId = modelIdOf(modelDir);
  const maxNewTokens = Number.parseInt(values['max-new-tokens'], 10);
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) {
    throw new UsageError(`--max-new-tokens must be a positive integer, got ${values['max-new-tokens']}`);
  }
  let prompts;
  try {
    prompts = JSON.parse(fs.readFileSync(path.resolve(values.prompts), 'utf8'));
  } catch (e) {
    throw new UsageError(`cannot read prompts file ${values.prompts}: ${e.message}`);
  }
  validatePrompts(prompts);
  return {
    values,
    modelDir,
    modelId,
    localModelPath: path.dirname(modelDir) + path.sep,
    prompts,
    maxNewTokens,
  };
}

/** Print the result object as one JSON line on stdout and wait for it to flush. */
export function emitJson(obj) {
  return new Promise((resolve) => process.stdout.write(`${JSON.stringify(obj)}\n`, resolve));
}

export function fail(err, code = 1) {
  const short = err instanceof UsageError || err instanceof HarnessError;
  const msg = short ? err.message : (err?.stack || String(err));
  process.stderr.write(`ERROR: ${msg}\n`);
  process.exit(err instanceof UsageError ? 2 : code);
}

/**
 * The client folder whose Transformers.js the harness runs: $GRAPHKIT_TJS_CLIENT (a folder with its own
 * package.json + node_modules, e.g. tests/js-tjs3 for the version matrix), or null for this folder's pinned one.
 */
export function clientDir() {
  const client = process.env.GRAPHKIT_TJS_CLIENT;
  if (!client) return null;
  const dir = path.resolve(client);
  if (!fs.existsSync(path.join(dir, 'node_modules', '@huggingface', 'transformers', 'package.json'))) {
    throw new HarnessError(`GRAPHKIT_TJS_CLIENT=${client}: no node_modules/@huggingface/transformers there; `
      + 'run `bash scripts/setup.sh` (it installs every client folder)');
  }
  return dir;
}

/** The package folder of the Transformers.js in use (see clientDir). */
function transformersDir() {
  const dir = clientDir();
  if (dir) return path.join(dir, 'node_modules', '@huggingface', 'transformers');
  const require = createRequire(import.meta.url);
  return path.join(path.dirname(require.resolve('@huggingface/transformers')), '..');
}

/** Import Transformers.js: this folder's pinned version, or the client folder's (same ESM entry Node would pick). */
export async function importTransformers() {
  const dir = clientDir();
  if (!dir) return import('@huggingface/transformers');
  const pkgDir = transformersDir();
  const pkg = JSON.parse(fs.readFileSync(path.join(pkgDir, 'package.json'), 'utf8'));
  const entry = pkg.exports?.node?.import?.default ?? pkg.exports?.node?.import ?? pkg.module;
  if (typeof entry !== 'string') throw new HarnessError(`${pkgDir}: no Node ESM entry in package.json exports`);
  return import(pathToFileURL(path.join(pkgDir, entry)).href);
}

/** onnxruntime-node exactly as Transformers.js resolves it (its own dependency, not a second copy). */
export function ortNodeModule() {
  return createRequire(path.join(transformersDir(), 'package.json'))('onnxruntime-node');
}
