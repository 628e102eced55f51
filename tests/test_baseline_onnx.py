"""Row (a') of benchmarks/serving_cpu.py: stock TorchServe + BaseHandler's ONNX Runtime path on the
same .onnx hetserve serves. The benchmark is not run here; its archive is built and answers one
request on a real TorchServe with the baseline's own config, matching the model."""

from __future__ import annotations

import importlib.util
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from hetserve.tsprocess import start_torchserve

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("serving_cpu", REPO / "benchmarks" / "serving_cpu.py")
serving_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serving_cpu)

MODEL = "resnet18-tiny"


@pytest.fixture(scope="module")
def archives(tmp_path_factory, tiny_mar):
    # The hetserve archive is the session's (conftest.tiny_mar, the same zoo model): the stock
    # row under test is built from it, as serving_cpu builds it from the one it archived.
    store = tmp_path_factory.mktemp("store")
    hetserve_mar = Path(shutil.copyfile(tiny_mar, store / f"{MODEL}.mar"))
    return store, hetserve_mar, serving_cpu.build_stock_onnx_mar(MODEL, store, hetserve_mar)


def test_stock_onnx_archive_holds_the_same_graph_and_its_weights_only(archives):
    _, hetserve_mar, stock_mar = archives
    with zipfile.ZipFile(hetserve_mar) as h, zipfile.ZipFile(stock_mar) as s:
        names = set(s.namelist())
        assert s.read("model.onnx") == h.read("model.onnx")
        assert s.read("weights.bin") == h.read("weights.bin")
    assert not any(n.startswith("handlers/") for n in names), "a stock handler, not hetserve's runtime"
    assert "stock_onnx_handler.py" in names and "model-config.yaml" not in names


@pytest.mark.server
def test_stock_onnx_row_serves_the_model_through_base_handler(archives, tmp_path):
    store, hetserve_mar, stock_mar = archives
    server = start_torchserve(tmp_path / "ts", store, {"m": stock_mar.name},
                              base_config=serving_cpu.BASELINE / "default.properties")
    try:
        x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
        resp = server.predict("m", x.tobytes(), "application/octet-stream")
        assert resp.status == 200, resp.body
        log = server.log_text()
    finally:
        server.stop()
    assert "Succesfully setup ort session" in log  # BaseHandler's own ONNX path (its spelling)
    with zipfile.ZipFile(hetserve_mar) as z:
        z.extract("model.onnx", tmp_path)
        z.extract("weights.bin", tmp_path)
    expected = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(np.frombuffer(resp.body, np.float32).reshape(expected.shape), expected, atol=1e-4)


def test_summary_reports_the_ratio_to_the_onnx_baseline():
    rows = {"a_stock_eager": {"knee_rate": 10.0}, "a2_stock_onnx": {"knee_rate": 20.0},
            "b_whole_one_group": {"knee_rate": 30.0}}
    summary = serving_cpu.summarize(rows)
    assert summary["vs_stock_onnx"]["b_whole_one_group"] == 1.5
    assert summary["vs_stock"]["b_whole_one_group"] == 3.0
    assert summary["best_hetserve_row"] == "b_whole_one_group"
