"""Turn what the user names on the command line into a model the exporter can take.

A spec is one of:

* ``zoo:NAME`` or ``zoo:NAME?key=value&key=value`` -- a built-in model with size overrides;
* ``path/to/file.py:factory`` -- a Python file whose ``factory()`` returns an ``nn.Module`` or
  ``(module, example_inputs)``; a bare module needs ``input_shape`` to build its example input;
* ``path/to/model.onnx`` -- an already exported model;
* ``hf:DIR`` -- a local Hugging Face ``save_pretrained`` directory, built for ``task``
  (``partitioner.hf_dir``; its processors and their files travel in ``LoadedModel``).

Weights only ever come from ``.safetensors`` files: anything torch would unpickle is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import nn

from partitioner.loaded import LoadedModel, ModelLoadError

__all__ = ["WEIGHTS_SUFFIX", "LoadedModel", "ModelLoadError", "load_model", "load_weights"]

WEIGHTS_SUFFIX = ".safetensors"


def load_model(
    spec: str,
    weights: str | None = None,
    input_shape: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None = None,
    input_dtypes: Mapping[str, str] | None = None,
    task: str | None = None,
    max_length: int | None = None,
) -> LoadedModel:
    """Load the model ``spec`` names (see the module docstring); raises ``ModelLoadError``.

    ``input_shape`` is the shape of one sample, without the batch (e.g. ``(3, 224, 224)``); the
    example input is a batch of one such sample. For a bare module with several named inputs it
    is a mapping ``{name: shape}`` (the module is then called with keyword arguments), and
    ``input_dtypes`` gives each name's dtype (default float32).
    """
    named: dict[str, tuple[int, ...]] | None = None
    if isinstance(input_shape, Mapping):
        named = {str(k): _check_input_shape(v) for k, v in input_shape.items()}
        input_shape = None
    elif input_shape is not None:
        input_shape = _check_input_shape(input_shape)
    if input_dtypes and named is None:
        raise ModelLoadError("--input-dtype NAME=DTYPE needs --input-shape NAME=SHAPE per input")
    if (spec.startswith(("zoo:", "hf:")) or spec.lower().endswith(".onnx")) and named is not None:
        raise ModelLoadError("named input shapes apply to Python factories returning a module")
    if spec.startswith("hf:"):
        from partitioner.hf_dir import load_hf_dir

        loaded = load_hf_dir(spec, task, max_length)
    elif spec.startswith("zoo:"):
        loaded = _load_zoo(spec, input_shape)
    elif spec.lower().endswith(".onnx"):
        loaded = _load_onnx(spec, weights, input_shape)
    elif ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        loaded = _load_factory(spec, input_shape, named, dict(input_dtypes or {}))
    else:
        raise ModelLoadError(
            f"cannot tell what kind of model {spec!r} is: give zoo:NAME (e.g. zoo:resnet18), "
            "path/to/file.py:factory_function, path/to/model.onnx or hf:DIR"
        )
    if weights is not None and loaded.module is not None:
        load_weights(loaded.module, weights)
    return loaded


def parse_zoo_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``zoo:vit-tiny?depth=3&width=0.5`` -> ``("vit-tiny", {"depth": 3, "width": 0.5})``."""
    body = spec.removeprefix("zoo:")
    name, _, query = body.partition("?")
    overrides: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key in overrides:
            raise ModelLoadError(f"{spec!r} sets {key!r} twice")
        overrides[key] = _parse_value(value)
    return name, overrides


def load_weights(module: nn.Module, path: str) -> None:
    """Load a ``.safetensors`` state dict into ``module`` with every key accounted for."""
    file = Path(path)
    if file.suffix != WEIGHTS_SUFFIX:
        raise ModelLoadError(
            f"weights {path!r}: only {WEIGHTS_SUFFIX} files are accepted, because .pt/.pth/.bin "
            "checkpoints are pickles that can run code when loaded. Convert it once where you "
            "trust it: safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
        )
    if not file.is_file():
        raise ModelLoadError(f"weights file {path!r} does not exist")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(file)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"weights {path!r} is not a readable safetensors file: {exc}") from None
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
        raise ModelLoadError(
            f"weights {path!r} do not fit the model: {'; '.join(parts)}. Save the file from the "
            "same architecture (model.state_dict()) or fix the model's size overrides."
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(f"weights {path!r} do not fit the model: {exc}") from None


def _load_zoo(spec: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    from partitioner import zoo

    name, overrides = parse_zoo_spec(spec)
    try:
        model = zoo.build(name, **overrides)
    except ValueError as exc:
        raise ModelLoadError(f"{spec!r}: {exc}") from None
    _check_matches(spec, model.example_inputs, input_shape, hint="use ?image_size=N instead")
    return LoadedModel(
        source=spec,
        module=model.module,
        example_inputs=model.example_inputs,
        input_names=model.input_names,
        output_names=model.output_names,
    )


def _load_onnx(spec: str, weights: str | None, input_shape: tuple[int, ...] | None) -> LoadedModel:
    path = Path(spec)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file {spec!r} does not exist")
    if weights is not None:
        raise ModelLoadError(
            f"--weights applies to PyTorch models only; the ONNX file {spec!r} carries its own"
        )
    if input_shape is not None:
        raise ModelLoadError(
            f"an input shape applies to Python factories only; {spec!r} declares its own inputs"
        )
    return LoadedModel(source=spec, onnx_path=path.resolve())


def _load_factory(
    spec: str,
    input_shape: tuple[int, ...] | None,
    named: dict[str, tuple[int, ...]] | None = None,
    dtypes: dict[str, str] | None = None,
) -> LoadedModel:
    file_part, factory_name = spec.rsplit(":", 1)
    path = Path(file_part)
    if not path.is_file():
        raise ModelLoadError(f"model file {file_part!r} does not exist")
    if not factory_name.isidentifier():
        raise ModelLoadError(f"{factory_name!r} in {spec!r} is not a Python function name")
    module = _import_file(path)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ModelLoadError(
            f"{file_part!r} has no function {factory_name!r}; callables in it: {_listing(found)}"
        )
    try:
        made = factory()
    except Exception as exc:
        raise ModelLoadError(f"{spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc

    names: tuple[str, ...] | None = None
    if isinstance(made, nn.Module):
        if named is not None:
            net, names, inputs = made, tuple(named), _named_examples(spec, named, dtypes or {})
            return LoadedModel(
                source=spec, module=net.eval(), example_inputs=inputs, input_names=names,
                call_kwargs=True,
            )
        if input_shape is None:
            raise ModelLoadError(
                f"{spec!r} returns only a module, so give the shape of one input sample without "
                "the batch (e.g. 3,224,224, or input_ids=128 per named input), or make the "
                "factory return (module, example_inputs)"
            )
        seeded = torch.Generator().manual_seed(0)
        net, inputs = made, (torch.randn((1, *input_shape), generator=seeded),)
    elif isinstance(made, tuple | list) and len(made) == 2 and isinstance(made[0], nn.Module):
        if named is not None:
            raise ModelLoadError(f"{spec!r} gives its own example inputs; drop --input-shape")
        net = made[0]
        if isinstance(made[1], Mapping):
            names, inputs = _as_input_dict(spec, made[1])
        else:
            inputs = _as_input_tuple(spec, made[1])
        _check_matches(spec, inputs, input_shape, hint="drop the input shape or fix the factory")
    else:
        raise ModelLoadError(
            f"{spec!r} returned {type(made).__name__}; a factory must return an nn.Module or "
            "(nn.Module, example_inputs)"
        )
    if names is not None:
        return LoadedModel(
            source=spec, module=net.eval(), example_inputs=inputs, input_names=names,
            call_kwargs=True,
        )
    names = ("input",) if len(inputs) == 1 else tuple(f"input_{i}" for i in range(len(inputs)))
    return LoadedModel(source=spec, module=net.eval(), example_inputs=inputs, input_names=names)


def _as_input_dict(
    spec: str, inputs: Mapping[Any, Any]
) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    """A factory's ``{name: tensor}`` example: the names become the ONNX input names."""
    if not inputs or not all(
        isinstance(k, str) and k.isidentifier() and isinstance(v, torch.Tensor)
        for k, v in inputs.items()
    ):
        raise ModelLoadError(
            f"{spec!r}: example inputs given as a dict must map argument names to tensors"
        )
    names, tensors = tuple(inputs), tuple(inputs.values())
    _check_batch(spec, tensors)
    return names, tensors


def _named_examples(
    spec: str, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]
) -> tuple[torch.Tensor, ...]:
    """Batch-1 examples for a bare module's named inputs: floats ~N(0,1), integers in {0, 1}
    (valid token ids and mask values for any vocabulary)."""
    unknown = sorted(set(dtypes) - set(shapes))
    if unknown:
        raise ModelLoadError(f"--input-dtype names {unknown} that no --input-shape declares")
    seeded = torch.Generator().manual_seed(0)
    out = []
    for name, shape in shapes.items():
        dtype_name = dtypes.get(name, "float32")
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ModelLoadError(f"{spec!r}: input {name!r} has unknown dtype {dtype_name!r}")
        if dtype.is_floating_point:
            out.append(torch.randn((1, *shape), generator=seeded).to(dtype))
        else:
            out.append(torch.randint(0, 2, (1, *shape), generator=seeded).to(dtype))
    return tuple(out)


def _import_file(path: Path) -> Any:
    # A name unique to the file keeps two user files called model.py from clobbering each other.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"hetserve_user_model_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look the module up while it executes
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ModelLoadError(
            f"importing {str(path)!r} failed with {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _as_input_tuple(spec: str, inputs: Any) -> tuple[torch.Tensor, ...]:
    items = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    if (
        not isinstance(items, tuple | list)
        or not items
        or not all(isinstance(t, torch.Tensor) for t in items)
    ):
        raise ModelLoadError(
            f"{spec!r}: example_inputs must be a tensor or a tuple of tensors, "
            f"got {type(inputs).__name__}"
        )
    _check_batch(spec, tuple(items))
    return tuple(items)


def _check_batch(spec: str, items: tuple[torch.Tensor, ...]) -> None:
    """Every example input has the batch in dim 0, the same size across inputs (any size)."""
    sizes = {t.shape[0] if t.dim() else None for t in items}
    if None in sizes or len(sizes) != 1:
        raise ModelLoadError(
            f"{spec!r}: example inputs must share one batch size in dim 0, got shapes "
            f"{[tuple(t.shape) for t in items]}"
        )


def _check_input_shape(shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ModelLoadError(
            f"input shape {dims} must be positive integers: one sample's shape, without the batch"
        )
    return dims


def _check_matches(
    spec: str, inputs: tuple[torch.Tensor, ...], shape: tuple[int, ...] | None, hint: str
) -> None:
    if shape is not None and (len(inputs) != 1 or tuple(inputs[0].shape[1:]) != shape):
        have = [tuple(t.shape[1:]) for t in inputs]
        raise ModelLoadError(
            f"{spec!r} takes samples of shape {have} (batch left out), not {shape}; {hint}"
        )


def _parse_value(text: str) -> Any:
    """Query values: ints, floats, comma lists of them (for tuple knobs), else the string."""
    if "," in text:
        return tuple(_parse_value(part) for part in text.split(",") if part)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _listing(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "") or "none"
