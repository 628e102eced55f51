"""The KServe v2 / Triton binary tensor extension, in process: pure splitting and joining, every
bad size a client can claim, and round trips through the codecs read back by tritonclient's and
kserve's own parsers. The same extension on a real TorchServe is tested in tests/test_kserve.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as tritonhttp
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.artifact.manifest import TensorSpec
from handlers.protocol.codecs import decode_request, encode_error, encode_response
from handlers.protocol.v2_binary import (
    V2_BINARY_HEADER,
    BinaryOutputs,
    binary_outputs,
    bytes_elements,
    join_bytes_elements,
    split_blobs,
)
from handlers.protocol.validation import RequestError, RequestLimits

IMAGE = (TensorSpec("x", "float32", (None, 3, 8, 8)),)
IMAGE_OUT = (TensorSpec("y", "float32", (None, 5)),)
PAIR = (TensorSpec("pixels", "float32", (None, 4)), TensorSpec("ids", "int64", (None, None)))
PAIR_OUT = (TensorSpec("scores", "float32", (None, 2)), TensorSpec("labels", "int64", (None,)))
LIMITS = RequestLimits()


def binary_body(entries, blobs, **document) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": entries, **document}).encode()
    return head + b"".join(blobs), {V2_BINARY_HEADER: str(len(head))}


def image_entry(x: np.ndarray, size: int | None = None, **extra) -> dict:
    parameters = {"binary_data_size": x.nbytes if size is None else size}
    return {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": parameters, **extra}


def decode(body, headers, inputs=IMAGE, outputs=IMAGE_OUT, limits=LIMITS, content_type=None):
    return decode_request(body, content_type, headers, inputs, limits, outputs=outputs)


def refused(status, fragment, body, headers, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode(body, headers, **kwargs)
    err = info.value
    assert err.status == status, err.message
    assert fragment in err.message, err.message
    assert err.request_format == "kservev2"
    assert json.loads(encode_error(err).body) == {"error": err.message}
    return err


def image(batch=1, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 8, 8)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# pure pieces


def test_bytes_elements_round_trip_including_empty_and_binary_elements():
    elements = [b"", b"hello", bytes(range(256)), "héllo".encode()]
    blob = join_bytes_elements(elements)
    assert bytes_elements("t", blob, 4, 64) == elements
    assert bytes_elements("t", b"", 0, 64) == []


@pytest.mark.parametrize(
    ("blob", "count", "status", "fragment"),
    [
        (join_bytes_elements([b"ab"]) + b"\x00", 1, 400, "1 bytes follow the last of its 1"),
        (join_bytes_elements([b"ab"]), 2, 400, "element 1 has no 4-byte length"),
        (b"\x05\x00\x00\x00abc", 1, 400, "element 0 claims 5 bytes, only 3"),
        (b"\x01\x00", 1, 400, "element 0 has no 4-byte length"),
        (b"\xff\xff\xff\xff", 1, 400, "claims 4294967295 bytes"),
        (join_bytes_elements([b"a"] * 3), 3, 413, "3 BYTES elements exceed the limit of 2"),
    ],
    ids=["trailing", "too-few", "overlong-element", "cut-length", "huge-length", "too-many"],
)
def test_bytes_elements_refuse_every_bad_size(blob, count, status, fragment):
    with pytest.raises(RequestError) as info:
        bytes_elements("texts", blob, count, 2)
    assert info.value.status == status and fragment in info.value.message
    assert "'texts'" in info.value.message


def test_split_blobs_takes_binary_inputs_in_order_and_skips_json_ones():
    entries = [
        {"name": "a", "parameters": {"binary_data_size": 3}},
        {"name": "b", "data": [1]},
        {"name": "c", "parameters": {"binary_data_size": 0}},
        {"name": "d", "parameters": {"binary_data_size": 2}},
    ]
    blobs = split_blobs(entries, b"xyzpq")
    assert {k: bytes(v) for k, v in blobs.items()} == {"a": b"xyz", "c": b"", "d": b"pq"}


def test_binary_output_choice_follows_tritons_rule():
    assert not binary_outputs({}).any
    everything = binary_outputs({"parameters": {"binary_data_output": True}})
    assert everything.wants("y") and everything.any
    # A requested output's own flag overrides the request's.
    mixed = binary_outputs({
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
    })
    assert not mixed.wants("y") and mixed.wants("z")
    one = binary_outputs({"outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    assert one.wants("y") and not one.wants("z")
    with pytest.raises(RequestError, match="binary_data_output must be true or false"):
        binary_outputs({"parameters": {"binary_data_output": "yes"}})
    with pytest.raises(RequestError, match="output 'y': parameters.binary_data must be true or false"):
        binary_outputs({"outputs": [{"name": "y", "parameters": {"binary_data": 1}}]})
    with pytest.raises(RequestError, match="'outputs' must be a list of objects with a string 'name'"):
        binary_outputs({"outputs": [{"parameters": {"binary_data": True}}]})


# --------------------------------------------------------------------------------------------
# decode and encode through the codecs


def test_binary_input_round_trip_matches_json_decoding():
    x = image(2, 1)
    body, headers = binary_body([image_entry(x)], [x.tobytes()], id="r1")
    request = decode(body, headers, content_type="application/octet-stream")
    assert request.format == "kservev2" and request.request_id == "r1"
    assert request.batch == 2 and request.had_batch_dim
    np.testing.assert_array_equal(request.arrays["x"], x)
    assert not request.binary_outputs.any


def test_two_inputs_one_binary_one_json_with_safe_cast_and_true_shapes():
    pixels = np.arange(8, dtype=np.float16).reshape(2, 4)
    ids = np.arange(6, dtype=np.int32).reshape(2, 3)
    entries = [
        {"name": "ids", "shape": [2, 3], "datatype": "INT32", "parameters": {"binary_data_size": ids.nbytes}},
        {"name": "pixels", "shape": [2, 4], "datatype": "FP16", "data": pixels.ravel().tolist()},
    ]
    body, headers = binary_body(entries, [ids.tobytes()])
    request = decode(body, headers, inputs=PAIR, outputs=PAIR_OUT)
    assert request.arrays["ids"].dtype == np.int64 and request.arrays["ids"].shape == (2, 3)
    np.testing.assert_array_equal(request.arrays["ids"], ids)
    np.testing.assert_array_equal(request.arrays["pixels"], pixels.astype(np.float32))


def test_binary_outputs_are_read_back_by_tritonclient():
    x = image(3, 2)
    tensor = tritonhttp.InferInput("pixels", [3, 4], "FP32")  # tritonclient's defaults: binary
    tensor.set_data_from_numpy(x.reshape(3, -1)[:, :4].copy())
    ids = tritonhttp.InferInput("ids", [3, 2], "INT64")
    ids.set_data_from_numpy(np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64))
    outputs = [tritonhttp.InferRequestedOutput("scores"), tritonhttp.InferRequestedOutput("labels", binary_data=False)]
    body, json_size = tritonhttp.InferenceServerClient.generate_request_body(
        [tensor, ids], outputs=outputs, request_id="t-1"
    )
    request = decode(body, {V2_BINARY_HEADER: str(json_size)}, inputs=PAIR, outputs=PAIR_OUT)
    np.testing.assert_array_equal(request.arrays["pixels"], x.reshape(3, -1)[:, :4])
    scores = np.arange(6, dtype=np.float32).reshape(3, 2) / 3
    labels = np.array([7, -1, 2], dtype=np.int64)
    encoded = encode_response({"scores": scores, "labels": labels}, request, PAIR_OUT, model_name="m")
    assert encoded.content_type == "application/octet-stream"
    header_bytes = int(encoded.headers[V2_BINARY_HEADER])
    head = json.loads(encoded.body[:header_bytes])
    assert head["id"] == "t-1"
    assert [o.get("parameters") for o in head["outputs"]] == [{"binary_data_size": scores.nbytes}, None]
    assert len(encoded.body) == header_bytes + scores.nbytes  # only the binary output has a blob
    result = tritonhttp.InferResult.from_response_body(encoded.body, header_length=header_bytes)
    np.testing.assert_array_equal(result.as_numpy("scores"), scores)
    np.testing.assert_array_equal(result.as_numpy("labels"), labels)


def test_default_binary_data_output_answers_every_output_in_binary():
    x = image(1, 3)
    body, headers = binary_body([image_entry(x)], [x.tobytes()], parameters={"binary_data_output": True})
    request = decode(body, headers)
    assert request.binary_outputs == BinaryOutputs(True, {})
    y = np.arange(5, dtype=np.float32).reshape(1, 5)
    encoded = encode_response({"y": y}, request, IMAGE_OUT, model_name="m")
    n = int(encoded.headers[V2_BINARY_HEADER])
    result = tritonhttp.InferResult.from_response_body(encoded.body, header_length=n)
    np.testing.assert_array_equal(result.as_numpy("y").reshape(1, 5), y)


def test_json_request_may_ask_for_binary_outputs():
    # No input blobs, but binary answers: a plain JSON body with binary_data on an output.
    x = image(1, 4)
    document = {
        "inputs": [{"name": "x", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }
    request = decode(json.dumps(document).encode(), {}, content_type="application/json")
    y = np.ones((1, 5), np.float32)
    encoded = encode_response({"y": y}, request, IMAGE_OUT, model_name="m")
    n = int(encoded.headers[V2_BINARY_HEADER])
    assert encoded.body[n:] == y.tobytes()


def test_without_binary_requests_the_answer_is_json_as_before():
    x = image(1, 5)
    body, headers = binary_body([image_entry(x)], [x.tobytes()])
    request = decode(body, headers)
    encoded = encode_response({"y": np.ones((1, 5), np.float32)}, request, IMAGE_OUT, model_name="m")
    assert encoded.content_type == "application/json" and V2_BINARY_HEADER not in encoded.headers
    assert json.loads(encoded.body)["outputs"][0]["data"] == [1.0] * 5


def test_kserve_infer_request_binary_serialisation_decodes(kserve_infer_types):
    InferInput, InferRequest, RequestedOutput, InferResponse = kserve_infer_types
    x = image(2, 6)
    tensor = InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    request = InferRequest(
        model_name="m", infer_inputs=[tensor], request_id="k-1",
        request_outputs=[RequestedOutput("y", parameters={"binary_data": True})],
    )
    body, json_length = request.to_rest()
    assert isinstance(body, bytes) and json_length < len(body), "kserve sent the binary extension"
    decoded = decode(body, {V2_BINARY_HEADER: str(json_length)})
    np.testing.assert_array_equal(decoded.arrays["x"], x)
    y = np.arange(10, dtype=np.float32).reshape(2, 5)
    encoded = encode_response({"y": y}, decoded, IMAGE_OUT, model_name="m")
    answer = InferResponse.from_bytes(encoded.body, int(encoded.headers[V2_BINARY_HEADER]))
    assert answer.id == "k-1"
    np.testing.assert_array_equal(answer.outputs[0].as_numpy(), y)


@pytest.fixture(scope="module")
def kserve_infer_types():
    """kserve's InferRequest/InferResponse (kserve.protocol.infer_type), imported without running
    kserve's package ``__init__`` (the SDK is installed --no-deps; this module needs orjson,
    pandas and fastapi, declared in the kserve extra)."""
    import importlib
    import importlib.util
    import sys
    import types

    if "kserve" not in sys.modules:
        spec = importlib.util.find_spec("kserve")
        if spec is None or spec.submodule_search_locations is None:
            pytest.fail("kserve is not installed: pip install --no-deps kserve==0.21.0 (docs/kserve.md)")
        package = types.ModuleType("kserve")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["kserve"] = package
    module = importlib.import_module("kserve.protocol.infer_type")
    return module.InferInput, module.InferRequest, module.RequestedOutput, module.InferResponse


# --------------------------------------------------------------------------------------------
# every bad size, each a clear 4xx naming the input


def _bad_cases():
    x = image(1)
    good = x.tobytes()
    head = json.dumps({"inputs": [image_entry(x)]}).encode()
    n = str(len(head))
    cases = [
        ("header-not-a-number", 400, "is not a byte count", head + good, {V2_BINARY_HEADER: "12abc"}),
        ("header-zero", 400, "Inference-Header-Content-Length is 0", head + good, {V2_BINARY_HEADER: "0"}),
        ("header-past-body", 400, f"body has {len(head) + len(good)} bytes",
         head + good, {V2_BINARY_HEADER: str(len(head) + len(good) + 1)}),
        ("header-cuts-json", 400, "invalid JSON", head + good, {V2_BINARY_HEADER: str(len(head) - 3)}),
        ("header-not-v2", 400, "is not a KServe v2 request", b'{"x": 1}' + good, {V2_BINARY_HEADER: "8"}),
        ("blob-short", 400, "input 'x': binary_data_size 768 runs past the end",
         head + good[:-4], {V2_BINARY_HEADER: n}),
        ("blobs-too-long", 400, "add up to 768 bytes but the body carries 772", head + good + b"\0" * 4,
         {V2_BINARY_HEADER: n}),
        ("size-vs-shape", 400, "input 'x': shape [2, 3, 8, 8] of float32 needs 1536 bytes, its binary_data_size is 768",
         *binary_body([{**image_entry(x), "shape": [2, 3, 8, 8]}], [good])),
        ("size-not-int", 400, "input 'x': parameters.binary_data_size must be a non-negative integer",
         *binary_body([image_entry(x, size=-1)], [good])),
        ("size-bool", 400, "binary_data_size must be a non-negative integer",
         *binary_body([image_entry(x, size=True)], [good])),
        ("data-and-size", 400, "input 'x': has both 'data' and parameters.binary_data_size",
         *binary_body([image_entry(x, data=[0.0] * 192)], [good])),
        ("bytes-for-numbers", 400, "input 'x': BYTES tensors are not supported; send FP32",
         *binary_body([{**image_entry(x), "datatype": "BYTES"}], [good])),
        ("lossy-dtype", 400, "input 'x': float64 cannot be converted to float32",
         *binary_body([{**image_entry(x.astype(np.float64)), "datatype": "FP64"}], [x.astype(np.float64).tobytes()])),
        ("wrong-shape", 400, "input 'x': expected shape",
         *binary_body([{**image_entry(x), "shape": [1, 3, 4, 16]}], [good])),
        ("huge-shape", 413, "input 'x': 1000000000000000000 elements exceed",
         *binary_body([{**image_entry(x), "shape": [10**9, 10**9]}], [good])),
        ("nan", 400, "input 'x' contains NaN",
         *binary_body([image_entry(x)], [np.full_like(x, np.nan).tobytes()])),
    ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize(("status", "fragment", "body", "headers"), _bad_cases())
def test_bad_binary_requests_get_a_clear_4xx(status, fragment, body, headers):
    refused(status, fragment, body, headers)


def test_binary_body_over_the_body_limit_is_413_before_parsing():
    x = image(1)
    body, headers = binary_body([image_entry(x)], [x.tobytes()])
    with pytest.raises(RequestError) as info:
        decode(body, headers, limits=RequestLimits(max_body_bytes=len(body) - 1))
    assert info.value.status == 413 and "exceeds the limit" in info.value.message


def test_binary_size_without_the_header_is_refused_naming_the_header():
    x = image(1)
    document = {"inputs": [image_entry(x)]}
    refused(400, "has no Inference-Header-Content-Length header", json.dumps(document).encode(),
            {"content-type": "application/json"})


@settings(max_examples=150, deadline=None)
@given(
    cut=st.integers(0, 40), extra=st.binary(max_size=8), length_shift=st.integers(-5, 5),
    size_shift=st.integers(-8, 8), batch=st.integers(1, 2),
)
def test_fuzz_binary_bodies_decode_exactly_or_refuse_safely(cut, extra, length_shift, size_shift, batch):
    """Truncated, padded and mis-sized binary bodies: the exact tensor or a clear 4xx, nothing else."""
    x = image(batch, 7)
    head = json.dumps({"inputs": [image_entry(x, size=max(x.nbytes + size_shift, 0))]}).encode()
    body = (head + x.tobytes())[: len(head) + x.nbytes - cut] + extra
    headers = {V2_BINARY_HEADER: str(len(head) + length_shift)}
    exact = (cut, extra, length_shift, size_shift) == (0, b"", 0, 0)
    try:
        request = decode(body, headers, limits=RequestLimits(max_body_bytes=4096))
    except RequestError as err:
        assert not exact, err.message
        assert err.status in (400, 413) and err.request_format == "kservev2"
        assert "\n" not in err.message and "Traceback" not in err.message
        return
    # Accepted only when every size agrees (extra bytes may stand in for cut ones).
    assert (length_shift, size_shift, len(extra)) == (0, 0, cut)
    sent = np.frombuffer(body[len(head):], np.float32).reshape(x.shape)
    np.testing.assert_array_equal(request.arrays["x"], sent)


def test_the_early_response_size_bound_stays_a_lower_bound_for_binary_answers():
    from handlers.protocol.response_size import min_response_bytes

    half = (TensorSpec("h", "float16", (None, 1000)),)
    request = decode(*binary_body([image_entry(image(1))], [image(1).tobytes()],
                                  parameters={"binary_data_output": True}), outputs=None)
    encoded = encode_response({"h": np.zeros((1, 1000), np.float16)}, request, half, model_name="m")
    bound = min_response_bytes(half, "kservev2", 1, binary=request.binary_outputs.any)
    assert bound <= len(encoded.body) < min_response_bytes(half, "kservev2", 1)


def test_a_negative_dimension_never_reaches_a_reshape():
    """[-1, -1] claims one element (the product is 1), which the blob's size would agree with;
    every route checks shapes first, and the blob reader refuses them on its own as well."""
    from handlers.protocol.v2_binary import tensor_from_blob

    blob = memoryview(np.zeros(1, np.float32).tobytes())
    with pytest.raises(RequestError) as info:
        tensor_from_blob("x", blob, np.dtype(np.float32), [-1, -1])
    assert info.value.status == 400 and "negative dimension" in info.value.message
    x = image()
    refused(400, "'shape' must be a list of non-negative integers (at most 32), got [-1, 3, 8, 8]",
            *binary_body([{**image_entry(x), "shape": [-1, 3, 8, 8]}], [x.tobytes()]))
