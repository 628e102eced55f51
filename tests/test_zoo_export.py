"""Zoo models, model loading and ONNX export, run for real (tiny models, CPU, ONNX Runtime)."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from models import tiny_exported
from safetensors.torch import save_file

from handlers.protocol.dynamic_dims import DynamicDims
from partitioner import zoo
from partitioner.export import (
    ExportError,
    FlatModule,
    _check_other_batch,
    _export_torchscript,
    export_onnx,
    finalize,
)
from partitioner.loading import LoadedModel, ModelLoadError, load_model, parse_zoo_spec

TINY = ("googlenet-tiny", "nfnet-tiny", "vit-tiny", "resnet18-tiny")


def exported(name: str) -> tuple[LoadedModel, onnx.ModelProto]:
    """Each tiny model is exported once per test session (export is the slow part), shared with
    the other modules that cut or profile the same models (tests/models.py)."""
    return tiny_exported(name)


def run_onnx(model: onnx.ModelProto, *inputs: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)


def constant_only_nodes(model: onnx.ModelProto) -> list[str]:
    constants = {i.name for i in model.graph.initializer}
    return [
        n.name for n in model.graph.node if n.op_type == "Constant"
        or all(i in constants for i in n.input if i)
    ]


def write_factory(tmp_path, body: str):
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(body))
    return path


# ---- zoo ------------------------------------------------------------------------------------


def test_zoo_lists_every_required_name():
    required = {
        "googlenet", "googlenet-tiny", "nfnet", "nfnet-tiny", "vit-b16", "vit-tiny",
        "resnet18", "resnet18-tiny", "resnet50",
    }
    assert required <= set(zoo.names())


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_are_deterministic_with_sane_outputs(name):
    first, second = zoo.build(name), zoo.build(name)
    assert not first.module.training
    assert torch.equal(first.example_inputs[0], second.example_inputs[0])
    assert first.example_inputs[0].shape[0] == 1
    with torch.no_grad():
        out = first.module(*first.example_inputs)
        other = first.module(torch.randn_like(first.example_inputs[0]))
        assert torch.equal(out, second.module(*second.example_inputs))
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3 and out.abs().max() < 100
    assert not torch.allclose(out, other)  # the output depends on the input


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("vit-tiny")
    assert torch.equal(torch.rand(3), expected)


def test_overrides_change_the_model_and_bad_ones_are_named():
    deeper = zoo.build("vit-tiny", depth=3, image_size=48)
    assert len(deeper.module.blocks) == 3
    assert deeper.example_inputs[0].shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match=r"no size knob 'depht'.*depth"):
        zoo.build("vit-tiny", depht=3)
    with pytest.raises(ValueError, match="should be int"):
        zoo.build("vit-tiny", depth=2.5)
    with pytest.raises(ValueError, match="multiple of heads"):
        zoo.build("vit-tiny", dim=30)
    with pytest.raises(ValueError, match="unknown zoo model 'vgg'"):
        zoo.build("vgg")


def test_nfnet_weight_standardisation_matches_its_formula():
    conv = zoo.build("nfnet-tiny").module.blocks[0].conv1
    w = conv.weight
    fan_in = w[0].numel()
    expected = conv.gain * (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (
        w.std(dim=(1, 2, 3), unbiased=False, keepdim=True) * fan_in**0.5
    )
    torch.testing.assert_close(conv.standardized_weight(), expected, rtol=1e-4, atol=1e-5)
    block = zoo.build("nfnet-tiny").module.blocks[1]
    assert float(block.skip_gain) != 0.0  # a zero gain would make every block the identity


# ---- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_exports_and_matches_torch_at_batch_1_and_3(name):
    loaded, model = exported(name)
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert model.opset_import[0].version >= 17
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]

    generator = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        x = torch.randn(batch, *loaded.example_inputs[0].shape[1:], generator=generator)
        with torch.no_grad():
            want = loaded.module(x).numpy()
        (got,) = run_onnx(model, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_graph_is_folded_named_and_shaped(name):
    _, model = exported(name)
    assert constant_only_nodes(model) == []
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    shaped = {v.name: v for v in model.graph.value_info}
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out in outputs:
                continue
            dims = shaped[out].type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") or d.dim_param == "batch" for d in dims), out


def test_nfnet_weight_standardisation_is_folded_into_the_conv_weights():
    loaded, model = exported("nfnet-tiny")
    module = loaded.module
    ws_convs = [m for m in module.modules() if hasattr(m, "standardized_weight")]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    se_convs = [n for n in module.modules() if type(n) is torch.nn.Conv2d]
    assert len(convs) == len(ws_convs) + len(se_convs)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert all(c.input[1] in weights for c in convs)  # read straight from an initializer
    # Nothing of the standardisation is left: no Sqrt/Clip, and the stem conv's weight is W_hat.
    assert not {n.op_type for n in model.graph.node} & {"Sqrt", "Clip", "Reciprocal", "Sub"}
    stem_weight = module.stem[0].standardized_weight().detach().numpy()
    assert any(
        w.shape == stem_weight.shape and np.allclose(w, stem_weight, atol=1e-6)
        for w in weights.values()
    )


def test_data_dependent_control_flow_is_an_export_error(tmp_path):
    path = write_factory(tmp_path, """
        import torch

        class Branchy(torch.nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x * 2
                return x - 1

        def make():
            return Branchy()
    """)
    loaded = load_model(f"{path}:make", input_shape=(4,))
    with pytest.raises(ExportError, match="cannot be exported") as info:
        export_onnx(loaded)
    message = str(info.value)
    assert "data-dependent" in message and "x.sum() > 0" in message
    assert "\n" not in message  # one paragraph


def test_non_tensor_output_and_fixed_batch_are_export_errors(tmp_path):
    path = write_factory(tmp_path, """
        import torch

        class Dict(torch.nn.Module):
            def forward(self, x):
                return {"y": x}

        class Flat(torch.nn.Module):
            def forward(self, x):
                return x.view(1, -1) * 2

        def as_dict():
            return Dict()

        def flat():
            return Flat()
    """)
    # A dict output is what Hugging Face models return: its keys name the outputs.
    model = export_onnx(load_model(f"{path}:as_dict", input_shape=(4,)))
    assert [o.name for o in model.graph.output] == ["y"]
    with pytest.raises(ExportError, match="needs the batch in dim 0"):
        export_onnx(load_model(f"{path}:flat", input_shape=(4,)))


def test_torchscript_fallback_gives_the_same_clean_graph():
    loaded = load_model("zoo:vit-tiny")
    names = (loaded.input_names, loaded.output_names)
    raw, _ = _export_torchscript(
        loaded.module, loaded.example_inputs, *names, opset=18, dynamic=DynamicDims()
    )
    assert any(n.op_type == "Identity" for n in raw.graph.node)  # its deduplicated weights
    model = finalize(raw, loaded.source)
    assert constant_only_nodes(model) == []
    assert not any(n.op_type == "Identity" for n in model.graph.node)
    # Its Reshape(-1, ...) hide the batch from onnx's inference; the symbolic pass names it.
    for value in model.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") or d.dim_param == "batch" for d in dims), value.name
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(model, x)[0], loaded.module(x).numpy(), atol=1e-4)


def test_a_trace_with_a_frozen_batch_is_caught_at_another_batch(tmp_path):
    path = write_factory(tmp_path, """
        import torch

        class RowByRow(torch.nn.Module):
            def forward(self, x):
                return torch.stack([row * 2 for row in x.unbind(0)])  # unrolled at trace time

        def make():
            return RowByRow()
    """)
    loaded = load_model(f"{path}:make", input_shape=(4,))
    raw, _ = _export_torchscript(
        loaded.module, loaded.example_inputs, ("x",), ("y",), opset=18, dynamic=DynamicDims()
    )
    with pytest.raises(ExportError, match="fails at batch 2.*fixes the batch size"):
        _check_other_batch(FlatModule(loaded, ("output_0",)), loaded.example_inputs, raw)


def test_onnx_file_is_reloaded_renamed_and_checked(tmp_path):
    loaded, model = exported("resnet18-tiny")
    anonymous = onnx.ModelProto()
    anonymous.CopyFrom(model)
    for node in anonymous.graph.node:
        node.name = ""
    anonymous.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    path = tmp_path / "model.onnx"
    onnx.save(anonymous, path)

    again = export_onnx(load_model(str(path)))
    names = [n.name for n in again.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert again.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = torch.randn(2, *loaded.example_inputs[0].shape[1:])
    np.testing.assert_allclose(run_onnx(again, x)[0], run_onnx(model, x)[0], atol=1e-6)

    anonymous.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(anonymous, path)
    with pytest.raises(ExportError, match="dim 0 of 'image' is fixed at 1"):
        export_onnx(load_model(str(path)))

    anonymous.opset_import[0].version = 16
    onnx.save(anonymous, path)
    with pytest.raises(ExportError, match="opset 16 is older than 17"):
        export_onnx(load_model(str(path)))


def test_constant_subgraphs_of_an_onnx_file_are_folded(tmp_path):
    h = onnx.helper
    weight = onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    graph = h.make_graph(
        [
            h.make_node("Identity", ["w"], ["w_alias"], name="alias"),
            h.make_node("Mul", ["w_alias", "w"], ["w_sq"], name="square"),  # weights only
            h.make_node("MatMul", ["x", "w_sq"], ["y"], name="matmul"),
        ],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 2])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])],
        [weight],
    )
    path = tmp_path / "folded.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=10), path)
    model = export_onnx(load_model(str(path)))
    assert [n.name for n in model.graph.node] == ["matmul"]
    (folded,) = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer]
    np.testing.assert_array_equal(folded, np.arange(6, dtype=np.float32).reshape(2, 3) ** 2)


# ---- loading --------------------------------------------------------------------------------


def test_zoo_spec_parses_overrides():
    assert parse_zoo_spec("zoo:nfnet-tiny?depths=1,1,1,2&alpha=0.3&activation=relu") == (
        "nfnet-tiny", {"depths": (1, 1, 1, 2), "alpha": 0.3, "activation": "relu"},
    )
    loaded = load_model("zoo:vit-tiny?depth=1&dim=32&heads=2")
    assert len(loaded.module.blocks) == 1 and loaded.module.dim == 32
    with pytest.raises(ModelLoadError, match="no size knob 'colour'"):
        load_model("zoo:vit-tiny?colour=3")
    with pytest.raises(ModelLoadError, match="use \\?image_size="):
        load_model("zoo:vit-tiny", input_shape=(3, 64, 64))
    assert load_model("zoo:vit-tiny", input_shape=(3, 32, 32)).example_inputs[0].shape[0] == 1
    with pytest.raises(ModelLoadError, match="cannot tell what kind of model"):
        load_model("resnet18")


def test_factory_returning_a_module_needs_and_uses_the_input_shape(tmp_path):
    path = write_factory(tmp_path, """
        import torch

        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh())
    """)
    with pytest.raises(ModelLoadError, match="returns only a module, so give the shape"):
        load_model(f"{path}:make")
    with pytest.raises(ModelLoadError, match="must be positive integers"):
        load_model(f"{path}:make", input_shape=(0, 5))
    with pytest.raises(ModelLoadError, match="has no function 'nope'.*'make'"):
        load_model(f"{path}:nope", input_shape=(5,))
    loaded = load_model(f"{path}:make", input_shape=(5,))
    assert loaded.example_inputs[0].shape == (1, 5) and loaded.input_names == ("input",)
    assert not loaded.module.training


def test_factory_returning_module_and_inputs_exports_two_inputs(tmp_path):
    path = write_factory(tmp_path, """
        import torch

        class Pair(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(4, 4)

            def forward(self, a, b):
                return self.proj(a) * b, a.sum(dim=1)

        def make():
            torch.manual_seed(0)
            return Pair(), (torch.randn(1, 4), torch.randn(1, 4))
    """)
    loaded = load_model(f"{path}:make")
    assert loaded.input_names == ("input_0", "input_1")
    model = export_onnx(loaded)
    assert [o.name for o in model.graph.output] == ["output_0", "output_1"]
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        want = loaded.module(a, b)
    for got, expected in zip(run_onnx(model, a, b), want, strict=True):
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_safetensors_weights_round_trip_and_wrong_keys_are_named(tmp_path):
    source = zoo.build("resnet18-tiny").module
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))  # different from what the zoo's seed gives
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), path)

    plain = load_model("zoo:resnet18-tiny")
    loaded = load_model("zoo:resnet18-tiny", weights=str(path))
    x = plain.example_inputs[0]
    with torch.no_grad():
        assert torch.equal(loaded.module(x), source(x))
        assert not torch.allclose(loaded.module(x), plain.module(x))

    state = dict(source.state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing 1 key\(s\): 'fc.bias'.*'extra.weight'"):
        load_model("zoo:resnet18-tiny", weights=str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelLoadError, match="size mismatch"):
        load_model("zoo:resnet18-tiny?num_classes=5", weights=str(path))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_pickle_checkpoints_are_refused_unread(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"not even read")
    with pytest.raises(ModelLoadError, match="only .safetensors files are accepted"):
        load_model("zoo:resnet18-tiny", weights=str(path))


def test_onnx_spec_refuses_weights_and_missing_files(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="carries its own"):
        load_model(str(path), weights="w.safetensors")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "absent.onnx"))
    assert load_model(str(path)).is_onnx
