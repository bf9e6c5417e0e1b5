"""kv-rename: give a decoder graph the I/O names and dims that Transformers.js expects.

Target contract: inputs ``input_ids``, ``attention_mask``, ``position_ids`` (if the graph has one),
``past_key_values.{i}.key`` / ``.value``; outputs ``logits``, ``present.{i}.key`` / ``.value``; dims
``batch_size``, ``sequence_length``, ``past_sequence_length``, ``total_sequence_length``; KV heads
and head dim static numbers (Transformers.js 4.x builds the empty past from the graph's input
metadata: ``batch_size`` -> batch, any other symbol -> 0).

Everything is identified from the graph, never from the digits in the names:

* **KV inputs**: float rank-4 graph inputs. From each, the pass walks forward through data movement
  (Concat, Reshape, Transpose, Unsqueeze, Expand, Slice, Cast, Identity, Tile, Mul/Div by a
  constant); Shape/Size reads are ignored.
* **Pairing**: the graph output reached on that walk (the ``Concat`` that appends the new key/value
  to the past and produces the present output, possibly through Cast/Identity) is its present.
  For fused attention ops the present is the op's matching output (``GroupQueryAttention`` /
  ``MultiHeadAttention``: past key/value inputs 3/4 resp. 6/7 -> outputs 1/2).
* **Key or value, and layer**: the walk ends at the attention computation. Decomposed attention:
  a ``MatMul`` whose result flows into a ``Softmax`` reads the *key*; a ``MatMul`` whose other
  operand comes from a ``Softmax`` reads the *value*; the two belong to the same layer when it is
  the same Softmax. Fused attention: the op is the layer, the lower input slot is the key. Only if
  the graph cannot tell key from value do name hints (``key``/``keys``/``k_cache`` vs.
  ``value``/``values``/``v_cache``) decide.
* **Layer order**: layers are sorted by the dependency depth of their attention node (longest path
  from the graph inputs), i.e. the order in which the graph uses them.
* ``input_ids``: the int rank-2 input that feeds the indices of the embedding ``Gather`` /
  ``GatherBlockQuantized`` (constant table). ``position_ids``: the other int rank-2 input that is
  closer to ``Cos``/``Sin``/``RotaryEmbedding`` than to mask operations (Cast to bool,
  comparisons, And/Or/Not, ReduceSum, Where); ``attention_mask``: the one closer to mask
  operations. ``logits``: the one float output that is not a present.
* **Static dims**: a symbolic KV head dim (onnxruntime-genai writes ``kv_cache_dim``) or KV-heads
  dim is replaced by a number from, in order: options ``head_dim=``/``kv_heads=``, ``config=``
  (config.json: ``num_key_value_heads``, ``head_dim`` or ``hidden_size/num_attention_heads``),
  static dims of the other KV tensors, the ``kv_num_heads`` attribute of fused attention, the
  shape ONNX inference gives the new key/value concatenated to the past, and the output width N of
  the key projection (``MatMul`` weight / ``MatMulNBits`` N) divided by the KV heads. Sources that
  disagree are an error. Numeric dim strings (e.g. ``"32"``, written by transformers' exporter)
  become numbers.

Ambiguity (a past without a present, a past reaching two outputs, two candidates for one name,
a layer without exactly one key and one value, key/value undecidable) raises GraphkitError listing
the candidates. A graph that already has the canonical names and dims, or has no KV-cache input at
all, is PassNotApplicable.
Renames update every node (subgraphs included) and value_info. Tolerance: exact.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from graphkit.errors import GraphkitError, PassNotApplicable, PostconditionError
from graphkit.passbase import GraphPass, PassResult, Tolerance, option
from graphkit import tjs_contract as tjs
from passes._graph import Graph, infer_shapes, rename_values

FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
INTS = {TensorProto.INT64, TensorProto.INT32}
PASS_THROUGH = frozenset({"Concat", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Slice", "Cast",
                          "Identity", "Tile", "Flatten"})
SHAPE_OPS = frozenset({"Shape", "Size"})
#: fused attention ops: past input slot -> (role, present output slot)
FUSED_KV_SLOTS = {"GroupQueryAttention": {3: ("key", 1), 4: ("value", 2)},
                  "MultiHeadAttention": {6: ("key", 1), 7: ("value", 2)},
                  "DecoderMaskedMultiHeadAttention": {5: ("key", 1), 6: ("value", 2)}}
SCORE_PATH = frozenset({"Mul", "Div", "Add", "Sub", "Where", "Reshape", "Transpose", "Cast", "Slice", "Unsqueeze",
                        "Squeeze", "Expand", "Identity", "Tanh"})
PROBS_PATH = frozenset({"Where", "Cast", "Reshape", "Transpose", "Identity", "Dropout", "Slice", "Unsqueeze",
                        "Squeeze", "Expand"})
ROTARY_OPS = frozenset({"Cos", "Sin", "RotaryEmbedding"})
MASK_OPS = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
                      "ReduceSum", "Where"})
CANON_PAST, CANON_PRESENT = tjs.PAST_RE, tjs.PRESENT_RE
KEY_HINT = re.compile(r"(^|[._/\-])(key|keys|k|k_cache|key_cache)([._/\-\d]|$)", re.I)
VALUE_HINT = re.compile(r"(^|[._/\-])(value|values|v|v_cache|value_cache)([._/\-\d]|$)", re.I)


@dataclass
class KvRenameOptions:
    head_dim: int | None = option(None, "KV head dim to write where the graph has a symbol (default: from the graph)")
    kv_heads: int | None = option(None, "number of KV heads to write where the graph has a symbol (default: from "
                                        "the graph)")
    config: str | None = option(None, "config.json to read num_key_value_heads / head_dim from")


@dataclass
class KvEntry:
    past: str
    present: str
    role: str        # "key" | "value"
    layer: int


@dataclass
class Plan:
    renames: dict[str, str]
    entries: list[KvEntry]
    roles: dict[str, str]        # canonical I/O name -> old name
    dims: dict[str, list]        # final name -> target dims (int | str | None=keep)
    kv_heads: int | None
    head_dim: int | None
    notes: list[str]


def _dims(vi: onnx.ValueInfoProto) -> list:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return []
    out = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.dim_param:
            out.append(int(d.dim_param) if d.dim_param.strip().isdigit() else d.dim_param)
        else:
            out.append(None)
    return out


def _rank(vi) -> int | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return len(vi.type.tensor_type.shape.dim)


def _etype(vi) -> int:
    return vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0


class _KvGraph(Graph):
    """The shared graph layer (``passes/_graph.py``) plus the two walks kv-rename needs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model, with_info=False)
        self.nodes = list(self.graph.node)
        self.inputs = {vi.name: vi for vi in self.graph.input if vi.name not in self.inits}
        self.outputs = {vi.name: vi for vi in self.graph.output}
        self._depth: list[int] | None = None

    def depth(self) -> list[int]:
        if self._depth is None:
            level: dict[str, int] = {}
            d = []
            for n in self.nodes:  # graph.node is topologically sorted (ONNX requirement)
                lv = 1 + max((level.get(x, 0) for x in n.input if x), default=0)
                d.append(lv)
                for o in n.output:
                    level[o] = lv
            self._depth = d
        return self._depth

    def forward_distance(self, start: str, targets, skip=SHAPE_OPS, limit: int = 400) -> int | None:
        """Fewest nodes from tensor ``start`` to a node whose op is in ``targets`` (not through ``skip``)."""
        seen = {start}
        q = deque([(start, 0)])
        visited_nodes = 0
        while q:
            t, d = q.popleft()
            for n, _s in self.uses(t):
                if n.op_type in skip:
                    continue
                if targets(n):
                    return d + 1
                visited_nodes += 1
                if visited_nodes > limit:
                    return None
                for o in n.output:
                    if o and o not in seen:
                        seen.add(o)
                        q.append((o, d + 1))
        return None


def _is_mask_node(n: onnx.NodeProto) -> bool:
    if n.op_type == "Cast":
        return any(a.name == "to" and a.i == TensorProto.BOOL for a in n.attribute)
    return n.op_type in MASK_OPS


class KvRenamePass(GraphPass):
    """Rename decoder I/O and dims to Transformers.js's (past_key_values.N.key, present.N.key, ...)."""

    name = "kv-rename"
    Options = KvRenameOptions
    tolerance = Tolerance("exact", 0.0, "the graph before the pass", "only names and shape metadata change")
    mutates_input = False

    def validate_options(self) -> None:
        o = self.options
        for k in ("head_dim", "kv_heads"):
            v = getattr(o, k)
            if v is not None and v <= 0:
                raise GraphkitError(f"kv-rename: {k} must be a positive integer, got {v}")
        if o.config is not None and not Path(o.config).is_file():
            raise GraphkitError(f"kv-rename: config file {o.config} not found")

    def match(self, model: onnx.ModelProto) -> Plan:
        plan = self.plan(model)
        if not self._changes(model, plan):
            raise PassNotApplicable("I/O names and dims are already canonical")
        return plan

    # -------------------------------------------------------------------------------------------
    def plan(self, model: onnx.ModelProto) -> Plan:
        G = _KvGraph(model)
        notes: list[str] = []
        kv_inputs = [n for n, vi in G.inputs.items() if _etype(vi) in FLOATS and _rank(vi) == 4]
        if not kv_inputs:
            raise PassNotApplicable("no KV-cache inputs (float rank-4 graph inputs): not a decoder with past")
        entries_raw = []  # (past, present, role|None, anchor_key, slot)
        for p in kv_inputs:
            entries_raw.append(self._trace_past(G, p))
        # presents must be unique
        by_present: dict[str, list[str]] = defaultdict(list)
        for e in entries_raw:
            by_present[e["present"]].append(e["past"])
        dup = {k: v for k, v in by_present.items() if len(v) > 1}
        if dup:
            k, v = next(iter(dup.items()))
            raise GraphkitError(f"kv-rename: ambiguous KV pairing: output '{k}' is reached from several past inputs "
                                f"({', '.join(v)})")
        # layers: group by anchor, order by depth
        groups: dict[object, list[dict]] = defaultdict(list)
        for e in entries_raw:
            groups[e["anchor"]].append(e)
        ordered = sorted(groups.items(), key=lambda kv: kv[1][0]["anchor_depth"])
        depths = [grp[0]["anchor_depth"] for _, grp in ordered]
        if len(set(depths)) != len(depths):
            raise GraphkitError("kv-rename: cannot order the layers: two attention blocks sit at the same graph depth "
                                f"({', '.join(str([e['past'] for e in grp]) for _, grp in ordered)})")
        entries: list[KvEntry] = []
        for layer, (_anchor, grp) in enumerate(ordered):
            roles = self._resolve_roles(grp)
            for e in grp:
                entries.append(KvEntry(e["past"], e["present"], roles[e["past"]], layer))

        # other I/O ---------------------------------------------------------------------------------
        renames: dict[str, str] = {}
        roles_map: dict[str, str] = {}
        for e in entries:
            renames[e.past] = tjs.past_name(e.layer, e.role)
            renames[e.present] = tjs.present_name(e.layer, e.role)
        kv_in = {e.past for e in entries}
        kv_out = {e.present for e in entries}
        stray = [n for n, vi in G.outputs.items() if n not in kv_out and _etype(vi) in FLOATS and _rank(vi) == 4
                 and entries]
        if stray:
            raise GraphkitError(f"kv-rename: cannot pair output(s) {', '.join(stray)} with a past input; "
                                f"paired: {', '.join(sorted(kv_out)) or '(none)'}")

        int_inputs = [n for n, vi in G.inputs.items()
                      if n not in kv_in and _etype(vi) in INTS and _rank(vi) in (2, None)]
        ids = self._find_input_ids(G, int_inputs)
        roles_map[tjs.INPUT_IDS] = ids
        rest = [n for n in int_inputs if n != ids]
        pos, mask = self._classify_pos_mask(G, rest)
        if pos:
            roles_map[tjs.POSITION_IDS] = pos
        if mask:
            roles_map[tjs.ATTENTION_MASK] = mask
        logits = self._find_logits(G, kv_out)
        if logits:
            roles_map[tjs.LOGITS] = logits
        for canon, old in roles_map.items():
            renames[old] = canon

        # dims --------------------------------------------------------------------------------------
        kv_heads, head_dim = self._static_kv_dims(G, entries, notes)
        dims: dict[str, list] = {}
        for canon, old in roles_map.items():
            vi = G.inputs.get(old) or G.outputs.get(old)
            cur = _dims(vi)
            axes = tjs.IO_AXES[canon]  # input_ids, position_ids, attention_mask: rank 2; logits: [batch, seq, vocab]
            want = [axes[0], axes[1]] + ([None] * max(0, len(cur) - 2) if canon == tjs.LOGITS else [])
            dims[canon] = self._merge_dims(cur, want, canon)
        for e in entries:
            for old, new, seq in ((e.past, renames[e.past], tjs.PAST_SEQUENCE),
                                  (e.present, renames[e.present], tjs.TOTAL_SEQUENCE)):
                vi = G.inputs.get(old) or G.outputs.get(old)
                cur = _dims(vi)
                if len(cur) != 4:
                    cur = [None] * 4
                dims[new] = self._merge_dims(cur, [tjs.BATCH, kv_heads, seq, head_dim], new)
        return Plan(renames, entries, roles_map, dims, kv_heads, head_dim, notes)

    @staticmethod
    def _merge_dims(cur: list, want: list, name: str) -> list:
        out = []
        for i in range(max(len(cur), len(want))):
            c = cur[i] if i < len(cur) else None
            w = want[i] if i < len(want) else None
            if isinstance(c, int):
                if isinstance(w, int) and w != c:
                    raise GraphkitError(f"kv-rename: '{name}' has static dim {i} = {c} but the graph/options say {w}")
                out.append(c)
            elif w is None:
                out.append(c)  # keep a symbol we have no canonical name for (e.g. vocab given as symbol)
            else:
                out.append(w)
        return out

    # -- KV tracing ----------------------------------------------------------------------------------
    def _trace_past(self, G: _KvGraph, past: str) -> dict:
        seen = {past}
        q = deque([past])
        anchors: list[tuple[int, int, str]] = []  # (node index, slot, tensor)
        reached_outputs: list[str] = []
        while q:
            t = q.popleft()
            if t in G.outputs and t != past:
                reached_outputs.append(t)
            for n, slot in G.uses(t):
                ci = G.position(n)
                if n.op_type in SHAPE_OPS:
                    continue
                through = n.op_type in PASS_THROUGH or (
                    n.op_type in ("Mul", "Div") and all(x == t or G.is_const(x) for x in n.input if x))
                if through:
                    for o in n.output:
                        if o and o not in seen:
                            seen.add(o)
                            q.append(o)
                else:
                    anchors.append((ci, slot, t))
        uniq = sorted({a[0] for a in anchors})
        if not uniq:
            raise GraphkitError(f"kv-rename: past input '{past}' does not reach an attention computation "
                                "(only shape reads or data movement); cannot tell its layer")
        if len(uniq) > 1:
            names = ", ".join(f"{G.nodes[i].op_type} '{G.nodes[i].name}'" for i in uniq[:4])
            raise GraphkitError(f"kv-rename: past input '{past}' feeds several attention computations ({names}); "
                                "ambiguous")
        ci, slot, _t = next(a for a in anchors if a[0] == uniq[0])
        anchor = G.nodes[ci]
        depth = G.depth()
        role = None
        anchor_key: object = ci
        anchor_depth = depth[ci]
        if anchor.op_type in FUSED_KV_SLOTS and slot in FUSED_KV_SLOTS[anchor.op_type]:
            role, out_slot = FUSED_KV_SLOTS[anchor.op_type][slot]
            if not reached_outputs and out_slot < len(anchor.output) and anchor.output[out_slot]:
                reached_outputs = self._follow_to_outputs(G, anchor.output[out_slot])
        elif anchor.op_type == "MatMul":
            sm = self._softmax_after(G, ci)
            if sm is not None:
                role, anchor_key = "key", ("softmax", sm)
                anchor_depth = depth[sm]
            else:
                other = anchor.input[1 - slot] if slot in (0, 1) else None
                sm = self._softmax_before(G, other) if other else None
                if sm is not None:
                    role, anchor_key = "value", ("softmax", sm)
                    anchor_depth = depth[sm]
        else:
            anchor_key = ("fused", ci)
        if not reached_outputs:
            raise GraphkitError(f"kv-rename: cannot pair past input '{past}' with a present output: no graph output "
                                f"is the past concatenated with new values (it reaches {anchor.op_type} "
                                f"'{anchor.name}')")
        if len(set(reached_outputs)) > 1:
            raise GraphkitError(f"kv-rename: past input '{past}' reaches several outputs "
                                f"({', '.join(sorted(set(reached_outputs)))}); ambiguous pairing")
        return {"past": past, "present": reached_outputs[0], "role": role, "anchor": anchor_key,
                "anchor_depth": anchor_depth, "slot": slot, "anchor_op": anchor.op_type}

    @staticmethod
    def _follow_to_outputs(G: _KvGraph, t: str) -> list[str]:
        out, q, seen = [], deque([t]), {t}
        while q:
            x = q.popleft()
            if x in G.outputs:
                out.append(x)
            for n, _s in G.uses(x):
                if n.op_type in ("Cast", "Identity"):
                    for o in n.output:
                        if o not in seen:
                            seen.add(o)
                            q.append(o)
        return out

    @staticmethod
    def _softmax_after(G: _KvGraph, ci: int, limit: int = 8) -> int | None:
        frontier = [ci]
        for _ in range(limit):
            nxt = []
            for i in frontier:
                for o in G.nodes[i].output:
                    for c, _s in G.uses(o):
                        cj, op = G.position(c), c.op_type
                        if op == "Softmax":
                            return cj
                        if op in SCORE_PATH:
                            nxt.append(cj)
            frontier = nxt
            if not frontier:
                break
        return None

    @staticmethod
    def _softmax_before(G: _KvGraph, t: str, limit: int = 8) -> int | None:
        frontier = [t]
        for _ in range(limit):
            nxt = []
            for x in frontier:
                n = G.producer(x)
                if n is None:
                    continue
                if n.op_type == "Softmax":
                    return G.position(n)
                if n.op_type in PROBS_PATH or n.op_type == "IsNaN":
                    nxt.extend(i for i in n.input if i and not G.is_const(i))
            frontier = nxt
            if not frontier:
                break
        return None

    @staticmethod
    def _resolve_roles(grp: list[dict]) -> dict[str, str]:
        pasts = [e["past"] for e in grp]
        if len(grp) != 2:
            raise GraphkitError(f"kv-rename: an attention block reads {len(grp)} past input(s) ({', '.join(pasts)}); "
                                "expected one key and one value")
        roles = {e["past"]: e["role"] for e in grp}
        if sorted(r for r in roles.values() if r) == ["key", "value"]:
            return roles
        known = [r for r in roles.values() if r]
        if len(known) == 1:  # the other one is the complement
            other = "value" if known[0] == "key" else "key"
            return {p: (r or other) for p, r in roles.items()}
        if not known and all(e["anchor_op"] not in ("MatMul",) for e in grp):
            a, b = sorted(grp, key=lambda e: e["slot"])  # unknown fused op: lower input slot is the key
            return {a["past"]: "key", b["past"]: "value"}
        hints = {p: ("key" if KEY_HINT.search(p) and not VALUE_HINT.search(p) else
                     "value" if VALUE_HINT.search(p) and not KEY_HINT.search(p) else None) for p in pasts}
        if sorted(h for h in hints.values() if h) == ["key", "value"]:
            return hints
        raise GraphkitError(f"kv-rename: cannot tell key from value for past inputs {', '.join(pasts)} "
                            "(graph and names are inconclusive)")

    # -- other I/O -----------------------------------------------------------------------------------
    @staticmethod
    def _find_input_ids(G: _KvGraph, candidates: list[str]) -> str:
        found: dict[str, int] = {}
        for c in candidates:
            seen, q = {c}, deque([c])
            while q:
                t = q.popleft()
                for n, slot in G.uses(t):
                    if n.op_type in ("Gather", "GatherBlockQuantized") and slot == 1 and G.is_const(n.input[0]):
                        rows = 0
                        if n.input[0] in G.inits:
                            dims = list(G.inits[n.input[0]].dims)
                            rows = dims[0] if dims else 0
                        found[c] = max(found.get(c, 0), rows or 1)
                    elif n.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"):
                        for o in n.output:
                            if o not in seen:
                                seen.add(o)
                                q.append(o)
        if not found:
            raise GraphkitError("kv-rename: no integer input feeds the embedding Gather; cannot identify input_ids "
                                f"(int inputs: {', '.join(candidates) or 'none'})")
        if len(found) == 1:
            return next(iter(found))
        best = sorted(found.items(), key=lambda kv: -kv[1])
        if best[0][1] > best[1][1]:
            return best[0][0]  # e.g. GPT-2: token table (vocab rows) vs. position table
        raise GraphkitError(f"kv-rename: several inputs feed an embedding Gather ({', '.join(found)}); "
                            "cannot tell which is input_ids")

    @staticmethod
    def _classify_pos_mask(G: _KvGraph, rest: list[str]) -> tuple[str | None, str | None]:
        pos, mask = [], []
        info = {}
        for r in rest:
            d_rot = G.forward_distance(r, lambda n: n.op_type in ROTARY_OPS)
            d_mask = G.forward_distance(r, _is_mask_node)
            info[r] = (d_rot, d_mask)
            if d_rot is not None and (d_mask is None or d_rot < d_mask):
                pos.append(r)
            elif d_mask is not None and (d_rot is None or d_mask < d_rot):
                mask.append(r)
            elif r == tjs.ATTENTION_MASK or "mask" in r.lower():
                mask.append(r)
            elif r == tjs.POSITION_IDS or "pos" in r.lower():
                pos.append(r)
            else:
                raise GraphkitError(f"kv-rename: cannot tell whether input '{r}' is attention_mask or position_ids "
                                    f"(distance to rotary/mask ops: {d_rot}/{d_mask})")
        if len(pos) > 1:
            raise GraphkitError(f"kv-rename: several position_ids candidates: {', '.join(pos)}")
        if len(mask) > 1:
            raise GraphkitError(f"kv-rename: several attention_mask candidates: {', '.join(mask)}")
        return (pos[0] if pos else None), (mask[0] if mask else None)

    @staticmethod
    def _find_logits(G: _KvGraph, kv_out: set[str]) -> str | None:
        cands = [n for n, vi in G.outputs.items() if n not in kv_out and _etype(vi) in FLOATS]
        if len(cands) <= 1:
            return cands[0] if cands else None
        named = [c for c in cands if c == tjs.LOGITS]
        if named:
            return named[0]
        raise GraphkitError(f"kv-rename: several float outputs could be logits: {', '.join(cands)}")

    # -- static KV dims ------------------------------------------------------------------------------
    def _static_kv_dims(self, G: _KvGraph, entries: list[KvEntry], notes: list[str]) -> tuple[int | None, int | None]:
        if not entries:
            return None, None
        heads: dict[str, set[int]] = defaultdict(set)
        hdim: dict[str, set[int]] = defaultdict(set)
        o = self.options
        if o.kv_heads:
            heads["option kv_heads"].add(o.kv_heads)
        if o.head_dim:
            hdim["option head_dim"].add(o.head_dim)
        if o.config:
            try:
                cfg = json.loads(Path(o.config).read_text())
            except (OSError, ValueError) as exc:
                raise GraphkitError(f"kv-rename: cannot read {o.config}: {exc}") from None
            cfg = cfg.get("text_config", cfg)
            nh = cfg.get("num_attention_heads")
            kvh = cfg.get("num_key_value_heads", nh)
            if kvh:
                heads["config"].add(int(kvh))
            hd = cfg.get("head_dim") or (cfg["hidden_size"] // nh if nh and cfg.get("hidden_size") else None)
            if hd:
                hdim["config"].add(int(hd))
        for e in entries:
            for name in (e.past, e.present):
                vi = G.inputs.get(name) or G.outputs.get(name)
                d = _dims(vi)
                if len(d) == 4:
                    if isinstance(d[1], int):
                        heads["graph I/O"].add(d[1])
                    if isinstance(d[3], int):
                        hdim["graph I/O"].add(d[3])
        # fused attention attributes
        for n in G.nodes:
            if n.op_type in FUSED_KV_SLOTS:
                for a in n.attribute:
                    if a.name == "kv_num_heads" and n.op_type == "GroupQueryAttention":
                        heads["GroupQueryAttention.kv_num_heads"].add(a.i)
        # inferred shapes of what is concatenated to the past, and the key projection width
        shapes = _infer_shapes(G.model)
        proj_n: set[int] = set()
        for e in entries:
            for n, _slot in G.uses(e.past):
                if n.op_type != "Concat":
                    continue
                for x in n.input:
                    if x == e.past or not x:
                        continue
                    s = shapes.get(x)
                    if s and len(s) == 4:
                        if isinstance(s[1], int) and s[1] > 0:
                            heads["inferred shapes"].add(s[1])
                        if isinstance(s[3], int) and s[3] > 0:
                            hdim["inferred shapes"].add(s[3])
                    if e.role == "key":
                        w = self._projection_width(G, x)
                        if w:
                            proj_n.add(w)
            for n, _slot in G.uses(e.past):
                if n.op_type == "GroupQueryAttention" and e.role == "key":
                    w = self._projection_width(G, n.input[1]) if len(n.input) > 1 and n.input[1] else None
                    if w:
                        proj_n.add(w)
        kv = self._agree("KV heads", heads)
        if proj_n and kv:
            for w in proj_n:
                if w % kv == 0:
                    hdim["key projection width / KV heads"].add(w // kv)
        hd = self._agree("head dim", hdim)
        if kv is None or hd is None:
            missing = " and ".join(x for x, v in (("KV heads", kv), ("head dim", hd)) if v is None)
            raise GraphkitError(f"kv-rename: cannot determine the {missing} of the KV cache from the graph; "
                                "give kv_heads=/head_dim= or config=PATH/config.json")
        notes.append(f"kv_heads={kv} ({', '.join(heads)}), head_dim={hd} ({', '.join(hdim)})")
        return kv, hd

    @staticmethod
    def _agree(what: str, sources: dict[str, set[int]]) -> int | None:
        vals = {v for s in sources.values() for v in s}
        if len(vals) > 1:
            detail = "; ".join(f"{k}: {sorted(v)}" for k, v in sources.items())
            raise GraphkitError(f"kv-rename: sources disagree on the {what}: {detail}")
        return vals.pop() if vals else None

    @staticmethod
    def _projection_width(G: _KvGraph, t: str, limit: int = 40) -> int | None:
        """Output width N of the first constant-weight projection found walking back from ``t``."""
        seen, q = {t}, deque([t])
        steps = 0
        while q and steps < limit:
            x = q.popleft()
            steps += 1
            n = G.producer(x)
            if n is None:
                continue
            if n.op_type == "MatMulNBits":
                for a in n.attribute:
                    if a.name == "N":
                        return int(a.i)
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and G.is_const(n.input[1]):
                w = G.inits.get(n.input[1])
                dims = list(w.dims) if w is not None else list(np.shape(G.const(n.input[1])))
                if len(dims) == 2:
                    trans_b = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
                    return int(dims[0] if trans_b else dims[1])
            for i in n.input:
                if i and not G.is_const(i) and i not in seen and i not in G.inputs:
                    seen.add(i)
                    q.append(i)
        return None

    # -- apply ---------------------------------------------------------------------------------------
    def _changes(self, model: onnx.ModelProto, plan: Plan) -> bool:
        if any(k != v for k, v in plan.renames.items()):
            return True
        g = model.graph
        for vi in list(g.input) + list(g.output):
            want = plan.dims.get(vi.name)
            if want is None:
                continue
            if not _dims_equal(vi, want):
                return True
        return False

    def rewrite(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        renames = {k: v for k, v in plan.renames.items() if k != v}
        # a target name already used by an unrelated tensor: move that tensor aside first
        used = _all_names(g)
        sources = set(renames)
        for new in list(renames.values()):
            if new in used and new not in sources:
                i = 0
                while f"{new}_orig{i or ''}" in used:
                    i += 1
                renames[new] = f"{new}_orig{i or ''}"
        rename_values(g, renames)
        # old symbol -> new symbol, where the I/O use it unambiguously (e.g. transformers' "s10" -> batch_size)
        sym: dict[str, set[str]] = defaultdict(set)
        for vi in list(g.input) + list(g.output):
            want = plan.dims.get(vi.name)
            if want is None:
                continue
            for d, w in zip(vi.type.tensor_type.shape.dim, want):
                if d.dim_param and isinstance(w, str) and d.dim_param != w:
                    sym[d.dim_param].add(w)
            _set_dims(vi, want)
        sym_map = {k: next(iter(v)) for k, v in sym.items() if len(v) == 1}
        for vi in g.value_info:
            if vi.type.HasField("tensor_type"):
                for d in vi.type.tensor_type.shape.dim:
                    if d.dim_param in sym_map:
                        d.dim_param = sym_map[d.dim_param]
        # drop stale value_info of graph I/O (the I/O entries are authoritative)
        io = {vi.name for vi in list(g.input) + list(g.output)}
        keep = [vi for vi in g.value_info if vi.name not in io]
        del g.value_info[:]
        g.value_info.extend(keep)
        summary = (f"{len(plan.entries) // 2} layers; renamed {len(renames)} tensors; "
                   + "; ".join(plan.notes))
        details = {"renames": renames, "layers": len(plan.entries) // 2,
                   "kv_heads": plan.kv_heads, "head_dim": plan.head_dim,
                   "pairs": [(e.past, e.present, e.layer, e.role) for e in plan.entries]}
        return PassResult(out, True, summary, details)

    def ensures(self, model: onnx.ModelProto) -> None:
        g = model.graph
        names_in = {vi.name for vi in g.input}
        names_out = {vi.name for vi in g.output}
        past = [n for n in names_in if CANON_PAST.match(n)]
        layers = sorted({int(CANON_PAST.match(n).group(1)) for n in past})
        if layers != list(range(len(layers))):
            raise PostconditionError(f"kv-rename: layers are not 0..N-1: {layers}")
        for i in layers:
            for k in ("key", "value"):
                if tjs.past_name(i, k) not in names_in or tjs.present_name(i, k) not in names_out:
                    raise PostconditionError(f"kv-rename: layer {i} {k} is missing its past or present")
        for vi in list(g.input) + list(g.output):
            if CANON_PAST.match(vi.name) or CANON_PRESENT.match(vi.name):
                d = _dims(vi)
                if len(d) != 4 or not isinstance(d[1], int) or not isinstance(d[3], int):
                    raise PostconditionError(f"kv-rename: {vi.name} has non-static heads/head dim {d}")


# -------------------------------------------------------------------------------------------------
def _dims_equal(vi, want: list) -> bool:
    dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
    if len(dims) != len(want):
        return False
    for d, w in zip(dims, want):
        if isinstance(w, int):
            if not d.HasField("dim_value") or d.dim_value != w:
                return False
        elif w is None:
            if d.HasField("dim_value") or d.dim_param:
                return False
        elif d.dim_param != w:
            return False
    return True


def _set_dims(vi, want: list) -> None:
    tt = vi.type.tensor_type
    shape = tt.shape
    while len(shape.dim) < len(want):
        shape.dim.add()
    for d, w in zip(shape.dim, want):
        if isinstance(w, int):
            d.Clear()
            d.dim_value = w
        elif isinstance(w, str):
            d.Clear()
            d.dim_param = w
        else:
            d.Clear()


def _all_names(g: onnx.GraphProto) -> set[str]:
    names = {vi.name for vi in list(g.input) + list(g.output) + list(g.value_info)}
    names.update(t.name for t in g.initializer)
    for n in g.node:
        names.update(x for x in list(n.input) + list(n.output) if x)
    return names


def _infer_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Shapes from ONNX inference (with data propagation; the shared weight-free setup), without the
    model's own value_info (what inference finds, not what the exporter declared)."""
    try:
        inf = infer_shapes(model, data_prop=True, value_info=False)
    except Exception:
        return {}
    out = {}
    for vi in list(inf.graph.value_info) + list(inf.graph.output) + list(inf.graph.input):
        d = _dims(vi)
        if d:
            out[vi.name] = d
    return out
