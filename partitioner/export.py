"""PyTorch (or a user's ONNX file) -> one clean ONNX graph the profiler and the cut can trust.

Whatever the source, the returned model has: opset >= 17; a dynamic dim 0 called ``batch`` on every
input and output; no node computing from constants only (weight-only subgraphs, such as NFNet's
weight standardisation, are folded into initializers); unique non-empty node names; and a shape
in ``value_info`` for every intermediate tensor, because the cut prices a tensor by its bytes.
It passes ``onnx.checker`` (full check) and strict shape inference. Weights stay inline.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from handlers.artifact.example_inputs import draw
from handlers.artifact.manifest import ValueRange
from handlers.protocol.dynamic_dims import DynamicDims
from partitioner.loaded import LoadedModel
from partitioner.value_ranges import config_hints, derive_ranges, record_hints

log = logging.getLogger(__name__)

MIN_OPSET = 17
BATCH = "batch"
EXPORT_BATCH = 2  # the smallest batch torch.export does not specialise
PROTO_LIMIT = 2**31 - 1  # protobuf's hard limit on one serialized message
# Ops whose result is not a function of their inputs: folding them would freeze one sample.
_NOT_FOLDABLE = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli", "If", "Loop", "Scan",
}


class ExportError(ValueError):
    """The model cannot be turned into an ONNX graph hetserve can cut; the message says why."""


def export_onnx(
    loaded: LoadedModel, opset: int = 18, dynamic: DynamicDims | None = None
) -> onnx.ModelProto:
    """The loaded model as a checked, constant-folded ONNX graph with a dynamic batch axis.

    ``dynamic`` declares further dynamic input dims (``input_ids:1=seq``); for an ONNX file
    they are read from its symbolic dims instead (see ``symbolic_dims``).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; hetserve needs opset {MIN_OPSET} or newer")
    if loaded.onnx_path is not None:
        model = _read_onnx_file(loaded)
    else:
        model = _export_torch(loaded, opset, dynamic or DynamicDims())
    return finalize(model, loaded.source)


def symbolic_dims(model: onnx.ModelProto) -> dict[str, dict[int, str]]:
    """Each input's named dims beyond dim 0 (``{"input_ids": {1: "seq"}}``)."""
    initializers = {t.name for t in model.graph.initializer}
    found: dict[str, dict[int, str]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis and not dim.HasField("dim_value") and dim.dim_param:
                found.setdefault(value.name, {})[axis] = dim.dim_param
    return found


def finalize(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Fold constants, name nodes, infer shapes and check; the shared tail of both sources."""
    model = fold_constants(model)
    name_nodes(model.graph)
    _drop_stale_value_info(model.graph)
    try:
        model = onnx.shape_inference.infer_shapes(
            model, check_type=True, strict_mode=True, data_prop=True
        )
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{source}: the ONNX graph does not pass onnx's checks: {exc}") from None
    if _tensors_without_shape(model):
        model = _symbolic_shapes(model)
    missing = _tensors_without_shape(model)
    if missing:
        raise ExportError(
            f"{source}: shape inference left {len(missing)} intermediate tensor(s) without a full "
            f"shape, e.g. {missing[:5]}; the cut needs the byte size of every tensor. Export "
            "from code whose shapes are static apart from the batch."
        )
    return model


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every node computed from initializers and constants only by an initializer.

    Works in place and returns ``model``.

    Done here rather than left to the exporters: the dynamo exporter's optimizer skips tensors
    over a size limit (on full NFNet-F0 it leaves 55 weight standardisations), the TorchScript
    exporter does not fold parameters at all, and a user's ONNX file may never have been folded.
    One pass, evaluated by ONNX Runtime with its own optimisations off, treats all three alike,
    keeps the other nodes and their names untouched, and has no size limit.
    """
    graph = model.graph
    runtime_inputs = {i.name for i in graph.input}
    constant = {i.name for i in graph.initializer} - runtime_inputs
    graph_outputs = {o.name for o in graph.output}
    # Names read inside If/Loop bodies cannot be renamed from here, so those stay tensors.
    read_in_subgraphs = _names_read(list(graph.node)) - _names_read(list(graph.node), nested=False)
    aliases: dict[str, str] = {}  # Identity of a constant: reuse the tensor instead of copying it
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        if not _is_foldable(node, constant, graph_outputs):
            continue
        if node.op_type == "Identity" and node.output[0] not in read_in_subgraphs:
            aliases[node.output[0]] = aliases.get(node.input[0], node.input[0])
        else:
            folded.append(node)
        constant.update(o for o in node.output if o)
    if not folded and not aliases:
        return model

    folded_ids = {id(n) for n in folded}
    kept = [
        n for n in graph.node
        if id(n) not in folded_ids and not (n.op_type == "Identity" and n.output[0] in aliases)
    ]
    for node in (*kept, *folded):
        _rename_inputs(node, aliases)
    needed = _names_read(kept) | graph_outputs
    wanted = [o for n in folded for o in n.output if o and o in needed]
    values = _evaluate(folded, graph.initializer, wanted, model) if wanted else {}

    new_initializers = [numpy_helper.from_array(values[name], name) for name in wanted]
    still_read = needed | runtime_inputs
    initializers = [i for i in graph.initializer if i.name in still_read] + new_initializers
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every top-level node a unique non-empty name (profiles and cuts key on them)."""
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        suffix = 1
        candidate = name
        while candidate in seen:
            candidate = f"{name}_{suffix}"
            suffix += 1
        node.name = candidate
        seen.add(candidate)


# ---- torch -> ONNX ---------------------------------------------------------------------------


def _export_torch(loaded: LoadedModel, opset: int, dynamic: DynamicDims) -> onnx.ModelProto:
    module = loaded.module
    assert module is not None
    module.eval()
    size = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    if size > PROTO_LIMIT:
        raise ExportError(
            f"{loaded.source}: the weights take {size / 2**30:.1f} GiB; models over 2 GB do not "
            "fit in one ONNX protobuf and are out of scope for hetserve"
        )
    input_names = loaded.input_names or tuple(
        f"input_{i}" for i in range(len(loaded.example_inputs))
    )
    unknown = sorted(set(dynamic.axes) - set(input_names))
    if unknown:
        raise ExportError(
            f"{loaded.source}: --dynamic names {unknown}, but the inputs are {list(input_names)}"
        )
    # torch.export specialises every dim whose example size is 1, the batch included: export
    # from a batch of at least 2 whatever batch the user's example has.
    inputs = tuple(replicate_batch(t, EXPORT_BATCH) for t in loaded.example_inputs)
    for name, tensor in zip(input_names, inputs, strict=True):
        for axis, symbol in dynamic.axes.get(name, {}).items():
            if axis >= tensor.dim() or tensor.shape[axis] < 2:
                raise ExportError(
                    f"{loaded.source}: {name} dim {axis} ({symbol}) needs an example size of at "
                    f"least 2 (the example has shape {tuple(tensor.shape)}); torch.export fixes "
                    "any dim whose example size is 1"
                )
    outputs = _run_once(loaded, inputs)
    output_names = loaded.output_names or tuple(name for name, _ in outputs)
    if len(output_names) != len(outputs):
        raise ExportError(
            f"{loaded.source}: {len(output_names)} output names for {len(outputs)} outputs"
        )
    flat = FlatModule(loaded, tuple(name for name, _ in outputs))
    # What the graph may not show (an id that reaches its table through ops the walk does not
    # follow): the config's sizes travel in the graph, for every later example run.
    hints = config_hints(module, input_names)
    try:
        model = _export_dynamo(flat, inputs, input_names, output_names, opset, dynamic)
    except Exception as dynamo_exc:
        dynamo_reason = _summarize(dynamo_exc)
    else:
        for value in (*model.graph.input, *model.graph.output):
            _require_dynamic_batch(loaded.source, value, rename=False)
        record_hints(model, hints)
        return model
    try:
        model, tracer = _export_torchscript(flat, inputs, input_names, output_names, opset, dynamic)
        record_hints(model, hints)
        # The tracer declares the batch dynamic whatever the code does with it; check it did.
        _check_other_batch(flat, inputs, model)
    except Exception as script_exc:
        script_reason = _summarize(script_exc)
    else:
        log.warning(
            "%s: torch.export failed (%s); exported with the TorchScript tracer instead, which "
            "froze %d value-dependent step(s) (e.g. %s). The traced graph matched torch at "
            "batch %d and %d.",
            loaded.source, dynamo_reason, len(tracer), tracer[0] if tracer else "none",
            inputs[0].shape[0], 2 * inputs[0].shape[0],
        )
        return model
    raise ExportError(
        f"{loaded.source} cannot be exported to ONNX. torch.export said: {dynamo_reason} "
        f"The TorchScript exporter, tried next, said: {script_reason} The usual causes are "
        "Python control flow on tensor values (if x.sum() > 0), outputs that are not tensors, "
        "and a batch size fixed in the code (x.view(1, -1)); rewrite forward() with tensor ops "
        "(torch.where, reshape(-1, ...)) and return only tensors."
    )


def replicate_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """``tensor`` repeated along dim 0 until it has at least ``batch`` rows."""
    if tensor.dim() == 0 or tensor.shape[0] >= batch:
        return tensor
    reps = -(-batch // tensor.shape[0])
    return torch.cat([tensor] * reps)[:batch]


def flatten_outputs(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Named tensors of a forward() result: a tensor, a tuple/list, a dict or a Hugging Face
    ``ModelOutput`` (names from the keys: ``logits``, ``pred_boxes``), nested ones joined by
    ``_``; ``None`` entries (absent optional outputs) are skipped."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output_0", out)]
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, tuple | list):
        items = [(f"output_{i}" if not prefix else str(i), v) for i, v in enumerate(out)]
    elif out is None:
        return []
    else:
        raise ExportError(
            f"forward() returned {type(out).__name__}{' at ' + prefix if prefix else ''}; "
            "hetserve exports tensors, tuples, dicts and ModelOutputs of tensors. Wrap the "
            "model in a module that returns only the tensors you want served."
        )
    flat: list[tuple[str, torch.Tensor]] = []
    for key, value in items:
        flat.extend(flatten_outputs(value, f"{prefix}_{key}" if prefix else key))
    return flat


class FlatModule(torch.nn.Module):
    """The user's module seen as tensors in, a tuple of named tensors out (what ONNX holds)."""

    def __init__(self, loaded: LoadedModel, names: tuple[str, ...]) -> None:
        super().__init__()
        self.inner = loaded.module
        self._loaded = loaded
        self._names = names
        # In eval mode like the module it wraps: the TorchScript exporter switches to eval
        # for the trace and then restores the top module's mode recursively, so a wrapper
        # left in training mode put the user's dropout/drop-path back on, and every later
        # comparison with torch (the batch check, verification) compared against a random
        # model (HF Swin's drop_path: 0.1-0.5% of its logits, refused as a bad export).
        self.eval()

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        found = dict(flatten_outputs(self._loaded.call(args)))
        return tuple(found[name] for name in self._names)


def _run_once(loaded: LoadedModel, inputs) -> list[tuple[str, torch.Tensor]]:
    """Run the model once: its outputs must be tensors, which both exporters need."""
    try:
        with torch.no_grad():
            out = loaded.call(inputs)
    except Exception as exc:
        raise ExportError(
            f"{loaded.source}: running the model on its example input "
            f"{[tuple(t.shape) for t in inputs]} failed with "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        named = flatten_outputs(out)
    except ExportError as exc:
        raise ExportError(f"{loaded.source}: {exc}") from None
    if not named:
        raise ExportError(f"{loaded.source}: forward() returned no tensor")
    if len({n for n, _ in named}) != len(named):
        raise ExportError(f"{loaded.source}: output names repeat: {[n for n, _ in named]}")
    batch = inputs[0].shape[0]
    for name, tensor in named:
        if tensor.dim() == 0 or tensor.shape[0] != batch:
            raise ExportError(
                f"{loaded.source}: output {name!r} has shape {tuple(tensor.shape)} for a batch of "
                f"{batch}; every output needs the batch in dim 0. Return only per-sample outputs."
            )
    return named


def _dims(dynamic: DynamicDims) -> dict[str, Any]:
    out: dict[str, Any] = {BATCH: torch.export.Dim(BATCH)}
    for symbol in sorted(dynamic.symbols):
        low, high = dynamic.bounds.get(symbol, (None, None))
        kwargs = {}
        if low is not None:
            kwargs["min"] = max(low, 2)
        if high is not None and high < (1 << 31):
            kwargs["max"] = high
        out[symbol] = torch.export.Dim(symbol, **kwargs)
    return out


# torch.onnx's view errors: a `reshape` the trace lowered to a `view` (the layout allowed it)
# no longer fits the layout the exporter's own fake run derives for the same tensor.
_LAYOUT_MISMATCH = re.compile(r"Cannot view a tensor with shape|view size is not compatible")


def _export_dynamo(module, inputs, input_names, output_names, opset, dynamic) -> onnx.ModelProto:
    dims = _dims(dynamic)
    specs = tuple(
        {0: dims[BATCH], **{a: dims[s] for a, s in dynamic.axes.get(name, {}).items()}}
        for name in input_names
    )
    try:
        return _to_onnx(module, inputs, input_names, output_names, opset, specs)
    except Exception as exc:
        if not _LAYOUT_MISMATCH.search(str(exc)):
            raise
        # torch.export traces scaled_dot_product_attention with the CPU flash kernel, whose
        # output is laid out (batch, seq, heads, dim): `attn.transpose(1, 2).contiguous()` is
        # then a no-op and the reshape after it becomes a view. torch.onnx's type-promotion
        # pass re-runs the graph with SDPA's generic fake kernel, which returns the usual
        # (batch, heads, seq, dim) layout, and that view no longer fits (pytorch issues
        # 136543, 141107; seen on HF Swin and on a 2-head block with a float mask). Traced
        # with the math backend, both runs agree. ONNX has no strides, so the graph computes
        # the same thing; only a retry, so the models that convert directly keep their graphs
        # (the math trace adds a couple of Reshapes to ViT's).
        from torch.nn.attention import SDPBackend, sdpa_kernel

        log.info("torch.onnx failed on a view (%s); retrying with SDPA's math backend", _summarize(exc))
        with sdpa_kernel(SDPBackend.MATH):
            return _to_onnx(module, inputs, input_names, output_names, opset, specs)


def _to_onnx(module, inputs, input_names, output_names, opset, specs) -> onnx.ModelProto:
    with _quiet_exporter(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytree deprecations, shared-Dim notices: noise here
        program = torch.onnx.export(
            module,
            tuple(inputs),
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            dynamic_shapes={"args": specs},  # FlatModule.forward(*args)
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def _export_torchscript(
    module, inputs, input_names, output_names, opset, dynamic
) -> tuple[onnx.ModelProto, list[str]]:
    """The traced graph and the tracer's warnings (each a step frozen at the example's values;
    the caller verifies the graph against torch at another batch before trusting it)."""
    buffer = io.BytesIO()
    axes: dict[str, dict[int, str]] = {name: {0: BATCH} for name in (*input_names, *output_names)}
    for name, named in dynamic.axes.items():
        axes[name].update(named)
    with _quiet_exporter(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            tuple(inputs),
            buffer,
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    tracer = [
        str(w.message).splitlines()[0][:200]
        for w in caught
        if issubclass(w.category, torch.jit.TracerWarning)
    ]
    return onnx.load_from_string(buffer.getvalue()), tracer


def _check_other_batch(module, inputs, model: onnx.ModelProto) -> None:
    """Run ``model`` at the example's batch and at twice it in ONNX Runtime; compare with torch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure is reported below, not logged in red
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    ranges = derive_ranges(model)
    names = [i.name for i in session.get_inputs()]
    redrawn = [_redrawn(t, ranges.get(n), rng) for n, t in zip(names, inputs, strict=True)]
    # The example, then twice its batch with other values in the second half, then other values
    # only (ids in their tables' ranges, floats of either sign): a trace that froze a
    # value-dependent branch or a batch size differs from torch in one of them.
    cases = (
        list(inputs),
        [torch.cat([t, r]) for t, r in zip(inputs, redrawn, strict=True)],
        redrawn,
    )
    for feeds_t in cases:
        batch = feeds_t[0].shape[0]
        with torch.no_grad():
            expected = list(module(*feeds_t))
        try:
            feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), feeds_t, strict=True)}
            results = session.run(None, feeds)
        except Exception as exc:
            raise ExportError(
                f"the traced graph fails at batch {batch} ({str(exc).splitlines()[0][:300]}): "
                "the code fixes the batch size somewhere"
            ) from None
        for want, got in zip(expected, results, strict=True):
            want = want.numpy()
            scale = max(1.0, float(np.abs(want).max(initial=0.0)))
            if want.shape != got.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3 * scale):
                raise ExportError(
                    f"the traced graph differs from torch at batch {batch} (torch gives "
                    f"{want.shape}, ONNX {got.shape}): a traced step froze a value or shape"
                )


def _redrawn(tensor: torch.Tensor, values: ValueRange | None, rng: np.random.Generator) -> torch.Tensor:
    """Other values for ``tensor`` from the one example-input generator: in ``values`` (the
    graph's range for that input: ids, masks), else floats of the example's magnitude, either sign."""
    if tensor.is_floating_point():
        if values is None:
            magnitude = float(tensor.float().abs().max()) if tensor.numel() else 0.0
            values = ValueRange(-magnitude, magnitude, integers=False) if magnitude > 0 else None
        array = draw("float32", tuple(tensor.shape), values, rng)
    else:
        array = draw(tensor[:0].numpy().dtype.name, tuple(tensor.shape), values, rng)
    return torch.from_numpy(array).to(tensor.dtype)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporters' progress prints, graph dumps and log lines off the user's terminal.

    Whatever matters comes back as an exception; the rest is pages of traced graph per failure.
    """
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(disabled)


def _summarize(exc: BaseException) -> str:
    """One or two sentences from an exporter exception (they can run to pages)."""
    text = str(exc)
    summary = re.search(r"## Exception summary\s*\n\s*(.+)", text)
    line = summary.group(1) if summary else (text.strip().splitlines() or [type(exc).__name__])[0]
    line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
    where = re.search(r'The following call raised this error:\s*\n\s*(File .+)\n\s*(.+)', text)
    if where:
        line += f" (at {where.group(1).strip()}: {where.group(2).strip()})"
    if len(line) > 400:
        line = line[:400] + "..."
    return f"{type(exc).__name__}: {line}".rstrip(".") + "."


def resolve_dynamic(
    model: onnx.ModelProto, loaded: LoadedModel, declared: DynamicDims
) -> DynamicDims:
    """The dynamic dims the archive records: declared ones (torch) or the file's symbolic dims
    (ONNX, merged with any declared), each with a representative size (``--dim``, else the
    example's size) and its bounds. The exported graph must really keep them dynamic."""
    found = symbolic_dims(model)
    if loaded.onnx_path is not None:
        axes = {name: dict(named) for name, named in found.items()}
        for name, named in declared.axes.items():
            for axis, symbol in named.items():
                have = axes.get(name, {}).get(axis)
                if have is not None and have != symbol:
                    # the file's own name wins inside the graph; declared is an alias
                    raise ExportError(
                        f"{loaded.source}: {name} dim {axis} is {have!r} in the file, not {symbol!r}"
                    )
                axes.setdefault(name, {})[axis] = symbol
        sizes = dict(declared.sizes)
        symbols = {s for named in axes.values() for s in named.values()}
        unknown = sorted({*sizes, *declared.bounds} - symbols)
        if unknown:
            raise ExportError(
                f"{loaded.source}: --dim names {unknown}; the file's dynamic dims are "
                f"{sorted(symbols) or 'none besides the batch'}"
            )
        missing = sorted(symbols - set(sizes))
        if missing:
            raise ExportError(
                f"{loaded.source}: inputs have dynamic dims {missing} besides the batch; give "
                "each a representative size for profiling and pricing the cut, e.g. "
                + " ".join(f"--dim {m}=128" for m in missing)
            )
        return DynamicDims(axes=axes, sizes=sizes, bounds=dict(declared.bounds))
    undeclared = sorted({*declared.sizes, *declared.bounds} - declared.symbols)
    if undeclared:
        raise ExportError(
            f"{loaded.source}: --dim names {undeclared}, which no --dynamic INPUT:AXIS=SYMBOL "
            "declares"
        )
    sizes = dict(declared.sizes)
    for name, named in declared.axes.items():
        index = loaded.input_names.index(name)
        for axis, symbol in named.items():
            if found.get(name, {}).get(axis) != symbol:
                raise ExportError(
                    f"{loaded.source}: {name} dim {axis} did not stay dynamic ({symbol}) in the "
                    "exported graph; the code fixes that size somewhere (a constant in a "
                    "view/reshape, a buffer of fixed length)"
                )
            sizes.setdefault(symbol, int(loaded.example_inputs[index].shape[axis]))
    return DynamicDims(axes=declared.axes, sizes=sizes, bounds=dict(declared.bounds))


def torch_reference(loaded: LoadedModel, output_names: Sequence[str] | None = None):
    """numpy feeds -> the module's outputs by ONNX output name (position decides), for
    verifying the stages against torch itself."""

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in loaded.input_names]
        with torch.no_grad():
            flat = flatten_outputs(loaded.call(tensors))
        names = list(output_names) if output_names else [n for n, _ in flat]
        return {name: t.numpy() for name, (_, t) in zip(names, flat, strict=True)}

    return run


# ---- ONNX file -------------------------------------------------------------------------------


def _read_onnx_file(loaded: LoadedModel) -> onnx.ModelProto:
    path = loaded.onnx_path
    assert path is not None
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ExportError(f"{path}: not a readable ONNX model ({exc})") from None
    if model.ByteSize() > PROTO_LIMIT:
        raise ExportError(f"{path}: models over 2 GB are out of scope for hetserve")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ExportError(
            f"{path}: opset {opset} is older than {MIN_OPSET}; convert it with "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET}) or re-export"
        )
    graph = model.graph
    # Initializers listed as inputs (old exporters) could be overridden at run time, which blocks
    # folding and makes them look like model inputs; a served model never overrides its weights.
    weights = {i.name for i in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(real_inputs)
    for value in (*graph.input, *graph.output):
        _require_dynamic_batch(path, value, rename=True)
    return model


def _require_dynamic_batch(source, value: onnx.ValueInfoProto, rename: bool) -> None:
    """Dim 0 must be dynamic; ``rename`` gives it the name ``batch`` (an ONNX file's own name
    for it may differ), otherwise it must already be ``batch`` (not, say, ``2*batch``)."""
    dims = value.type.tensor_type.shape.dim
    if not value.type.HasField("tensor_type") or not dims:
        raise ExportError(f"{source}: {value.name!r} must be a tensor with a batch dimension")
    if dims[0].HasField("dim_value"):
        raise ExportError(
            f"{source}: dim 0 of {value.name!r} is fixed at {dims[0].dim_value}; hetserve needs "
            "dim 0 of every input and output to be the batch, of any size. Keep the batch in "
            "the code (reshape(-1, ...) or x.shape[0], not a constant) and, for an ONNX file, "
            "re-export with dynamic_shapes or dynamic_axes={name: {0: 'batch'}} on every input "
            "and output."
        )
    if rename:
        dims[0].dim_param = BATCH
    elif dims[0].dim_param != BATCH:
        raise ExportError(
            f"{source}: dim 0 of {value.name!r} is {dims[0].dim_param or 'unknown'}, not the "
            "batch; hetserve needs dim 0 of every input and output to be the batch"
        )


# ---- helpers ---------------------------------------------------------------------------------


def _is_foldable(node: onnx.NodeProto, constant: set[str], graph_outputs: set[str]) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDABLE:
        return False
    if node.op_type != "Constant" and not any(node.input):
        return False
    if any(o in graph_outputs for o in node.output):
        return False
    return all(not i or i in constant for i in node.input)


def _drop_stale_value_info(graph: onnx.GraphProto) -> None:
    """Keep the exporter's shapes (dynamo's name the batch through Reshape(-1, ...), where onnx's
    own inference cannot) but only for tensors some node still produces."""
    produced = {o for n in graph.node for o in n.output}
    kept = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _rename_inputs(node: onnx.NodeProto, aliases: dict[str, str]) -> None:
    for k, name in enumerate(node.input):
        if name in aliases:
            node.input[k] = aliases[name]


def _names_read(nodes: list[onnx.NodeProto], nested: bool = True) -> set[str]:
    """Every tensor name the nodes read, with ``nested`` also the names read inside subgraphs."""
    names: set[str] = set()
    for node in nodes:
        names.update(i for i in node.input if i)
        if not nested:
            continue
        for attr in node.attribute:
            for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                names |= _names_read(list(sub.node))
    return names


def _evaluate(
    nodes: list[onnx.NodeProto],
    initializers,
    outputs: list[str],
    parent: onnx.ModelProto,
) -> dict[str, np.ndarray]:
    """Run ``nodes`` (constant inputs only) once in ONNX Runtime and return ``outputs``."""
    import onnxruntime as ort

    read = _names_read(nodes)
    graph = onnx.helper.make_graph(
        list(nodes),
        "fold",
        inputs=[],
        outputs=[onnx.ValueInfoProto(name=o) for o in outputs],
        initializer=[i for i in initializers if i.name in read],
    )
    # The parent's IR version: onnx's newest may be newer than ONNX Runtime reads.
    mini = onnx.helper.make_model(
        graph, opset_imports=list(parent.opset_import), ir_version=parent.ir_version
    )
    mini = onnx.shape_inference.infer_shapes(mini)
    typed = {v.name: v for v in mini.graph.value_info}
    for out in mini.graph.output:
        if out.name in typed:
            out.CopyFrom(typed[out.name])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        mini.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return dict(zip(outputs, session.run(outputs, {}), strict=True))


def _tensors_without_shape(model: onnx.ModelProto) -> list[str]:
    """Intermediate tensors whose shape (or any non-batch dim) inference could not pin down."""
    known = {v.name: v for v in (*model.graph.value_info, *model.graph.output)}
    missing = []
    for node in model.graph.node:
        for name in node.output:
            if not name:
                continue
            value = known.get(name)
            if value is None:
                missing.append(name)
                continue
            if not value.type.HasField("tensor_type"):
                continue  # sequences and optionals have no shape to give
            tensor = value.type.tensor_type
            if not tensor.HasField("shape") or any(_is_unknown(d) for d in tensor.shape.dim):
                missing.append(name)
    return missing


def _is_unknown(dim: onnx.TensorShapeProto.Dimension) -> bool:
    if dim.HasField("dim_value"):
        return False
    # onnx names dims it could not relate to anything unk__N; they are as good as unknown.
    return not dim.HasField("dim_param") or dim.dim_param.startswith("unk__")


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's sympy-based inference: it follows the batch dim through Reshape(-1, ...)
    and Shape arithmetic where onnx's inference gives up (the TorchScript exporter's graphs)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # its coverage of ops is narrower than onnx's; keep what onnx found
        return model
    return inferred if inferred is not None else model
