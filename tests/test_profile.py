"""Per-node profiling with ONNX Runtime's own profiler, and the static FLOP estimate."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from partitioner.export import export_onnx
from partitioner.loading import load_model
from partitioner.profile import (
    NodeProfile,
    ProfileError,
    _kernel_times,
    flops_costs,
    profile_feeds,
    profile_nodes,
)

MATRIX_OPS = {"Conv", "MatMul", "Gemm"}


@functools.cache
def resnet() -> onnx.ModelProto:
    return export_onnx(load_model("zoo:resnet18-tiny"))


def small_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def weight(name: str, *shape: int) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.ones(shape, dtype=np.float32), name)


def conv_model(channels_in: int, channels_out: int, kernel: int = 3, groups: int = 1):
    return small_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[kernel // 2] * 4,
                          group=groups)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels_in, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight("w", channels_out, channels_in // groups, kernel, kernel)],
    )


# ---- measured -------------------------------------------------------------------------------


def test_profile_covers_every_node_and_conv_dominates():
    model = resnet()
    profile = profile_nodes(model, runs=5, warmup=1, threads=1, progress=False)
    assert set(profile.costs) == {n.name for n in model.graph.node}
    assert all(c >= 0 for c in profile.costs.values())
    assert profile.total_us > 0 and profile.unmatched == []
    assert (profile.device, profile.provider, profile.batch, profile.runs) == (
        "cpu", "CPUExecutionProvider", 1, 5,
    )
    assert profile.seconds > 0
    ops = {n.name: n.op_type for n in model.graph.node}
    heaviest = sorted(profile.costs, key=profile.costs.get, reverse=True)[:3]
    assert {ops[n] for n in heaviest} <= MATRIX_OPS
    matrix_share = sum(c for n, c in profile.costs.items() if ops[n] in MATRIX_OPS)
    assert matrix_share > 0.5 * profile.total_us


def test_profile_json_round_trip():
    profile = profile_nodes(resnet(), runs=1, warmup=0, progress=False)
    text = json.dumps(profile.to_json())
    assert NodeProfile.from_json(json.loads(text)) == profile


def test_constant_nodes_cost_zero_and_integer_inputs_are_valid_indices():
    table = onnx.numpy_helper.from_array(np.random.rand(4, 3).astype(np.float32), "table")
    model = small_model(
        [
            helper.make_node("Constant", [], ["one"], name="one", value_float=1.0),
            helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup"),
            helper.make_node("Add", ["rows", "one"], ["y"], name="add"),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 3])],
        [table],
    )
    feeds = profile_feeds(model, batch=3)
    assert feeds["ids"].shape == (3, 5) and feeds["ids"].dtype == np.int64
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 4
    profile = profile_nodes(model, batch=3, runs=3, progress=False)
    assert profile.costs["one"] == 0.0  # ORT turns Constant nodes into initializers
    assert profile.costs["lookup"] > 0 and profile.costs["add"] > 0
    assert profile.batch == 3


def test_unnamed_nodes_are_refused():
    model = conv_model(4, 4)
    model.graph.node[0].name = ""
    with pytest.raises(ProfileError, match="unique non-empty name"):
        profile_nodes(model, progress=False)


def cuda_works() -> bool:
    options = ort.SessionOptions()
    try:
        session = ort.InferenceSession(
            conv_model(4, 4).SerializeToString(), options,
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
    except Exception:  # noqa: BLE001 - any failure means no usable CUDA provider
        return False
    return "CUDAExecutionProvider" in session.get_providers()


def test_cuda_profiling_runs_on_cuda_or_says_why_not():
    model = conv_model(4, 8)
    if cuda_works():
        profile = profile_nodes(model, device="cuda", runs=2, progress=False)
        assert profile.provider == "CUDAExecutionProvider" and profile.costs["conv"] > 0
    else:
        with pytest.raises(ProfileError, match="CUDAExecutionProvider could not be started"):
            profile_nodes(model, device="cuda", progress=False)


def test_trace_parsing_skips_warmup_and_resists_a_preempted_run():
    def run(ts):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": 90}

    def kernel(node, ts, dur):
        return {"cat": "Node", "name": f"{node}_kernel_time", "ts": ts, "dur": dur}

    events = [
        run(0), kernel("conv", 1, 5000),  # warm-up: slow first run, left out
        run(100), kernel("conv", 101, 10), kernel("relu", 120, 2),
        run(200), kernel("conv", 201, 12), kernel("conv_fence", 210, 1),
        {"cat": "Node", "name": "conv_fence_before", "ts": 211, "dur": 50},
        run(300), kernel("conv", 301, 9000), kernel("Memcpy_1", 330, 4),  # preempted run
    ]
    times, unmatched = _kernel_times(events, {"conv", "relu"}, warmup=1, runs=3)
    assert times["conv"] == 12  # median of 10, 12, 9000
    assert times["relu"] == 0  # ran in one of three runs: median 0
    assert unmatched == {"conv_fence", "Memcpy_1"}
    with pytest.raises(ProfileError, match="holds 4 runs, expected 5"):
        _kernel_times(events, {"conv"}, warmup=2, runs=3)


# ---- static ---------------------------------------------------------------------------------


def test_flops_are_positive_for_every_matrix_op_and_never_negative():
    model = resnet()
    costs = flops_costs(model)
    assert set(costs) == {n.name for n in model.graph.node}
    assert all(c >= 0 for c in costs.values())
    for node in model.graph.node:
        if node.op_type in MATRIX_OPS:
            assert costs[node.name] > 0, node.name
    ops = {n.name: n.op_type for n in model.graph.node}
    heaviest = max(costs, key=costs.get)
    assert ops[heaviest] == "Conv"


def test_conv_flops_follow_channels_kernel_and_groups():
    dense = flops_costs(conv_model(16, 16))["conv"]
    assert dense == 8 * 8 * 16 * (2 * 16 * 3 * 3)  # output elements * 2 MACs each
    assert flops_costs(conv_model(32, 32))["conv"] == 4 * dense
    assert flops_costs(conv_model(16, 16, kernel=1))["conv"] == dense / 9
    assert flops_costs(conv_model(16, 16, groups=4))["conv"] == dense / 4


def test_matmul_gemm_and_elementwise_flops():
    model = small_model(
        [
            helper.make_node("MatMul", ["a", "b"], ["ab"], name="batched"),
            helper.make_node("Gemm", ["v", "w", "bias"], ["g"], name="gemm", transB=1),
            helper.make_node("Relu", ["ab"], ["r"], name="relu"),
            helper.make_node("Softmax", ["r"], ["s"], name="softmax", axis=-1),
            helper.make_node("Reshape", ["s", "shape"], ["flat"], name="reshape"),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 2, 3, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 2, 4, 5]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", 6]),
        ],
        [
            helper.make_tensor_value_info("flat", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, None),
        ],
        [
            weight("w", 7, 6),
            weight("bias", 7),
            onnx.numpy_helper.from_array(np.array([-1, 30], dtype=np.int64), "shape"),
        ],
    )
    costs = flops_costs(model)
    assert costs["batched"] == 2 * (2 * 3 * 5) * 4  # per sample: 2 heads of 3x4 @ 4x5
    assert costs["gemm"] == 7 * (2 * 6 + 1)
    assert costs["relu"] == 30
    assert costs["softmax"] > costs["relu"]
    assert costs["reshape"] == 0
