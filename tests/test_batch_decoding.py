"""A batch's bytes decoded side by side and assembled into runs (issue 23, items 2 and 3).

Pure parts: the length grouping of texts (checked against every possible grouping), the decode
pool's hand-back, and the shape groups that let a micro-batch start while its neighbours decode.
Then the real serving core in process: a batch of large JPEGs decoded on the pool with bad ones
among them, and a batch of short and long texts, each answer equal to the request served alone.
"""

from __future__ import annotations

import json
import random
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from handlers.batching import ShapeGroups, early_rows
from handlers.decode_pool import DecodePool, decode_threads
from handlers.processors import ProcessedRequest
from handlers.processors.length_batching import padded_lengths
from handlers.protocol.codecs import DecodedRequest
from tests.hf_fixtures import WORDS, bomb_png, jpeg, write_tokenizer

# ---- length-aware batching: a pure function ------------------------------------------------------


def _partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1:]]


def _cost(requests, groups, overhead):
    return sum(sum(requests[i][0] for i in g) * max(requests[i][1] for i in g) + overhead for g in groups)


def test_a_short_text_is_not_padded_to_a_long_one():
    assert padded_lengths([(1, 5), (1, 100)], overhead_tokens=16) == [5, 100]
    assert padded_lengths([(1, 30), (1, 31)], overhead_tokens=16) == [31, 31]  # a run costs more
    assert padded_lengths([(1, 10), (1, 20)], overhead_tokens=16) == [20, 20]
    assert padded_lengths([(8, 10), (1, 20)], overhead_tokens=16) == [10, 20]  # 8 rows weigh more
    assert padded_lengths([(1, 7), (2, 7), (1, 9)], overhead_tokens=0) == [7, 7, 9]  # equal: together
    assert padded_lengths([], overhead_tokens=16) == []
    with pytest.raises(ValueError):
        padded_lengths([(0, 4)])


def test_length_groups_cost_the_least_of_every_possible_grouping():
    rng = random.Random(23)
    for _ in range(400):
        requests = [(rng.randint(1, 4), rng.randint(1, 40)) for _ in range(rng.randint(1, 6))]
        overhead = rng.choice([0, 1, 5, 16, 50])
        got = padded_lengths(requests, overhead)
        assert all(length >= r[1] for length, r in zip(got, requests, strict=True))
        groups: dict[int, list[int]] = {}
        for i, length in enumerate(got):
            groups.setdefault(length, []).append(i)
        best = min(_cost(requests, p, overhead) for p in _partitions(list(range(len(requests)))))
        assert _cost(requests, list(groups.values()), overhead) == best, (requests, overhead, got)


# ---- the decode pool ---------------------------------------------------------------------------------


def test_decode_threads_follow_the_workers_cores():
    assert decode_threads(1, True) == 0  # one core: decode stays on the worker's thread
    assert decode_threads(2, True) == 2
    assert decode_threads(64, True) == 8
    assert decode_threads(8, False) == 0  # tensors only: nothing worth a thread


def test_large_bodies_decode_on_the_pool_small_ones_here_each_exactly_once():
    pool = DecodePool(2, min_bytes=100)
    items = [b"x" * 500, b"y" * 10, b"z" * 300, b"w" * 20]
    try:
        run = pool.start(items, lambda b: (b[:1], threading.current_thread().name), len)
        assert run.pending == 4
        got = dict(run)
        assert run.pending == 0
    finally:
        pool.close()
    assert sorted(got) == [0, 1, 2, 3]
    assert [got[i][0] for i in range(4)] == [b"x", b"y", b"z", b"w"]
    assert got[0][1].startswith("hetserve-decode") and got[2][1].startswith("hetserve-decode")
    assert got[1][1] == got[3][1] == threading.current_thread().name
    lone = DecodePool(2, min_bytes=100)
    try:  # one large body alone: no hand-off
        assert dict(lone.start([b"x" * 500], lambda b: threading.current_thread().name, len)) == {
            0: threading.current_thread().name}
    finally:
        lone.close()


def test_decoded_requests_come_back_as_they_finish_not_in_order():
    """The first body's decode waits until the second's result was handed out: a pool that
    handed results back in request order would never get there."""
    second_seen = threading.Event()

    def decode(body: bytes) -> str:
        if body.startswith(b"slow"):
            return "slow" if second_seen.wait(30) else "waited in vain"
        return "fast"

    pool = DecodePool(2, min_bytes=1)
    try:
        order = []
        for index, result in pool.start([b"slow", b"fast"], decode, len):
            order.append((index, result))
            second_seen.set()
    finally:
        pool.close()
    assert order == [(1, "fast"), (0, "slow")]


# ---- shape groups: which runs start while the batch still decodes ---------------------------------


def _image(rows: int = 1, side: int = 4) -> DecodedRequest:
    return ProcessedRequest({"x": np.zeros((rows, 3, side, side), np.float32)}, rows, "json", False, kind="image")


def _text(length: int) -> DecodedRequest:
    return ProcessedRequest({"ids": np.zeros((1, length), np.int64)}, 1, "json", False, kind="text")


def test_a_micro_batch_starts_once_decoded_while_its_neighbours_still_decode():
    assert early_rows(first_micro_batch=4, requests=8, pool_threads=2) == 4
    assert early_rows(first_micro_batch=8, requests=8, pool_threads=2) == 0  # one lane: run it whole
    assert early_rows(first_micro_batch=4, requests=8, pool_threads=0) == 0  # nothing decodes meanwhile
    groups = ShapeGroups(early=2)
    assert groups.add(0, _image(), still_decoding=True) is None
    assert groups.add(1, _image(side=8), still_decoding=True) is None  # another shape: its own group
    started = groups.add(2, _image(), still_decoding=True)
    assert started is not None and [i for i, _ in started[0]] == [0, 2] and started[1] == 2
    assert groups.add(3, _text(5), still_decoding=True) is None
    assert groups.add(4, _text(6), still_decoding=True) is None  # texts wait for every length
    assert groups.add(5, _image(), still_decoding=False) is None  # the last: nothing to overlap
    padded = []

    def pad(items):
        padded.extend(i for i, _ in items)
        return items

    rest = {tuple(i for i, _ in group): size for group, size in groups.rest(pad)}
    assert sorted(padded) == [1, 3, 4, 5]
    # The started shape keeps its micro-batch size; the others get the runtime's own rule (0).
    assert rest == {(1,): 0, (3,): 0, (4,): 0, (5,): 2}


# ---- the serving core in process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_service(tiny_model_dir, tmp_path_factory):
    from handlers.service import InferenceService

    yaml = {"hetserve": {"calibration_runs": 1, "state_dir": str(tmp_path_factory.mktemp("state")),
                         "ratio": 0.5, "core_groups": "size:1",
                         "processors": {"image": {"size": 72, "crop": 64}}}}
    service = InferenceService.load(tiny_model_dir, yaml)
    service.decoder.close()
    service.decoder = DecodePool(2, min_bytes=4096)  # two threads whatever this box has
    yield service
    service.close()


def _raw(body: bytes, content_type: str = "image/jpeg"):
    from handlers.service import RawRequest

    return RawRequest(body, content_type, {"x-hetserve-raw": "1"})


def test_a_batch_of_photos_decodes_on_the_pool_and_bad_ones_fail_alone(image_service):
    photos = [jpeg(400, 300, seed=s) for s in range(5)]
    assert min(map(len, photos)) > 4096  # large enough to go to the pool
    cases = [
        (photos[0], 200), (photos[1][: len(photos[1]) // 2], 400), (photos[2], 200),
        (bomb_png(), 413), (photos[3], 200), (b"\xff\xd8\xff" + b"\x00" * 9000, 415),
        (photos[4], 200), (jpeg(60, 40, seed=9), 200),  # small: decoded on the worker's thread
    ]
    replies = image_service.handle([_raw(body) for body, _ in cases])
    assert [r.status for r in replies] == [status for _, status in cases]
    for (body, status), reply in zip(cases, replies, strict=True):
        if status != 200:
            assert "image" in json.loads(reply.body)["message"]
            continue
        (alone,) = image_service.handle([_raw(body)])
        got, want = json.loads(reply.body)["outputs"], json.loads(alone.body)["outputs"]
        np.testing.assert_allclose(np.asarray(got["logits"]), np.asarray(want["logits"]), atol=1e-5)


def _bag_of_words_onnx(path: Path) -> Path:
    """A tiny text classifier: masked mean of token embeddings -> 3 logits, sequence length a
    symbolic dim (written as ONNX directly: no torch export to wait for)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"emb": rng.normal(0, 1, (40, 16)), "mix": rng.normal(0, 0.3, (16, 16)),
               "head": rng.normal(0, 0.3, (16, 3)), "one": np.array(1.0)}
    constants = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in weights.items()]
    constants += [numpy_helper.from_array(np.array([k], np.int64), f"axis{k}") for k in (1, 2)]
    node = helper.make_node
    nodes = [
        node("Gather", ["emb", "input_ids"], ["e"]), node("MatMul", ["e", "mix"], ["m"]),
        node("Tanh", ["m"], ["t"]), node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        node("Unsqueeze", ["mf", "axis2"], ["mu"]), node("Mul", ["t", "mu"], ["tm"]),
        node("ReduceSum", ["tm", "axis1"], ["s"], keepdims=0),
        node("ReduceSum", ["mu", "axis1"], ["c"], keepdims=0), node("Max", ["c", "one"], ["cc"]),
        node("Div", ["s", "cc"], ["mean"]), node("MatMul", ["mean", "head"], ["logits"]),
    ]
    tokens = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
              for n in ("input_ids", "attention_mask")]
    logits = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])]
    graph = helper.make_graph(nodes, "bag", tokens, logits, constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.fixture(scope="module")
def text_service(tmp_path_factory):
    """The tiny text classifier archived with a tokenizer, sequences up to 48 tokens."""
    from handlers.service import InferenceService
    from hetserve.cli import main

    root = tmp_path_factory.mktemp("text-model")
    model = _bag_of_words_onnx(root / "bag.onnx")
    write_tokenizer(root / "tokenizer.json")
    store = root / "store"
    assert main(["archive", "--model", str(model), "--model-name", "bag", "--export-path", str(store),
                 "--ratios", "0.5", "--cost", "flops", "--quiet", "--tokenizer", str(root / "tokenizer.json"),
                 "--dim", "seq=8", "--dim", "seq<=48", "--set", "hetserve.processors.text.max_length=48"]) == 0
    unpacked = root / "unpacked"
    with zipfile.ZipFile(store / "bag.mar") as z:
        z.extractall(unpacked)
    yaml = {"hetserve": {"calibration_runs": 1, "state_dir": str(root), "ratio": 1.0,
                         "processors": {"text": {"max_length": 48}}}}
    service = InferenceService.load(unpacked, yaml)
    yield service
    service.close()


def test_short_and_long_texts_in_one_batch_are_each_padded_to_their_own_length(text_service):
    from handlers.service import TOKENS_HEADER

    long = " ".join(WORDS[i % len(WORDS)] for i in range(40))  # 40 words + [CLS] [SEP]
    texts = ["fun", long, "a great film", long.upper()]
    replies = text_service.handle([_raw(t.encode(), "text/plain") for t in texts])
    assert [r.status for r in replies] == [200] * 4
    # The two short ones share a run padded to 5 tokens ("fun" is 3), not to the long ones' 42.
    assert [int(r.headers[TOKENS_HEADER]) for r in replies] == [5, 42, 5, 42]
    for text, reply, own in zip(texts, replies, (3, 42, 5, 42), strict=True):
        (alone,) = text_service.handle([_raw(text.encode(), "text/plain")])
        assert int(alone.headers[TOKENS_HEADER]) == own
        got, want = json.loads(reply.body)["outputs"], json.loads(alone.body)["outputs"]
        np.testing.assert_allclose(np.asarray(got["logits"]), np.asarray(want["logits"]), atol=1e-6)


def test_a_json_tensor_request_to_a_text_model_is_held_to_the_dynamic_dim_bound(text_service):
    """Tensors sent to a model with a text processor pass the same checks as on any model: a
    sequence past the archive's ``seq<=48`` is a 400 naming the bound, not a run."""
    ids = [[k % 40 for k in range(53)]]  # 53 tokens of the 40-word vocabulary
    body = json.dumps({"input_ids": ids, "attention_mask": [[1] * 53]}).encode()
    (reply,) = text_service.handle([_raw(body, "application/json")])
    assert reply.status == 400
    assert "seq" in reply.reason and "48" in reply.reason, reply.reason
    fits = json.dumps({"input_ids": [ids[0][:48]], "attention_mask": [[1] * 48]}).encode()
    assert [r.status for r in text_service.handle([_raw(fits, "application/json")])] == [200]
