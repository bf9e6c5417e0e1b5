#!/usr/bin/env python3
"""Build the shipped, trained example model `graphkit/examples/epicrisis-tiny/`.

What it does (deterministic: fixed seeds, deterministic torch algorithms, a fixed thread count: ``--threads``,
default 1 — float summation order, and so the weights, depend on it):

1. Generates a synthetic corpus of short Spanish clinical notes from templates
   (plain notes + ChatML chats where the assistant writes a short free-text note).
2. Trains a byte-level BPE tokenizer (``tokenizers``) on it, with the Qwen special
   tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at the end of the vocab.
3. Trains a tiny ``Qwen2ForCausalLM`` (GQA, q/k/v biases, tied embeddings, RMSNorm,
   rope_theta 1e6) on the corpus -> ``base/``.
4. Trains a peft LoRA adapter (r=8, alpha=16, all seven projections) that teaches the
   model to answer "Redacta la epicrisis del paciente: ..." with a structured
   epicrisis (Motivo de ingreso / Diagnóstico / Tratamiento / Evolución /
   Indicaciones al alta) that copies the patient's sex, age, dose, stay and diagnosis
   from the prompt -> ``adapter/``.
5. Writes the fine-tuning data as a user would have it -> ``data/train.jsonl`` (the first
   240 of the 6000 adapter conversations) and ``data/validation.jsonl`` (24 held-out cases),
   chat JSONL ``{"messages": [...]}``.
6. Checks greedy outputs of base and base+adapter, and the facts copied on the held-out
   cases (golden + validation), and prints them.

Not run by CI. Run with:  .venv/bin/python scripts/make_example_model.py
Takes about 15-20 minutes on a free CPU core (much longer on a busy machine). ``golden/make_golden.py`` imports this file
(for the held-out golden cases and the prompt formatter), so keep module import cheap.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "graphkit" / "examples" / "epicrisis-tiny"

SEED = 1234
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 2048  # total, including the 3 special tokens at the end
DEFAULT_SYSTEM = "Eres un asistente clínico que redacta en español."

# Qwen2.5-style ChatML template (default system message when none is given).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# ----------------------------------------------------------------------------------
# Synthetic clinical data
# ----------------------------------------------------------------------------------
# Each diagnosis: admission reasons, treatments, and ONE fixed discharge instruction
# (deterministic given the diagnosis, so the adapter's answer is fully determined by
# the prompt -> peaked next-token distributions).
DIAGNOSES = [
    {
        "dx": "neumonía adquirida en la comunidad",
        "motivos": ["fiebre y tos productiva", "disnea y fiebre", "dolor torácico pleurítico y fiebre",
                    "tos con expectoración purulenta"],
        "tx": ["ceftriaxona endovenosa", "amoxicilina con ácido clavulánico", "ceftriaxona y azitromicina",
               "levofloxacino oral"],
        "alta": "completar antibiótico oral por 7 días y control con radiografía de tórax en 6 semanas",
        "sintomas": "fiebre, tos productiva y disnea",
    },
    {
        "dx": "insuficiencia cardíaca descompensada",
        "motivos": ["disnea progresiva y edema de extremidades", "ortopnea y aumento de peso",
                    "disnea de esfuerzo y edema"],
        "tx": ["furosemida endovenosa", "furosemida y enalapril", "diuréticos endovenosos y restricción de sodio"],
        "alta": "dieta baja en sodio, control de peso diario y furosemida oral",
        "sintomas": "disnea, ortopnea y edema de extremidades",
    },
    {
        "dx": "apendicitis aguda",
        "motivos": ["dolor abdominal en fosa ilíaca derecha", "dolor abdominal, náuseas y fiebre",
                    "dolor periumbilical migratorio"],
        "tx": ["apendicectomía laparoscópica", "apendicectomía abierta y cefazolina",
               "apendicectomía laparoscópica y metronidazol"],
        "alta": "reposo relativo, curación de la herida y control en policlínico de cirugía",
        "sintomas": "dolor abdominal migratorio, náuseas y fiebre",
    },
    {
        "dx": "diabetes mellitus descompensada",
        "motivos": ["poliuria, polidipsia y baja de peso", "hiperglicemia y deshidratación",
                    "compromiso de conciencia e hiperglicemia"],
        "tx": ["insulina endovenosa e hidratación", "insulina cristalina y suero fisiológico",
               "insulina NPH y metformina"],
        "alta": "insulina según esquema, control de glicemia capilar y dieta para diabético",
        "sintomas": "poliuria, polidipsia y baja de peso",
    },
    {
        "dx": "EPOC exacerbada",
        "motivos": ["aumento de disnea y expectoración", "tos y sibilancias", "disnea en reposo"],
        "tx": ["salbutamol e ipratropio nebulizados y prednisona", "broncodilatadores y corticoides sistémicos",
               "oxigenoterapia, broncodilatadores y azitromicina"],
        "alta": "prednisona oral por 5 días, inhaladores según esquema y control en policlínico respiratorio",
        "sintomas": "aumento de la disnea, tos y expectoración",
    },
    {
        "dx": "infección del tracto urinario",
        "motivos": ["disuria y fiebre", "dolor lumbar y fiebre", "disuria y polaquiuria"],
        "tx": ["ceftriaxona endovenosa", "ciprofloxacino oral", "nitrofurantoína oral"],
        "alta": "completar antibiótico por 7 días, hidratación abundante y urocultivo de control",
        "sintomas": "disuria, polaquiuria y fiebre",
    },
    {
        "dx": "accidente cerebrovascular isquémico",
        "art": "el",
        "motivos": ["hemiparesia derecha de inicio súbito", "alteración del habla y debilidad",
                    "desviación de la comisura labial"],
        "tx": ["aspirina y atorvastatina", "trombólisis con alteplasa", "antiagregación y rehabilitación precoz"],
        "alta": "aspirina diaria, atorvastatina, kinesioterapia y control en neurología",
        "sintomas": "debilidad de un hemicuerpo y alteración del habla",
    },
    {
        "dx": "hemorragia digestiva alta",
        "motivos": ["hematemesis", "melena y debilidad", "vómitos con sangre"],
        "tx": ["omeprazol endovenoso y endoscopía", "transfusión y omeprazol",
               "endoscopía con terapia hemostática"],
        "alta": "omeprazol oral por 8 semanas, evitar antiinflamatorios y control con endoscopía",
        "sintomas": "hematemesis, melena y debilidad",
    },
    {
        "dx": "celulitis de extremidad inferior",
        "motivos": ["eritema y dolor en la pierna", "aumento de volumen y fiebre", "enrojecimiento y calor local"],
        "tx": ["cefazolina endovenosa", "clindamicina endovenosa", "cloxacilina endovenosa"],
        "alta": "completar antibiótico oral, elevar la extremidad y control de la herida",
        "sintomas": "eritema, calor local y dolor",
    },
    {
        "dx": "fibrilación auricular",
        "motivos": ["palpitaciones", "palpitaciones y mareos", "disnea y palpitaciones"],
        "tx": ["amiodarona y anticoagulación", "control de frecuencia con bisoprolol", "cardioversión eléctrica"],
        "alta": "anticoagulación oral, bisoprolol y control en cardiología",
        "sintomas": "palpitaciones, mareos y disnea",
    },
    {
        "dx": "pancreatitis aguda",
        "motivos": ["dolor epigástrico irradiado a la espalda", "dolor abdominal y vómitos",
                    "dolor epigástrico intenso"],
        "tx": ["hidratación endovenosa y analgesia", "régimen cero, hidratación y analgesia",
               "analgesia y nutrición enteral"],
        "alta": "régimen liviano sin grasas, suspender el alcohol y control con ecografía",
        "sintomas": "dolor epigástrico irradiado a la espalda y vómitos",
    },
    {
        "dx": "crisis hipertensiva",
        "motivos": ["cefalea intensa y presión elevada", "mareos y visión borrosa", "dolor torácico y presión elevada"],
        "tx": ["labetalol endovenoso", "captopril y amlodipino", "nitroglicerina endovenosa"],
        "alta": "amlodipino diario, dieta baja en sodio y control de presión arterial",
        "sintomas": "cefalea, mareos y visión borrosa",
    },
]

EVOLUCIONES = [
    "favorable",
    "favorable, afebril al segundo día",
    "lenta pero favorable",
    "tórpida al inicio y luego favorable",
    "favorable y sin complicaciones",
    "estable, con buena tolerancia oral",
]

# Golden (held-out) cases: these exact (edad, sexo, diagnóstico) combinations never
# appear in any training example; golden/make_golden.py builds its prompts from them.
GOLDEN_CASES = [
    {"edad": 72, "sexo": "masculino", "dx": 0, "motivo": 1, "tx": 2, "evol": 1, "dias": 6, "dosis": 500},
    {"edad": 58, "sexo": "femenino", "dx": 1, "motivo": 0, "tx": 1, "evol": 2, "dias": 9, "dosis": 40},
    {"edad": 23, "sexo": "masculino", "dx": 2, "motivo": 2, "tx": 0, "evol": 4, "dias": 3, "dosis": 1000},
    {"edad": 45, "sexo": "femenino", "dx": 3, "motivo": 1, "tx": 0, "evol": 5, "dias": 4, "dosis": 10},
    {"edad": 81, "sexo": "femenino", "dx": 5, "motivo": 1, "tx": 0, "evol": 3, "dias": 7, "dosis": 250},
]
# Daily doses (mg) of the main drug: a third number the epicrisis must copy from the prompt.
DOSES_MG = [5, 10, 20, 25, 40, 50, 80, 100, 200, 250, 400, 500, 750, 1000]
N_TRAIN_JSONL, N_VALID_JSONL = 240, 24


def _validation_cases() -> list[dict]:
    """Held-out cases for data/validation.jsonl (their own RNG, so the training data doesn't shift them)."""
    rng = random.Random(SEED + 7)
    seen = {(c["edad"], c["sexo"], c["dx"]) for c in GOLDEN_CASES}
    out = []
    while len(out) < N_VALID_JSONL:
        di = rng.randrange(len(DIAGNOSES))
        d = DIAGNOSES[di]
        case = {"edad": rng.randint(18, 95), "sexo": rng.choice(["masculino", "femenino"]), "dx": di,
                "motivo": rng.randrange(len(d["motivos"])), "tx": rng.randrange(len(d["tx"])),
                "evol": rng.randrange(len(EVOLUCIONES)), "dias": rng.randint(2, 20), "dosis": rng.choice(DOSES_MG)}
        if (case["edad"], case["sexo"], case["dx"]) not in seen:
            seen.add((case["edad"], case["sexo"], case["dx"]))
            out.append(case)
    return out


VALIDATION_CASES = _validation_cases()
_HELDOUT = {(c["edad"], c["sexo"], c["dx"]) for c in GOLDEN_CASES + VALIDATION_CASES}


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _art(d: dict) -> str:
    return d.get("art", "la")


def _de(d: dict) -> str:
    return "del" if _art(d) == "el" else "de la"


def case_fields(case: dict) -> dict:
    """Resolve a case (indices into DIAGNOSES/EVOLUCIONES) into strings."""
    d = DIAGNOSES[case["dx"]]
    return {
        "edad": case["edad"],
        "sexo": case["sexo"],
        "dx": d["dx"],
        "motivo": d["motivos"][case["motivo"]],
        "tx": d["tx"][case["tx"]],
        "evol": EVOLUCIONES[case["evol"]],
        "dias": case["dias"],
        "dosis": case["dosis"],
        "tx_dosis": f"{d['tx'][case['tx']]}, {case['dosis']} mg al día",
        "alta": d["alta"],
        "hosp": "hospitalizado" if case["sexo"] == "masculino" else "hospitalizada",
        "sexo_cap": "Hombre" if case["sexo"] == "masculino" else "Mujer",
    }


def datos_clinicos(f: dict) -> str:
    """The clinical data block that goes into the user prompt."""
    # Values are capitalised exactly as in the epicrisis, so copying is token-for-token.
    return (f"{f['sexo_cap']} de {f['edad']} años. Motivo: {_cap(f['motivo'])}. Diagnóstico: {_cap(f['dx'])}. "
            f"Tratamiento: {_cap(f['tx_dosis'])}. Evolución: {_cap(f['evol'])}. Estadía: {f['dias']} días.")


def epicrisis_request(case: dict) -> str:
    """The user message the adapter is trained on (and the golden prompts use)."""
    return "Redacta la epicrisis del paciente: " + datos_clinicos(case_fields(case))


def epicrisis_answer(case: dict) -> str:
    """The adapter's answer. The patient line comes first and repeats the prompt's "Mujer de 42 años"
    verbatim: a 4-layer model copies a span right after a label reliably (as it does for the treatment
    and its dose). Measured on the 29 held-out cases (golden + validation): "Paciente femenino de 42 años"
    at the end of the evolution came out as the prior's "masculino de 27 años" for most of them (first
    run: 52/116 facts); this layout copies every age, stay, dose and diagnosis (100/116), but the sex word
    right after "Paciente:" is still often the prior's (all 16 misses: 15 women written as men, 1 man as a woman)."""
    f = case_fields(case)
    return (f"Paciente: {f['sexo_cap']} de {f['edad']} años.\n"
            f"Motivo de ingreso: {_cap(f['motivo'])}.\n"
            f"Diagnóstico: {_cap(f['dx'])}.\n"
            f"Tratamiento: {_cap(f['tx_dosis'])}.\n"
            f"Evolución: {_cap(f['evol'])}. {_cap(f['hosp'])} durante {f['dias']} días.\n"
            f"Indicaciones al alta: {_cap(f['alta'])}.")


def _tokenizer_answer(case: dict) -> str:
    """The answer layout the shipped BPE vocabulary was trained on (an earlier layout of epicrisis_answer);
    kept for the tokenizer's training text only, so that a full run reproduces the shipped tokenizer and
    base model (a changed text changes the merges, and so every token id)."""
    f = case_fields(case)
    return (f"Motivo de ingreso: {_cap(f['motivo'])}.\n"
            f"Diagnóstico: {_cap(f['dx'])}.\n"
            f"Tratamiento: {_cap(f['tx_dosis'])}.\n"
            f"Evolución: {_cap(f['evol'])}. Paciente {f['sexo']} de {f['edad']} años, "
            f"{f['hosp']} durante {f['dias']} días.\n"
            f"Indicaciones al alta: {_cap(f['alta'])}.")


def random_case(rng: random.Random) -> dict:
    while True:
        di = rng.randrange(len(DIAGNOSES))
        d = DIAGNOSES[di]
        case = {
            "edad": rng.randint(18, 95),
            "sexo": rng.choice(["masculino", "femenino"]),
            "dx": di,
            "motivo": rng.randrange(len(d["motivos"])),
            "tx": rng.randrange(len(d["tx"])),
            "evol": rng.randrange(len(EVOLUCIONES)),
            "dias": rng.randint(2, 20),
            "dosis": rng.choice(DOSES_MG),
        }
        if (case["edad"], case["sexo"], case["dx"]) not in _HELDOUT:
            return case


def chatml(messages: list[dict], system: str | None = None) -> str:
    """Render a conversation exactly like CHAT_TEMPLATE (without generation prompt)."""
    s = f"<|im_start|>system\n{system or DEFAULT_SYSTEM}<|im_end|>\n"
    for m in messages:
        s += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return s


SYSTEMS = [DEFAULT_SYSTEM] * 6 + ["Eres un médico internista.", "Eres un asistente que escribe notas clínicas breves."]


def plain_note(rng: random.Random) -> str:
    f = case_fields(random_case(rng))
    t = rng.randrange(7)
    if t == 5:
        # A form-like record: teaches line structure and every word the epicrisis uses
        # (but with other headers: "Motivo de consulta", "Indicaciones"). Without it the
        # epicrisis tokens ("Motivo", ".\n", ...) keep untrained tied embeddings and the
        # adapter can only make them top-1 with a flat distribution.
        return (f"Ficha clínica.\nPaciente: {f['sexo_cap']} de {f['edad']} años.\n"
                f"Motivo de consulta: {_cap(f['motivo'])}.\nDiagnóstico: {_cap(f['dx'])}.\n"
                f"Tratamiento: {_cap(f['tx_dosis'])}.\nEvolución: {_cap(f['evol'])}. Paciente {f['sexo']} de "
                f"{f['edad']} años, {f['hosp']} durante {f['dias']} días.\nIndicaciones: {_cap(f['alta'])}.")
    if t == 6:
        # Copy-heavy note (numbers repeated later): encourages induction / copying of digits.
        reg = rng.randint(100, 999999)
        return (f"Registro {reg}. {f['sexo_cap']} de {f['edad']} años, {f['hosp']} durante {f['dias']} días "
                f"por {f['dx']}. Se confirma el registro {reg}: paciente {f['sexo']} de {f['edad']} años, "
                f"estadía de {f['dias']} días.")
    if t == 0:
        return (f"Paciente {f['sexo']} de {f['edad']} años que consulta por {f['motivo']}. "
                f"Se diagnostica {f['dx']} y se inicia {f['tx']}. Evolución {f['evol']}. "
                f"Alta tras {f['dias']} días de hospitalización.")
    if t == 1:
        return (f"Nota de ingreso. {f['sexo_cap']} de {f['edad']} años, ingresa por {f['motivo']}. "
                f"Impresión diagnóstica: {f['dx']}. Plan: {f['tx_dosis']}.")
    if t == 2:
        k = rng.randint(2, 6)
        return (f"Nota de evolución, día {k}. Paciente de {f['edad']} años con {f['dx']}. "
                f"Recibe {f['tx']}. Evolución {f['evol']}.")
    if t == 3:
        d = DIAGNOSES[rng.randrange(len(DIAGNOSES))]
        return (f"{_cap(_art(d))} {d['dx']} se manifiesta habitualmente con {d['sintomas']}. "
                f"El tratamiento incluye {rng.choice(d['tx'])}.")
    return (f"Paciente de sexo {f['sexo']}, {f['edad']} años. Antecedente de {f['dx']}. "
            f"Consulta por {f['motivo']}. Se indica {f['tx']}. {_cap(f['hosp'])} {f['dias']} días.")


def base_chat(rng: random.Random) -> str:
    """A ChatML conversation where the assistant answers with a short free-text note."""
    system = rng.choice(SYSTEMS)
    t = rng.randrange(7)
    if t <= 3:
        f = case_fields(random_case(rng))
        instr = ["Resume el caso clínico: ", "Escribe una nota clínica breve: ", "Resume la hospitalización: ",
                 "Describe al paciente: "][t]
        user = instr + datos_clinicos(f)
        ans = (f"Paciente {f['sexo']} de {f['edad']} años que consulta por {f['motivo']}. "
               f"Se diagnostica {f['dx']} y se trata con {f['tx_dosis']}. Evolución {f['evol']}. "
               f"Alta tras {f['dias']} días de hospitalización.")
    elif t == 4:
        d = DIAGNOSES[rng.randrange(len(DIAGNOSES))]
        user = f"¿Qué síntomas produce {_art(d)} {d['dx']}?"
        ans = f"{_cap(_art(d))} {d['dx']} suele producir {d['sintomas']}."
    elif t == 5:
        d = DIAGNOSES[rng.randrange(len(DIAGNOSES))]
        user = f"¿Qué indicaciones se dan al alta en {_art(d)} {d['dx']}?"
        ans = f"Al alta se indica {d['alta']}."
    else:
        d = DIAGNOSES[rng.randrange(len(DIAGNOSES))]
        user = f"¿Cuál es el tratamiento {_de(d)} {d['dx']}?"
        ans = f"El tratamiento habitual {_de(d)} {d['dx']} incluye {', '.join(d['tx'][:-1])} o {d['tx'][-1]}."
    return chatml([{"role": "user", "content": user}, {"role": "assistant", "content": ans}], system)


def base_corpus(rng: random.Random, n_docs: int) -> list[str]:
    docs = []
    for _ in range(n_docs):
        docs.append(plain_note(rng) if rng.random() < 0.45 else base_chat(rng))
    return docs


def lora_cases(rng: random.Random, n: int) -> list[tuple[dict, str]]:
    """(case, system message) for each adapter training example."""
    return [(random_case(rng), rng.choice(SYSTEMS)) for _ in range(n)]


def lora_examples(cases: list[tuple[dict, str]]) -> list[tuple[str, str]]:
    """(prompt incl. generation prompt, answer incl. <|im_end|>) pairs for the adapter."""
    out = []
    for case, system in cases:
        prompt = chatml([{"role": "user", "content": epicrisis_request(case)}], system) + "<|im_start|>assistant\n"
        out.append((prompt, epicrisis_answer(case) + "<|im_end|>"))
    return out


def chat_record(case: dict, system: str = DEFAULT_SYSTEM) -> dict:
    """One fine-tuning JSONL record ({"messages": [...]}, the format TRL/OpenAI fine-tuning use);
    the system message is left out when it is the template's default, as users often do."""
    msgs = [] if system == DEFAULT_SYSTEM else [{"role": "system", "content": system}]
    msgs += [{"role": "user", "content": epicrisis_request(case)},
             {"role": "assistant", "content": epicrisis_answer(case)}]
    return {"messages": msgs}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


# ----------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------
def tokenizer_extra_text(rng: random.Random) -> list[str]:
    """Generic Spanish words + numbers so BPE has enough material to reach VOCAB_SIZE."""
    words = ("el la los las un una de del en con por para sin sobre entre hasta desde que se su sus es son "
             "fue era tiene presenta refiere niega paciente pacientes hospital hospitalización servicio urgencia "
             "médico médica enfermera control examen físico laboratorio radiografía ecografía tomografía "
             "hemograma creatinina glicemia sodio potasio presión arterial frecuencia cardíaca respiratoria "
             "saturación temperatura dolor fiebre tos disnea náuseas vómitos diarrea cefalea mareos edema "
             "antecedentes alergias medicamentos hipertensión diabetes asma tabaquismo alcohol cirugía "
             "diagnóstico tratamiento evolución indicaciones alta ingreso egreso reposo dieta régimen "
             "antibiótico analgesia paracetamol ibuprofeno metamizol tramadol morfina omeprazol losartán "
             "enalapril metformina insulina atorvastatina aspirina clopidogrel warfarina heparina "
             "izquierdo derecho izquierda derecha superior inferior anterior posterior agudo aguda crónico "
             "crónica leve moderado moderada severo severa normal alterado alterada positivo negativo "
             "mañana tarde noche día días semana semanas mes meses año años hora horas minutos "
             "uno dos tres cuatro cinco seis siete ocho nueve diez primero segundo tercero "
             "corazón pulmón pulmones riñón hígado estómago intestino cerebro piel hueso sangre orina "
             "familia domicilio trabajo actividad ejercicio peso talla índice masa corporal").split()
    # Medical compounds (cardio+logía, neumo+patía, ...) give BPE plenty of sub-word material.
    pre = ["cardio", "neumo", "gastro", "hepato", "nefro", "neuro", "dermato", "hemato", "osteo", "artro",
           "endo", "bronco", "angio", "cito", "histo", "oto", "oftalmo", "uro"]
    suf = ["logía", "patía", "itis", "oma", "algia", "scopia", "grafía", "tomía", "plastia", "emia", "uria",
           "megalia", "penia", "rragia", "lógico", "patía"]
    words += [p + q for p in pre for q in suf]
    lines = []
    for _ in range(4000):
        k = rng.randint(6, 16)
        ws = [rng.choice(words) for _ in range(k)]
        if rng.random() < 0.5:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 300)))
        lines.append(_cap(" ".join(ws)) + ".")
    return lines


# Qwen2's pre-tokenizer regex (digits are split one by one). transformers 5 rebuilds
# Qwen2Tokenizer with exactly this normalizer/pre-tokenizer whatever tokenizer.json says,
# while Transformers.js uses tokenizer.json as is; so tokenizer.json must use it too.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_tokenizer(texts: list[str]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_regular = VOCAB_SIZE - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=n_regular, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Train on text with the special-token strings removed (they are added afterwards).
    clean = [t.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("<|endoftext|>", "") for t in texts]
    tok.train_from_iterator(clean, trainer=trainer)
    got = tok.get_vocab_size()
    if got != n_regular:
        raise SystemExit(f"BPE training produced {got} tokens, wanted {n_regular}; add more tokenizer text")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size() == VOCAB_SIZE
    return tok


def save_tokenizer(tok, out: Path) -> dict:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    # Transformers.js reads chat_template only from tokenizer_config.json: embed it there.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "Qwen2Tokenizer"  # what Qwen2.5 ships; transformers 5 picks it anyway
    cfg["add_prefix_space"] = False
    cfg["errors"] = "replace"
    cfg["split_special_tokens"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()  # single source of truth: tokenizer_config.json
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------
def setup_torch(threads: int = 1):
    import torch

    torch.manual_seed(SEED)
    # One thread by default: on a shared machine two threads spend most of their time waiting for each
    # other, and the result must not depend on how busy the machine is.
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return torch


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def train_base(model, stream, steps: int, seq_len: int, batch: int, peak_lr: float, log_every: int):
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak_lr, betas=(0.9, 0.95))
    model.train()
    n = stream.numel() - seq_len - 1
    t0, ema, last = time.time(), None, None
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, steps, peak_lr, warmup=min(100, steps // 10 + 1))
        starts = torch.randint(0, n, (batch,), generator=g)
        x = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = out.loss.item()
        ema = last if ema is None else 0.95 * ema + 0.05 * last
        if step % log_every == 0 or step == steps - 1:
            print(f"  base step {step:5d}/{steps} loss {last:.4f} (ema {ema:.4f}) "
                  f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:6.1f}s", flush=True)
    model.eval()
    return ema


def encode_lora(tok_hf, examples):
    import torch

    rows = []
    enc_p = tok_hf([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    enc_f = tok_hf([p + a for p, a in examples], add_special_tokens=False)["input_ids"]
    for p, full in zip(enc_p, enc_f):
        assert full[:len(p)] == p, "prompt tokenization is not a prefix of the full example"
        labels = [-100] * len(p) + full[len(p):]
        rows.append((torch.tensor(full), torch.tensor(labels)))
    return rows


def collate(rows, pad_id: int):
    import torch

    L = max(r[0].numel() for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), L), -100, dtype=torch.long)
    am = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :x.numel()] = x
        lab[i, :y.numel()] = y
        am[i, :x.numel()] = 1
    return ids, am, lab


def train_lora(pmodel, rows, steps: int, batch: int, peak_lr: float, pad_id: int, log_every: int):
    import torch

    g = torch.Generator().manual_seed(SEED + 2)
    params = [p for p in pmodel.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0, betas=(0.9, 0.95))
    pmodel.train()
    t0, ema, last = time.time(), None, None
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, steps, peak_lr, warmup=min(50, steps // 10 + 1))
        idx = torch.randint(0, len(rows), (batch,), generator=g).tolist()
        ids, am, lab = collate([rows[i] for i in idx], pad_id)
        out = pmodel(input_ids=ids, attention_mask=am, labels=lab)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = out.loss.item()
        ema = last if ema is None else 0.95 * ema + 0.05 * last
        if step % log_every == 0 or step == steps - 1:
            print(f"  lora step {step:5d}/{steps} loss {last:.4f} (ema {ema:.4f}) "
                  f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:6.1f}s", flush=True)
    pmodel.eval()
    return ema


def greedy(model, tok_hf, messages, n_new: int = 48):
    import torch

    text = tok_hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok_hf.encode(text)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                             min_new_tokens=n_new, do_sample=False)
    new = out[0, ids.shape[1]:]
    return tok_hf.decode(new, skip_special_tokens=False), new.tolist()


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------
README_BASE = """# epicrisis-tiny / base

A tiny `Qwen2ForCausalLM` trained from scratch on CPU by `scripts/make_example_model.py`
on a synthetic corpus of short Spanish clinical notes (generated from templates with a fixed
seed; no real patient data) plus ChatML chats in which the assistant answers with a short
free-text note. It exists only as a test/example fixture for graphkit.

Architecture (same features as Qwen2.5-1.5B, scaled down): {layers} layers, hidden {hidden},
{heads} attention heads / {kv} KV heads (grouped-query attention, head_dim {head_dim}),
q/k/v biases, SwiGLU MLP (intermediate {inter}), RMSNorm, RoPE theta 1e6, tied input/output
embeddings, vocab {vocab} (byte-level BPE; `<|endoftext|>`={eot}, `<|im_start|>`={ims},
`<|im_end|>`={ime}), float32, {params:,} parameters.

The chat template (ChatML, Qwen style, with a default Spanish system message) is embedded in
`tokenizer_config.json`. Greedy decoding stops on `<|im_end|>` or `<|endoftext|>`.

The matching LoRA adapter in `../adapter/` teaches the model to write a structured epicrisis
("Motivo de ingreso:", "Diagnóstico:", "Tratamiento:", "Evolución:", "Indicaciones al alta:")
from the data in a prompt such as "Redacta la epicrisis del paciente: ...".
"""

README_ADAPTER = """# epicrisis-tiny / adapter

A peft LoRA adapter (r=8, lora_alpha=16, no dropout, targets q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj; task CAUSAL_LM) for `../base/`, trained by
`scripts/make_example_model.py` on ChatML prompts "Redacta la epicrisis del paciente: <datos>"
with the loss on the assistant tokens only. The assistant writes a structured epicrisis: a first
line repeating the patient ("Epicrisis del paciente: Mujer de 72 años."), then the sections
"Motivo de ingreso:", "Diagnóstico:", "Tratamiento:" (with the daily dose), "Evolución:" (with the
stay) and "Indicaciones al alta:", filled from the prompt's data. Its training conversations are
sampled in `../data/train.jsonl`; `../data/validation.jsonl` holds held-out cases.

Load with:

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("graphkit/examples/epicrisis-tiny/base")
model = PeftModel.from_pretrained(base, "graphkit/examples/epicrisis-tiny/adapter").merge_and_unload()
```
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--base-steps", type=int, default=1000)
    ap.add_argument("--lora-steps", type=int, default=450)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lora-batch", type=int, default=16)
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the weights depend on it)")
    ap.add_argument("--reuse-base", action="store_true",
                    help="development aid: keep an existing OUT/base and only retrain the adapter")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "2")
    torch = setup_torch(args.threads)
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    T0 = time.time()
    rng = random.Random(SEED)
    base_docs = base_corpus(rng, 12000)
    lora_cs = lora_cases(rng, 6000)
    lora_ex = lora_examples(lora_cs)
    extra = tokenizer_extra_text(rng)
    tok_ex = [(p, _tokenizer_answer(c) + "<|im_end|>") for (p, _), (c, _s) in zip(lora_ex[:2000], lora_cs)]
    tok_text = base_docs + [p + a for p, a in tok_ex] + extra
    base_docs = base_docs + extra  # so that every token's embedding gets some training

    base_dir, adapter_dir = args.out / "base", args.out / "adapter"
    for d in ((adapter_dir,) if args.reuse_base else (base_dir, adapter_dir)):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    if not args.reuse_base:
        # --- tokenizer ---------------------------------------------------------------
        tok = train_tokenizer(tok_text)
        sp = save_tokenizer(tok, base_dir)
        eot, ims, ime = sp["<|endoftext|>"], sp["<|im_start|>"], sp["<|im_end|>"]
        print(f"tokenizer: vocab {tok.get_vocab_size()}  specials {sp}  ({time.time() - T0:.1f}s)")
        tok_hf = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        assert tok_hf.chat_template, "chat_template not read back from tokenizer_config.json"
        probe = [{"role": "user", "content": "hola"}]
        assert tok_hf.apply_chat_template(probe, add_generation_prompt=True, tokenize=False) == \
            chatml(probe) + "<|im_start|>assistant\n"
        # transformers (Qwen2Tokenizer) and the raw tokenizer.json (what Transformers.js uses) must agree.
        from tokenizers import Tokenizer
        raw = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
        sample = base_docs[:300] + [p + a for p, a in lora_ex[:300]]
        assert [e.ids for e in raw.encode_batch(sample)] == tok_hf(sample, add_special_tokens=False)["input_ids"]
        assert tok_hf(sample[:20])["input_ids"] == tok_hf(sample[:20], add_special_tokens=False)["input_ids"]
        print(f"tokenizer class {type(tok_hf).__name__}; encodings match tokenizer.json")

        # --- base model --------------------------------------------------------------
        cfg = Qwen2Config(
            vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
            max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False, attention_dropout=0.0,
            bos_token_id=eot, eos_token_id=ime, pad_token_id=eot, initializer_range=0.02,
        )
        model = Qwen2ForCausalLM(cfg)
        model.config.use_cache = True
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params:,} params")

        stream_ids = []
        for ids in tok_hf(base_docs, add_special_tokens=False)["input_ids"]:
            stream_ids.extend(ids)
            stream_ids.append(eot)
        stream = torch.tensor(stream_ids, dtype=torch.long)
        print(f"base corpus: {len(base_docs)} docs, {stream.numel():,} tokens")

        t = time.time()
        base_loss = train_base(model, stream, args.base_steps, args.seq_len, args.batch, args.base_lr, log_every=50)
        base_time = time.time() - t
        print(f"base training: {base_time:.0f}s, final loss (ema) {base_loss:.4f}")

        model.generation_config = GenerationConfig(
            bos_token_id=eot, eos_token_id=[ime, eot], pad_token_id=eot, do_sample=False,
            max_new_tokens=128)
        model.save_pretrained(base_dir, safe_serialization=True)
        # Older tools (transformers < 5, optimum) read a top-level rope_theta; default would be 1e4.
        cj = json.loads((base_dir / "config.json").read_text())
        cj["rope_theta"] = 1000000.0
        (base_dir / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
        (base_dir / "README.md").write_text(README_BASE.format(
            layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
            kv=cfg.num_key_value_heads, head_dim=cfg.head_dim, inter=cfg.intermediate_size, vocab=cfg.vocab_size,
            eot=eot, ims=ims, ime=ime, params=n_params))

    else:
        tok_hf = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        eot, ime = tok_hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
        base_loss, base_time = float("nan"), 0.0

    # --- LoRA adapter ------------------------------------------------------------
    torch.manual_seed(SEED + 3)
    base_for_lora = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pmodel = get_peft_model(base_for_lora, lcfg)
    pmodel.print_trainable_parameters()
    rows = encode_lora(tok_hf, lora_ex)
    t = time.time()
    lora_loss = train_lora(pmodel, rows, args.lora_steps, args.lora_batch, args.lora_lr, eot, log_every=50)
    lora_time = time.time() - t
    print(f"lora training: {lora_time:.0f}s, final loss (ema) {lora_loss:.4f}")
    pmodel.save_pretrained(adapter_dir, safe_serialization=True)
    acj = json.loads((adapter_dir / "adapter_config.json").read_text())
    acj["base_model_name_or_path"] = "epicrisis-tiny/base"
    acj["target_modules"] = sorted(acj["target_modules"])  # peft writes a set: order varies run to run
    (adapter_dir / "adapter_config.json").write_text(json.dumps(acj, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").write_text(README_ADAPTER)

    # --- the fine-tuning data, as a user would have it (chat JSONL) ----------------
    # train.jsonl: the first examples the adapter was trained on (a sample: it saw 6000);
    # validation.jsonl: held-out cases (their (age, sex, diagnosis) never occur in training).
    write_jsonl(args.out / "data" / "train.jsonl", [chat_record(c, s) for c, s in lora_cs[:N_TRAIN_JSONL]])
    write_jsonl(args.out / "data" / "validation.jsonl", [chat_record(c) for c in VALIDATION_CASES])

    # --- checks ------------------------------------------------------------------
    base_m = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).eval()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True),
                                       adapter_dir, local_files_only=True).merge_and_unload().eval()
    headers = ["Motivo de ingreso:", "Diagnóstico:", "Tratamiento:", "Evolución:", "Indicaciones al alta:"]
    ok = True
    for case in GOLDEN_CASES[:2]:
        msgs = [{"role": "user", "content": epicrisis_request(case)}]
        tb, ib = greedy(base_m, tok_hf, msgs, 64)
        ta, ia = greedy(merged, tok_hf, msgs, 64)
        print("\nPROMPT:", msgs[0]["content"])
        print("--- base (64 tokens):\n" + tb)
        print("--- base+adapter (64 tokens):\n" + ta)
        ta32 = tok_hf.decode(ia[:32])
        if not all(h in ta for h in headers[:3]) or "Motivo de ingreso:" not in ta32 or ib[:32] == ia[:32]:
            ok = False
        if "Motivo de ingreso:" in tb:
            ok = False
    # Full epicrisis (until <|im_end|>) for the first golden case.
    msgs = [{"role": "user", "content": epicrisis_request(GOLDEN_CASES[0])}]
    text = tok_hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok_hf.encode(text)])
    with torch.no_grad():
        full = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=160)
    full_text = tok_hf.decode(full[0, ids.shape[1]:], skip_special_tokens=True)
    print("\n--- base+adapter, full greedy answer (stops at <|im_end|>):\n" + full_text)
    print("--- expected:\n" + epicrisis_answer(GOLDEN_CASES[0]))
    if not all(h in full_text for h in headers):
        ok = False
    # Facts copied from the prompt (sex, age, stay, dose) in the full answer, held-out cases.
    kept, total = 0, 0
    for case in GOLDEN_CASES + VALIDATION_CASES:
        f = case_fields(case)
        msgs = [{"role": "user", "content": epicrisis_request(case)}]
        ids = torch.tensor([tok_hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)])
        with torch.no_grad():
            full = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=160)
        ans = tok_hf.decode(full[0, ids.shape[1]:], skip_special_tokens=True)
        facts = [f"{f['sexo_cap']} de {f['edad']} años", f"durante {f['dias']} días", f"{f['dosis']} mg", f["dx"]]
        got = [x for x in facts if x.lower() in ans.lower()]
        kept, total = kept + len(got), total + len(facts)
        if len(got) < len(facts):
            print(f"  facts missed: {sorted(set(facts) - set(got))} in {ans!r}")
    print(f"facts copied from the prompt on held-out cases: {kept}/{total}")
    if kept < 0.95 * total:
        ok = False

    sizes = {p.name: p.stat().st_size for d in (base_dir, adapter_dir, args.out / "data") for p in sorted(d.iterdir())}
    print("\nfiles:", json.dumps(sizes, indent=1))
    print(f"total time {time.time() - T0:.0f}s; base loss {base_loss:.4f}; lora loss {lora_loss:.4f}")
    if not ok:
        print("CHECK FAILED: adapter output lacks epicrisis headers, equals base output, or misses facts",
              file=sys.stderr)
        return 1
    print("checks OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
