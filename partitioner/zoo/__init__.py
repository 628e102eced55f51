"""Example models in plain torch, with deterministic random weights, for tests and benchmarks.

Plain torch on purpose: torchvision and timm cannot be imported next to this project's torch (see
../shared/NOTES.md). The families are the ones the StarONNX paper cuts (GoogLeNet, NFNet, ViT) plus
ResNets. Weights are random but seeded and scaled so activations and logits stay finite and O(1):
profiling and cutting only need realistic shapes, and tests need outputs worth comparing.

    model = build("vit-tiny", depth=3)
    model.module(*model.example_inputs)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

INPUT_NAMES = ("image",)
OUTPUT_NAMES = ("logits",)
SEED = 0


@dataclass(frozen=True)
class ZooModel:
    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]  # batch 1
    input_names: tuple[str, ...] = INPUT_NAMES
    output_names: tuple[str, ...] = OUTPUT_NAMES
    config: Any = None  # the family's config dataclass, overrides applied


@dataclass(frozen=True)
class _Entry:
    config: Any  # a frozen config dataclass instance: the defaults for this name
    factory: Callable[[Any], nn.Module]


def _registry() -> dict[str, _Entry]:
    # Imported lazily so that importing the package costs nothing until a model is built.
    from partitioner.zoo import googlenet, nfnet, resnet, vit

    return {
        "googlenet": _Entry(googlenet.GoogLeNetConfig(), googlenet.GoogLeNet),
        "googlenet-tiny": _Entry(googlenet.TINY, googlenet.GoogLeNet),
        "nfnet": _Entry(nfnet.NFNetConfig(), nfnet.NFNet),
        "nfnet-tiny": _Entry(nfnet.TINY, nfnet.NFNet),
        "vit-b16": _Entry(vit.ViTConfig(), vit.ViT),
        "vit-tiny": _Entry(vit.TINY, vit.ViT),
        "resnet18": _Entry(resnet.RESNET18, resnet.ResNet),
        "resnet18-tiny": _Entry(resnet.RESNET18_TINY, resnet.ResNet),
        "resnet50": _Entry(resnet.RESNET50, resnet.ResNet),
    }


def names() -> list[str]:
    return sorted(_registry())


def build(name: str, **overrides: Any) -> ZooModel:
    """Build zoo model ``name`` in eval mode; ``overrides`` replace fields of its config."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(sorted(registry))}")
    entry = registry[name]
    config = apply_overrides(entry.config, overrides, what=f"zoo model {name!r}")
    # fork_rng keeps the caller's global RNG state untouched while seeding the init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        module = entry.factory(config).eval()
        example = torch.randn(1, 3, config.image_size, config.image_size)
    for p in module.parameters():
        p.requires_grad_(False)
    return ZooModel(name=name, module=module, example_inputs=(example,), config=config)


def apply_overrides(config: Any, overrides: dict[str, Any], what: str) -> Any:
    """``config`` with ``overrides`` applied, each checked against the field's declared type."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"{what} has no size knob {', '.join(map(repr, unknown))}; "
            f"its knobs are: {', '.join(sorted(fields))}"
        )
    coerced = {k: _coerce(k, v, getattr(config, k), what) for k, v in overrides.items()}
    return dataclasses.replace(config, **coerced)


def _coerce(key: str, value: Any, default: Any, what: str) -> Any:
    """Accept ``value`` for a field whose default is ``default`` (the default fixes the type)."""
    bad = ValueError(
        f"{what}: {key}={value!r} should be {type(default).__name__} like the default {default!r}"
    )
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise bad
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise bad
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if isinstance(default, tuple):
        items = (value,) if isinstance(value, int | float) else value
        if not isinstance(items, tuple | list) or not items:
            raise bad
        item_default = default[0] if default else 0
        return tuple(_coerce(key, v, item_default, what) for v in items)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value
    raise bad
