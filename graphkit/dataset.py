"""Read the JSONL a user fine-tuned on: calibration sequences and (prompt, reference answer) pairs.

One JSON object per line, in any of the formats fine-tuning tools (TRL, OpenAI, Axolotl) take:

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: rendered with the
  model folder's own chat template (``tokenizer_config.json``), exactly as the fine-tuning saw it;
- ``{"prompt": ..., "completion": ...}``: two strings (plain text, concatenated), or two message
  lists (conversational, rendered with the chat template);
- ``{"text": "..."}``: plain text (a calibration sequence; it has no separate reference answer, so
  ``verify --data`` refuses it).

Calibration uses the whole conversation; verification splits it into the prompt (everything before
the last assistant turn, with the template's generation prompt) and the reference answer (that turn,
up to and including the end-of-turn token). Blank lines are skipped; other keys beside the
recognised ones (``id``, ``metadata``…) are ignored.

Bad input is refused before any work with one line naming the file, the line and the fix
(:class:`~graphkit.errors.GraphkitError`, exit 2): a missing file, a line that is not JSON or not
an object, an unknown schema, an empty file, bytes that are not UTF-8, a sample longer than the
model's context (``max_position_embeddings``).

The structural checks (:func:`read_records`) need nothing beyond the standard library; tokenizing
imports transformers, lazily.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphkit.errors import GraphkitError

FORMATS_HINT = '{"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}'


@dataclass
class Record:
    """One parsed line. ``kind`` is "messages", "prompt_completion" or "text"."""
    line: int
    kind: str
    messages: list[dict[str, str]] | None = None   # "messages", and conversational prompt/completion
    prompt: str | None = None                      # plain-text prompt/completion
    completion: str | None = None
    text: str | None = None


@dataclass
class Example:
    """A verification example: token ids and the human-readable texts the facts are read from."""
    line: int
    prompt_ids: list[int]
    answer_ids: list[int]      # the reference answer, ending with the end-of-turn token when it has one
    prompt_text: str           # the user-visible prompt (message contents, no template markup)
    answer_text: str           # the reference answer as written in the file
    meta: dict[str, Any] = field(default_factory=dict)


def _where(path: Path, line: int | None = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _check_messages(path: Path, n: int, msgs: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise GraphkitError(f'{_where(path, n)}: "{key}" must be a non-empty list of {{"role", "content"}} objects')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise GraphkitError(f'{_where(path, n)}: {key}[{i}] must be an object with "role" and "content" '
                                f'strings, e.g. {{"role": "user", "content": "..."}}')
        if not isinstance(m["content"], str):
            raise GraphkitError(f'{_where(path, n)}: {key}[{i}]["content"] is a {type(m["content"]).__name__}; '
                                f'give the message text as a string')
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _parse(path: Path, n: int, obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise GraphkitError(f"{_where(path, n)}: a JSON {type(obj).__name__}, not an object; "
                            f"write one object per line: {FORMATS_HINT}")
    if "messages" in obj:
        return Record(n, "messages", messages=_check_messages(path, n, obj["messages"], "messages"))
    if "prompt" in obj or "completion" in obj:
        if "prompt" not in obj or "completion" not in obj:
            missing = "completion" if "prompt" in obj else "prompt"
            raise GraphkitError(f'{_where(path, n)}: has "{"prompt" if missing == "completion" else "completion"}" '
                                f'but no "{missing}"; give both, e.g. {{"prompt": "...", "completion": "..."}}')
        p, c = obj["prompt"], obj["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return Record(n, "prompt_completion", prompt=p, completion=c)
        if isinstance(p, list) and isinstance(c, list):
            return Record(n, "prompt_completion", messages=_check_messages(path, n, p, "prompt")
                          + _check_messages(path, n, c, "completion"))
        raise GraphkitError(f'{_where(path, n)}: "prompt" and "completion" must both be strings or both be '
                            f'message lists (got {type(p).__name__} and {type(c).__name__})')
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise GraphkitError(f'{_where(path, n)}: "text" must be a non-empty string')
        return Record(n, "text", text=obj["text"])
    keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
    raise GraphkitError(f"{_where(path, n)}: unknown record (keys {keys}); each line must be {FORMATS_HINT}")


def read_records(path: str | Path, what: str = "data") -> list[Record]:
    """Parse and check every line of a JSONL file (no tokenizer needed). ``what`` names the file's
    role in messages ("calibration", "validation")."""
    path = Path(path)
    if path.is_dir():
        raise GraphkitError(f"{path}: is a folder; give the {what} JSONL file (one JSON object per line)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise GraphkitError(f"{path}: no such {what} file; give the JSONL file you fine-tuned with "
                            f"(one JSON object per line)") from None
    except OSError as exc:
        raise GraphkitError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one): harmless
        raw = raw[3:]
    records: list[Record] = []
    for n, bline in enumerate(raw.split(b"\n"), start=1):
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GraphkitError(f"{_where(path, n)}: not UTF-8 text (byte 0x{bline[exc.start]:02x} at column "
                                f"{exc.start + 1}); re-save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ("the file looks like one JSON array or a pretty-printed object; write one object per line "
                    "(JSONL)" if n == 1 and line.strip() in ("[", "{") else
                    f"each line must be one complete JSON object (JSONL): {FORMATS_HINT}")
            raise GraphkitError(f"{_where(path, n)}: not valid JSON ({exc.msg} at column {exc.colno}); {hint}") from None
        records.append(_parse(path, n, obj))
    if not records:
        raise GraphkitError(f"{path}: no records (the file is empty); give one JSON object per line: {FORMATS_HINT}")
    return records


# ---------------------------------------------------------------- tokenizing


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:
        raise GraphkitError(f"{tokenizer_dir}: cannot load the tokenizer ({str(exc).splitlines()[0][:150]})") from None


def model_context(model_dir: str | Path) -> int | None:
    """The model's context length (``max_position_embeddings`` of config.json), None when not stated."""
    cfg = Path(model_dir) / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    n = data.get("max_position_embeddings") or data.get("text_config", {}).get("max_position_embeddings")
    return int(n) if isinstance(n, int) and n > 0 else None


def _render(tok, path: Path, rec: Record, messages: list[dict], generation_prompt: bool) -> str:
    if not tok.chat_template:
        raise GraphkitError(f"{_where(path, rec.line)}: chat messages need a chat template, and the model's "
                            f"tokenizer has none; add one to tokenizer_config.json or give "
                            f'{{"prompt": "...", "completion": "..."}} strings')
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    except Exception as exc:  # a template that raises (e.g. roles must alternate) names its own problem
        raise GraphkitError(f"{_where(path, rec.line)}: the chat template refused these messages "
                            f"({str(exc).splitlines()[0][:150]}); fix the roles or their order") from None


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _check_length(path: Path, line: int, n_tokens: int, max_len: int | None, context_source: str) -> None:
    if max_len is not None and n_tokens > max_len:
        raise GraphkitError(f"{_where(path, line)}: sample is {n_tokens} tokens, longer than the model's context "
                            f"({max_len} tokens, {context_source}); shorten or split it, or remove the line")


def _select(records: list[Record], limit: int | None) -> list[Record]:
    return records if limit is None else records[:max(int(limit), 0)]


def calibration_sequences(path: str | Path, tokenizer_dir: str | Path, max_len: int | None = None,
                          limit: int | None = None, tokenizer=None) -> list[list[int]]:
    """Token ids of each sample's whole text (the conversation through the chat template), in file order.

    ``max_len`` defaults to the context of the model in ``tokenizer_dir`` (its config.json); every line
    is checked (not just the first ``limit``), so a bad file is refused whatever the sample count."""
    path = Path(path)
    records = read_records(path, "calibration")
    tok = tokenizer or load_tokenizer(tokenizer_dir)
    if max_len is None:
        max_len = model_context(tokenizer_dir)
    source = f"max_position_embeddings in {Path(tokenizer_dir) / 'config.json'}"
    seqs = []
    for rec in records:
        if rec.kind == "text":
            ids = _encode(tok, rec.text)
        elif rec.messages is not None:
            ids = _encode(tok, _render(tok, path, rec, rec.messages, False))
        else:
            ids = _encode(tok, rec.prompt + rec.completion)
        _check_length(path, rec.line, len(ids), max_len, source)
        seqs.append(ids)
    return _select(seqs, limit)  # type: ignore[arg-type]


def _eos_ids(tok, tokenizer_dir: Path) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    try:
        gen = json.loads((tokenizer_dir / "generation_config.json").read_text(encoding="utf-8"))
        e = gen.get("eos_token_id")
        ids |= set(e if isinstance(e, list) else [e] if isinstance(e, int) else [])
    except (OSError, json.JSONDecodeError):
        pass
    return ids


def eos_token_ids(tokenizer_dir: str | Path, tokenizer=None) -> set[int]:
    """End-of-turn ids: the tokenizer's eos and generation_config.json's eos_token_id(s)."""
    return _eos_ids(tokenizer or load_tokenizer(tokenizer_dir), Path(tokenizer_dir))


def read_validation_records(path: str | Path) -> list[Record]:
    """read_records plus what verification needs: every record has a reference answer (no tokenizer)."""
    path = Path(path)
    records = read_records(path, "validation")
    for rec in records:
        if rec.kind == "text":
            raise GraphkitError(f'{_where(path, rec.line)}: a {{"text"}} record has no reference answer; '
                                f'give {{"messages": [...]}} ending with the assistant\'s answer, or '
                                f'{{"prompt": ..., "completion": ...}}')
        if rec.messages is not None and (rec.messages[-1]["role"] != "assistant" or len(rec.messages) < 2):
            raise GraphkitError(f"{_where(path, rec.line)}: the last message must be the assistant's reference "
                                f"answer after at least one user message (got roles "
                                f"{[m['role'] for m in rec.messages]})")
    return records


def verification_examples(path: str | Path, tokenizer_dir: str | Path, max_len: int | None = None,
                          limit: int | None = None, tokenizer=None) -> list[Example]:
    """(prompt, reference answer) pairs: the prompt is everything before the last assistant turn
    (with the generation prompt), the answer is that turn through its end-of-turn token."""
    path, tokenizer_dir = Path(path), Path(tokenizer_dir)
    records = read_validation_records(path)
    tok = tokenizer or load_tokenizer(tokenizer_dir)
    if max_len is None:
        max_len = model_context(tokenizer_dir)
    source = f"max_position_embeddings in {tokenizer_dir / 'config.json'}"
    eos = _eos_ids(tok, tokenizer_dir)
    out = []
    for rec in records:
        if rec.messages is not None:
            prompt_msgs, answer = rec.messages[:-1], rec.messages[-1]["content"]
            prompt_str = _render(tok, path, rec, prompt_msgs, True)
            full_str = _render(tok, path, rec, rec.messages, False)
            prompt_text = "\n".join(m["content"] for m in prompt_msgs if m["role"] != "system")
        else:
            prompt_str, full_str, answer, prompt_text = rec.prompt, rec.prompt + rec.completion, rec.completion, rec.prompt
        prompt_ids, full_ids = _encode(tok, prompt_str), _encode(tok, full_str)
        if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            answer_ids = full_ids[len(prompt_ids):]
        else:  # a template that rewrites earlier turns, or a merge across the boundary: encode the answer alone
            answer_ids = _encode(tok, answer)
        # Up to and including the end-of-turn token: what follows it (a newline) is not the answer.
        cut = next((i for i, t in enumerate(answer_ids) if t in eos), None)
        if cut is not None:
            answer_ids = answer_ids[:cut + 1]
        elif rec.messages is None and tok.eos_token_id is not None:
            answer_ids = answer_ids + [tok.eos_token_id]  # what TRL appends to a plain completion
        if not answer_ids:
            raise GraphkitError(f"{_where(path, rec.line)}: the reference answer is empty; give the expected answer")
        _check_length(path, rec.line, len(prompt_ids) + len(answer_ids), max_len, source)
        out.append(Example(rec.line, prompt_ids, answer_ids, prompt_text, answer))
    return _select(out, limit)  # type: ignore[arg-type]
