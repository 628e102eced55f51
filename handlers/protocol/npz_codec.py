"""``.npz`` bodies: several named tensors in one binary body, for multi-input models.

Read with ``np.load(allow_pickle=False)``: an object array is refused, never unpickled. Every
member's uncompressed size is checked against the body limit before it is read (a zip bomb
stays a 413), and each array goes through the same validation as every other format.
The response is an ``.npz`` of the model's outputs (or those named in X-Output-Name).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from handlers.protocol.body import RAW_CONTENT_TYPE, header
from handlers.protocol.codec import (
    BodyRequest,
    Codec,
    DecodedRequest,
    EncodedResponse,
    ResponseMeta,
)
from handlers.protocol.kserve_v2 import check_output_name
from handlers.protocol.validation import (
    BAD_REQUEST,
    PAYLOAD_TOO_LARGE,
    RequestError,
    RequestLimits,
    check_cast,
    check_element_budget,
    check_names,
    clip,
    quoted,
    validate_inputs,
)

if TYPE_CHECKING:
    from handlers.artifact.manifest import TensorSpec

FORMAT_NPZ = "npz"
NPZ_CONTENT_TYPE = "application/x-npz"
ZIP_MAGIC = b"PK\x03\x04"
MAX_MEMBERS = 64
# Headers that describe a raw tensor: raw bytes that happen to start with a magic stay raw.
SHAPE_HEADER = "X-Tensor-Shape"
DTYPE_HEADER = "X-Tensor-Dtype"
OUTPUT_HEADER = "X-Output-Name"


def described_raw(request: BodyRequest) -> bool:
    """Bytes sent as octet-stream with a raw tensor's shape or dtype header: raw, whatever they
    start with."""
    return request.media == RAW_CONTENT_TYPE and (
        header(request.headers, SHAPE_HEADER) is not None
        or header(request.headers, DTYPE_HEADER) is not None
    )


class NpzCodec(Codec):
    """Several named tensors in one binary body: NumPy's .npz (a zip of .npy, never pickled)."""

    format = FORMAT_NPZ

    def matches(self, request: BodyRequest) -> bool:
        if not request.is_bytes:
            return False
        zipped = request.body.startswith(ZIP_MAGIC) and not described_raw(request)
        return zipped or request.media == NPZ_CONTENT_TYPE

    def decode(self, request: BodyRequest) -> DecodedRequest:
        arrays, batch, had_batch_dim = decode_npz(bytes(request.body), request.inputs, request.limits)
        named = header(request.headers, OUTPUT_HEADER)
        if named is not None:
            check_output_name(named, request.outputs)
        wanted = (named,) if named is not None else None
        return DecodedRequest(arrays, batch, FORMAT_NPZ, had_batch_dim, None, wanted)

    def encode(
        self, arrays: dict[str, np.ndarray], request: DecodedRequest, meta: ResponseMeta
    ) -> EncodedResponse:
        return encode_npz(arrays, had_batch_dim=True)  # already this request's (unbatched) rows


def decode_npz(
    body: bytes, inputs: Sequence[TensorSpec], limits: RequestLimits
) -> tuple[dict[str, np.ndarray], int, bool]:
    """(arrays, batch, had_batch_dim) from an .npz body; raises only ``RequestError``."""
    try:
        return _decode(body, tuple(inputs), limits)
    except RequestError as err:
        err.request_format = err.request_format or FORMAT_NPZ
        raise


def _decode(
    body: bytes, inputs: tuple[TensorSpec, ...], limits: RequestLimits
) -> tuple[dict[str, np.ndarray], int, bool]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise RequestError(BAD_REQUEST, f"body is not a readable .npz file: {clip(str(exc))}") from None
    if len(members) > MAX_MEMBERS:
        raise RequestError(BAD_REQUEST, f".npz holds {len(members)} files; at most {MAX_MEMBERS}")
    total = sum(m.file_size for m in members)
    if total > limits.max_body_bytes:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f".npz unpacks to {total} bytes, over the limit of {limits.max_body_bytes}",
        )
    names = [m.filename.removesuffix(".npy") for m in members]
    _check_unique(names, members)
    check_names(names, inputs, " (name each .npz member after a model input)")
    specs = {spec.name: spec for spec in inputs}
    budget = limits.max_elements
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            for name in names:
                array = npz[name]
                if array.dtype.hasobject or array.dtype.names is not None:
                    raise RequestError(BAD_REQUEST, f"input {name!r}: only numeric dtypes are accepted")
                check_cast(name, array.dtype, np.dtype(specs[name].dtype))
                check_element_budget(name, array.size, budget)
                budget -= array.size
                arrays[name] = array
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy's failures on hostile members have no closed list
        raise RequestError(BAD_REQUEST, f"an .npz member is not a valid .npy array: {clip(str(exc))}") from None
    return validate_inputs(arrays, inputs, limits)


def _check_unique(names: list[str], members: list[zipfile.ZipInfo]) -> None:
    """A zip may hold one name twice (or ``x`` and ``x.npy``); numpy would read one silently."""
    seen: dict[str, str] = {}
    for name, member in zip(names, members, strict=True):
        if name in seen:
            raise RequestError(
                BAD_REQUEST,
                f"input {quoted(name)} is given twice in the .npz (members {quoted(seen[name])} and "
                f"{quoted(member.filename)}); send each input once",
            )
        seen[name] = member.filename


def encode_npz(outputs: Mapping[str, np.ndarray], had_batch_dim: bool) -> EncodedResponse:
    """The outputs (this request's rows) as one .npz body."""
    buffer = io.BytesIO()
    arrays = {name: np.asarray(a) if had_batch_dim else np.asarray(a)[0] for name, a in outputs.items()}
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy stubs type **kwds as allow_pickle
    return EncodedResponse(buffer.getvalue(), NPZ_CONTENT_TYPE)
