"""The shared graph layer (passes/_graph.py) on tiny hand-built graphs: index, rules, names, edits."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes._graph import (Graph, fresh_name, infer_shapes, is_overridable, overridable, remove_unused, taken_names,
                           toposort, weight_free_copy)
from tiny_decoder import make_model, vi


def _model(ir_version: int = 8, weight_is_input: bool = False) -> onnx.ModelProto:
    """x[2,4] @ W[4,3] -> y; y + b -> z (output); Identity(W) -> w2 read by a second MatMul."""
    W = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    b = numpy_helper.from_array(np.ones(3, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Add", ["y", "b"], ["z"], name="add"),
             helper.make_node("Identity", ["W"], ["w2"], name="id"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2")]
    inputs = [vi("x", TensorProto.FLOAT, [2, 4])]
    if weight_is_input:
        inputs.append(vi("W", TensorProto.FLOAT, [4, 3]))
    return make_model(nodes, inputs, [vi("z", TensorProto.FLOAT, [2, 3]), vi("y2", TensorProto.FLOAT, [2, 3])],
                      [W, b], opset=17, ir_version=ir_version)


def test_producer_uses_and_typed_producer():
    G = Graph(_model())
    assert G.producer("y").name == "mm" and G.producer("x") is None and G.producer("W") is None
    assert [(n.name, s) for n, s in G.uses("x")] == [("mm", 0), ("mm2", 0)]
    assert [(n.name, s) for n, s in G.uses("W")] == [("mm", 1), ("id", 0)]
    assert G.node_of("y", "MatMul").name == "mm" and G.node_of("y", "Add") is None
    assert G.position(G.producer("z")) == 1
    assert G.only_user("y", G.producer("z")) and not G.only_user("z", G.producer("z"))  # z: graph output


def test_constants_through_identity_and_shapes():
    G = Graph(_model())
    np.testing.assert_array_equal(G.const("w2"), np.arange(12, dtype=np.float32).reshape(4, 3))
    assert G.is_const("w2") and G.const_root("w2") == "W" and not G.is_const("x")
    assert G.shape("y") == [2, 3] and G.elem_type("z") == TensorProto.FLOAT and G.last_dim("y2") == 3


@pytest.mark.parametrize("ir_version, overridden", [(8, True), (3, False)])
def test_the_overridable_rule(ir_version, overridden):
    """IR >= 4: an initializer that is also a graph input is a default, not a constant (IR 3: inputs must list
    every initializer, so it stays constant)."""
    m = _model(ir_version, weight_is_input=True)
    G = Graph(m)
    assert overridable(m) == ({"W"} if overridden else set())
    assert is_overridable(m, "W") is overridden and G.is_overridable("W") is overridden
    assert (G.const("W") is None) is overridden and (G.initializer("W") is None) is overridden
    assert ("W" in G.graph_inputs) is overridden
    assert not is_overridable(m, "b") and G.initializer("b") is not None


def test_fresh_names_are_unique_against_tensors_and_nodes():
    G = Graph(_model())
    assert G.fresh_name("y") == "y_1" and G.fresh_name("y") == "y_2"
    assert G.fresh_name("mm") == "mm_1"  # node names count too
    assert G.fresh_name("new") == "new"
    taken = taken_names(_model().graph)
    assert {"x", "W", "b", "y", "z", "w2", "y2", "mm", "add", "id", "mm2"} <= taken
    assert fresh_name("z", taken) == "z_1" and "z_1" in taken


def test_replace_all_uses_with_and_insert_after_keep_the_index_current():
    m = _model()
    G = Graph(m)
    mm = G.producer("y")
    G.replace_all_uses_with("y", "y_scaled")
    stored = G.insert_after(mm, helper.make_node("Mul", ["y", "b"], ["y_scaled"], name="scale"))
    assert [n.name for n in m.graph.node] == ["mm", "scale", "add", "id", "mm2"]
    assert G.producer("y_scaled") is stored and [n.name for n in G.users("y")] == ["scale"]
    assert [n.name for n in G.users("y_scaled")] == ["add"] and G.position(G.producer("z")) == 2
    onnx.checker.check_model(m)
    # a graph output follows: its readers and the output name move to the new tensor
    G.replace_all_uses_with("y2", "y2_new")
    assert [o.name for o in m.graph.output] == ["z", "y2_new"] and "y2_new" in G.graph_outputs


def test_rename_moves_producer_readers_outputs_and_initializers():
    m = _model()
    G = Graph(m)
    G.rename("W", "weight")
    G.rename("z", "out")
    assert [t.name for t in m.graph.initializer] == ["weight", "b"] and G.initializer("weight") is not None
    assert list(G.producer("out").output) == ["out"] and [o.name for o in m.graph.output][0] == "out"
    assert [(n.name, s) for n, s in G.uses("weight")] == [("mm", 1), ("id", 0)]
    onnx.checker.check_model(m)
    assert G.fresh_name("out") == "out_1"


def test_replace_all_uses_with_refuses_subgraph_reads():
    m = _model()
    then = helper.make_graph([helper.make_node("Identity", ["y"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "c"))
    m.graph.node.append(helper.make_node("If", ["c"], ["r"], then_branch=then, else_branch=then))
    with pytest.raises(ValueError, match="subgraph"):
        Graph(m).replace_all_uses_with("y", "y2")


def test_infer_shapes_runs_without_large_weights():
    """One shape-inference setup: large initializers become typed inputs, small ones stay (they can carry
    shapes), external ones never get read."""
    m = _model()
    sk = weight_free_copy(m, small_numel=4)
    assert [t.name for t in sk.graph.initializer] == ["b"] and "W" in {i.name for i in sk.graph.input}
    inf = infer_shapes(m, small_numel=4)
    dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inf.graph.value_info}
    assert dims["y"] == [2, 3] and dims["w2"] == [4, 3]
    assert len(m.graph.initializer) == 2  # the model itself is untouched


def test_cleanup_and_toposort():
    m = _model()
    m.graph.node.insert(0, helper.make_node("Neg", ["y"], ["dead"], name="dead"))  # out of order and unread
    toposort(m)
    assert [n.name for n in m.graph.node] == ["mm", "dead", "add", "id", "mm2"]
    assert remove_unused(m) == 1 and [n.name for n in m.graph.node] == ["mm", "add", "id", "mm2"]


def test_rename_values_is_simultaneous_and_reaches_subgraph_reads():
    """Swaps are fine, and a subgraph's read of an outer tensor follows the rename (its own names do not)."""
    from passes._graph import rename_values
    m = _model()
    then = helper.make_graph([helper.make_node("Identity", ["y"], ["t"]), helper.make_node("Neg", ["t"], ["u"])],
                             "then", [], [helper.make_tensor_value_info("u", TensorProto.FLOAT, None)])
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "c"))
    m.graph.node.append(helper.make_node("If", ["c"], ["r"], then_branch=then, else_branch=then))
    rename_values(m.graph, {"y": "z", "z": "y", "t": "q"})
    assert list(m.graph.node[0].output) == ["z"] and list(m.graph.node[1].input) == ["z", "b"]
    assert list(m.graph.node[1].output) == ["y"] and m.graph.output[0].name == "y"
    sub = m.graph.node[-1].attribute[0].g
    assert list(sub.node[0].input) == ["z"]  # the outer y, renamed
    assert list(sub.node[0].output) == ["t"] and list(sub.node[1].input) == ["t"]  # the subgraph's own t: untouched
