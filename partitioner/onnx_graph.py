"""Build the plain-data ``TaskGraph`` from a shape-inferred ONNX model.

Nodes that do not depend on any graph input (``Constant`` and whatever constant folding left
behind) are kept out of the task graph: they cost nothing per request and
``onnx.utils.Extractor`` copies them into whichever stage reads them, so they never need to cross.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from partitioner.graph import TaskGraph, TensorEdge

log = logging.getLogger(__name__)

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


class GraphBuildError(ValueError):
    """The ONNX graph cannot be partitioned; the message says why."""


@dataclass(frozen=True)
class OnnxTaskGraph:
    """The task graph plus the mapping back to ONNX node names and tensor types."""

    graph: TaskGraph
    node_names: tuple[str, ...]  # task-graph index -> ONNX node name
    constant_nodes: tuple[str, ...]  # ONNX nodes left out because they read no graph input
    tensor_types: Mapping[str, onnx.ValueInfoProto]
    # ONNX nodes left out because they only compute shapes (small static integer tensors):
    # each stage recomputes the ones it reads (partitioner.stages), so they never cross.
    shape_nodes: tuple[str, ...] = ()


def tensor_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    types = {vi.name: vi for vi in g.value_info}
    types.update({vi.name: vi for vi in g.input})
    types.update({vi.name: vi for vi in g.output})
    return types


def bytes_per_sample(
    value_info: onnx.ValueInfoProto | None, dim_sizes: Mapping[str, int] | None = None
) -> int | None:
    """Bytes of one sample: a symbolic dimension counts as its representative size in
    ``dim_sizes`` (``seq`` -> 128), any other (the batch) as 1; None if unknown."""
    if value_info is None or not value_info.type.HasField("tensor_type"):
        return None
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
    except (KeyError, TypeError):
        return None
    count = 1
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            count *= max(dim.dim_value, 0)
        elif dim_sizes and dim.dim_param in dim_sizes:
            count *= dim_sizes[dim.dim_param]
    return count * itemsize


SHAPE_TENSOR_MAX_ELEMENTS = 64


def is_shape_tensor(value_info: onnx.ValueInfoProto | None) -> bool:
    """A small integer/bool tensor of fully static shape: a shape, an index, a flag. Its value
    cannot depend on a sample's data, only on the sizes of the tensors it was computed from."""
    if value_info is None or not value_info.type.HasField("tensor_type"):
        return False
    tensor_type = value_info.type.tensor_type
    if tensor_type.elem_type not in _INTEGER_TYPES or not tensor_type.HasField("shape"):
        return False
    count = 1
    for dim in tensor_type.shape.dim:
        if not dim.HasField("dim_value"):
            return False
        count *= dim.dim_value
    return count <= SHAPE_TENSOR_MAX_ELEMENTS


def carries_batch(value_info: onnx.ValueInfoProto | None) -> bool:
    """Dim 0 is the batch itself: the runtime can split and join the tensor per request."""
    if value_info is None or not value_info.type.HasField("tensor_type"):
        return False
    dims = value_info.type.tensor_type.shape.dim
    return bool(dims) and dims[0].dim_param == BATCH


BATCH = "batch"
_INTEGER_TYPES = frozenset({
    onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
})


def build_task_graph(
    model: onnx.ModelProto,
    costs: Mapping[str, float],
    dim_sizes: Mapping[str, int] | None = None,
) -> OnnxTaskGraph:
    """``costs`` maps ONNX node names to their measured (or estimated) cost; missing means 0.
    ``dim_sizes`` prices dynamic dims beyond the batch at their representative sizes."""
    g = model.graph
    control_flow = sorted({n.op_type for n in g.node if n.op_type in CONTROL_FLOW_OPS})
    if control_flow:
        raise GraphBuildError(
            f"the model uses control-flow operators ({', '.join(control_flow)}); "
            "the partitioner only cuts graphs without sub-graphs"
        )
    initializers = {t.name for t in g.initializer}
    graph_inputs = [vi.name for vi in g.input if vi.name not in initializers]
    input_dependent = _input_dependent_tensors(g, set(graph_inputs))

    types = tensor_types(model)
    outputs = {vi.name for vi in g.output}
    shape_nodes = tuple(
        n.name for n in g.node
        if any(o in input_dependent for o in n.output)
        and all(not o or (is_shape_tensor(types.get(o)) and o not in outputs) for o in n.output)
    )
    shape_set = set(shape_nodes)
    kept = [
        n for n in g.node
        if any(o in input_dependent for o in n.output) and n.name not in shape_set
    ]
    # Nodes whose results only feed shape computations (x in Shape(x)) lead to no output once
    # those are left out: a tail of them would serve nothing. They go with the shape nodes.
    feeders = _not_reaching_outputs(kept, outputs)
    if feeders:
        shape_nodes += tuple(n.name for n in kept if n.name in feeders)
        kept = [n for n in kept if n.name not in feeders]
    constant_nodes = tuple(n.name for n in g.node if not any(o in input_dependent for o in n.output))
    index = {n.name: i for i, n in enumerate(kept)}
    if len(index) != len(kept):
        raise GraphBuildError("node names must be unique (export names every node)")

    producers: dict[str, int | None] = {name: None for name in graph_inputs}
    for i, node in enumerate(kept):
        for out in node.output:
            if out:
                producers[out] = i
    consumers: dict[str, list[int]] = {name: [] for name in producers}
    for i, node in enumerate(kept):
        for name in node.input:
            if name in consumers and i not in consumers[name]:
                consumers[name].append(i)

    sizes = {name: bytes_per_sample(types.get(name), dim_sizes) for name in producers}
    known = [s for s in sizes.values() if s is not None]
    # An unknown size must not look like a cheap place to cut: assume the largest known tensor.
    fallback = max(known, default=1)
    unknown = sorted(name for name, s in sizes.items() if s is None and consumers[name])
    if unknown:
        log.warning("no static shape for %d tensors (e.g. %s); assuming %d bytes", len(unknown), unknown[0], fallback)

    tensors = tuple(
        TensorEdge(
            name=name,
            producer=producers[name],
            consumers=tuple(consumers[name]),
            nbytes=sizes[name] if sizes[name] is not None else fallback,
            is_output=name in outputs,
            cuttable=producers[name] is None or carries_batch(types.get(name)),
        )
        for name in producers
        if consumers[name] or name in outputs
    )
    task_graph = TaskGraph(
        node_names=tuple(n.name for n in kept),
        costs=tuple(float(max(costs.get(n.name, 0.0), 0.0)) for n in kept),
        tensors=tensors,
        op_types=tuple(n.op_type for n in kept),
    )
    return OnnxTaskGraph(
        graph=task_graph,
        node_names=task_graph.node_names,
        constant_nodes=constant_nodes,
        tensor_types=types,
        shape_nodes=shape_nodes,
    )


def _not_reaching_outputs(nodes: list[onnx.NodeProto], outputs: set[str]) -> set[str]:
    """Names of ``nodes`` (topologically ordered) from which no graph output can be reached."""
    needed = set(outputs)
    reaching: set[str] = set()
    for node in reversed(nodes):
        if any(o in needed for o in node.output if o):
            reaching.add(node.name)
            needed.update(i for i in node.input if i)
    return {n.name for n in nodes} - reaching


def _input_dependent_tensors(graph: onnx.GraphProto, graph_inputs: set[str]) -> set[str]:
    dependent = set(graph_inputs)
    for node in graph.node:  # ONNX requires nodes in topological order
        if any(name in dependent for name in node.input if name):
            dependent.update(o for o in node.output if o)
    return dependent
