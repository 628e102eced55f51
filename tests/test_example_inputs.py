"""The one example-input generator (handlers.artifact.example_inputs) and the value ranges it
draws from (partitioner.value_ranges): read from small hand-made ONNX graphs, recorded in the
manifest, and respected by the profiler (issue 22: token type ids drawn from [0, 4) against a
2-row table killed every BERT archive in profiling)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from handlers.artifact.example_inputs import SAFE_INTEGERS, draw, example_feeds, example_shape
from handlers.artifact.manifest import ManifestError, TensorSpec, ValueRange
from partitioner.profile import ProfileError, profile_feeds, profile_nodes
from partitioner.stages import graph_io_specs
from partitioner.value_ranges import (
    MASK,
    config_hints,
    derive_ranges,
    read_hints,
    record_hints,
    with_ranges,
)


def table(name: str, rows: int, width: int = 4) -> onnx.TensorProto:
    return numpy_helper.from_array(np.arange(rows * width, dtype=np.float32).reshape(rows, width), name)


def graph_model(nodes, inputs, initializers=(), outputs=None) -> onnx.ModelProto:
    outputs = outputs or [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def ints(name: str, *dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", *dims])


def bert_like() -> onnx.ModelProto:
    """Word ids (a 30-row table), token types (2 rows), a mask, a float input: BERT's inputs."""
    return graph_model(
        [
            helper.make_node("Gather", ["words", "input_ids"], ["w"], name="word"),
            helper.make_node("Gather", ["types", "token_type_ids"], ["t"], name="type"),
            helper.make_node("Cast", ["attention_mask"], ["m"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "last"], ["m3"], name="unsq"),
            helper.make_node("Add", ["w", "t"], ["wt"], name="add"),
            helper.make_node("Mul", ["wt", "m3"], ["wm"], name="mask"),
            helper.make_node("Mul", ["wm", "scale"], ["y"], name="scaled"),
        ],
        [ints("input_ids", 5), ints("token_type_ids", 5), ints("attention_mask", 5),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch", 5, 4])],
        [table("words", 30), table("types", 2), numpy_helper.from_array(np.array([-1]), "last")],
    )


# ---- ranges from the graph ---------------------------------------------------------------------


def test_each_id_is_bounded_by_its_table_masks_take_0_1_floats_have_no_range():
    assert derive_ranges(bert_like()) == {
        "input_ids": ValueRange(0, 30), "token_type_ids": ValueRange(0, 2), "attention_mask": MASK,
    }


def test_ids_reach_the_smallest_table_through_value_keeping_ops():
    model = graph_model(
        [
            helper.make_node("Cast", ["ids"], ["c"], name="cast", to=TensorProto.INT32),
            helper.make_node("Unsqueeze", ["c", "last"], ["u"], name="unsq"),
            helper.make_node("Reshape", ["u", "flat"], ["r"], name="reshape"),
            helper.make_node("Gather", ["big", "r"], ["a"], name="big_lookup"),
            helper.make_node("Identity", ["ids"], ["i"], name="ident"),
            helper.make_node("Gather", ["small", "i"], ["b"], name="small_lookup"),
            helper.make_node("ReduceSum", ["a"], ["sa"], name="ra", keepdims=0),
            helper.make_node("ReduceSum", ["b"], ["y"], name="rb", keepdims=0),
        ],
        [ints("ids", 3)],
        [table("big", 50), table("small", 7), numpy_helper.from_array(np.array([-1]), "last"),
         numpy_helper.from_array(np.array([-1]), "flat")],
    )
    assert derive_ranges(model) == {"ids": ValueRange(0, 7)}


def test_a_constant_added_or_subtracted_on_the_way_shifts_the_bound():
    def shifted(op: str, constant: int) -> ValueRange:
        model = graph_model(
            [
                helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.array(constant))),
                helper.make_node(op, ["ids", "k"], ["pos"], name="shift"),
                helper.make_node("Gather", ["positions", "pos"], ["y"], name="lookup"),
            ],
            [ints("ids", 3)], [table("positions", 10)],
        )
        return derive_ranges(model)["ids"]

    assert shifted("Add", 2) == ValueRange(0, 8)  # ids + 2 < 10
    assert shifted("Sub", 1) == ValueRange(1, 11)  # 0 <= ids - 1 < 10
    assert shifted("Add", 9) == ValueRange(0, 1)


def test_a_table_from_a_constant_node_and_a_gather_on_another_axis():
    model = graph_model(
        [
            helper.make_node("Constant", [], ["t"], name="t", value=table("t", 3, 6)),
            helper.make_node("Gather", ["t", "col"], ["y"], name="cols", axis=1),
        ],
        [ints("col")],
    )
    assert derive_ranges(model) == {"col": ValueRange(0, 6)}


def test_an_integer_input_that_indexes_nothing_gets_0_1_and_bools_are_left_to_the_generator():
    model = graph_model(
        [
            helper.make_node("Cast", ["n"], ["f"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Cast", ["flag"], ["g"], name="cast2", to=TensorProto.FLOAT),
            helper.make_node("Add", ["f", "g"], ["y"], name="add"),
        ],
        [ints("n", 2), helper.make_tensor_value_info("flag", TensorProto.BOOL, ["batch", 2])],
    )
    assert derive_ranges(model) == {"n": SAFE_INTEGERS}


def test_a_cast_to_bool_ends_the_walk():
    model = graph_model(
        [
            helper.make_node("Cast", ["ids"], ["b"], name="nonzero", to=TensorProto.BOOL),
            helper.make_node("Cast", ["b"], ["i"], name="back", to=TensorProto.INT64),
            helper.make_node("Gather", ["three_rows", "i"], ["y"], name="lookup"),
        ],
        [ints("ids", 3)], [table("three_rows", 3)],
    )
    # The gathered indices are 0/1 whatever the ids are: the table says nothing about the ids.
    assert derive_ranges(model) == {"ids": SAFE_INTEGERS}


def test_config_hints_travel_in_the_graph_and_narrow_what_the_graph_says(tmp_path):
    module = SimpleNamespace(config=SimpleNamespace(vocab_size=20, type_vocab_size=1,
                                                    max_position_embeddings=512))
    hints = config_hints(module, ["input_ids", "token_type_ids", "attention_mask"])
    assert hints == {"input_ids": ValueRange(0, 20), "token_type_ids": ValueRange(0, 1)}
    model = bert_like()
    record_hints(model, hints)
    record_hints(model, hints)  # replaced, not added twice
    assert sum(p.key == "hetserve.value_hints" for p in model.metadata_props) == 1
    onnx.save(model, tmp_path / "m.onnx")
    again = onnx.load(tmp_path / "m.onnx")
    assert read_hints(again) == hints
    ranges = derive_ranges(again)
    assert ranges["input_ids"] == ValueRange(0, 20)  # narrower than the 30-row table
    assert ranges["token_type_ids"] == ValueRange(0, 1)
    assert ranges["attention_mask"] == MASK
    assert config_hints(SimpleNamespace(), ["input_ids"]) == {}


def test_graph_io_specs_carry_the_ranges_and_with_ranges_keeps_the_rest():
    inputs, _ = graph_io_specs(bert_like())
    by_name = {s.name: s for s in inputs}
    assert by_name["token_type_ids"].values == ValueRange(0, 2)
    assert by_name["scale"].values is None
    narrowed = {s.name: s for s in with_ranges(inputs, {"input_ids": ValueRange(0, 5)})}
    assert narrowed["input_ids"].values == ValueRange(0, 5)
    assert narrowed["token_type_ids"].values == ValueRange(0, 2)


# ---- the generator -----------------------------------------------------------------------------


def test_draws_stay_in_their_ranges_and_cover_them():
    rng = np.random.default_rng(0)
    ids = draw("int64", (64, 50), ValueRange(0, 30522), rng)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 30522 and ids.max() > 20000
    types = draw("int32", (64, 50), ValueRange(0, 2), rng)
    assert set(np.unique(types)) == {0, 1}
    one_row = draw("int64", (8, 8), ValueRange(0, 1), rng)
    assert not one_row.any()
    shifted = draw("int64", (200,), ValueRange(1, 11), rng)
    assert shifted.min() == 1 and shifted.max() == 10
    flags = draw("bool", (100,), None, rng)
    assert flags.dtype == np.bool_ and flags.any() and not flags.all()
    normal = draw("float32", (4000,), None, rng)
    assert normal.dtype == np.float32 and abs(normal.std() - 1) < 0.1 and normal.min() < -2
    uniform = draw("float16", (4000,), ValueRange(-0.5, 0.25, integers=False), rng)
    assert uniform.dtype == np.float16 and uniform.min() >= -0.5 and uniform.max() <= 0.25
    float_mask = draw("float32", (100,), MASK, rng)
    assert set(np.unique(float_mask)) == {0.0, 1.0}
    narrow = draw("uint8", (1000,), ValueRange(0, 30522), rng)  # clipped to what uint8 holds
    assert narrow.dtype == np.uint8 and narrow.max() > 200


def test_an_integer_spec_without_a_range_gets_the_safe_default():
    feeds = example_feeds([TensorSpec("ids", "int64", (None, 6))], 50, np.random.default_rng(0))
    assert set(np.unique(feeds["ids"])) == {0, 1}


def test_dynamic_dims_take_their_symbols_size_else_1():
    spec = TensorSpec("ids", "int64", (None, None, 3), ValueRange(0, 9))
    assert example_shape(spec, 2) == (2, 1, 3)
    assert example_shape(spec, 2, {"seq": 7}, {"ids": {1: "seq"}}) == (2, 7, 3)
    feeds = example_feeds([spec], 4, np.random.default_rng(1), {"seq": 5}, {"ids": {1: "seq"}})
    assert feeds["ids"].shape == (4, 5, 3) and feeds["ids"].max() < 9


def test_one_seed_gives_one_batch():
    specs = graph_io_specs(bert_like())[0]
    a = example_feeds(specs, 3, np.random.default_rng(5))
    b = example_feeds(specs, 3, np.random.default_rng(5))
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ---- the manifest records them -----------------------------------------------------------------


def test_a_spec_with_a_range_round_trips_and_an_old_one_still_loads():
    spec = TensorSpec("token_type_ids", "int64", (None, 128), ValueRange(0, 2))
    data = json.loads(json.dumps(spec.to_json()))
    assert data["values"] == {"low": 0, "high": 2, "integers": True}
    assert TensorSpec.from_json(data) == spec
    floats = TensorSpec("x", "float32", (None, 3), ValueRange(-1.5, 2.0, integers=False))
    assert TensorSpec.from_json(json.loads(json.dumps(floats.to_json()))) == floats
    old = TensorSpec.from_json({"name": "ids", "dtype": "int64", "shape": [None, 8]})
    assert old.values is None and "values" not in old.to_json()


@pytest.mark.parametrize(
    "values",
    [{"low": 2, "high": 2, "integers": True}, {"low": 0, "high": float("inf"), "integers": False},
     {"low": 0, "high": 2.5, "integers": True}, {"low": 0, "high": 2}, {"low": "0", "high": 2, "integers": True}],
)
def test_a_bad_recorded_range_is_a_manifest_error(values):
    with pytest.raises(ManifestError):
        TensorSpec.from_json({"name": "ids", "dtype": "int64", "shape": [None, 8], "values": values})


# ---- the profiler draws from them --------------------------------------------------------------


def test_the_profiler_runs_a_bert_like_graph_whose_type_table_has_two_rows():
    model = bert_like()
    feeds = profile_feeds(model, batch=64)
    assert feeds["token_type_ids"].max() == 1 and feeds["input_ids"].max() < 30
    assert feeds["scale"].dtype == np.float32
    profile = profile_nodes(model, batch=4, runs=2, warmup=0, passes=1, progress=False)
    assert profile.costs["type"] >= 0 and set(profile.costs) == {n.name for n in model.graph.node}


def test_inputs_the_graph_cannot_bound_fail_profiling_with_one_line_not_a_traceback():
    # Mul hides the table from the walk: the ids get {0, 1}, and 1 overflows the one-row table.
    model = graph_model(
        [
            helper.make_node("Mul", ["ids", "one"], ["scaled"], name="scale"),
            helper.make_node("Gather", ["one_row", "scaled"], ["y"], name="lookup"),
        ],
        [ints("ids", 8)],
        [table("one_row", 1), numpy_helper.from_array(np.array(1), "one")],
    )
    with pytest.raises(ProfileError, match=r"profiling inputs \(ids int64 \[16, 8\] in \[0, 2\)\).*--cost flops"):
        profile_nodes(model, batch=16, runs=1, warmup=0, passes=1, progress=False)
