"""Exported tiny models shared by the test modules (export is the slow part: once per session)."""

from __future__ import annotations

import functools

import onnx

TINY_MODELS = ("googlenet-tiny", "nfnet-tiny", "vit-tiny", "resnet18-tiny")


@functools.cache
def tiny_onnx(name: str) -> onnx.ModelProto:
    from partitioner.export import export_onnx
    from partitioner.loading import load_model

    return export_onnx(load_model(f"zoo:{name}"))


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
