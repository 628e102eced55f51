"""Strings -> the model's token tensors with the ``tokenizers`` package (a tokenizer.json).

``TextProcessor.encode`` tokenizes one request's strings; ``pad_batch`` then pads every text
request of a batch to the batch's longest sequence, so they share one run. A model exported
with a fixed sequence length gets every sequence padded to exactly that length instead.
Over-long text is refused with a 413 naming its length unless the archive declares truncation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from handlers.protocol.validation import BAD_REQUEST, PAYLOAD_TOO_LARGE, RequestError

from .config import DEFAULT_TOKEN_INPUTS, ProcessorConfigError, TextConfig

if TYPE_CHECKING:
    from handlers.artifact.manifest import TensorSpec


class TextProcessor:
    def __init__(
        self, tokenizer_file: Path, config: TextConfig, input_specs: Sequence[TensorSpec]
    ) -> None:
        from tokenizers import Tokenizer

        self.config = config
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # noqa: BLE001 - the tokenizers crate raises plain Exceptions
            raise ProcessorConfigError(
                f"hetserve.processors.text.tokenizer {config.tokenizer!r} is not a readable "
                f"tokenizer.json: {' '.join(str(exc).split())[:200]}"
            ) from None
        self.sources = _input_sources(config, input_specs)
        self.specs = {spec.name: spec for spec in input_specs if spec.name in self.sources}
        # A fixed sequence dim in the model (dim 1) is the only length it takes.
        fixed = {spec.shape[1] for spec in self.specs.values() if len(spec.shape) > 1}
        self.fixed_length = next(iter(fixed)) if len(fixed) == 1 and None not in fixed else None
        self.limit = min(config.max_length, self.fixed_length or config.max_length)
        self.tokenizer.no_padding()
        if config.truncation:
            self.tokenizer.enable_truncation(self.limit)
        else:
            self.tokenizer.no_truncation()
        pad_id = self.tokenizer.token_to_id(config.pad_token)
        if pad_id is None:
            raise ProcessorConfigError(
                f"hetserve.processors.text.pad_token {config.pad_token!r} is not in the tokenizer's vocabulary"
            )
        self.pad_id = pad_id

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.sources)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """One request's strings -> arrays (len(texts), length) in the specs' dtypes."""
        if not texts:
            raise RequestError(BAD_REQUEST, "no text to classify (an empty list)")
        if len(texts) > self.config.max_texts:
            raise RequestError(
                PAYLOAD_TOO_LARGE,
                f"{len(texts)} texts in one request exceed the limit of {self.config.max_texts}",
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise RequestError(BAD_REQUEST, f"text {i} is {type(text).__name__}, not a string")
            if len(text) > self.config.max_chars:
                raise RequestError(
                    PAYLOAD_TOO_LARGE,
                    f"text {i} has {len(text)} characters, over the limit of {self.config.max_chars}",
                )
        encodings = self.tokenizer.encode_batch(list(texts))
        for i, encoding in enumerate(encodings):
            if len(encoding.ids) > self.limit:
                raise RequestError(
                    PAYLOAD_TOO_LARGE,
                    f"text {i} is {len(encoding.ids)} tokens long, over this model's limit of "
                    f"{self.limit} tokens (truncation is off for this archive)",
                )
        length = self.fixed_length or max(len(e.ids) for e in encodings)
        fields = {
            "ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "type_ids": [e.type_ids for e in encodings],
        }
        out = {}
        for name, source in self.sources.items():
            pad = self.pad_id if source == "ids" else 0
            out[name] = _padded(fields[source], length, pad, np.dtype(self.specs[name].dtype))
        return out

    def pad_to(self, arrays: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
        """``arrays`` (from ``encode``) padded on the right to ``length`` tokens."""
        out = {}
        for name, array in arrays.items():
            missing = length - array.shape[1]
            if missing <= 0:
                out[name] = array
                continue
            pad = self.pad_id if self.sources.get(name) == "ids" else 0
            out[name] = np.pad(array, ((0, 0), (0, missing)), constant_values=pad)
        return out


def _padded(rows: Sequence[Sequence[int]], length: int, pad: int, dtype: np.dtype) -> np.ndarray:
    out = np.full((len(rows), length), pad, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _input_sources(config: TextConfig, input_specs: Sequence[TensorSpec]) -> dict[str, str]:
    names = [spec.name for spec in input_specs]
    if config.inputs:
        sources = dict(config.inputs)
    else:
        sources = {n: DEFAULT_TOKEN_INPUTS[n] for n in names if n in DEFAULT_TOKEN_INPUTS}
    unknown = [n for n in sources if n not in names]
    if unknown:
        raise ProcessorConfigError(
            f"hetserve.processors.text.inputs names {unknown}, which the model does not have "
            f"(its inputs: {names})"
        )
    unfilled = [n for n in names if n not in sources]
    if unfilled:
        raise ProcessorConfigError(
            f"the text processor cannot fill the model input(s) {unfilled}; map them with "
            "hetserve.processors.text.inputs: {name: ids|attention_mask|type_ids}"
        )
    return sources
