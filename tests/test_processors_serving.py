"""Bytes in, labels out on a real TorchServe: hf: archives (ViT, BERT) written by the test from
tiny configs with random weights, and a zoo ResNet with an image processor and a labels file.

Every answer is compared with the model run on the same preprocessed input: torch (transformers)
for the hf: archives, ONNX Runtime on the archive's whole model for the ResNet. Archives are
built once per module and served by one TorchServe.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from handlers.processors.config import ImageConfig
from handlers.processors.image import decode_image
from hetserve.cli import main
from hetserve.tsprocess import start_torchserve
from tests.hf_fixtures import EXPRESSIONS, bomb_png, jpeg, write_bert_dir, write_vit_dir
from tests.photos import (
    elongated_png,
    encoded,
    grey,
    sample_photo,
    sixteen_bit_png,
    stored_sideways,
)

pytestmark = pytest.mark.server
pytest.importorskip("transformers")

MAX_LENGTH = 16
RESNET_LABELS = [f"class-{i}" for i in range(10)]
SENTENCES = ["great movie", "the plot was boring and the ending was really awful", "fun"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"vit": write_vit_dir(root / "vit"), "bert": write_bert_dir(root / "bert")}


@pytest.fixture(scope="module")
def store(dirs, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("store")
    common = ["--export-path", str(store), "--ratios", "0.5", "--cost", "flops", "--quiet",
              "--set", "batchSize=4", "--set", "maxBatchDelay=300",
              "--set", "minWorkers=1", "--set", "maxWorkers=1"]  # three models on one small box: a worker each
    assert main(["archive", "--model", f"hf:{dirs['vit']}", "--task", "image-classification",
                 "--model-name", "vit", "--top-k", "7", *common]) == 0
    assert main(["archive", "--model", f"hf:{dirs['bert']}", "--task", "text-classification",
                 "--model-name", "bert", "--max-length", str(MAX_LENGTH), *common]) == 0
    labels = store.parent / "resnet-labels.txt"
    labels.write_text("\n".join(RESNET_LABELS) + "\n")
    assert main(["archive", "--model", "zoo:resnet18-tiny", "--model-name", "resnet", "--image-processor", "imagenet",
                 "--labels", str(labels), "--set", "hetserve.processors.image.size=72",
                 "--set", "hetserve.processors.image.crop=64", *common]) == 0
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    ts = start_torchserve(tmp_path_factory.mktemp("ts"), store,
                          {"vit": "vit.mar", "bert": "bert.mar", "resnet": "resnet.mar"})
    yield ts
    ts.stop()


def archive_config(store: Path, name: str) -> dict:
    with zipfile.ZipFile(store / f"{name}.mar") as z:
        return yaml.safe_load(z.read("model-config.yaml"))["hetserve"]["processors"]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def put_image(server, model: str, data: bytes, query: str = ""):
    """What ``curl -T image.jpg URL`` sends: a PUT without a content type."""
    return server.request("PUT", f"/predictions/{model}{query}", data, {})


@pytest.fixture(scope="module")
def vit_reference(dirs, store):
    import torch
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(dirs["vit"], local_files_only=True).eval()
    config = ImageConfig.from_mapping(archive_config(store, "vit")["image"])

    def logits(data: bytes) -> np.ndarray:
        pixels = torch.from_numpy(decode_image(data, config))[None]
        with torch.no_grad():
            return model(pixel_values=pixels).logits.numpy()[0]

    return logits


@pytest.fixture(scope="module")
def bert_reference(dirs):
    import torch
    from tokenizers import Tokenizer
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(dirs["bert"], local_files_only=True).eval()
    tokenizer = Tokenizer.from_file(str(dirs["bert"] / "tokenizer.json"))

    def logits(texts: list[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch(texts)
        ids = np.zeros((len(texts), MAX_LENGTH), np.int64)  # [PAD] is 0; the archive's length is fixed
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
        ids_t = torch.from_numpy(ids)
        with torch.no_grad():
            return model(input_ids=ids_t, attention_mask=(ids_t != 0).long(),
                         token_type_ids=torch.zeros_like(ids_t)).logits.numpy()

    return logits


def test_vit_answers_a_jpeg_with_seven_named_scores(server, vit_reference):
    data = jpeg(120, 90, seed=11)
    resp = put_image(server, "vit", data)
    assert resp.status == 200, resp.body
    body = resp.json()
    assert sorted(body) == sorted(EXPRESSIONS)
    scores = list(body.values())
    assert scores == sorted(scores, reverse=True)
    want = softmax(vit_reference(data))
    for name, score in body.items():
        assert score == pytest.approx(float(want[EXPRESSIONS.index(name)]), abs=1e-4)


def test_vit_raw_tensors_on_request(server, vit_reference):
    data = jpeg(64, 64, seed=12, fmt="PNG")
    # TorchServe 0.12 drops the query string (?raw=1) before the handler: the header asks instead.
    resp = server.request("POST", "/predictions/vit", data, {"Content-Type": "image/png", "X-Hetserve-Raw": "1"})
    assert resp.status == 200, resp.body
    got = np.asarray(resp.json()["outputs"]["logits"], np.float32)
    assert got.shape == (7,)
    np.testing.assert_allclose(got, vit_reference(data), atol=1e-4)
    npy = server.request("POST", "/predictions/vit", data, {"Content-Type": "image/png", "Accept": "application/x-npy"})
    assert npy.status == 200 and npy.headers["content-type"] == "application/x-npy"
    np.testing.assert_allclose(np.load(io.BytesIO(npy.body), allow_pickle=False), vit_reference(data), atol=1e-4)


def test_vit_takes_v2_bytes_images(server, vit_reference):
    images = [jpeg(80, 80, seed=s) for s in (13, 14)]
    document = {"id": "imgs", "inputs": [{"name": "pixel_values", "datatype": "BYTES", "shape": [2],
                                          "data": [base64.b64encode(b).decode() for b in images]}]}
    resp = server.predict("vit", json.dumps(document).encode())
    assert resp.status == 200, resp.body
    (out,) = resp.json()["outputs"]
    assert resp.json()["id"] == "imgs" and out["shape"] == [2, 7]
    got = np.asarray(out["data"], np.float32).reshape(2, 7)
    np.testing.assert_allclose(got, np.stack([vit_reference(b) for b in images]), atol=1e-4)


def test_tritonclient_binary_bytes_images_and_texts_on_both_routes(server, vit_reference, bert_reference):
    """BYTES tensors as tritonclient sends them by default: the binary tensor extension, each
    element 4-byte length-prefixed; the answer read back by tritonclient's own parser."""
    import tritonclient.http as tritonhttp

    def send(path: str, name: str, elements: list[bytes]) -> tritonhttp.InferResult:
        tensor = tritonhttp.InferInput(name, [len(elements)], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=np.object_))
        body, size = tritonhttp.InferenceServerClient.generate_request_body([tensor], request_id="tb")
        resp = server.request("POST", path, body, {"Inference-Header-Content-Length": str(size)})
        assert resp.status == 200, resp.body
        length = int(resp.headers["inference-header-content-length"])
        result = tritonhttp.InferResult.from_response_body(resp.body, header_length=length)
        assert result.get_response()["id"] == "tb"
        return result

    images = [jpeg(80, 80, seed=s) for s in (15, 16)]
    want = np.stack([vit_reference(b) for b in images])
    for path in ("/predictions/vit", "/v2/models/vit/infer"):
        got = send(path, "pixel_values", images).as_numpy("logits")
        np.testing.assert_allclose(got.reshape(2, 7), want, atol=1e-4)
    texts = [s.encode() for s in SENTENCES[:2]]
    got = send("/v2/models/bert/infer", "text", texts).as_numpy("logits")
    np.testing.assert_allclose(got.reshape(2, 3), bert_reference(SENTENCES[:2]), atol=1e-4)


def test_bad_images_fail_alone_inside_a_mixed_batch(server, vit_reference):
    good = [jpeg(400, 300, seed=s) for s in (21, 22)]  # over 8 KB: decoded on the worker's pool
    cases = [
        ("good0", good[0], None, 200, None),
        ("truncated", good[1][:400], "image/jpeg", 400, "could not be"),
        ("bomb", bomb_png(), "image/png", 413, "decompression bomb"),
        ("not-an-image", b"GIF89a but not really", "image/gif", 415, "accepted format"),
        ("text", b"hello there", "text/plain", 415, "no text"),
        ("good1", good[1], "image/jpeg", 200, None),
    ]

    def send(case):
        _, data, content_type, _, _ = case
        headers = {} if content_type is None else {"Content-Type": content_type}
        return server.request("POST", "/predictions/vit", data, headers)

    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(send, cases))
    for (name, data, _, status, words), resp in zip(cases, responses, strict=True):
        assert resp.status == status, (name, resp.body)
        if status == 200:
            body = resp.json()
            want = softmax(vit_reference(data))
            assert body[EXPRESSIONS[int(want.argmax())]] == pytest.approx(float(want.max()), abs=1e-4)
        else:
            assert words in resp.json()["message"], (name, resp.body)


def test_vit_sees_phone_photos_as_people_do(server, vit_reference):
    """A photo taken upright but stored sideways (EXIF Orientation 6, as phones write it) is
    classified upright; a 16-bit greyscale PNG answers as the same picture in 8 bits."""
    from PIL import Image, ImageOps

    def served(data: bytes) -> np.ndarray:
        resp = server.request("POST", "/predictions/vit", data, {"X-Hetserve-Raw": "1"})
        assert resp.status == 200, resp.body
        return np.asarray(resp.json()["outputs"]["logits"], np.float32)

    upright = sample_photo("astronaut").resize((120, 80))
    phone = stored_sideways(upright, 6, "JPEG")
    with Image.open(io.BytesIO(phone)) as image:
        shown, sideways = encoded(ImageOps.exif_transpose(image), "PNG"), encoded(image.convert("RGB"), "PNG")
    got, want, ignored = served(phone), vit_reference(shown), vit_reference(sideways)
    # The tiny random ViT barely tells pictures apart: sideways moves its logits by ~0.03,
    # resampling the upright picture another way by ~1e-4.
    assert np.abs(got - want).max() < 0.002, (got, want)
    assert np.abs(ignored - want).max() > 0.02, "the test photo must look different sideways"
    pixels8 = grey(90, 70, seed=5)
    np.testing.assert_allclose(served(sixteen_bit_png(pixels8)), vit_reference(encoded(Image.fromarray(pixels8), "PNG")),
                               atol=1e-4)


def test_bert_answers_text(server, bert_reference):
    labels = ("negative", "neutral", "positive")
    resp = server.predict("bert", SENTENCES[0].encode(), "text/plain")
    assert resp.status == 200, resp.body
    want = softmax(bert_reference([SENTENCES[0]]))[0]
    assert set(resp.json()) == set(labels)
    for name, score in resp.json().items():
        assert score == pytest.approx(float(want[labels.index(name)]), abs=1e-4)
    resp = server.predict("bert", json.dumps({"text": SENTENCES}).encode())
    assert resp.status == 200, resp.body
    rows = resp.json()
    want = softmax(bert_reference(SENTENCES))
    assert len(rows) == len(SENTENCES)
    for row, expected in zip(rows, want, strict=True):
        for name, score in row.items():
            assert score == pytest.approx(float(expected[labels.index(name)]), abs=1e-4)


def test_bert_concurrent_texts_and_bad_ones(server, bert_reference):
    cases = [
        (json.dumps([SENTENCES[1]]).encode(), "application/json", 200, None),
        (json.dumps({"text": "good " * 40}).encode(), "application/json", 413, "tokens long"),
        (SENTENCES[2].encode(), "text/plain", 200, None),
        (jpeg(seed=3), "image/jpeg", 415, "no images"),
        (b"\xff\xfe bad utf8", "text/plain", 400, "UTF-8"),
        (b'{"text": "a\\ud800b"}', "application/json", 400, "text 0 is not valid Unicode: character 1 is a lone surrogate"),
        # 6.4 MB: 64 texts of 100k characters, refused by their count before any is tokenized
        (json.dumps({"text": ["good movie " * 9090 + "fun"] * 64}).encode(), "application/json", 413,
         "64 texts hold 6399552 characters, over the limit of 1000000 per request"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda c: server.predict("bert", c[0], c[1]), cases))
    for (_, _, status, words), resp in zip(cases, responses, strict=True):
        assert resp.status == status, resp.body
        if words:
            assert words in resp.json()["message"]
    raw = server.request("POST", "/predictions/bert", json.dumps({"text": SENTENCES}).encode(),
                         {"Content-Type": "application/json", "X-Hetserve-Raw": "true"})
    assert raw.status == 200, raw.body
    np.testing.assert_allclose(np.asarray(raw.json()["outputs"]["logits"]), bert_reference(SENTENCES), atol=1e-4)


def test_bert_takes_npz_and_v2_bytes(server, bert_reference):
    from tokenizers import Tokenizer  # noqa: F401 - the reference tokenizes; here: ids by hand

    ids = np.zeros((2, MAX_LENGTH), np.int64)
    ids[0, :4] = [2, 10, 6, 3]
    ids[1, :3] = [2, 12, 3]
    buf = io.BytesIO()
    np.savez(buf, input_ids=ids, attention_mask=(ids != 0).astype(np.int64), token_type_ids=np.zeros_like(ids))
    resp = server.predict("bert", buf.getvalue(), "application/x-npz")
    assert resp.status == 200, resp.body
    assert resp.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(resp.body), allow_pickle=False) as out:
        logits = out["logits"]
    assert logits.shape == (2, 3)
    document = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": SENTENCES[:2]}]}
    resp = server.predict("bert", json.dumps(document).encode())
    assert resp.status == 200, resp.body
    (out,) = resp.json()["outputs"]
    np.testing.assert_allclose(np.asarray(out["data"]).reshape(2, 3), bert_reference(SENTENCES[:2]), atol=1e-4)


@pytest.fixture(scope="module")
def resnet_session(store, tmp_path_factory):
    """ONNX Runtime on the resnet archive's whole model."""
    import onnxruntime as ort

    unpacked = tmp_path_factory.mktemp("resnet")
    with zipfile.ZipFile(store / "resnet.mar") as z:
        z.extractall(unpacked)
    return ort.InferenceSession(str(unpacked / "model.onnx"), providers=["CPUExecutionProvider"])


def test_resnet_answers_curl_upload_with_top5_names(server, store, resnet_session):
    session = resnet_session
    config = ImageConfig.from_mapping(archive_config(store, "resnet")["image"])
    data = jpeg(100, 130, seed=31)
    resp = put_image(server, "resnet", data)
    assert resp.status == 200, resp.body
    body = resp.json()
    want = softmax(session.run(None, {"image": decode_image(data, config)[None]})[0][0])
    top5 = np.argsort(-want)[:5]
    assert list(body) == [RESNET_LABELS[i] for i in top5]
    np.testing.assert_allclose(list(body.values()), want[top5], atol=1e-4)


def test_resnet_crops_an_elongated_image_before_resizing_it(server, store, resnet_session):
    """A 1x40000 PNG (a few hundred bytes): resized whole to a 72 shortest edge it would be
    72x2880000 pixels; the answer is the model's on the solid colour the crop sees."""
    session = resnet_session
    config = ImageConfig.from_mapping(archive_config(store, "resnet")["image"])
    colour = np.array([200, 60, 20], np.float32)
    pixels = (colour / 255 - np.array(config.mean, np.float32)) / np.array(config.std, np.float32)
    want = softmax(session.run(None, {"image": np.broadcast_to(pixels[None, :, None, None], (1, 3, 64, 64))
                                      .astype(np.float32)})[0][0])
    resp = put_image(server, "resnet", elongated_png(1, 40_000, (200, 60, 20)))
    assert resp.status == 200, resp.body
    body = resp.json()
    top5 = np.argsort(-want)[:5]
    assert list(body) == [RESNET_LABELS[i] for i in top5]
    np.testing.assert_allclose(list(body.values()), want[top5], atol=1e-4)


def test_examples_predict_sends_images_and_text(server, tmp_path):
    import subprocess
    import sys

    image = tmp_path / "face.jpg"
    image.write_bytes(jpeg(90, 90, seed=41))
    script = Path(__file__).resolve().parent.parent / "examples" / "predict.py"
    common = [sys.executable, str(script), "--key-file", str(server.workdir / "key_file.json"),
              "--port", str(server.ports["inference"]), "--management-port", str(server.ports["management"])]
    done = subprocess.run([*common, "--model", "vit", "--image", str(image)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(as curl -T)" in done.stdout and "-> 200" in done.stdout and '"happy"' in done.stdout
    assert '"outputs"' in done.stdout  # the tensors-out request
    done = subprocess.run([*common, "--model", "bert", "--text", "great movie", "--text", "boring"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("-> 200") == 3 and '"positive"' in done.stdout
