"""What loading a model gives the exporter: ``LoadedModel`` (a torch module with example inputs,
or an ONNX file), and ``ModelLoadError`` for a model that cannot be loaded. Shared by
``partitioner/loading.py`` (every spec kind) and ``partitioner/hf_dir.py`` (``hf:DIR``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelLoadError(ValueError):
    """The model named by the user cannot be loaded; the message says what to change."""


@dataclass(frozen=True)
class LoadedModel:
    """Either a torch module with example inputs (any batch), or the path of an ONNX file.

    ``call_kwargs``: the module is called as ``module(**dict(zip(input_names, inputs)))`` (a
    factory gave its example inputs as a dict, as Hugging Face models take them).
    """

    source: str  # the spec as given, for messages and the archive's provenance
    module: nn.Module | None = None
    example_inputs: tuple[torch.Tensor, ...] = ()
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()  # empty: named from the outputs' keys, or output_0...
    onnx_path: Path | None = None
    # hetserve.processors section and the files it reads (archive name -> bytes), e.g. hf:DIR's
    processors: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, bytes] = field(default_factory=dict)
    call_kwargs: bool = False

    def call(self, inputs: Sequence[torch.Tensor]) -> Any:
        """Run the module on ``inputs`` (in ``input_names`` order) the way it expects them."""
        assert self.module is not None
        if self.call_kwargs:
            return self.module(**dict(zip(self.input_names, inputs, strict=True)))
        return self.module(*inputs)

    @property
    def is_onnx(self) -> bool:
        return self.onnx_path is not None
