"""Exported tiny models shared by the test modules (export is the slow part: once per session)."""

from __future__ import annotations

import functools

import onnx

TINY_MODELS = ("googlenet-tiny", "nfnet-tiny", "vit-tiny", "resnet18-tiny")


@functools.cache
def tiny_exported(name: str):
    """(the loaded zoo model, its ONNX export), once per session for every module that asks."""
    from partitioner.export import export_onnx
    from partitioner.loading import load_model

    loaded = load_model(f"zoo:{name}")
    return loaded, export_onnx(loaded)


def tiny_onnx(name: str) -> onnx.ModelProto:
    return tiny_exported(name)[1]


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
