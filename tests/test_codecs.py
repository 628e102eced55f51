"""Request/response codecs: round trips per format, every client error, and fuzzing.

The fuzz tests state the decoders' contract: whatever the body, headers or content type, only
RequestError escapes, with a short single-line message and a 400/413/415 status, and nothing
sized by a client's claim is allocated before the claim is checked (tracemalloc sees numpy's
buffers too).
"""

from __future__ import annotations

import io
import json
import math
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from handlers.artifact.manifest import TensorSpec
from handlers.errors import MESSAGE_CHARS
from handlers.protocol.codecs import (
    NPY_MAGIC,
    NUMPY_TO_V2,
    DecodedRequest,
    decode_request,
    encode_error,
    encode_response,
    json_nesting_depth,
)
from handlers.protocol.validation import RequestError, RequestLimits

IMAGE = (TensorSpec("x", "float32", (None, 3, 8, 8)),)
IMAGE_OUT = (TensorSpec("y", "float32", (None, 5)),)
PAIR = (TensorSpec("pixels", "float32", (None, 4)), TensorSpec("ids", "int64", (None, None)))
PAIR_OUT = (TensorSpec("scores", "float32", (None, 2)), TensorSpec("labels", "int64", (None,)))
LIMITS = RequestLimits()
JSON = "application/json"
RAW = "application/octet-stream"
# HETSERVE_FUZZ_EXAMPLES=5000 for a deeper run than CI's.
FUZZ = settings(
    max_examples=int(os.environ.get("HETSERVE_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def decode(body, content_type=JSON, headers=None, inputs=IMAGE, limits=LIMITS, **kwargs):
    return decode_request(body, content_type, headers or {}, inputs, limits, **kwargs)


def refused(status, *fragments, **kwargs) -> RequestError:
    """Decode expecting RequestError(status) whose message contains every fragment."""
    with pytest.raises(RequestError) as info:
        decode(**kwargs)
    err = info.value
    assert err.status == status, err.message
    for fragment in fragments:
        assert fragment in err.message, err.message
    return err


def image(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, 8, 8)).astype(np.float32)


def pair(batch=2, seq=5):
    pixels = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4) / 7
    ids = np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) - 3
    return pixels, ids


def npy_bytes(array, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def model_outputs(request: DecodedRequest, specs=IMAGE_OUT):
    """Deterministic fake outputs for ``request.batch`` samples."""
    out = {}
    for spec in specs:
        shape = (request.batch, *spec.sample_shape)
        out[spec.name] = (np.arange(math.prod(shape)).reshape(shape) % 7).astype(spec.dtype)
    return out


def assert_valid(result: DecodedRequest, inputs, limits):
    """The guarantees every successful decode gives the runtime."""
    assert result.format in ("json", "raw", "npy", "kservev2")
    assert list(result.arrays) == [spec.name for spec in inputs]
    assert 1 <= result.batch <= limits.max_batch_per_request
    assert sum(a.size for a in result.arrays.values()) <= limits.max_elements
    for spec in inputs:
        array = result.arrays[spec.name]
        assert array.dtype == np.dtype(spec.dtype)
        assert array.flags.c_contiguous and array.flags.aligned
        assert array.ndim == len(spec.shape) and array.shape[0] == result.batch
        for want, got in zip(spec.shape, array.shape, strict=True):
            assert want is None or want == got
        if array.dtype.kind == "f" and not limits.allow_nonfinite:
            assert np.isfinite(array).all()


def assert_safe(err: RequestError):
    assert err.status in (400, 413, 415)
    assert 0 < len(err.message) <= MESSAGE_CHARS
    assert "\n" not in err.message and "Traceback" not in err.message
    assert "/work" not in err.message and ".py" not in err.message


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("with_batch", [True, False])
def test_json_round_trip_single_input(with_batch):
    x = image(batch=2 if with_batch else 1)
    sent = x.tolist() if with_batch else x[0].tolist()
    request = decode(json.dumps({"x": sent}).encode())
    assert (request.format, request.batch, request.had_batch_dim) == (
        "json",
        x.shape[0],
        with_batch,
    )
    np.testing.assert_array_equal(request.arrays["x"], x)
    outputs = model_outputs(request)
    response = encode_response(outputs, request, IMAGE_OUT)
    assert response.content_type == JSON
    got = np.array(json.loads(response.body)["outputs"]["y"], dtype=np.float32)
    np.testing.assert_array_equal(got, outputs["y"] if with_batch else outputs["y"][0])


def test_json_bare_array_and_pre_decoded_bodies():
    x = image()
    for body in (json.dumps(x.tolist()).encode(), x.tolist(), {"x": x.tolist()}):
        request = decode(body)
        np.testing.assert_array_equal(request.arrays["x"], x)
    text = json.dumps({"x": x[0].tolist()})  # TorchServe hands text/* bodies over as str
    assert decode(text, "text/plain").had_batch_dim is False


def test_json_two_inputs_with_dynamic_dim_and_ints_for_floats():
    pixels, ids = pair(batch=2, seq=7)
    body = {"pixels": [[1, 2, 3, 4], [5, 6, 7, 8]], "ids": ids.tolist()}
    request = decode(json.dumps(body).encode(), inputs=PAIR)
    assert request.batch == 2 and request.arrays["ids"].shape == (2, 7)
    assert request.arrays["pixels"].dtype == np.float32
    np.testing.assert_array_equal(request.arrays["ids"], ids)
    response = json.loads(encode_response(model_outputs(request, PAIR_OUT), request, PAIR_OUT).body)
    assert set(response["outputs"]) == {"scores", "labels"}
    assert np.array(response["outputs"]["labels"]).shape == (2,)


@pytest.mark.parametrize("shape_header", ["2,3,8,8", "[2, 3, 8, 8]", None])
def test_raw_round_trip_is_zero_copy(shape_header):
    x = image(batch=2)
    body = bytearray(x.tobytes())  # what TorchServe's socket reader produces
    headers = {} if shape_header is None else {"x-tensor-shape": shape_header}
    request = decode(body, RAW, headers)
    assert (request.format, request.batch, request.had_batch_dim) == ("raw", 2, True)
    np.testing.assert_array_equal(request.arrays["x"], x)
    assert np.shares_memory(request.arrays["x"], np.frombuffer(body, np.uint8))
    outputs = model_outputs(request)
    response = encode_response(outputs, request, IMAGE_OUT)
    assert response.content_type == RAW
    assert response.headers == {
        "X-Tensor-Name": "y",
        "X-Tensor-Shape": "2,5",
        "X-Tensor-Dtype": "float32",
    }
    got = np.frombuffer(response.body, "<f4").reshape(2, 5)
    np.testing.assert_array_equal(got, outputs["y"])


def test_raw_without_batch_dim_other_dtype_and_named_tensor():
    ids = np.array([4, 5, 6], dtype=np.int32)
    headers = {"X-Tensor-Shape": "3", "X-Tensor-Dtype": "INT32", "X-Tensor-Name": "ids"}
    specs = (TensorSpec("ids", "int64", (None, None)),)
    request = decode(ids.tobytes(), RAW, headers, inputs=specs)
    assert request.had_batch_dim is False and request.arrays["ids"].shape == (1, 3)
    assert request.arrays["ids"].dtype == np.int64
    response = encode_response({"y": np.ones((1, 5), np.float32)}, request, IMAGE_OUT)
    assert response.headers["X-Tensor-Shape"] == "5" and len(response.body) == 20


def test_raw_picks_the_output_named_in_x_output_name():
    headers = {"X-Tensor-Shape": "1,4", "X-Tensor-Name": "pixels", "X-Output-Name": "labels"}
    specs = PAIR[:1]
    request = decode(
        np.zeros((1, 4), np.float32).tobytes(), RAW, headers, inputs=specs, outputs=PAIR_OUT
    )
    assert request.output_names == ("labels",)
    response = encode_response(model_outputs(request, PAIR_OUT), request, PAIR_OUT)
    assert (
        response.headers["X-Tensor-Name"] == "labels"
        and response.headers["X-Tensor-Dtype"] == "int64"
    )


@pytest.mark.parametrize("variant", ["c", "fortran", "big-endian", "float16"])
def test_npy_round_trip(variant):
    x = image(batch=3)
    sent = {
        "c": x,
        "fortran": np.asfortranarray(x),
        "big-endian": x.astype(">f4"),
        "float16": x.astype(np.float16),
    }[variant]
    request = decode(npy_bytes(sent), content_type=None)
    assert (request.format, request.batch) == ("npy", 3)
    np.testing.assert_array_equal(request.arrays["x"], sent.astype(np.float32))
    outputs = model_outputs(request)
    response = encode_response(outputs, request, IMAGE_OUT)
    assert response.content_type == "application/x-npy"
    back = np.load(io.BytesIO(response.body), allow_pickle=False)
    np.testing.assert_array_equal(back, outputs["y"])


@pytest.mark.parametrize("nested", [False, True])
def test_kservev2_round_trip_keeps_true_shapes(nested):
    x = image(batch=2)
    data = x.tolist() if nested else x.ravel().tolist()
    body = {
        "id": "req-7",
        "inputs": [{"name": "x", "shape": [2, 3, 8, 8], "datatype": "FP32", "data": data}],
    }
    request = decode(json.dumps(body).encode())
    assert (request.format, request.request_id, request.batch) == ("kservev2", "req-7", 2)
    np.testing.assert_array_equal(request.arrays["x"], x)
    outputs = model_outputs(request)
    response = json.loads(
        encode_response(outputs, request, IMAGE_OUT, model_name="m", model_version="3").body
    )
    assert (
        response["id"] == "req-7"
        and response["model_name"] == "m"
        and response["model_version"] == "3"
    )
    (out,) = response["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [2, 5])
    np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(2, 5), outputs["y"])


def test_kservev2_two_inputs_safe_casts_requested_outputs_and_fallback_id():
    pixels, ids = pair(batch=1, seq=3)
    body = {
        "inputs": [
            {"name": "ids", "shape": [3], "datatype": "INT32", "data": ids[0].tolist()},
            {"name": "pixels", "shape": [4], "datatype": "FP16", "data": [0.5, 1, 2, 4]},
        ],
        "outputs": [{"name": "labels"}],
        "parameters": {"note": "[[[[ brackets in strings do not count"},
    }
    request = decode(body, inputs=PAIR, outputs=PAIR_OUT)
    assert request.had_batch_dim is False and request.output_names == ("labels",)
    assert request.arrays["ids"].dtype == np.int64 and request.arrays["pixels"].shape == (1, 4)
    response = json.loads(
        encode_response(model_outputs(request, PAIR_OUT), request, PAIR_OUT, request_id="ts-1").body
    )
    assert response["id"] == "ts-1" and "model_version" not in response
    assert [(o["name"], o["shape"], o["datatype"]) for o in response["outputs"]] == [
        ("labels", [], "INT64")
    ]


def test_torchserve_style_headers_are_found_case_insensitively():
    # TorchServe mixes the client's headers (client spelling) with per-part entries.
    x = image()
    headers = {"body": {"content-type": RAW}, "X-TENSOR-SHAPE": b"1,3,8,8", "Content-Type": RAW}
    request = decode(x.tobytes(), None, headers)
    assert request.format == "raw"


def test_octet_stream_with_raw_headers_is_raw_even_if_it_starts_like_npy():
    specs = (TensorSpec("b", "uint8", (None, None)),)
    body = NPY_MAGIC + b"\x01\x00"
    request = decode(body, RAW, {"X-Tensor-Shape": "1,8"}, inputs=specs)
    assert request.format == "raw" and bytes(request.arrays["b"][0]) == body


def test_nonfinite_outputs_become_null_in_json():
    request = decode({"x": image().tolist()})
    outputs = {"y": np.array([[1, np.nan, np.inf, -np.inf, 2]], np.float32)}
    assert json.loads(encode_response(outputs, request, IMAGE_OUT).body)["outputs"]["y"] == [
        [1.0, None, None, None, 2.0]
    ]


def test_allow_nonfinite_lets_nan_through():
    x = image()
    x[0, 0, 0, 0] = np.nan
    request = decode(x.tobytes(), RAW, limits=RequestLimits(allow_nonfinite=True))
    assert np.isnan(request.arrays["x"][0, 0, 0, 0])


# --------------------------------------------------------------------------------------------
# client errors: status and a message naming the problem


def test_empty_and_oversized_bodies():
    for body in (b"", None, "", bytearray()):
        refused(400, "empty request body", body=body)
    refused(
        413,
        "exceeds the limit",
        body=b"[" + b"0," * 600 + b"0]",
        limits=RequestLimits(max_body_bytes=1000),
    )


def test_deep_json_is_a_400_not_a_recursion_error():
    refused(400, "nesting depth 100000", body=b"[" * 100_000)
    refused(400, "nesting depth", body=b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}")


def test_invalid_json_and_unsupported_content_types():
    refused(400, "invalid JSON", "line 1", body=b'{"x": [1, 2,')
    refused(400, "invalid JSON", body=b"[1, 2] trailing", content_type="text/plain")
    refused(400, "invalid JSON", body=b"[" + b"9" * 5000 + b"]")  # past int digit limit
    refused(400, "not valid UTF-8", body=b'{"x": "\xff"}')
    refused(
        415, "'image/png'", "application/octet-stream", body=b"\x89PNG", content_type="image/png"
    )
    refused(415, "none given", body=b"hello", content_type=None)
    refused(400, "not a .npy file", body=b"1234", content_type="application/x-npy")
    # The binary tensor extension's header claims more bytes than the body has.
    refused(
        400,
        "Inference-Header-Content-Length is 10 but the body has 2 bytes",
        body=b"{}",
        headers={"inference-header-content-length": "10"},
    )


@pytest.mark.parametrize(
    ("sent", "fragment"),
    [
        ([[[[1.0] * 8] * 8] * 3, [[[1.0] * 8] * 8] * 2], "ragged"),
        ([[[[1.0] * 8] * 8] * 2 + [[[1.0] * 7] * 8]], "ragged"),
        ([[[["1.0"] * 8] * 8] * 3], "found a string"),
        ([[[[True] * 8] * 8] * 3], "found a boolean"),
        ([[[[None] * 8] * 8] * 3], "found null"),
        ([[[[{"v": 1}] * 8] * 8] * 3], "found an object"),
        ({"data": 1}, "found an object"),
    ],
)
def test_json_wrong_element_types_name_the_input(sent, fragment):
    refused(400, "input 'x'", fragment, body=json.dumps({"x": sent}).encode())


def test_json_integer_inputs_refuse_floats_and_out_of_range_values():
    ids = [[1, 2.5, 3]]
    refused(
        400,
        "input 'ids'",
        "expected integers for int64, found a non-integer number",
        body={"pixels": [[0, 0, 0, 0]], "ids": ids},
        inputs=PAIR,
    )
    refused(
        400,
        "input 'ids'",
        "out of range for int64",
        body={"pixels": [[0, 0, 0, 0]], "ids": [[2**63]]},
        inputs=PAIR,
    )
    small = (TensorSpec("q", "int8", (None, 2)),)
    refused(400, "out of range for int8", body={"q": [[1, 300]]}, inputs=small)
    refused(400, "out of range", body={"x": [[[[10**400] * 8] * 8] * 3]})


def test_json_names_and_top_level_array_rules():
    pixels, ids = pair()
    err = refused(
        400,
        "unknown input 'pixel'",
        "'pixels', 'ids'",
        body={"pixel": pixels.tolist(), "ids": ids.tolist()},
        inputs=PAIR,
    )
    assert "missing" not in err.message
    refused(400, "missing input 'ids'", body={"pixels": pixels.tolist()}, inputs=PAIR)
    refused(400, "only for single-input models", body=pixels.tolist(), inputs=PAIR)
    long_name = "n" * 10_000
    err = refused(400, "unknown input", body={long_name: [1]})
    assert len(err.message) < 200 and "n" * 81 not in err.message


def test_shape_messages():
    x = image()
    refused(
        400, "input 'x': expected shape [N,3,8,8], got [1,3,7,8]", body={"x": x[:, :, :7].tolist()}
    )
    refused(400, "input 'x': expected shape [3,8,8], got [2,8,8]", body={"x": x[0, :2].tolist()})
    refused(
        400,
        "input 'x': expected shape [N,3,8,8] or [3,8,8], got [8,8]",
        body=x[0, 0].tobytes(),
        content_type=RAW,
        headers={"X-Tensor-Shape": "8,8"},
    )
    refused(400, "nested more than 4 levels", body={"x": [x.tolist()]})


def test_batch_and_size_limits():
    limits = RequestLimits(max_batch_per_request=2, max_elements=1000)
    refused(400, "batch is empty", body=npy_bytes(np.zeros((0, 3, 8, 8), np.float32)))
    refused(400, "batch is empty", body=v2_body(shape=[0, 3, 8, 8], data=[]))
    refused(
        413,
        "batch of 3 exceeds the limit of 2",
        body=image(3).tobytes(),
        content_type=RAW,
        limits=limits,
    )
    few = RequestLimits(max_elements=300)
    refused(413, "exceed the request limit", body={"x": image(2).tolist()}, limits=few)
    refused(413, "more values than the limit", body=b"[" + b"0," * 6000 + b"0]", limits=limits)
    pixels, ids = pair(batch=2)
    refused(
        400,
        "disagree on the batch size",
        "'pixels' has 2, 'ids' has 1",
        body={"pixels": pixels.tolist(), "ids": ids[:1].tolist()},
        inputs=PAIR,
    )
    refused(
        400,
        "disagree on the batch dimension",
        body={"pixels": pixels[0].tolist(), "ids": ids[:1].tolist()},
        inputs=PAIR,
    )
    refused(400, "zero-size dimension", body={"pixels": [[1, 2, 3, 4]], "ids": [[]]}, inputs=PAIR)


def test_nonfinite_inputs_are_refused_by_default():
    x = image()
    for bad in (np.nan, np.inf, -np.inf):
        x[0, 1, 2, 3] = bad
        refused(400, "input 'x' contains NaN or infinity", body=x.tobytes(), content_type=RAW)
    refused(400, "input 'x' contains NaN", body=b'{"x": ' + json.dumps(x.tolist()).encode() + b"}")


def v2_body(**entry):
    base = {"name": "x", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}
    return {"inputs": [{**base, **entry}]}


@pytest.mark.parametrize(
    ("entry", "status", "fragment"),
    [
        ({"datatype": "BYTES", "data": ["abc"]}, 400, "BYTES tensors are not supported; send FP32"),
        ({"datatype": "COMPLEX64"}, 400, "unknown datatype 'COMPLEX64'"),
        ({"datatype": "FP64"}, 400, "float64 cannot be converted to float32 without loss"),
        ({"datatype": "INT64"}, 400, "int64 cannot be converted to float32"),
        ({"datatype": "BOOL", "data": [True] * 192}, 400, "bool cannot be converted"),
        ({"shape": [1, 3, 8, 9]}, 400, "needs 216 values, 'data' has 192"),
        ({"shape": [1, -3, 8, 8]}, 400, "'shape' must be a list of non-negative integers"),
        ({"shape": [1, True, 8, 8]}, 400, "'shape' must be a list"),
        ({"shape": [10**9, 10**9]}, 413, "exceed the request limit"),
        ({"data": None}, 400, "found null"),
        ({"data": [[0.0] * 192, [0.0]]}, 400, "ragged"),
        ({"data": ["0.5"] * 192}, 400, "found a string"),
        ({"shape": [2, 3, 8, 4]}, 400, "expected shape [N,3,8,8], got [2,3,8,4]"),
        ({"parameters": {"binary_data_size": 768}}, 400, "has no Inference-Header-Content-Length"),
    ],
)
def test_kservev2_tensor_errors(entry, status, fragment):
    err = refused(status, fragment, body=v2_body(**entry))
    assert err.request_format == "kservev2"
    assert json.loads(encode_error(err).body) == {"error": err.message}


def test_kservev2_envelope_errors():
    body = v2_body()
    refused(400, "'inputs' is empty", body={"inputs": []})
    refused(400, "'id' must be a string", body={**body, "id": 12})
    refused(400, "given twice", body={"inputs": body["inputs"] * 2})
    refused(
        400,
        "unknown output 'z'",
        "'y'",
        body={**body, "outputs": [{"name": "z"}]},
        outputs=IMAGE_OUT,
    )
    refused(400, "'parameters' must be an object", body={**body, "parameters": [1]})
    refused(400, "inputs[0] must be an object", body={"inputs": [{"shape": [1]}]})
    missing = {"inputs": [{"name": "x", "shape": [1, 3, 8, 8], "datatype": "FP32"}]}
    refused(400, "'data' is missing", body=missing)


def test_raw_errors():
    x = image()
    refused(
        400,
        "unsupported X-Tensor-Dtype 'complex64'",
        body=x.tobytes(),
        content_type=RAW,
        headers={"X-Tensor-Dtype": "complex64"},
    )
    refused(
        400,
        "X-Tensor-Shape '1;3;8;8' is not",
        body=x.tobytes(),
        content_type=RAW,
        headers={"X-Tensor-Shape": "1;3;8;8"},
    )
    refused(
        400,
        "X-Tensor-Shape [4,3,8,8] of float32 needs 3072 bytes, the body has 768",
        body=x.tobytes(),
        content_type=RAW,
        headers={"X-Tensor-Shape": "4,3,8,8"},
    )
    refused(400, "not a whole number of [3,8,8] samples", body=x.tobytes()[:-4], content_type=RAW)
    refused(
        400,
        "X-Tensor-Shape header is required",
        "dynamic",
        body=b"\0" * 8,
        content_type=RAW,
        inputs=PAIR[1:],
    )
    refused(
        400,
        "X-Tensor-Name header is required",
        "'pixels', 'ids'",
        body=b"\0" * 16,
        content_type=RAW,
        inputs=PAIR,
    )
    refused(
        400,
        "unknown input 'nope' in X-Tensor-Name",
        body=b"\0" * 16,
        content_type=RAW,
        inputs=PAIR,
        headers={"X-Tensor-Name": "nope"},
    )
    refused(
        400,
        "missing input 'ids'",
        "raw and .npy bodies carry one tensor",
        body=b"\0" * 16,
        content_type=RAW,
        inputs=PAIR,
        headers={"X-Tensor-Name": "pixels", "X-Tensor-Shape": "1,4"},
    )
    refused(
        400,
        "X-Output-Name header is required",
        body=b"\0" * 16,
        content_type=RAW,
        inputs=PAIR[:1],
        outputs=PAIR_OUT,
    )
    refused(
        400,
        "float32 cannot be converted to int64",
        body=b"\0" * 8,
        content_type=RAW,
        inputs=PAIR[1:],
        headers={"X-Tensor-Dtype": "float32", "X-Tensor-Shape": "1,2"},
    )


def test_npy_errors():
    x = image()
    refused(
        400,
        "dtype",
        "not supported",
        # An object-dtype .npy, as np.save writes one: its payload is a pickle stream, refused
        # by dtype before a byte of it is read (built by hand: no pickling in this repository).
        body=npy_header((2,), descr="|O") + b"\x80\x04\x95" + b"\0" * 29,
    )
    refused(400, "dtype", "not supported", body=npy_bytes(np.zeros(3, dtype=[("a", "<f4")])))
    refused(400, "not supported", body=npy_bytes(np.array(["abc"])))
    refused(400, "needs 768 bytes, the body has 764", body=npy_bytes(x)[:-4])
    refused(400, "malformed .npy header", body=NPY_MAGIC + b"\x01\x00\xff\x00{'descr'")
    refused(400, "version (3, 0) is not supported", body=NPY_MAGIC + b"\x03\x00" + b"\0" * 20)
    refused(400, "float64 cannot be converted to float32", body=npy_bytes(x.astype(np.float64)))
    refused(400, "int64 cannot be converted to float32", body=npy_bytes(x.astype(np.int64)))


def test_huge_claims_are_refused_before_allocating():
    claims = [
        dict(body=b"\0" * 64, content_type=RAW, headers={"X-Tensor-Shape": "100000,3,8000,8000"}),
        dict(body=npy_header(shape=(10**6, 3, 8000, 8000)) + b"\0" * 64),
        dict(body=v2_body(shape=[10**5, 3, 800, 800], data=[0.0])),
        dict(body=b'{"x": [[[[' + b"0," * 100 + b"0]]]]}", limits=RequestLimits(max_elements=50)),
    ]
    for claim in claims:
        tracemalloc.start()
        try:
            with pytest.raises(RequestError) as info:
                decode(**claim)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert info.value.status in (400, 413)
        assert peak < 1 << 20, (info.value.message, peak)


def npy_header(shape, descr="<f4", fortran=False, version=(1, 0)) -> bytes:
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}"
    text = text.ljust(64 * (len(text) // 64 + 1) - 11) + "\n"
    size = len(text).to_bytes(2 if version == (1, 0) else 4, "little")
    return NPY_MAGIC + bytes(version) + size + text.encode("latin-1")


# --------------------------------------------------------------------------------------------
# encoding and limits


def test_encode_error_shapes():
    err = RequestError(415, "unsupported content type ('image/png')")
    plain = encode_error(err, "json")
    assert plain.status == 415 and plain.content_type == JSON
    assert json.loads(plain.body) == {
        "code": 415,
        "type": "UnsupportedMediaType",
        "message": err.message,
    }
    assert json.loads(encode_error(err, "kservev2").body) == {"error": err.message}
    assert len(RequestError(400, "x" * 10_000).message) == MESSAGE_CHARS


def test_encode_response_refuses_mismatched_outputs():
    request = decode(image(2).tobytes(), RAW)
    with pytest.raises(ValueError, match="leading batch of 2"):
        encode_response({"y": np.zeros((3, 5), np.float32)}, request, IMAGE_OUT)
    with pytest.raises(ValueError, match="missing"):
        encode_response({}, request, IMAGE_OUT)
    with pytest.raises(RequestError, match="X-Output-Name header is required"):
        encode_response(model_outputs(request, PAIR_OUT), request, PAIR_OUT)


def test_request_limits_are_validated():
    with pytest.raises(ValueError, match="max_elements"):
        RequestLimits(max_elements=0)
    with pytest.raises(ValueError, match="max_batch_per_request"):
        RequestLimits(max_batch_per_request=True)
    with pytest.raises(ValueError, match="allow_nonfinite"):
        RequestLimits(allow_nonfinite="yes")
    with pytest.raises(ValueError, match="max_json_depth"):
        RequestLimits(max_json_depth=10_000)
    with pytest.raises(ValueError, match="unknown request limit"):
        RequestLimits.from_mapping({"max_body": 1})
    assert RequestLimits.from_mapping({"max_elements": 5}).max_elements == 5
    with pytest.raises(AttributeError):
        LIMITS.max_elements = 1  # frozen


# --------------------------------------------------------------------------------------------
# fuzzing

SMALL = RequestLimits(
    max_body_bytes=4096, max_elements=512, max_batch_per_request=4, max_json_depth=16
)
SPEC_SETS = st.sampled_from(
    [
        (TensorSpec("x", "float32", (None, 2, 2)),),
        PAIR,
        (TensorSpec("m", "bool", (None, 3)),),
        (TensorSpec("q", "int8", (None,)),),
        (TensorSpec("h", "float16", (1, None)),),
    ]
)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "",
        JSON,
        "application/json; charset=utf-8",
        RAW,
        "application/x-npy",
        "text/plain",
        "image/jpeg",
        "application/vnd+json",
        "multipart/form-data",
    ]
)
HEADER_VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "1,2,2",
            "2",
            "",
            "1,2",
            "[1,3]",
            "-1,2",
            "99999999999999,2",
            "float16",
            "FP32",
            "bool",
            "int8",
            "x",
            "pixels",
            "ids",
            "m",
            "q",
            "y",
        ]
    ),
)
HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "X-Tensor-Shape",
            "x-tensor-dtype",
            "X-TENSOR-NAME",
            "X-Output-Name",
            "Content-Type",
            "Inference-Header-Content-Length",
            "body",
        ]
    ),
    HEADER_VALUES,
    max_size=4,
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(["x", "pixels", "ids", "m", "q", "h", "inputs", "data", "shape"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=40,
)
V2_DATATYPES = st.sampled_from(
    [
        "FP32",
        "FP16",
        "FP64",
        "INT64",
        "INT32",
        "INT8",
        "UINT8",
        "BOOL",
        "BYTES",
        "UINT64",
        "fp32",
        "",
    ]
)
V2_ENTRIES = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "pixels", "ids", "m", "q", "h", "zz"])},
    optional={
        "shape": st.lists(st.integers(-2, 5), max_size=4) | JSON_VALUES,
        "datatype": V2_DATATYPES | JSON_VALUES,
        "data": st.lists(st.integers(-200, 200) | st.floats(width=32) | st.booleans(), max_size=30)
        | JSON_VALUES,
        "parameters": JSON_VALUES,
    },
)
V2_BODIES = st.fixed_dictionaries(
    {"inputs": st.lists(V2_ENTRIES, max_size=3)},
    optional={"id": JSON_VALUES, "outputs": JSON_VALUES, "parameters": JSON_VALUES},
)


def attempt(body, content_type, headers, specs, limits=SMALL):
    """Decode under the contract: only a safe RequestError, or a result meeting every guarantee."""
    try:
        result = decode_request(body, content_type, headers, specs, limits)
    except RequestError as err:
        assert_safe(err)
        answer = json.loads(encode_error(err).body)
        assert answer in (
            {"error": err.message},
            {"code": err.status, "type": answer.get("type"), "message": err.message},
        )
        return None
    assert_valid(result, specs, limits)
    return result


@FUZZ
@given(body=st.binary(max_size=300), content_type=CONTENT_TYPES, headers=HEADERS, specs=SPEC_SETS)
def test_fuzz_random_bytes(body, content_type, headers, specs):
    attempt(body, content_type, headers, specs)


@FUZZ
@given(
    body=st.binary(max_size=200),
    header_bytes=st.binary(max_size=120),
    specs=SPEC_SETS,
    version=st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x01\x01"]),
)
def test_fuzz_npy_lookalikes(body, header_bytes, specs, version):
    length = len(header_bytes).to_bytes(2 if version[0] == 1 else 4, "little")
    attempt(NPY_MAGIC + version + length + header_bytes + body, None, {}, specs)


@FUZZ
@given(
    shape=st.lists(st.integers(-3, 2**40), max_size=5),
    descr=st.sampled_from(
        ["<f4", ">f4", "|b1", "|i1", "<f2", "|O", "<U3", "<i8", "<c8", "[('a', '<f4')]"]
    ),
    fortran=st.booleans(),
    extra=st.integers(-8, 8),
    specs=SPEC_SETS,
)
def test_fuzz_npy_headers(shape, descr, fortran, extra, specs):
    try:
        claimed = math.prod(shape) * np.dtype(descr if not descr.startswith("[") else "V4").itemsize
    except (TypeError, ValueError):
        claimed = 0
    payload = b"\x01" * max(0, min(claimed + extra, 2000))
    attempt(npy_header(shape, descr, fortran) + payload, "application/x-npy", {}, specs)


@FUZZ
@given(value=JSON_VALUES, content_type=CONTENT_TYPES, specs=SPEC_SETS, as_bytes=st.booleans())
def test_fuzz_random_json(value, content_type, specs, as_bytes):
    body = json.dumps(value).encode() if as_bytes else value
    attempt(body, content_type if as_bytes else JSON, {}, specs)


@FUZZ
@given(document=V2_BODIES, specs=SPEC_SETS, as_bytes=st.booleans())
def test_fuzz_random_kservev2(document, specs, as_bytes):
    body = json.dumps(document).encode() if as_bytes else document
    result = attempt(body, JSON, {}, specs)
    if result is not None:
        assert result.format == "kservev2"


@FUZZ
@given(headers=HEADERS, specs=SPEC_SETS, size=st.integers(0, 64))
def test_fuzz_raw_headers(headers, specs, size):
    attempt(bytes(range(size)), RAW, headers, specs)


@FUZZ
@given(body=st.binary(max_size=1500), content_type=CONTENT_TYPES, headers=HEADERS, specs=SPEC_SETS)
def test_fuzz_allocation_stays_bounded(body, content_type, headers, specs):
    tracemalloc.start()
    try:
        attempt(body, content_type, headers, specs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Python objects for a JSON body of this size plus arrays within SMALL.max_elements.
    assert peak < 256 * 1024 + 64 * len(body)


JSON_TEXT = st.recursive(
    st.integers(0, 9).map(str) | st.text(alphabet='[]{}"\\ab', max_size=6).map(json.dumps),
    lambda children: (
        st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
        | st.lists(children, max_size=3).map(
            lambda items: "{" + ",".join(f'"k{i}":{v}' for i, v in enumerate(items)) + "}"
        )
    ),
    max_leaves=30,
)


def reference_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(reference_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(reference_depth, value.values()), default=0)
    return 0


@FUZZ
@given(text=JSON_TEXT)
def test_json_nesting_depth_ignores_brackets_in_strings(text):
    assert json_nesting_depth(text.encode()) == reference_depth(json.loads(text))


SINGLE_SPECS = [
    TensorSpec("x", "float32", (None, 2, 2)),
    TensorSpec("m", "bool", (None, 3)),
    TensorSpec("q", "int8", (None,)),
    TensorSpec("h", "float16", (1, None)),
    TensorSpec("ids", "int64", (None, None)),
]
ARRAY_DTYPES = ["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]


@st.composite
def spec_and_array(draw):
    spec = draw(st.sampled_from(SINGLE_SPECS))
    dtype = draw(st.sampled_from([spec.dtype, spec.dtype, *ARRAY_DTYPES]))
    if draw(st.booleans()):  # a shape the spec accepts, with or without the batch dim
        shape = [d if d is not None else draw(st.integers(1, 3)) for d in spec.shape]
        shape = shape[draw(st.integers(0, 1)) :]
    else:
        shape = draw(st.lists(st.integers(0, 3), max_size=4))
    array = draw(hnp.arrays(np.dtype(dtype), tuple(shape)))
    return spec, array


def request_in(fmt: str, array: np.ndarray, name: str):
    """(body, content type, headers) carrying ``array`` as input ``name`` in format ``fmt``."""
    if fmt == "json":
        return json.dumps({name: array.tolist()}).encode(), JSON, {}
    if fmt == "raw":
        shape = ",".join(map(str, array.shape))
        headers = {"X-Tensor-Shape": shape, "X-Tensor-Dtype": array.dtype.name}
        return array.astype(array.dtype.newbyteorder("<")).tobytes(), RAW, headers
    if fmt == "npy":
        return npy_bytes(array), None, {}
    entry = {
        "name": name,
        "shape": list(array.shape),
        "datatype": NUMPY_TO_V2[array.dtype.name],
        "data": array.ravel().tolist(),
    }
    return json.dumps({"inputs": [entry]}).encode(), JSON, {}


def plainly_valid(spec: TensorSpec, array: np.ndarray, limits: RequestLimits) -> bool:
    """Same dtype, an accepted shape, finite, within limits: every format must accept it."""
    sample = spec.sample_shape
    if array.dtype != np.dtype(spec.dtype) or array.ndim not in (len(sample), len(sample) + 1):
        return False
    batched = array.shape if array.ndim == len(spec.shape) else (1, *array.shape)
    return (
        all(w is None or w == g for w, g in zip(spec.shape, batched, strict=True))
        and 0 not in batched
        and batched[0] <= limits.max_batch_per_request
        and array.size <= limits.max_elements
        and (array.dtype.kind != "f" or bool(np.isfinite(array).all()))
    )


@FUZZ
@given(case=spec_and_array(), fmt=st.sampled_from(["json", "raw", "npy", "kservev2"]))
def test_fuzz_arrays_decode_exactly_or_refuse_safely(case, fmt):
    spec, array = case
    body, content_type, headers = request_in(fmt, array, spec.name)
    result = attempt(body, content_type, headers, (spec,))
    event(f"{fmt} {'accepted' if result is not None else 'refused'}")
    if plainly_valid(spec, array, SMALL):
        assert result is not None, (fmt, array.dtype, array.shape)
    if result is not None:
        assert result.format == fmt
        assert result.had_batch_dim == (array.ndim == len(spec.shape))
        expected = array.astype(spec.dtype).reshape(result.arrays[spec.name].shape)
        np.testing.assert_array_equal(result.arrays[spec.name], expected)


def test_each_body_format_is_one_codec_and_the_first_match_wins():
    from handlers.protocol.codecs import CODECS, BodyRequest, RequestLimits

    def request(body, media, headers):
        return BodyRequest(body, media, headers, (), RequestLimits())

    v2, npz, npy, raw, plain = CODECS
    assert [c.format for c in CODECS] == ["kservev2", "npz", "npy", "raw", "json"]
    zipped = io.BytesIO()
    np.savez(zipped, x=np.zeros((1, 3), np.float32))
    assert npz.matches(request(zipped.getvalue(), None, {})) and not npy.matches(request(zipped.getvalue(), None, {}))
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, 3), np.float32))
    npy_body, octets = buffer.getvalue(), "application/octet-stream"
    assert npy.matches(request(npy_body, octets, {})) and not npz.matches(request(npy_body, octets, {}))
    # the magic wins over the content type ...
    assert not npy.matches(request(npy_body, octets, {"X-Tensor-Shape": "1,3"}))  # ... unless described raw
    assert raw.matches(request(npy_body, octets, {"X-Tensor-Shape": "1,3"}))
    document = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    assert v2.matches(request(document, None, None)) and not v2.matches(request(b"{}", None, None))
    # The binary tensor extension's header claims a body first, whatever its content type says.
    binary = {"Inference-Header-Content-Length": "2"}
    assert v2.matches(request(b"{}\x00\x00", octets, binary)) and raw.matches(request(b"{}\x00\x00", octets, binary))
    assert [c.format for c in CODECS if c.matches(request({"x": [1.0]}, None, None))] == ["json"]
    # Errors answer in the codec's own form.
    assert json.loads(v2.error(RequestError(400, "bad")).body) == {"error": "bad"}
    assert json.loads(plain.error(RequestError(400, "bad")).body)["type"] == "BadRequest"


@pytest.mark.parametrize(("first", "second"), [("x.npy", "x.npy"), ("x", "x.npy")])
def test_npz_with_an_input_given_twice_is_a_400_naming_it(first, second):
    """numpy would read one of the two silently; the v2 path already refuses a name twice."""
    import warnings
    import zipfile

    x = image()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        archive.writestr(first, npy_bytes(x))
        archive.writestr(second, npy_bytes(x * 2))
    err = refused(400, "input 'x' is given twice in the .npz", f"members '{first}' and '{second}'",
                  body=buffer.getvalue(), content_type="application/x-npz")
    assert err.request_format == "npz"
