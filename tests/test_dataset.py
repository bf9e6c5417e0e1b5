"""The fine-tuning JSONL reader (graphkit.dataset), the fact extractor (graphkit.facts), and bad
data files refused through the CLI (`graphkit verify OUT --data FILE`): one line naming the file,
the line and the fix, exit 2."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE
from graphkit.dataset import calibration_sequences, load_tokenizer, read_records, verification_examples
from graphkit.errors import GraphkitError
from graphkit.facts import extract_facts, facts_taken

BASE = EXAMPLE / "base"
TRAIN = EXAMPLE / "data" / "train.jsonl"
VALID = EXAMPLE / "data" / "validation.jsonl"

PROMPT = ("Redacta la epicrisis del paciente: Mujer de 72 años. Motivo: Disnea y fiebre. Diagnóstico: Neumonía "
          "adquirida en la comunidad. Tratamiento: Ceftriaxona y azitromicina, 500 mg al día. Evolución: Favorable. "
          "Estadía: 6 días.")
ANSWER = ("Motivo de ingreso: Disnea y fiebre.\nDiagnóstico: Neumonía adquirida en la comunidad.\nTratamiento: "
          "Ceftriaxona y azitromicina, 500 mg al día.\nEvolución: Favorable. Paciente femenino de 72 años, "
          "hospitalizada durante 6 días.\nIndicaciones al alta: Completar antibiótico oral por 7 días.")


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BASE)


def test_messages_render_with_the_models_chat_template(tmp_path, tok):
    msgs = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]
    f = _write(tmp_path / "d.jsonl", [{"messages": msgs, "id": 7}, ""])  # extra keys and blank lines are fine
    [seq] = calibration_sequences(f, BASE, tokenizer=tok)
    assert seq == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    [ex] = verification_examples(f, BASE, tokenizer=tok)
    prompt_text = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
    assert ex.prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    # the answer: the assistant turn through <|im_end|>, and prompt + answer is the calibration sequence's prefix
    assert tok.decode(ex.answer_ids) == ANSWER + "<|im_end|>"
    assert seq[:len(ex.prompt_ids) + len(ex.answer_ids)] == ex.prompt_ids + ex.answer_ids
    assert ex.line == 1 and ex.prompt_text == PROMPT and ex.answer_text == ANSWER


def test_prompt_completion_and_text(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [
        {"prompt": "Paciente de 40 años.", "completion": " Alta."},
        {"prompt": [{"role": "user", "content": PROMPT}], "completion": [{"role": "assistant", "content": ANSWER}]},
        {"text": "Nota de evolución, día 3."},
    ])
    seqs = calibration_sequences(f, BASE, tokenizer=tok)
    assert seqs[0] == tok("Paciente de 40 años. Alta.", add_special_tokens=False)["input_ids"]
    assert seqs[2] == tok("Nota de evolución, día 3.", add_special_tokens=False)["input_ids"]
    assert [r.kind for r in read_records(f)] == ["prompt_completion", "prompt_completion", "text"]
    assert len(calibration_sequences(f, BASE, limit=2, tokenizer=tok)) == 2
    # a text record has no reference answer: verification refuses it, naming its line
    with pytest.raises(GraphkitError, match=r"d\.jsonl:3: .*no reference answer"):
        verification_examples(f, BASE, tokenizer=tok)
    ex = verification_examples(_write(tmp_path / "v.jsonl", [
        {"prompt": "Paciente de 40 años.", "completion": " Alta."}]), BASE, tokenizer=tok)[0]
    assert ex.answer_ids[-1] == tok.eos_token_id  # a plain completion ends with eos, as TRL trains it


def test_shipped_example_data(tok):
    """The example ships its fine-tuning data; the validation prompts' facts are in their answers."""
    train, valid = read_records(TRAIN), read_records(VALID)
    assert len(train) >= 100 and len(valid) >= 16 and all(r.kind == "messages" for r in train + valid)
    exs = verification_examples(VALID, BASE, tokenizer=tok)
    for ex in exs:
        facts = facts_taken(ex.prompt_text, ex.answer_text)
        assert {"sexo: masculino", "sexo: femenino"} & facts and any(f.endswith(" años") for f in facts)
        assert any(f.endswith(" días") for f in facts) and any(f.endswith(" mg") for f in facts)
        assert any(f.startswith("dx: ") for f in facts), ex.answer_text
    # validation cases never occur in training (age, sex, diagnosis held out)
    train_prompts = {r.messages[-2]["content"] for r in train}
    assert not train_prompts & {r.messages[-2]["content"] for r in valid}


# ---------------------------------------------------------------- facts


def test_facts_numbers_sex_diagnosis():
    assert extract_facts(PROMPT) == {"72 años", "500 mg", "6 días", "sexo: femenino", "dx: neumonía"}
    assert extract_facts("Varón de 1 año, 2,5 mg/kg cada 8 horas; NEUMONIA; 1 día; 80 mmHg; 3 g") == {
        "1 años", "2.5 mg/kg", "8 horas", "sexo: masculino", "dx: neumonía", "1 días", "80 mmHg", "3 g"}
    # numbers without a unit, and units glued to words, are not facts; whole words only
    assert extract_facts("Registro 12345, cama 7, 10mgx, mujeriego, apendicitisx") == set()
    # the q4f16 answer: a woman of 72, 6 days, read as a man of 54, 5 days
    bad = "Paciente masculino de 54 años, hospitalizado durante 5 días por neumonía."
    assert facts_taken(PROMPT, ANSWER) == {"72 años", "500 mg", "6 días", "sexo: femenino", "dx: neumonía"}
    assert facts_taken(PROMPT, ANSWER) - extract_facts(bad) == {"72 años", "500 mg", "6 días", "sexo: femenino"}


# ---------------------------------------------------------------- bad input, through the CLI


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A Transformers.js folder's tokenizer and config (from the example) with a 96-token context. The data
    file is refused before any ONNX file is opened, so onnx/model.onnx is only a named placeholder here."""
    out = tmp_path_factory.mktemp("tjs") / "model"
    (out / "onnx").mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(BASE / f, out / f)
    cfg = json.loads((BASE / "config.json").read_text())
    cfg["max_position_embeddings"] = 96
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "onnx" / "model.onnx").write_bytes(b"placeholder: never opened by these tests")
    return out


GOOD = {"messages": [{"role": "user", "content": "Hola"}, {"role": "assistant", "content": "Buenos días."}]}
BAD = {
    "missing": (None, r"missing\.jsonl: no such validation file; give the JSONL file"),
    "not_jsonl": (["[", json.dumps(GOOD), "]"], r"bad\.jsonl:1: not valid JSON .*one object per line \(JSONL\)"),
    "broken_line": ([GOOD, '{"messages": [', GOOD], r"bad\.jsonl:2: not valid JSON .*one complete JSON object"),
    "not_object": ([GOOD, GOOD, '["user", "hola"]'], r"bad\.jsonl:3: a JSON list, not an object; write one object"),
    "unknown_schema": ([GOOD, {"input": "a", "output": "b"}], r"bad\.jsonl:2: unknown record \(keys 'input', 'output'\); each line must be \{\"messages\""),
    "bad_message": ([{"messages": [{"role": "user"}]}], r"bad\.jsonl:1: messages\[0\] must be an object with \"role\" and \"content\""),
    "empty": (["", "  "], r"bad\.jsonl: no records \(the file is empty\); give one JSON object per line"),
    "non_utf8": (b'{"text": "ni\xf1o"}\n', r"bad\.jsonl:1: not UTF-8 text \(byte 0xf1 at column 13\); re-save the file as UTF-8"),
    "too_long": ([GOOD, {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]}],
                 r"bad\.jsonl:2: sample is \d+ tokens, longer than the model's context \(96 tokens, max_position_embeddings in .*config\.json\); shorten or split it"),
    "no_answer": ([{"messages": [{"role": "user", "content": "Hola"}]}], r"bad\.jsonl:1: the last message must be the assistant's reference answer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_file_refused_by_the_cli(case, folder, tmp_path):
    content, pattern = BAD[case]
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        _write(path, content)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = subprocess.run([sys.executable, "-m", "graphkit", "verify", str(folder), "--data", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    import re
    assert re.search(pattern, lines[0]), lines[0]
    assert str(path) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before and res.stdout == ""  # nothing written
