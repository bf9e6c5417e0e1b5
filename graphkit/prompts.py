"""Prompts used by `verify` and `convert` when the user gives none.

Chat messages, rendered with the model folder's own chat template. The defaults are the golden
prompts' style (the shipped example is a Spanish clinical model) plus two generic ones.
"""
from __future__ import annotations

import json
from pathlib import Path

from graphkit.errors import GraphkitError

DEFAULT_PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Redacta la epicrisis del paciente: varón de 67 años, ingresa por neumonía adquirida en la comunidad, tratado con ceftriaxona, evolución favorable."}],
    [{"role": "user", "content": "Redacta la epicrisis del paciente: mujer de 54 años, ingresa por insuficiencia cardíaca descompensada, tratada con furosemida intravenosa, mejora de la disnea."}],
    [{"role": "user", "content": "Resume en una frase el estado del paciente al alta."}],
    [{"role": "user", "content": "Write one sentence about the weather."}],
]


def load_prompts(path: Path | None) -> list:
    """A JSON list of strings (already formatted) or of message lists / {"messages": [...]}."""
    if path is None:
        return DEFAULT_PROMPTS
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraphkitError(f"{path}: prompts file not found") from None
    except json.JSONDecodeError as exc:
        raise GraphkitError(f"{path}: not valid JSON ({exc}); expected a list of strings or message lists") from None
    if not isinstance(data, list) or not data:
        raise GraphkitError(f"{path}: expected a non-empty JSON list of prompts")
    return [d["messages"] if isinstance(d, dict) and "messages" in d else d for d in data]


def encode_prompts(tokenizer_dir: Path, prompts: list) -> list[list[int]]:
    """Token ids for each prompt; message lists go through the folder's chat template."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:
        raise GraphkitError(f"{tokenizer_dir}: cannot load the tokenizer ({str(exc).splitlines()[0][:150]})") from None
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(tok(p, add_special_tokens=False)["input_ids"])
        else:
            if not tok.chat_template:
                raise GraphkitError(f"{tokenizer_dir}: tokenizer has no chat_template; give prompts as plain strings")
            ids = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
            out.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    return out


def encode_prompts_tokenizers(tokenizer_dir: Path, prompts: list) -> list[list[int]]:
    """encode_prompts without transformers (which imports torch): tokenizer.json through `tokenizers`, chat
    messages through tokenizer_config.json's chat_template rendered with jinja2 as transformers does
    (trim_blocks, lstrip_blocks, the special tokens as variables)."""
    folder = Path(tokenizer_dir)
    tok, cfg = load_tokenizer_files(folder)
    out = []
    for p in prompts:
        if isinstance(p, str):
            text = p
        else:
            if not cfg.get("chat_template"):
                raise GraphkitError(f"{folder}: tokenizer has no chat_template; give prompts as plain strings")
            text = render_chat(cfg, p)
        out.append(tok.encode(text, add_special_tokens=False).ids)
    return out


def load_tokenizer_files(folder: Path) -> tuple:
    """(tokenizers.Tokenizer from tokenizer.json, tokenizer_config.json as a dict), without transformers."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except Exception as exc:
        raise GraphkitError(f"{folder}: cannot load the tokenizer ({str(exc).splitlines()[0][:150]})") from None
    return tok, cfg


def render_chat(tokenizer_config: dict, messages: list[dict]) -> str:
    """tokenizer_config.json's chat_template rendered with jinja2 as transformers does (trim_blocks,
    lstrip_blocks, the special tokens as variables, the generation prompt added)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tokenizer_config.items()
               if k.endswith("_token")}
    return env.from_string(tokenizer_config["chat_template"]).render(messages=messages, add_generation_prompt=True,
                                                                      **special)
