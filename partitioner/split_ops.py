"""Split one huge operator into column chunks so a head/tail ratio becomes reachable.

A cut moves whole nodes, so a node heavier than the tolerance window leaves a gap in the ratios
a model can reach: GPT-2's ``lm_head`` (a MatMul against a [hidden, vocab] weight) is the last
third or more of the cost, and no head can end inside it. Splitting ``Y = X @ W`` into
``Concat(X @ W[:, c0], X @ W[:, c1], ...)`` along the output axis is the same math (every output
element is the same dot product) and gives the cut k smaller nodes to place. Only weight-constant
MatMul (2-D weight) and Gemm are split; their cost is shared out in proportion to the columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

SPLITTABLE_OPS = ("MatMul", "Gemm")
PART_SUFFIX = "_part"
CONCAT_SUFFIX = "_concat"


class SplitError(ValueError):
    """The node cannot be split as asked; the message says why."""


@dataclass(frozen=True)
class OpSplit:
    """What was split: reported in the archive so the user sees why the graph changed."""

    node: str
    op_type: str
    parts: int
    columns: int


def splittable_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray | None:
    """The node's constant weight as [K, N] (output columns last), or None if not splittable."""
    if node.op_type not in SPLITTABLE_OPS or len(node.input) < 2:
        return None
    inits = {i.name: i for i in model.graph.initializer}
    weight = inits.get(node.input[1])
    if weight is None or len(weight.dims) != 2:
        return None
    array = numpy_helper.to_array(weight)
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return None  # the output rows, not columns, would follow the weight
        if attrs.get("transB", 0):
            array = array.T
    return array


def split_node(model: onnx.ModelProto, node_name: str, parts: int) -> tuple[onnx.ModelProto, OpSplit]:
    """A copy of ``model`` with ``node_name`` computed as ``parts`` column chunks + Concat.

    The chunks keep the node's op (and Gemm's alpha/beta); a bias along the columns is split
    with them. The Concat writes the node's original output name, so readers are untouched.
    """
    if parts < 2:
        raise SplitError(f"parts must be at least 2, got {parts}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index = next((k for k, n in enumerate(graph.node) if n.name == node_name), None)
    if index is None:
        raise SplitError(f"no node named {node_name!r}")
    node = graph.node[index]
    weight = splittable_weight(out, node)
    if weight is None:
        raise SplitError(
            f"node {node_name!r} ({node.op_type}) is not a MatMul/Gemm with a constant 2-D weight"
        )
    columns = weight.shape[1]
    if parts > columns:
        raise SplitError(f"node {node_name!r} has {columns} output columns, cannot make {parts} parts")
    bias = _column_bias(out, node, columns)
    attrs = [a for a in node.attribute if a.name != "transB"]
    chunks = np.array_split(np.arange(columns), parts)
    new_nodes, new_inits, part_outputs = [], [], []
    for k, cols in enumerate(chunks):
        name = f"{node_name}{PART_SUFFIX}{k}"
        w_name = f"{node.input[1]}{PART_SUFFIX}{k}"
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(weight[:, cols]), w_name))
        inputs = [node.input[0], w_name]
        if bias is not None:
            b_name = f"{node.input[2]}{PART_SUFFIX}{k}"
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(bias[..., cols]), b_name))
            inputs.append(b_name)
        elif len(node.input) > 2 and node.input[2]:
            inputs.append(node.input[2])  # a scalar or per-row bias applies to every chunk
        part_out = f"{node.output[0]}{PART_SUFFIX}{k}"
        part = helper.make_node(node.op_type, inputs, [part_out], name=name)
        part.attribute.extend(attrs)
        new_nodes.append(part)
        part_outputs.append(part_out)
    new_nodes.append(
        helper.make_node("Concat", part_outputs, [node.output[0]], name=f"{node_name}{CONCAT_SUFFIX}", axis=-1)
    )
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    clash = taken & ({i.name for i in new_inits} | set(part_outputs))
    if clash:
        raise SplitError(f"node {node_name!r}: the chunks' names {sorted(clash)} are taken")
    rest = [n for k, n in enumerate(graph.node) if k != index]
    del graph.node[:]
    graph.node.extend([*rest[:index], *new_nodes, *rest[index:]])
    graph.initializer.extend(new_inits)
    _drop_if_unused(out, [i for i in node.input[1:] if i])
    _add_chunk_types(out, node.output[0], part_outputs, [len(c) for c in chunks])
    return out, OpSplit(node_name, node.op_type, parts, columns)


def _add_chunk_types(
    model: onnx.ModelProto, output: str, part_outputs: list[str], widths: list[int]
) -> None:
    """The chunks' types: the output's, with the last dim set to the chunk's width. The
    exporter's value_info (symbolic dims included) is kept as it is; only when the output's
    type is unknown does ONNX shape inference fill in the chunks."""
    known = {v.name: v for v in (*model.graph.value_info, *model.graph.output)}
    if output not in known or not known[output].type.tensor_type.shape.dim:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name in part_outputs)
        return
    for name, width in zip(part_outputs, widths, strict=True):
        value = onnx.ValueInfoProto()
        value.CopyFrom(known[output])
        value.name = name
        last = value.type.tensor_type.shape.dim[-1]
        last.Clear()
        last.dim_value = width
        model.graph.value_info.append(value)


def split_costs(costs: Mapping[str, float], split: OpSplit) -> dict[str, float]:
    """The node's cost shared by its chunks in proportion to their columns; the Concat is free
    next to them (a copy of the output)."""
    out = {k: v for k, v in costs.items() if k != split.node}
    cost = float(costs.get(split.node, 0.0))
    for k, cols in enumerate(np.array_split(np.arange(split.columns), split.parts)):
        out[f"{split.node}{PART_SUFFIX}{k}"] = cost * len(cols) / split.columns
    out[f"{split.node}{CONCAT_SUFFIX}"] = 0.0
    return out


def _column_bias(model: onnx.ModelProto, node: onnx.NodeProto, columns: int) -> np.ndarray | None:
    """Gemm's C when it varies along the output columns (then it is split with them)."""
    if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
        return None
    inits = {i.name: i for i in model.graph.initializer}
    if node.input[2] not in inits:
        raise SplitError(f"node {node.name!r}: its bias {node.input[2]!r} is not a constant")
    bias = numpy_helper.to_array(inits[node.input[2]])
    return bias if bias.ndim and bias.shape[-1] == columns else None


def _drop_if_unused(model: onnx.ModelProto, names: list[str]) -> None:
    """Drop the split node's old weight and bias unless something else reads them (a tied
    embedding reads GPT-2's lm_head weight, which then stays next to its chunks)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dropped = {n for n in names if n not in used}
    kept = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    inputs = [v for v in model.graph.input if v.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
