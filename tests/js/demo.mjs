#!/usr/bin/env node
// The README's demo: Transformers.js (Node, offline) writes an epicrisis with the converted
// fine-tuned model. usage: node tests/js/demo.mjs OUT_DIR [dtype=q4f16]
import path from 'node:path';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const [folderArg, dtype = 'q4f16'] = process.argv.slice(2);
if (!folderArg) {
  console.error('usage: node tests/js/demo.mjs OUT_DIR [dtype]');
  process.exit(2);
}
const folder = path.resolve(folderArg);
const T = await import(require.resolve('@huggingface/transformers'));
const { env, AutoTokenizer, AutoModelForCausalLM, TextStreamer } = T;
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(folder) + path.sep;
env.useFSCache = false;
const id = path.basename(folder);

const tokenizer = await AutoTokenizer.from_pretrained(id);
const t0 = performance.now();
const model = await AutoModelForCausalLM.from_pretrained(id, { dtype, device: 'cpu' });
const loadMs = performance.now() - t0;
const messages = [{
  role: 'user',
  content: 'Redacta la epicrisis del paciente: Mujer de 72 años. Motivo: Fiebre y tos productiva. '
    + 'Diagnóstico: Neumonía adquirida en la comunidad. Tratamiento: Ceftriaxona y azitromicina, 500 mg al día. '
    + 'Evolución: Favorable, afebril al segundo día. Estadía: 6 días.',
}];
const inputs = tokenizer.apply_chat_template(messages, { add_generation_prompt: true, return_dict: true });
console.log(`Transformers.js ${env.version} · onnx/${dtype === 'fp32' ? 'model' : 'model_' + dtype}.onnx · loaded in ${loadMs.toFixed(0)} ms\n`);
console.log(`> ${messages[0].content}\n`);
const streamer = new TextStreamer(tokenizer, { skip_prompt: true, skip_special_tokens: true });
const t1 = performance.now();
const out = await model.generate({ ...inputs, max_new_tokens: 160, do_sample: false, streamer });
const n = out.dims.at(-1) - inputs.input_ids.dims.at(-1);
console.log(`\n[${n} tokens in ${(performance.now() - t1).toFixed(0)} ms]`);
