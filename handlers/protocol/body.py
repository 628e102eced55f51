"""Reading a request body before any codec sees it: its media type, its bytes, its JSON.

Every request goes through these once (``handlers.protocol.codecs.RequestDecoder``): the media
type from ``content_type`` or the Content-Type header, text turned back into the client's bytes,
compressed bodies refused, and JSON parsed only after its nesting depth and value count are
bounded. Standard library + numpy only.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import numpy as np

from handlers.protocol.validation import (
    BAD_REQUEST,
    PAYLOAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    RequestError,
    RequestLimits,
    clip,
    quoted,
)

JSON_CONTENT_TYPE = "application/json"
RAW_CONTENT_TYPE = "application/octet-stream"

# Commas bound the number of JSON values before json.loads builds them; keys and v2 metadata
# add a few commas of their own.
JSON_COMMA_SLACK = 4096
JSON_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*[\[{]")
# Compressed bodies would otherwise fail as malformed JSON or tensor bytes (a misleading 400).
_GZIP_MAGIC = b"\x1f\x8b"


def header(headers: Mapping[str, Any] | None, name: str) -> str | None:
    """A request header by case-insensitive name; values that are not text are ignored.

    TorchServe's header dict keeps the client's spelling of names and also holds one entry per
    body part (``{"body": {"content-type": ...}}``), hence the type checks.
    """
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        wanted = name.lower()
        for key, candidate in headers.items():
            if isinstance(key, (str, bytes)) and _text(key).lower() == wanted:
                value = candidate
                break
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("latin-1")
    return value if isinstance(value, str) else None


def on_kserve_route(headers: Mapping[str, Any] | None) -> bool:
    """Whether TorchServe received the request on /v2/models/{name}/infer (or KServe v1's route).

    TorchServe 0.12's frontend adds an ``explain`` header to every inference request it passes
    on, and a ``url_path`` header only to those that came in on /predictions. KServe's clients
    and its TorchServe wrapper read errors as ``{"error": message}`` whatever the body was.
    """
    return header(headers, "explain") is not None and header(headers, "url_path") is None


def media_type(content_type: Any) -> str | None:
    if isinstance(content_type, (bytes, bytearray)):
        content_type = content_type.decode("latin-1")
    if not isinstance(content_type, str):
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def is_json_media(media: str | None) -> bool:
    return media is not None and (
        media in (JSON_CONTENT_TYPE, "text/json") or media.endswith("+json")
    )


def body_bytes(body: Any) -> Any:
    """The client's bytes: a memoryview copied out, text (TorchServe decodes text/* bodies to
    str) encoded back; anything else (None, a parsed document) as it is."""
    if isinstance(body, memoryview):
        return body.tobytes()
    if isinstance(body, str):
        try:
            return body.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(BAD_REQUEST, "request body is not valid UTF-8 text") from None
    return body


def empty_body_message(media: str | None) -> str:
    if media is not None and media.startswith("multipart/"):
        # TorchServe hands over no part when the body does not match the declared boundary.
        return ("multipart body with no readable part: check that the boundary in Content-Type "
                "matches the body's, or send the tensor as the whole body")
    return "empty request body"


def refuse_content_encoding(body: Any, media: str | None, headers: Mapping[str, Any] | None) -> None:
    encoding = (header(headers, "content-encoding") or "").strip().lower()
    if encoding not in ("", "identity"):
        raise RequestError(
            UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {quoted(encoding)} is not supported; send the body uncompressed",
        )
    # Raw tensor bytes may start with these two bytes: only a body that claims no raw media.
    if media != RAW_CONTENT_TYPE and isinstance(body, (bytes, bytearray)) and body.startswith(_GZIP_MAGIC):
        raise RequestError(
            UNSUPPORTED_MEDIA_TYPE,
            "the body is gzip-compressed; content encodings are not supported, send it uncompressed",
        )


def parse_json(body: bytes | bytearray, limits: RequestLimits) -> Any:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestError(
            BAD_REQUEST, f"JSON body is not valid UTF-8 (byte {exc.start})"
        ) from None
    depth = json_nesting_depth(body)
    if depth > limits.max_json_depth:
        raise RequestError(
            BAD_REQUEST,
            f"JSON nesting depth {depth} exceeds the limit of {limits.max_json_depth}",
        )
    if body.count(b",") > limits.max_elements + JSON_COMMA_SLACK:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f"JSON body holds more values than the limit of {limits.max_elements} elements",
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(
            BAD_REQUEST,
            f"invalid JSON: {clip(exc.msg)} at line {exc.lineno} column {exc.colno}",
        ) from None
    except (ValueError, RecursionError):
        # e.g. an integer literal past Python's 4300-digit conversion limit
        raise RequestError(BAD_REQUEST, "invalid JSON: a value cannot be parsed") from None


_NOT_JSON_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_DEPTH_CHUNK = 1 << 20


def json_nesting_depth(data: bytes | bytearray) -> int:
    """Deepest [ / { nesting outside string literals, without recursing (UTF-8 JSON text).

    On the prefix json.loads actually parses this equals the parser's recursion depth, so
    checking it first makes deep input a 400, never a RecursionError.
    """
    if b"\\" in data:
        # Drop escaped backslashes, then escaped quotes: what is left of a quote delimits strings.
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Multi-byte UTF-8 never contains ASCII bytes, so filtering bytes keeps the structure.
    marks = np.frombuffer(data.translate(None, _NOT_JSON_STRUCTURE), dtype=np.uint8)
    deepest = depth = quotes_so_far = 0
    # Chunks keep the temporaries small even for a body made only of brackets.
    for start in range(0, marks.size, _DEPTH_CHUNK):
        chunk = marks[start : start + _DEPTH_CHUNK]
        steps = ((chunk == 0x5B) | (chunk == 0x7B)).astype(np.int32)
        steps -= (chunk == 0x5D) | (chunk == 0x7D)
        quotes = np.cumsum(chunk == 0x22, dtype=np.int32) + quotes_so_far
        steps[quotes % 2 == 1] = 0  # brackets inside strings
        levels = np.cumsum(steps, dtype=np.int64) + depth
        deepest = max(deepest, int(levels.max()))
        depth, quotes_so_far = int(levels[-1]), int(quotes[-1])
    return deepest


_P = ParamSpec("_P")
_R = TypeVar("_R")


def stamp(request_format: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Tag RequestErrors raised while decoding ``request_format`` so errors answer in kind."""

    def wrap(decoder: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(decoder)
        def decode(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return decoder(*args, **kwargs)
            except RequestError as err:
                err.request_format = err.request_format or request_format
                raise

        return decode

    return wrap


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
