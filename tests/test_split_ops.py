"""Splitting one huge MatMul/Gemm into column chunks + Concat: same outputs, more nodes to cut."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from partitioner.split_ops import OpSplit, SplitError, split_costs, split_node

RNG = np.random.default_rng(0)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, initializers, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def matmul_model() -> onnx.ModelProto:
    """x [batch, seq, 8] -> Relu -> MatMul W [8, 13] -> y, the lm_head shape."""
    return _model(
        [
            helper.make_node("Relu", ["x"], ["h"], name="relu"),
            helper.make_node("MatMul", ["h", "w"], ["y"], name="head"),
        ],
        [_init("w", 8, 13)], ["batch", "seq", 8], ["batch", "seq", 13],
    )


def gemm_model(trans_b: int) -> onnx.ModelProto:
    w = _init("w", 13, 8) if trans_b else _init("w", 8, 13)
    return _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b, alpha=0.5, beta=2.0)],
        [w, _init("b", 13)], ["batch", 8], ["batch", 13],
    )


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("parts", [2, 3, 4, 13])
def test_matmul_split_gives_the_same_outputs_and_k_parts_plus_a_concat(parts):
    model = matmul_model()
    split, info = split_node(model, "head", parts)
    onnx.checker.check_model(split, full_check=True)
    assert info == OpSplit("head", "MatMul", parts, 13)
    ops = [n.op_type for n in split.graph.node]
    assert ops.count("MatMul") == parts and ops.count("Concat") == 1
    assert len(split.graph.node) == len(model.graph.node) + parts
    assert "w" not in {i.name for i in split.graph.initializer}  # no second copy of the weight
    x = RNG.standard_normal((3, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(run(split, x), run(model, x), rtol=1e-6, atol=1e-6)
    widths = {
        v.name: v.type.tensor_type.shape.dim[-1].dim_value
        for v in split.graph.value_info if "_part" in v.name
    }
    assert sorted(widths.values()) == sorted(len(c) for c in np.array_split(range(13), parts))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_split_keeps_alpha_beta_and_splits_its_bias(trans_b):
    model = gemm_model(trans_b)
    split, _ = split_node(model, "fc", 3)
    onnx.checker.check_model(split, full_check=True)
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(run(split, x), run(model, x), rtol=1e-6, atol=1e-6)


def test_a_tied_weight_stays_for_its_other_reader():
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="head"),
            helper.make_node("MatMul", ["h", "wt"], ["y"], name="back"),
        ],
        [_init("w", 8, 6), _init("wt", 6, 8)], ["batch", 8], ["batch", 8],
    )
    model.graph.node[1].input[1] = "w_t_reader"
    model.graph.node.insert(0, helper.make_node("Transpose", ["w"], ["w_t_reader"], name="tie"))
    split, _ = split_node(model, "head", 2)
    assert "w" in {i.name for i in split.graph.initializer}
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(run(split, x), run(model, x), rtol=1e-6, atol=1e-6)


def test_costs_are_shared_in_proportion_to_columns():
    costs = {"relu": 1.0, "head": 130.0}
    out = split_costs(costs, OpSplit("head", "MatMul", 3, 13))
    assert out == pytest.approx(
        {"relu": 1.0, "head_part0": 50.0, "head_part1": 40.0, "head_part2": 40.0, "head_concat": 0.0}
    )
    assert sum(out.values()) == pytest.approx(sum(costs.values()))


def test_only_constant_weight_matmuls_split():
    model = _model(
        [helper.make_node("MatMul", ["x", "x"], ["y"], name="square")], [], [4, 4], [4, 4]
    )
    with pytest.raises(SplitError, match="constant 2-D weight"):
        split_node(model, "square", 2)
    with pytest.raises(SplitError, match="no node named"):
        split_node(matmul_model(), "nope", 2)
    with pytest.raises(SplitError, match="13 output columns"):
        split_node(matmul_model(), "head", 14)
