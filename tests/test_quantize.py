"""int8 stages (``hetserve archive --quantize int8``).

The pure parts first: accuracy metrics, the held-out split, the choice between static and
dynamic quantization, the one-line verdict, the manifest's precision variants, the
``hetserve.precision`` knob and the history key. Then one archive of zoo:resnet18-tiny calibrated
on real photos (matplotlib's and scikit-image's samples) through its image processor, served at
int8 and at float32 from the same .mar by one real TorchServe; and the refusal below the
threshold (and --allow-accuracy-loss) on that archive's own model.onnx, which skips the export.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from handlers.artifact.history_key import history_key
from handlers.artifact.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    Partition,
    StageVariant,
    TensorSpec,
)
from handlers.runtime.config import ConfigError, RuntimeConfig
from hetserve.archive_checks import ArchiveInputError, check_quantize
from hetserve.cli import main
from partitioner.calibration import CalibrationError, read_directory
from partitioner.quant_metrics import (
    COSINE,
    TOP1,
    Accuracy,
    Candidate,
    choose_method,
    held_out_indices,
    is_classifier,
    judge,
    measure,
    row_cosines,
)

LOGITS = (TensorSpec("logits", "float32", (None, 3)),)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry", "page")


# ---- pure parts ---------------------------------------------------------------------------------


def test_measure_counts_top1_flips_and_differences():
    reference = [{"logits": np.array([[3.0, 1.0, 0.0]])}, {"logits": np.array([[0.0, 2.0, 1.0]])}]
    candidate = [{"logits": np.array([[2.9, 1.1, 0.0]])}, {"logits": np.array([[0.0, 1.0, 1.5]])}]
    acc = measure(reference, candidate, LOGITS, classifier=True)
    assert acc.metric == TOP1 and acc.value == acc.top1_agreement == 0.5
    assert acc.samples == 2
    assert acc.max_abs_diff == pytest.approx(1.0)
    assert acc.mean_abs_diff == pytest.approx((0.1 + 0.1 + 0 + 0 + 1.0 + 0.5) / 6)
    assert acc.max_abs_diff_of_largest == pytest.approx(1.0 / 3.0)
    assert acc.cosine_min < acc.cosine_mean < 1.0


def test_measure_judges_embeddings_by_cosine():
    spec = (TensorSpec("embedding", "float32", (None, 4)),)
    reference = [{"embedding": np.array([[1.0, 0.0, 0.0, 0.0]])}]
    candidate = [{"embedding": np.array([[1.0, 1.0, 0.0, 0.0]])}]
    acc = measure(reference, candidate, spec, classifier=False)
    assert acc.metric == COSINE and acc.top1_agreement is None
    assert acc.value == pytest.approx(1 / np.sqrt(2))


def test_classifier_needs_labels_or_a_scores_name():
    embedding = (TensorSpec("embedding", "float32", (None, 384)),)
    assert is_classifier(LOGITS, labelled=False)
    assert not is_classifier(embedding, labelled=False)
    assert is_classifier(embedding, labelled=True)
    assert not is_classifier((TensorSpec("hidden", "float32", (None, 8, 384)),), labelled=True)


def test_row_cosines_of_zero_rows():
    want = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    got = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_array_equal(row_cosines(want, got), [1.0, 0.0, 0.0])


def test_held_out_inputs_are_every_fourth_and_never_calibrated_on():
    assert held_out_indices(5) == ([1, 2, 3], [0, 4])
    assert held_out_indices(2) == ([1], [0])
    with pytest.raises(ValueError, match="at least 2"):
        held_out_indices(1)


def _acc(value: float) -> Accuracy:
    return Accuracy(8, TOP1, value, value, 0.1, 0.01, 0.02, 0.99, 0.995)


def test_choice_is_the_fastest_method_meeting_the_threshold():
    both = [Candidate("static", _acc(1.0), 1.9), Candidate("dynamic", _acc(1.0), 1.2)]
    assert choose_method(both, 0.99).method == "static"
    one = [Candidate("static", _acc(0.9), 1.9), Candidate("dynamic", _acc(1.0), 1.2)]
    choice = choose_method(one, 0.99)
    assert choice.method == "dynamic" and "the only one" in choice.reason
    none = [Candidate("static", _acc(0.9), 1.9), Candidate("dynamic", _acc(0.95), 0.5)]
    choice = choose_method(none, 0.99)
    assert choice.method == "dynamic" and "no method meets" in choice.reason
    assert "static top1_agreement 0.9000 at 1.90x" in choice.reason


def test_verdict_is_one_line_saying_by_how_much():
    verdict = judge([("whole model", _acc(1.0)), ("ratio 0.5 head -> tail", _acc(0.875))], 0.99)
    assert not verdict.passed
    line = verdict.line(0.99)
    assert "\n" not in line
    assert "ratio 0.5 head -> tail" in line and "0.8750" in line and "0.1150 below --min-accuracy 0.99" in line
    assert judge([("whole model", _acc(1.0))], 0.99).passed


def _manifest(with_int8: bool) -> Manifest:
    image = TensorSpec("image", "float32", (None, 3, 4, 4))
    cut = TensorSpec("cut", "float32", (None, 8))
    variants = {"int8": StageVariant({"head": "h-int8.onnx", "tail": "t-int8.onnx"}, {"value": 1.0})}
    part = Partition(0.5, 0.5, "metis", "h.onnx", "t.onnx", (cut,), 32, 1.0, 1.0, 0.0,
                     variants=variants if with_int8 else {})
    names = ["model.onnx", "h.onnx", "t.onnx", *(["model-int8.onnx", "h-int8.onnx", "t-int8.onnx"] if with_int8 else [])]
    return Manifest(
        "m", (image,), LOGITS, "model.onnx", (part,),
        {n: FileEntry(f"{i:064x}", 1) for i, n in enumerate(names)}, default_ratio=0.5,
        whole_variants={"int8": StageVariant({"whole": "model-int8.onnx"})} if with_int8 else {},
    )


def test_manifest_precision_variants_round_trip_and_name_their_files():
    manifest = _manifest(with_int8=True)
    again = Manifest.from_json(json.loads(json.dumps(manifest.to_json())))
    assert again == manifest
    assert again.precisions == ("float32", "int8")
    part = again.partition_for(0.5)
    assert again.stage_files(part, "int8") == {"head": "h-int8.onnx", "tail": "t-int8.onnx"}
    assert again.stage_files(None, "int8") == {"whole": "model-int8.onnx"}
    assert again.stage_files(part) == {"head": "h.onnx", "tail": "t.onnx"}
    assert {"h-int8.onnx", "t-int8.onnx", "model-int8.onnx"} <= set(again.referenced_files())


def test_manifest_refuses_precisions_it_cannot_serve():
    float_only = _manifest(with_int8=False)
    with pytest.raises(ManifestError, match="no int8 stages .* --quantize int8"):
        float_only.stage_files(float_only.partition_for(0.5), "int8")
    data = _manifest(with_int8=True).to_json()
    data["partitions"][0].pop("variants")
    with pytest.raises(ManifestError, match="ratio 0.5 has precisions"):
        Manifest.from_json(data)
    data = _manifest(with_int8=True).to_json()
    data["whole_variants"]["int4"] = data["whole_variants"]["int8"]
    with pytest.raises(ManifestError, match="unknown precision"):
        Manifest.from_json(data)
    data = _manifest(with_int8=True).to_json()
    del data["files"]["t-int8.onnx"]
    with pytest.raises(ManifestError, match="t-int8.onnx"):
        Manifest.from_json(data)


def test_precision_knob_is_validated():
    assert RuntimeConfig.from_model_yaml({"hetserve": {"precision": "int8"}}).precision == "int8"
    assert RuntimeConfig().precision == "float32"
    with pytest.raises(ConfigError, match="hetserve.precision must be one of"):
        RuntimeConfig.from_model_yaml({"hetserve": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match="hetserve.precision must be a string"):
        RuntimeConfig.from_model_yaml({"hetserve": {"precision": 8}})


def test_history_key_names_the_precision():
    manifest = _manifest(with_int8=True)
    float_key = history_key(manifest, 0.5, "numa")
    assert history_key(manifest, 0.5, "numa", 0, "float32") == float_key
    assert history_key(manifest, 0.5, "numa", 0, "int8") != float_key
    # An archive that gains int8 stages keeps its float32 histories.
    assert history_key(_manifest(with_int8=False), 0.5, "numa") == float_key


def test_quantize_flags_are_checked_before_the_export(tmp_path):
    with pytest.raises(ArchiveInputError, match="add --quantize int8"):
        check_quantize(None, tmp_path, 0.99, None)
    with pytest.raises(ArchiveInputError, match="hetserve.precision is 'int8'.*--quantize int8"):
        check_quantize(None, None, 0.99, "int8")
    with pytest.raises(ArchiveInputError, match="no images"):
        check_quantize("int8", tmp_path, 0.99, None)
    with pytest.raises(ArchiveInputError, match="fraction"):
        check_quantize("int8", None, 99.0, None)
    check_quantize("int8", None, 0.99, "int8")


def test_calibration_tensors_from_npy_and_npz(tmp_path):
    manifest = _manifest(with_int8=False)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.standard_normal((3, 3, 4, 4)))  # a batch of 3, float64
    np.save(tmp_path / "b.npy", rng.standard_normal((3, 4, 4)).astype(np.float32))  # one sample
    np.savez(tmp_path / "c.npz", image=rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    (tmp_path / "notes.md").write_text("not an input")
    found = read_directory(tmp_path, manifest, None, tmp_path)
    assert len(found.feeds) == 6 and found.kinds == {"tensor": 6}
    assert all(f["image"].shape == (1, 3, 4, 4) and f["image"].dtype == np.float32 for f in found.feeds)
    assert "other kinds" in found.notes[0]
    np.save(tmp_path / "d.npy", np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(CalibrationError, match=r"d.npy: 'image' has shape \[2, 3, 5, 5\]"):
        read_directory(tmp_path, manifest, None, tmp_path)


def test_calibration_images_need_an_image_processor(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(_photos()[0])
    with pytest.raises(CalibrationError, match="photo.jpg is an image but the archive declares no image processor"):
        read_directory(tmp_path, _manifest(with_int8=False), None, tmp_path)


# ---- one int8 archive, served ------------------------------------------------------------------


def _photos() -> list[bytes]:
    import matplotlib
    import skimage.data
    from PIL import Image

    out = [(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()]
    for name in SKIMAGE_PHOTOS:
        pixels = getattr(skimage.data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, -1)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., :3]).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, data in enumerate(_photos()):
        (folder / f"photo-{i}.jpg").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def int8_archive(photo_dir, tmp_path_factory) -> tuple[Path, str]:
    """(the .mar, what the archive command printed)."""
    store = tmp_path_factory.mktemp("int8-store")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["archive", "--model", "zoo:resnet18-tiny", "--model-name", "q", "--export-path", str(store),
                   "--cost", "flops", "--quiet", "--ratios", "0.5", "--image-processor", "imagenet",
                   "--set", "hetserve.processors.image.size=72", "--set", "hetserve.processors.image.crop=64",
                   "--set", "minWorkers=1", "--set", "maxWorkers=1",
                   "--quantize", "int8", "--calibration", str(photo_dir)])
    assert rc == 0, out.getvalue()
    return store / "q.mar", out.getvalue()


@pytest.fixture(scope="module")
def int8_dir(int8_archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8-unpacked")
    with zipfile.ZipFile(int8_archive[0]) as z:
        z.extractall(out)
    return out


def test_archive_records_the_int8_accuracy(int8_archive, int8_dir):
    from handlers.artifact.manifest import load_verified_manifest

    manifest = load_verified_manifest(int8_dir)  # every int8 file is listed and hashed
    record = manifest.quantization
    assert record["method"] in ("static", "dynamic", "dynamic_u8") and record["reason"]
    assert record["calibration"] == {"source": "directory", "inputs": 8, "kinds": {"image": 8},
                                     "calibrated_on": 6, "held_out": 2}
    assert record["threshold"] == {"metric": "top1_agreement", "min": 0.99}
    assert record["passed"] is True and record["accuracy_loss_allowed"] is False
    assert {c["method"] for c in record["candidates"]} == {"static", "dynamic", "dynamic_u8"}
    assert manifest.precisions == ("float32", "int8")
    (part,) = manifest.partitions
    for accuracy in (manifest.whole_variants["int8"].accuracy, part.variants["int8"].accuracy):
        assert accuracy["samples"] == 2 and accuracy["passed"] is True
        assert accuracy["top1_agreement"] >= 0.99 and 0.9 < accuracy["cosine_mean"] <= 1.0
    report = int8_archive[1]
    assert f"int8: {record['method']} quantization" in report
    assert "int8: ratio 0.5 head -> tail" in report and "int8: whole model" in report


def test_int8_stages_keep_float32_boundaries_and_hold_8bit_weights(int8_dir):
    from handlers.artifact.manifest import load_verified_manifest

    manifest = load_verified_manifest(int8_dir)
    (part,) = manifest.partitions
    # The method is chosen by measured speed, so which ops it quantizes depends on the machine
    # (static: convolutions too; dynamic: MatMul/Gemm only): a stage holding such an op must
    # hold 8-bit weights, and at least one stage always does.
    quantizable = {"Conv", "MatMul", "Gemm"} if manifest.quantization["method"] == "static" else {"MatMul", "Gemm"}
    stages_with_8bit = 0
    for float_file, int8_file in ((part.head, part.variants["int8"].files["head"]),
                                  (part.tail, part.variants["int8"].files["tail"]),
                                  (manifest.whole_model, manifest.whole_variants["int8"].files["whole"])):
        want, got = (ort.InferenceSession(str(int8_dir / f), providers=["CPUExecutionProvider"])
                     for f in (float_file, int8_file))
        assert [(i.name, i.type) for i in got.get_inputs()] == [(i.name, i.type) for i in want.get_inputs()]
        assert [(o.name, o.type) for o in got.get_outputs()] == [(o.name, o.type) for o in want.get_outputs()]
        model = onnx.load(str(int8_dir / int8_file))
        eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        has_8bit = any(t.data_type in eight_bit for t in model.graph.initializer)
        float_ops = {n.op_type for n in onnx.load(str(int8_dir / float_file), load_external_data=False).graph.node}
        if float_ops & quantizable:
            assert has_8bit, f"{int8_file}: no 8-bit weights"
        stages_with_8bit += has_8bit
    assert stages_with_8bit >= 1


@pytest.fixture(scope="module")
def server(int8_archive, tmp_path_factory):
    from hetserve.tsprocess import start_torchserve
    from partitioner.archive import with_config

    mar = int8_archive[0]
    store = tmp_path_factory.mktemp("int8-serve")
    with_config(mar, store / "q8.mar", {"hetserve": {"precision": "int8"}})
    with_config(mar, store / "qf.mar", {"hetserve": {"precision": "float32"}})
    ts = start_torchserve(tmp_path_factory.mktemp("ts-int8"), store, {"q8": "q8.mar", "qf": "qf.mar"})
    yield ts
    ts.stop()


def _in_process(model_dir: Path, files: dict[str, str], feeds: dict[str, np.ndarray]) -> np.ndarray:
    from partitioner.stages import run_pipeline

    sessions = [ort.InferenceSession(str(model_dir / files[s]), providers=["CPUExecutionProvider"])
                for s in ("head", "tail", "whole") if s in files]
    if len(sessions) == 1:
        return sessions[0].run(["logits"], feeds)[0]
    return run_pipeline(*sessions, feeds)["logits"]


@pytest.mark.server
def test_one_archive_serves_int8_or_float32_as_configured(server, int8_dir):
    import yaml

    from handlers.artifact.manifest import load_verified_manifest
    from handlers.processors.config import ImageConfig
    from handlers.processors.image import decode_image

    manifest = load_verified_manifest(int8_dir)
    section = yaml.safe_load((int8_dir / "model-config.yaml").read_text())["hetserve"]["processors"]
    photo = _photos()[0]
    feeds = {"image": decode_image(photo, ImageConfig.from_mapping(section["image"]))[None]}
    part = manifest.partitions[0]
    float_ways = [_in_process(int8_dir, manifest.stage_files(p), feeds) for p in (None, part)]
    int8_ways = [_in_process(int8_dir, manifest.stage_files(p, "int8"), feeds) for p in (None, part)]
    answers = {}
    for model in ("q8", "qf"):
        resp = server.request("POST", f"/predictions/{model}", photo,
                              {"Content-Type": "image/jpeg", "X-Hetserve-Raw": "1"})
        assert resp.status == 200, resp.body
        answers[model] = np.asarray(resp.json()["outputs"]["logits"], np.float32)
    # Served at int8: what the int8 stages compute (whole or split: the worker's layout choice).
    assert any(np.allclose(answers["q8"], w[0], atol=1e-4) for w in int8_ways)
    assert not any(np.allclose(answers["q8"], w[0], atol=1e-4) for w in float_ways)
    assert any(np.allclose(answers["qf"], w[0], atol=1e-4) for w in float_ways)
    cosine = row_cosines(answers["q8"][None].astype(np.float64), answers["qf"][None].astype(np.float64))
    assert cosine[0] > 0.99


def test_int8_on_an_archive_without_int8_stages_is_a_load_error(tiny_model_dir, tmp_path):
    from handlers.service import InferenceService

    with pytest.raises(ManifestError, match="no int8 stages .* --quantize int8"):
        InferenceService.load(tiny_model_dir, {"hetserve": {"precision": "int8", "state_dir": str(tmp_path)}})


def _archive_onnx(int8_dir: Path, store: Path, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["archive", "--model", str(int8_dir / "model.onnx"), "--model-name", "r", "--export-path",
                   str(store), "--cost", "flops", "--quiet", "--ratios", "0.5", "--set", "minWorkers=1",
                   "--set", "maxWorkers=1", "--quantize", "int8", "--min-accuracy", "1.01", *extra])
    return rc, err.getvalue()


def test_below_the_threshold_the_archive_is_refused_in_one_line(int8_dir, tmp_path):
    rc, err = _archive_onnx(int8_dir, tmp_path)
    assert rc == 2
    assert "random inputs. That is a smoke test, not a calibration" in err  # no --calibration
    (line,) = [x for x in err.splitlines() if x.startswith("hetserve archive: error:")]
    assert "below --min-accuracy 1.01" in line and "--allow-accuracy-loss" in line
    assert not (tmp_path / "r.mar").exists()


def test_allow_accuracy_loss_archives_it_and_records_the_miss(int8_dir, tmp_path):
    rc, err = _archive_onnx(int8_dir, tmp_path, "--allow-accuracy-loss")
    assert rc == 0, err
    assert "below --min-accuracy 1.01" in err  # still said, as a warning
    with zipfile.ZipFile(tmp_path / "r.mar") as z:
        record = json.loads(z.read(MANIFEST_NAME))
    assert record["quantization"]["passed"] is False
    assert record["quantization"]["accuracy_loss_allowed"] is True
    assert record["quantization"]["calibration"]["source"] == "random"
    assert record["whole_variants"]["int8"]["accuracy"]["passed"] is False


def test_calibration_stride_divides_the_runs():
    from partitioner.quantize import calibration_stride

    assert calibration_stride(16) == 8
    assert calibration_stride(6) == 6
    assert calibration_stride(13) == 1
    assert calibration_stride(12) == 6
