"""Turn a split into two runnable ONNX stages, store their weights once, and prove them right.

``split_model`` is in-memory (``onnx.utils.Extractor``); ``write_models`` is the file side: every
model of the archive (the whole model and each ratio's head and tail) points its large
initializers at one shared ``weights.bin`` through ONNX external data, so an archive with four
ratios is not five copies of the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.utils import Extractor

from handlers.artifact.manifest import TensorSpec
from partitioner.onnx_graph import OnnxTaskGraph
from partitioner.value_ranges import derive_ranges, with_ranges

WEIGHTS_FILE = "weights.bin"
INLINE_LIMIT = 1024  # bytes; smaller initializers stay inside the graph file
PAGE = 4096
VERIFY_TOLERANCE = 1e-4


class StageError(ValueError):
    """The stages cannot be built or do not reproduce the whole model."""


@dataclass(frozen=True)
class StagePair:
    head: onnx.ModelProto
    tail: onnx.ModelProto
    cut_tensors: tuple[str, ...]  # the tail's inputs: head outputs and graph inputs it reads
    head_outputs: tuple[str, ...]  # model outputs the head produces itself


def split_model(model: onnx.ModelProto, task: OnnxTaskGraph, tail: Iterable[int]) -> StagePair:
    tail_set = frozenset(tail)
    graph = task.graph
    if not tail_set or len(tail_set) == graph.num_nodes:
        raise StageError("both stages must hold at least one node")
    in_tail = [v in tail_set for v in range(graph.num_nodes)]
    graph_inputs = [t.name for t in graph.tensors if t.producer is None]
    model_outputs = [vi.name for vi in model.graph.output]

    cut_tensors, head_produced = [], []
    for t in graph.tensors:
        from_head = t.producer is None or not in_tail[t.producer]
        if from_head and any(in_tail[c] for c in t.consumers):
            cut_tensors.append(t.name)
            if t.producer is not None:
                head_produced.append(t.name)
        elif t.producer is not None and in_tail[t.producer] and any(not in_tail[c] for c in t.consumers):
            raise StageError(f"tensor {t.name!r} flows tail -> head: the split is not pipeline-valid")
    producer_in_tail = {t.name: t.producer is not None and in_tail[t.producer] for t in graph.tensors}
    head_outputs = [o for o in model_outputs if not producer_in_tail.get(o, False)]
    tail_outputs = [o for o in model_outputs if producer_in_tail.get(o, False)]
    if not tail_outputs:
        raise StageError("the tail produces no model output; nothing would reach the client")

    readers = {t.name: t.consumers for t in graph.tensors}
    head_inputs = [name for name in graph_inputs if any(not in_tail[c] for c in readers[name])]
    head_inputs += [  # graph inputs only the head's shape computations read (Shape(input_ids))
        name for name in graph_inputs if name not in head_inputs and name not in cut_tensors
    ]
    head = Extractor(model).extract_model(head_inputs, _unique(head_produced + head_outputs))
    head = _drop_unused_inputs(head)
    tail_source = recompute_shapes_in_tail(model, task, tail_set, cut_tensors)
    tail_model = Extractor(tail_source).extract_model(cut_tensors, tail_outputs)
    _check_membership(head, task, tail_set, expect_tail=False)
    _check_membership(tail_model, task, tail_set, expect_tail=True)
    return StagePair(head, tail_model, tuple(cut_tensors), tuple(head_outputs))


TAIL_SHAPE_SUFFIX = "__tail_shape"


def recompute_shapes_in_tail(
    model: onnx.ModelProto, task: OnnxTaskGraph, tail: frozenset[int], cut_tensors: list[str]
) -> onnx.ModelProto:
    """``model`` with each ``Shape(x)`` the tail needs but cannot compute (x stays in the head)
    rebuilt from the cut tensors: every dim of x is a constant or a named symbol (``batch``,
    ``seq``) that some cut tensor also has, so ``Concat(Gather(Shape(cut), axis), ...)`` gives
    the same value. Shape tensors therefore never cross the cut; each stage recomputes its own.
    """
    shape_nodes = set(task.shape_nodes)
    produced_by = {o: n for n in model.graph.node for o in n.output if o}
    types = task.tensor_types
    available = set(cut_tensors) | {i.name for i in model.graph.initializer}
    tail_names = {task.node_names[v] for v in tail}
    for node in model.graph.node:
        if node.name in tail_names:
            available.update(o for o in node.output if o)
    rewrites: dict[str, list[onnx.NodeProto]] = {}
    seen: set[str] = set()
    pending = [i for n in model.graph.node if n.name in tail_names for i in n.input if i]
    while pending:
        name = pending.pop()
        if name in seen or name in available:
            continue
        seen.add(name)
        node = produced_by.get(name)
        if node is None or node.name not in shape_nodes:
            if node is None or node.name in task.constant_nodes:
                continue  # an initializer or a constant: the extractor copies it
            raise StageError(f"the tail reads {name!r}, which is neither cut nor recomputable")
        reads_unavailable = [i for i in node.input if i and i not in available]
        if node.op_type == "Shape" and reads_unavailable:
            rewrites[node.name] = _shape_from_cut(node, types, cut_tensors)
        else:
            pending.extend(reads_unavailable)
    if not rewrites:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        nodes.extend(rewrites.get(node.name, [node]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _shape_from_cut(
    node: onnx.NodeProto, types: Mapping[str, onnx.ValueInfoProto], cut_tensors: list[str]
) -> list[onnx.NodeProto]:
    source = node.input[0]
    dims = list(types[source].type.tensor_type.shape.dim) if source in types else None
    if dims is None:
        raise StageError(f"no shape known for {source!r}; cannot recompute {node.name!r}")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    rank = len(dims)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    dims = dims[slice(start, end)]
    where: dict[str, tuple[str, int]] = {}  # symbol -> (cut tensor, axis)
    for cut in cut_tensors:
        for axis, dim in enumerate(types[cut].type.tensor_type.shape.dim if cut in types else ()):
            if dim.dim_param and dim.dim_param not in where:
                where[dim.dim_param] = (cut, axis)
    base = f"{node.name}{TAIL_SHAPE_SUFFIX}"
    made: list[onnx.NodeProto] = []
    shapes_of: dict[str, str] = {}
    parts = []
    for k, dim in enumerate(dims):
        part = f"{base}_d{k}"
        if dim.HasField("dim_value"):
            made.append(onnx.helper.make_node(
                "Constant", [], [part], name=part,
                value=numpy_helper.from_array(np.array([dim.dim_value], dtype=np.int64)),
            ))
        elif dim.dim_param in where:
            cut, axis = where[dim.dim_param]
            if cut not in shapes_of:
                shapes_of[cut] = f"{base}_of{len(shapes_of)}"
                made.append(onnx.helper.make_node(
                    "Shape", [cut], [shapes_of[cut]], name=shapes_of[cut]
                ))
            index = f"{part}_index"
            made.append(onnx.helper.make_node(
                "Constant", [], [index], name=index,
                value=numpy_helper.from_array(np.array([axis], dtype=np.int64)),
            ))
            made.append(onnx.helper.make_node(
                "Gather", [shapes_of[cut], index], [part], name=part, axis=0
            ))
        else:
            raise StageError(
                f"{node.name!r} reads the shape of {source!r}, whose dim {k + start} "
                f"({dim.dim_param or 'unknown'}) no cut tensor carries; it cannot be recomputed "
                "in the tail"
            )
        parts.append(part)
    if not parts:
        made.append(onnx.helper.make_node(
            "Constant", [], [node.output[0]], name=base,
            value=numpy_helper.from_array(np.zeros(0, dtype=np.int64)),
        ))
    else:
        made.append(onnx.helper.make_node("Concat", parts, [node.output[0]], name=base, axis=0))
    return made


def _drop_unused_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    read = {i for n in model.graph.node for i in n.input}
    read |= {o.name for o in model.graph.output}
    kept = [i for i in model.graph.input if i.name in read]
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)
    return model


def tensor_spec(model: onnx.ModelProto, name: str) -> TensorSpec:
    """The manifest's view of a graph input/output: numpy dtype name and shape (None = dynamic)."""
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if vi.name == name:
            tt = vi.type.tensor_type
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            return TensorSpec(name=name, dtype=dtype, shape=shape)
    raise StageError(f"no type information for tensor {name!r}")


def graph_io_specs(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's inputs, each with the value range example inputs are drawn from
    (partitioner.value_ranges), and its outputs."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = with_ranges(
        (tensor_spec(model, vi.name) for vi in model.graph.input if vi.name not in initializers),
        derive_ranges(model),
    )
    outputs = tuple(tensor_spec(model, vi.name) for vi in model.graph.output)
    return inputs, outputs


class SharedWeights:
    """Appends initializers to one file and rewrites models to reference it (stored once by name)."""

    def __init__(self, directory: Path, filename: str = WEIGHTS_FILE) -> None:
        self.path = directory / filename
        self.filename = filename
        self._offsets: dict[str, tuple[int, int]] = {}
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()

    def externalize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` whose large initializers point into the shared file."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for tensor in out.graph.initializer:
            if _nbytes(tensor) < INLINE_LIMIT:
                continue
            offset, length = self._store(tensor)
            _clear_data(tensor)
            _point_at(tensor, self.filename, offset, length)
        return out

    def _store(self, tensor: onnx.TensorProto) -> tuple[int, int]:
        if tensor.name in self._offsets:
            return self._offsets[tensor.name]
        data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
        position = self._file.tell()
        # Page-aligned large tensors let ORT map them instead of copying.
        align = PAGE if len(data) >= 16 * PAGE else 64
        padding = (-position) % align
        self._file.write(b"\0" * padding)
        offset = position + padding
        self._file.write(data)
        self._offsets[tensor.name] = (offset, len(data))
        return offset, len(data)

    def flush(self) -> None:
        """Make everything stored so far readable by ORT sessions opened before close()."""
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SharedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_model(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))


def run_pipeline(head, tail, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Head then tail, wiring tensors by name (the tail may also read graph inputs)."""
    available = dict(feeds)
    head_in = {i.name: available[i.name] for i in head.get_inputs()}
    available.update(zip([o.name for o in head.get_outputs()], head.run(None, head_in), strict=True))
    tail_in = {i.name: available[i.name] for i in tail.get_inputs()}
    available.update(zip([o.name for o in tail.get_outputs()], tail.run(None, tail_in), strict=True))
    return available


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _check_membership(stage: onnx.ModelProto, task: OnnxTaskGraph, tail: frozenset[int], expect_tail: bool) -> None:
    index = {name: i for i, name in enumerate(task.node_names)}
    constant = set(task.constant_nodes) | set(task.shape_nodes)
    for node in stage.graph.node:
        if node.name in constant or TAIL_SHAPE_SUFFIX in node.name:
            continue
        if node.name not in index:
            raise StageError(f"extracted node {node.name!r} is unknown to the task graph")
        if (index[node.name] in tail) != expect_tail:
            side = "tail" if expect_tail else "head"
            raise StageError(f"node {node.name!r} leaked into the {side}: the split is not closed")


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _clear_data(tensor: onnx.TensorProto) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
