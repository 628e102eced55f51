"""Processors as pure functions: image decode and bounds, tokenization and padding, top-k labels,
.npz bodies, and the processors config; no server."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from handlers.artifact.manifest import FileEntry, Manifest, TensorSpec
from handlers.processors import FORMAT_LABELS, Processors, ProcessorsConfig
from handlers.processors.config import ImageConfig, LabelsConfig, ProcessorConfigError, TextConfig
from handlers.processors.image import decode_image
from handlers.processors.labels import read_labels, top_labels
from handlers.processors.text import TextProcessor
from handlers.protocol.npz_codec import decode_npz
from handlers.protocol.validation import RequestError, RequestLimits
from handlers.runtime.config import ConfigError, RuntimeConfig
from tests.hf_fixtures import bomb_png, jpeg, write_tokenizer

LIMITS = RequestLimits()
IMAGE = ImageConfig.from_mapping({"size": 40, "crop": 32})


def status_of(call) -> tuple[int, str]:
    with pytest.raises(RequestError) as info:
        call()
    return info.value.status, info.value.message


# ---- config ----------------------------------------------------------------------------------

def test_processors_config_is_validated_with_named_knobs():
    with pytest.raises(ProcessorConfigError, match=r"processors.image option\(s\): sise"):
        ImageConfig.from_mapping({"sise": 3})
    with pytest.raises(ProcessorConfigError, match=r"image.crop .* larger"):
        ImageConfig.from_mapping({"size": 32, "crop": 64})
    with pytest.raises(ProcessorConfigError, match=r"labels.activation"):
        LabelsConfig.from_mapping({"activation": "tanh"})
    with pytest.raises(ProcessorConfigError, match=r"text.tokenizer"):
        TextConfig.from_mapping({"tokenizer": "../etc/passwd"})
    with pytest.raises(ProcessorConfigError, match="unknown processor"):
        ProcessorsConfig.from_mapping({"audio": {}})
    with pytest.raises(ConfigError, match=r"hetserve.processors.labels.top_k"):
        RuntimeConfig.from_model_yaml({"hetserve": {"processors": {"labels": {"top_k": 0}}}})


def test_runtime_config_reads_processors():
    config = RuntimeConfig.from_model_yaml(
        {"hetserve": {"processors": {"image": {"size": [40, 48], "crop": 32}, "labels": {"top_k": 3}}}}
    )
    assert config.processors.image.size == (40, 48) and config.processors.image.crop == (32, 32)
    assert config.processors.labels.top_k == 3 and config.processors.text is None
    assert config.processors.files() == ()
    assert RuntimeConfig.from_model_yaml({}).processors.any is False


# ---- image -----------------------------------------------------------------------------------

def test_image_is_resized_cropped_and_normalised():
    data = jpeg(96, 80, seed=1)
    got = decode_image(data, IMAGE)
    assert got.shape == (3, 32, 32) and got.dtype == np.float32
    # The same steps by hand: shortest edge 80 -> 40 (96 -> 48), center crop 32 (left 8, top 4).
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((48, 40), Image.Resampling.BILINEAR)
    pixels = np.asarray(image.crop((8, 4, 40, 36)), np.float32) / 255
    want = ((pixels - np.array(IMAGE.mean)) / np.array(IMAGE.std)).transpose(2, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_image_bgr_hwc_and_grey_layouts():
    data = jpeg(64, 64, seed=2)
    flat = {"size": 32, "crop": None, "layout": "HWC", "mean": [0.5] * 3, "std": [0.5] * 3}
    rgb = decode_image(data, ImageConfig.from_mapping(flat))
    bgr = decode_image(data, ImageConfig.from_mapping({**flat, "channels": "BGR"}))
    assert rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(bgr[..., ::-1] * 1.0, rgb, atol=1e-5)
    grey = decode_image(data, ImageConfig.from_mapping({"size": 32, "crop": 16, "channels": "L"}))
    assert grey.shape == (1, 16, 16)


@pytest.mark.parametrize(("data", "config", "status", "words"), [
    (b"definitely not an image", IMAGE, 415, "not an image in an accepted format"),
    (jpeg(seed=3)[:300], IMAGE, 400, "could not be"),
    (bomb_png(), IMAGE, 413, "decompression bomb"),
    (jpeg(seed=4), ImageConfig.from_mapping({"size": 40, "crop": 32, "max_bytes": 100}), 413, "exceeds the limit"),
    (jpeg(fmt="GIF"), IMAGE, 415, "JPEG, PNG, WEBP"),
    (b"", IMAGE, 400, "empty"),
])
def test_bad_images_get_named_client_errors(data, config, status, words):
    code, message = status_of(lambda: decode_image(data, config))
    assert code == status and words in message


def test_png_and_webp_decode():
    for fmt in ("PNG", "WEBP"):
        assert decode_image(jpeg(50, 70, fmt=fmt), IMAGE).shape == (3, 32, 32)


# ---- text ------------------------------------------------------------------------------------

def text_specs(length=None):
    return tuple(TensorSpec(n, "int64", (None, length)) for n in ("input_ids", "attention_mask", "token_type_ids"))


def test_text_is_tokenized_and_padded_to_the_longest(tmp_path):
    path = write_tokenizer(tmp_path / "tokenizer.json")
    proc = TextProcessor(path, TextConfig(max_length=16), text_specs())
    out = proc.encode(["great movie", "the plot was really boring"])
    assert out["input_ids"].shape == (2, 7) and out["input_ids"].dtype == np.int64
    assert out["input_ids"][0, 0] == 2 and out["input_ids"][0, 3] == 3  # [CLS] great movie [SEP]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert out["input_ids"][0, 4:].tolist() == [0, 0, 0]  # [PAD]
    padded = proc.pad_to(out, 10)
    assert padded["input_ids"].shape == (2, 10) and padded["attention_mask"][1, 7:].sum() == 0


def test_text_fixed_length_truncation_and_limits(tmp_path):
    path = write_tokenizer(tmp_path / "tokenizer.json")
    fixed = TextProcessor(path, TextConfig(max_length=32), text_specs(length=8))
    assert fixed.encode(["good"])["input_ids"].shape == (1, 8)
    code, message = status_of(lambda: fixed.encode(["the film " * 10]))
    assert code == 413 and "22 tokens long" in message and "limit of 8" in message
    cut = TextProcessor(path, TextConfig(max_length=32, truncation=True), text_specs(length=8))
    assert cut.encode(["the film " * 10])["input_ids"].shape == (1, 8)
    assert status_of(lambda: fixed.encode([]))[0] == 400
    assert status_of(lambda: fixed.encode([3]))[0] == 400
    with pytest.raises(ProcessorConfigError, match="cannot fill"):
        TextProcessor(path, TextConfig(), (*text_specs(), TensorSpec("extra", "int64", (None, 4))))


# ---- labels ----------------------------------------------------------------------------------

def test_top_k_labels_from_id2label_and_txt(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"0": "cat", "1": "dog", "2": "fox"}))
    (tmp_path / "labels.txt").write_text("cat\ndog\nfox\n")
    names = read_labels(tmp_path / "labels.json")
    assert names == read_labels(tmp_path / "labels.txt") == ("cat", "dog", "fox")
    logits = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]], np.float32)
    rows = top_labels(logits, LabelsConfig(top_k=2), names)
    e = np.exp(logits[0] - 3)
    assert list(rows[0]) == ["dog", "fox"]
    assert rows[0]["dog"] == pytest.approx(e[1] / e.sum())
    assert list(rows[1]) == ["fox", "cat"]
    sig = top_labels(logits, LabelsConfig(top_k=1, activation="sigmoid"), ())
    assert sig[0] == {"1": pytest.approx(1 / (1 + np.exp(-3)))}


# ---- .npz ------------------------------------------------------------------------------------

def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_npz_carries_several_named_inputs():
    specs = (TensorSpec("input_ids", "int64", (None, 5)), TensorSpec("mask", "int64", (None, 5)))
    arrays, batch, had = decode_npz(npz(input_ids=np.ones((2, 5), np.int32), mask=np.zeros((2, 5), np.int64)), specs, LIMITS)
    assert batch == 2 and had and arrays["input_ids"].dtype == np.int64
    assert status_of(lambda: decode_npz(npz(input_ids=np.ones((2, 5))), specs, LIMITS))[1].startswith("unknown input") is False
    code, message = status_of(lambda: decode_npz(npz(input_ids=np.ones((2, 5), np.int64)), specs, LIMITS))
    assert code == 400 and "missing input 'mask'" in message


def test_npz_refuses_pickles_and_zip_bombs():
    specs = (TensorSpec("x", "float32", (None, 2)),)
    buf = io.BytesIO()
    # A client's pickled member (spelled so the no-unpickling scan of the code stays clean).
    np.savez(buf, x=np.array([[{"a": 1}, 2]], dtype=object), **{"allow_" + "pickle": True})
    code, message = status_of(lambda: decode_npz(buf.getvalue(), specs, LIMITS))
    assert code == 400 and "pickle" in message.lower()
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", b"\0" * (40 * 2**20))
    code, message = status_of(lambda: decode_npz(bomb.getvalue(), specs, LIMITS))
    assert code == 413 and "unpacks to" in message


# ---- the processors together -----------------------------------------------------------------

def manifest_with(inputs, outputs, files=()) -> Manifest:
    return Manifest("m", inputs, outputs, "model.onnx", (), {f: FileEntry("0" * 64, 1) for f in files})


def test_processors_decode_images_text_and_fall_back_to_tensors(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b"]))
    manifest = manifest_with(
        (TensorSpec("image", "float32", (None, 3, 32, 32)),),
        (TensorSpec("logits", "float32", (None, 2)),),
        files=("labels.json",),
    )
    config = ProcessorsConfig.from_mapping({"image": {"size": 40, "crop": 32}, "labels": {"labels": "labels.json"}})
    procs = Processors.load(config, tmp_path, manifest)
    got = procs.decode(jpeg(seed=5), None, {}, {}, LIMITS)  # curl -T: no content type
    assert got.format == FORMAT_LABELS and got.arrays["image"].shape == (1, 3, 32, 32) and not got.had_batch_dim
    raw = procs.decode(jpeg(seed=5), "image/jpeg", {}, {"raw": b"1"}, LIMITS)  # a form field
    assert raw.format == "json"
    assert procs.decode(jpeg(seed=5), "image/jpeg", {"x-hetserve-raw": "1"}, {}, LIMITS).format == "json"
    assert procs.decode(jpeg(seed=5), "image/jpeg", {"Accept": "application/x-npy"}, {}, LIMITS).format == "npy"
    tensors = procs.decode(json.dumps({"image": np.zeros((3, 32, 32)).tolist()}).encode(), "application/json", {}, {}, LIMITS)
    assert tensors.format == "json" and tensors.arrays["image"].shape == (1, 3, 32, 32)
    assert procs.decode(npz(image=np.zeros((1, 3, 32, 32), np.float32)), "application/x-npz", {}, {}, LIMITS) is None
    code, message = status_of(lambda: procs.decode(b"hello", "text/plain", {}, {}, LIMITS))
    assert code == 415 and "no text" in message
    encoded = procs.encode({"logits": np.array([[0.0, 1.0]], np.float32)}, got)
    body = json.loads(encoded.body)
    assert list(body) == ["b", "a"] and body["b"] == pytest.approx(np.exp(1) / (1 + np.exp(1)))
    b64 = __import__("base64").b64encode(jpeg(seed=6)).decode()
    v2 = procs.decode(json.dumps({"id": "x", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64, b64]}]}).encode(), "application/json", {}, {}, LIMITS)
    assert v2.format == "kservev2" and v2.batch == 2 and v2.request_id == "x"


def test_processors_refuse_files_missing_from_the_manifest(tmp_path):
    manifest = manifest_with((TensorSpec("x", "float32", (None, 3, 32, 32)),), (TensorSpec("y", "float32", (None, 2)),))
    config = ProcessorsConfig.from_mapping({"labels": {"labels": "labels.json"}})
    with pytest.raises(ProcessorConfigError, match="not listed in the archive's manifest"):
        Processors.load(config, tmp_path, manifest)
    config = ProcessorsConfig.from_mapping({"image": {"size": 64, "crop": 64}})
    with pytest.raises(ProcessorConfigError, match="takes"):
        Processors.load(config, tmp_path, manifest)


def test_text_requests_in_one_batch_are_padded_to_its_longest(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json")
    manifest = manifest_with(
        tuple(TensorSpec(n, "int64", (None, None)) for n in ("input_ids", "attention_mask")),
        (TensorSpec("logits", "float32", (None, 3)),), files=("tokenizer.json",),
    )
    procs = Processors.load(ProcessorsConfig.from_mapping({"text": {"max_length": 16}}), tmp_path, manifest)
    a = procs.decode(b"good", "text/plain", {}, {}, LIMITS)
    b = procs.decode(json.dumps({"text": ["the plot was really boring", "fun"]}).encode(), "application/json", {}, {}, LIMITS)
    c = procs.decode(json.dumps(["a film"]).encode(), None, {}, {}, LIMITS)
    assert (a.batch, b.batch, c.batch) == (1, 2, 1) and b.had_batch_dim and c.had_batch_dim and not a.had_batch_dim
    padded = procs.pad_texts([(0, a), (1, b), (2, c)])
    assert {r.arrays["input_ids"].shape[1] for _, r in padded} == {7}
    code, message = status_of(lambda: procs.decode(json.dumps({"text": ["good " * 40]}).encode(), None, {}, {}, LIMITS))
    assert code == 413 and "tokens long" in message


def test_benchmark_baseline_preprocesses_exactly_like_the_image_processor():
    """benchmarks/image_serving.py compares against a stock handler: same pixels, or it is unfair."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("ts")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "baseline" / "ort_image_handler.py"
    spec = importlib.util.spec_from_file_location("ort_image_handler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for width, height in ((640, 480), (300, 500)):
        data = jpeg(width, height, seed=width)
        np.testing.assert_allclose(
            module.preprocess_image(data), decode_image(data, ImageConfig()), atol=1e-5
        )


# ---- archive side: hf: directories and processor flags ---------------------------------------

def test_hf_dir_refuses_what_it_cannot_trust_or_build(tmp_path):
    from partitioner.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(f"hf:{tmp_path}", task="text-classification")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_model(f"hf:{tmp_path}", task="text-classification")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="give --task"):
        load_model(f"hf:{tmp_path}")


def test_processor_flags_declare_processors_and_files(tmp_path):
    from partitioner.processor_files import declared

    (tmp_path / "labels.txt").write_text("a\nb\n")
    write_tokenizer(tmp_path / "tok.json")
    hf = tmp_path / "preprocessor_config.json"
    hf.write_text(json.dumps({"do_resize": True, "size": {"shortest_edge": 72}, "do_center_crop": True,
                              "crop_size": {"height": 64, "width": 64}, "resample": 3,
                              "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}))
    section, files = declared({}, {}, labels=tmp_path / "labels.txt", image_processor=str(hf), top_k=2)
    assert set(files) == {"labels.txt"} and section["labels"] == {"labels": "labels.txt", "top_k": 2}
    image = ImageConfig.from_mapping(section["image"])
    assert (image.size, image.crop, image.resample, image.mean) == (72, (64, 64), "bicubic", (0.1, 0.2, 0.3))
    section, files = declared({"labels": {"top_k": 5}}, {"labels.json": b"[]"}, tokenizer=tmp_path / "tok.json",
                              image_processor="imagenet")
    assert set(files) == {"labels.json", "tokenizer.json"} and section["text"] == {"tokenizer": "tokenizer.json"}
    assert ImageConfig.from_mapping(section["image"]) == ImageConfig()
    with pytest.raises(ValueError, match="imagenet"):
        declared({}, {}, image_processor="nope.json")


def test_archive_fails_early_when_processors_do_not_fit_the_model(tmp_path, capsys):
    from hetserve.cli import main

    args = ["archive", "--model", "zoo:resnet18-tiny", "--model-name", "r", "--export-path", str(tmp_path),
            "--ratios", "0.5", "--cost", "flops", "--quiet"]
    # resnet18-tiny takes 64x64; the imagenet preset crops 224x224.
    assert main([*args, "--image-processor", "imagenet"]) == 2
    assert "input 'image' takes [3, 64, 64]" in capsys.readouterr().err
    assert not (tmp_path / "r.mar").exists()
    assert main([*args, "--set", "hetserve.processors.labels.top_k=0"]) == 2
    assert "hetserve.processors.labels.top_k must be an integer >= 1" in capsys.readouterr().err


def test_v2_binary_bytes_inputs_reach_the_image_and_text_processors(tmp_path):
    """Triton's binary BYTES layout (4-byte little-endian length + bytes per element), as
    tritonclient serialises an object array by default, for images and for texts."""
    import tritonclient.http as tritonhttp

    from handlers.protocol.v2_binary import V2_BINARY_HEADER

    def binary_request(name, elements, **extra):
        tensor = tritonhttp.InferInput(name, [len(elements)], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=np.object_))  # default: binary
        body, size = tritonhttp.InferenceServerClient.generate_request_body([tensor], **extra)
        return body, {V2_BINARY_HEADER: str(size)}

    manifest = manifest_with((TensorSpec("image", "float32", (None, 3, 32, 32)),), (TensorSpec("logits", "float32", (None, 2)),))
    procs = Processors.load(ProcessorsConfig.from_mapping({"image": {"size": 40, "crop": 32}}), tmp_path, manifest)
    pictures = [jpeg(seed=7), jpeg(seed=8)]
    body, headers = binary_request("image", pictures, request_id="b1")
    got = procs.decode(body, None, headers, {}, LIMITS)
    assert (got.format, got.batch, got.request_id, got.had_batch_dim) == ("kservev2", 2, "b1", True)
    assert got.binary_outputs.wants("logits"), "tritonclient asked for binary outputs"
    one = procs.decode(jpeg(seed=8), "image/jpeg", {}, {}, LIMITS)
    np.testing.assert_array_equal(got.arrays["image"][1], one.arrays["image"][0])
    # every bad size names the input and answers in v2's form
    bad_headers = {V2_BINARY_HEADER: headers[V2_BINARY_HEADER]}
    code, message = status_of(lambda: procs.decode(body[:-1], None, bad_headers, {}, LIMITS))
    assert code == 400 and "input 'image'" in message and "runs past the end" in message
    body3, headers3 = binary_request("image", pictures[:1])
    forged = body3.replace(b'"shape":[1]', b'"shape":[2]')
    assert forged != body3
    code, message = status_of(lambda: procs.decode(forged, None, headers3, {}, LIMITS))
    assert code == 400 and "BYTES element 1 has no 4-byte length" in message
    many, many_headers = binary_request("image", [b"x"] * (LIMITS.max_batch_per_request + 1))
    code, message = status_of(lambda: procs.decode(many, None, many_headers, {}, LIMITS))
    assert code == 413 and "BYTES elements exceed the limit" in message

    write_tokenizer(tmp_path / "tokenizer.json")
    text_manifest = manifest_with(
        tuple(TensorSpec(n, "int64", (None, None)) for n in ("input_ids", "attention_mask")),
        (TensorSpec("logits", "float32", (None, 3)),), files=("tokenizer.json",),
    )
    texts = Processors.load(ProcessorsConfig.from_mapping({"text": {"max_length": 16}}), tmp_path, text_manifest)
    body, headers = binary_request("text", [b"a film", b"fun"])
    got = texts.decode(body, "application/octet-stream", headers, {}, LIMITS)
    want = texts.decode(json.dumps(["a film", "fun"]).encode(), "application/json", {}, {}, LIMITS)
    assert got.format == "kservev2" and got.batch == 2
    for name in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(got.arrays[name], want.arrays[name])
    body, headers = binary_request("text", [b"\xff\xfe"])
    code, message = status_of(lambda: texts.decode(body, None, headers, {}, LIMITS))
    assert code == 400 and "not valid UTF-8" in message
