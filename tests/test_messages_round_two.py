"""Client mistakes that got misleading answers (issue 17, item 8), through the real decoder."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from handlers.artifact.manifest import TensorSpec
from handlers.protocol.codecs import decode_request
from handlers.protocol.validation import RequestError, RequestLimits

INPUTS = (TensorSpec("x", "float32", (None, 4)),)
LIMITS = RequestLimits()
GOOD = json.dumps({"x": [[1.0, 2.0, 3.0, 4.0]]}).encode()


def _error(body, content_type, headers=None) -> RequestError:
    with pytest.raises(RequestError) as err:
        decode_request(body, content_type, headers or {}, INPUTS, LIMITS)
    return err.value


def test_gzip_body_is_a_415_saying_encodings_are_unsupported():
    err = _error(gzip.compress(GOOD), "application/json", {"Content-Encoding": "gzip"})
    assert err.status == 415 and "not supported" in err.message and "gzip" in err.message
    err = _error(gzip.compress(GOOD), "application/json")  # no header, gzip magic
    assert err.status == 415 and "gzip" in err.message
    err = _error(GOOD, "application/json", {"content-encoding": "br"})
    assert err.status == 415 and "'br'" in err.message


def test_raw_tensor_bytes_that_happen_to_start_like_gzip_still_decode():
    x = np.frombuffer(b"\x1f\x8b" + bytes(14), np.float32).reshape(1, 4)
    got = decode_request(x.tobytes(), "application/octet-stream", {"X-Tensor-Shape": "1,4"}, INPUTS, LIMITS)
    assert got.arrays["x"].tobytes() == x.tobytes()


def test_multipart_with_a_wrong_boundary_names_the_boundary():
    err = _error(None, "multipart/form-data; boundary=nope")
    assert err.status == 400 and "boundary" in err.message and "empty request body" not in err.message
    assert _error(b"", "application/json").message == "empty request body"


@pytest.mark.parametrize("inputs", [{"name": "x"}, "x", 3])
def test_a_v2_body_whose_inputs_is_not_a_list_is_a_v2_error(inputs):
    err = _error(json.dumps({"inputs": inputs}).encode(), "application/json")
    assert err.status == 400 and '"inputs" must be a list' in err.message
    assert err.request_format == "kservev2"
