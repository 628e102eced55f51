"""Strings -> the model's token tensors with the ``tokenizers`` package (a tokenizer.json).

``TextProcessor.encode`` tokenizes one request's strings; ``pad_batch`` then pads every text
request of a batch to the batch's longest sequence, so they share one run. A model exported
with a fixed sequence length gets every sequence padded to exactly that length instead.
Over-long text is refused with a 413 naming its length unless the archive declares truncation.

Work is bounded before it is done: the number of texts, each text's characters and the
request's total characters are checked before anything is tokenized, and text that is not
valid Unicode (a lone surrogate, which JSON's ``\ud800`` escapes can carry) is a 400 naming
it. A text longer than ``PREFIX_CHARS_PER_TOKEN`` characters per allowed token is tokenized on
its head first: when the head alone is well over the token limit, the text is refused (no
truncation) or cut to that head (truncation: its first tokens are the whole text's), so a
100k-character text costs what a few thousand do.
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

# Natural language runs 3-6 characters per token; a head this long per allowed token is far
# past the limit for any real text, yet cheap to tokenize.
PREFIX_CHARS_PER_TOKEN = 16
# Tokens past the limit a head must reach before its count decides: only the last few tokens
# of a head can differ from the whole text's (the cut splits a word).
PREFIX_MARGIN = 16
_SPACES = (" ", "\n", "\t")


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
        # Counts a head's tokens untruncated, without special tokens.
        self.counter = self.tokenizer
        if config.truncation:
            self.counter = Tokenizer.from_str(self.tokenizer.to_str())
            self.counter.no_truncation()
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
        self._check(texts)
        encodings = self.tokenizer.encode_batch([self._bounded(i, t) for i, t in enumerate(texts)])
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

    def _check(self, texts: Sequence[str]) -> None:
        """Counts, types, sizes and Unicode: everything that needs no tokenizer, cheapest first."""
        config = self.config
        if not texts:
            raise RequestError(BAD_REQUEST, "no text to classify (an empty list)")
        if len(texts) > config.max_texts:
            raise RequestError(
                PAYLOAD_TOO_LARGE,
                f"{len(texts)} texts in one request exceed the limit of {config.max_texts}",
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise RequestError(BAD_REQUEST, f"text {i} is {type(text).__name__}, not a string")
            if len(text) > config.max_chars:
                raise RequestError(
                    PAYLOAD_TOO_LARGE,
                    f"text {i} has {len(text)} characters, over the limit of {config.max_chars}",
                )
        total = sum(len(t) for t in texts)
        if total > config.max_request_chars:
            raise RequestError(
                PAYLOAD_TOO_LARGE,
                f"the request's {len(texts)} texts hold {total} characters, over the limit of "
                f"{config.max_request_chars} per request (hetserve.processors.text.max_request_chars)",
            )
        for i, text in enumerate(texts):
            _check_unicode(i, text)

    def _bounded(self, index: int, text: str) -> str:
        """``text``, or its head when the head alone decides the answer (see the module doc)."""
        window = self.limit * PREFIX_CHARS_PER_TOKEN
        if len(text) <= window:
            return text
        head = _head(text, window)
        count = len(self.counter.encode(head, add_special_tokens=False).ids)
        if count < self.limit + PREFIX_MARGIN:
            return text  # long tokens: only the whole text can tell
        if not self.config.truncation:
            raise RequestError(
                PAYLOAD_TOO_LARGE,
                f"text {index} is over {self.limit} tokens long (its first {len(head)} of "
                f"{len(text)} characters alone are {count} tokens), over this model's limit of "
                f"{self.limit} tokens (truncation is off for this archive)",
            )
        return head

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


def _check_unicode(index: int, text: str) -> None:
    """Refuse lone surrogates (tokenizers would raise a TypeError: a 500)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            BAD_REQUEST,
            f"text {index} is not valid Unicode: character {exc.start} is a lone surrogate "
            f"(U+{ord(text[exc.start]):04X}); send UTF-8 text",
        ) from None


def _head(text: str, chars: int) -> str:
    """The first ``chars`` characters of ``text``, cut at a space in their second half if any."""
    cut = max(text.rfind(space, chars // 2, chars) for space in _SPACES)
    return text[: cut if cut > 0 else chars]


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
