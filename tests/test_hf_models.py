"""Bring your own Hugging Face model: ten architectures built from small configs with random
weights go through export, cut at 0.75 and 0.85 (or a clean off-target failure, then the
nearest cut kept and labelled honestly), archive, load in one real TorchServe, and answer JSON
and KServe v2 requests with the outputs torch computes. BERT serves three sequence lengths
from one archive.

Cost control: the archives are built once per session with FLOP costs (deterministic, no
profiling runs) and one TorchServe serves all of them.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

transformers = pytest.importorskip("transformers")

import hf_models  # noqa: E402

from handlers.artifact.manifest import Manifest  # noqa: E402
from handlers.protocol.dynamic_dims import DynamicDims, parse_declarations  # noqa: E402
from hetserve.tsprocess import start_torchserve  # noqa: E402
from partitioner.archive import copy_runtime, model_config, package  # noqa: E402
from partitioner.build import (  # noqa: E402
    CutOptions,
    OffTargetError,
    build_stage_directory,
    check_loads,
)
from partitioner.export import export_onnx, resolve_dynamic, torch_reference  # noqa: E402
from partitioner.loading import load_model  # noqa: E402
from partitioner.profile import flops_costs  # noqa: E402
from partitioner.stages import TAIL_SHAPE_SUFFIX  # noqa: E402

pytestmark = pytest.mark.server

FACTORIES = Path(hf_models.__file__)
RATIOS = (0.75, 0.85)
RTOL, ATOL_OF_SCALE = 1e-3, 1e-4
BERT_SEQ_MAX = 32
EXPECTED_IO = {
    "bert": (("input_ids", "attention_mask"), ("last_hidden_state", "pooler_output")),
    "distilbert": (("input_ids", "attention_mask"), ("last_hidden_state",)),
    "gpt2": (("input_ids",), ("logits",)),
    "vit": (("pixel_values",), ("logits",)),
    "convnext": (("pixel_values",), ("logits",)),
    "swin": (("pixel_values",), ("logits",)),
    "mobilenet_v2": (("pixel_values",), ("logits",)),
    "efficientnet": (("pixel_values",), ("logits",)),
    "detr": (("pixel_values",), ("logits", "pred_boxes")),
    "yolos": (("pixel_values",), ("logits", "pred_boxes")),
}


@dataclass
class Built:
    name: str
    reference: object  # numpy feeds -> {output: array}, torch itself
    manifest: Manifest
    off_target: str | None  # the message of the refused first attempt, if any
    sample: dict[str, tuple[int, ...]]  # one sample's shape per input


def _build(name: str, store: Path, scratch: Path) -> Built:
    loaded = load_model(f"{FACTORIES}:{name}")
    declared = DynamicDims()
    if name == "bert":
        declared = parse_declarations(
            ["input_ids:1=seq", "attention_mask:1=seq"], [f"seq<={BERT_SEQ_MAX}"]
        )
    model = export_onnx(loaded, dynamic=declared)
    dynamic = resolve_dynamic(model, loaded, declared)
    costs = flops_costs(model, dict(dynamic.sizes))
    reference = torch_reference(loaded, [o.name for o in model.graph.output])
    stage_dir = scratch / name
    off_target = None
    for allow in (False, True):
        shutil.rmtree(stage_dir, ignore_errors=True)
        copy_runtime(stage_dir)
        try:
            result = build_stage_directory(
                model, costs, stage_dir, name, CutOptions(ratios=RATIOS, allow_off_target=allow),
                progress=False, dynamic=dynamic, reference=reference,
            )
            break
        except OffTargetError as exc:
            off_target = str(exc)
    config = model_config(None, {
        "batchSize": 4, "maxBatchDelay": 20, "minWorkers": 1, "maxWorkers": 1,  # CI time: one per model
        "hetserve": {"calibration_runs": 1, "ratio": RATIOS[-1]},
    })
    check_loads(stage_dir, config, result.manifest)
    package(stage_dir, name, store, config, force=True)
    sample = {n: tuple(t.shape[1:]) for n, t in zip(loaded.input_names, loaded.example_inputs, strict=True)}
    return Built(name, reference, result.manifest, off_target, sample)


@pytest.fixture(scope="session")
def hf_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-store")


# Known to be refused: hetserve's own checks stop them, with a message, before any archive.
# xfail (not strict) so the day they pass, the suite says so. None today. Swin was refused
# until 2026-12-01 for two reasons, both fixed in partitioner/export.py: torch.onnx failed on
# a view after SDPA (its fake layout differs from the trace's; now retried with SDPA's math
# backend), and the TorchScript fallback's "0.5% difference" was torch's side: the trace left
# the model in training mode, so the reference ran Swin's drop_path. Its graph now comes from
# torch.export and equals torch to ~1e-8 (logits of scale 0.04-0.08) at batch 1-4.
KNOWN_REFUSED: dict[str, str] = {}


@pytest.fixture(scope="session")
def built(hf_store, tmp_path_factory) -> dict[str, Built | Exception]:
    scratch = tmp_path_factory.mktemp("hf-stages")
    out: dict[str, Built | Exception] = {}
    for name in hf_models.ALL:
        try:
            out[name] = _build(name, hf_store, scratch)
        except ValueError as exc:  # hetserve's user-facing errors
            out[name] = exc
    return out


def _get(built: dict[str, Built | Exception], name: str) -> Built:
    item = built[name]
    if isinstance(item, Exception):
        if name in KNOWN_REFUSED:
            assert "\n" not in str(item)[:400]  # one readable message, no traceback dump
            pytest.xfail(f"{KNOWN_REFUSED[name]} ({item})")
        raise item
    return item


@pytest.fixture(scope="session")
def server(built, hf_store, tmp_path_factory):
    served = {name: f"{name}.mar" for name, item in built.items() if isinstance(item, Built)}
    ts = start_torchserve(tmp_path_factory.mktemp("hf-ts"), hf_store, served, timeout=600)
    yield ts
    ts.stop()


def _inputs(item: Built, batch: int, seed: int, seq: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, sample in item.sample.items():
        shape = (batch, *((seq,) if seq is not None and len(sample) == 1 else sample))
        if name == "input_ids":
            feeds[name] = rng.integers(0, hf_models.VOCAB, shape).astype(np.int64)
        elif name == "attention_mask":
            mask = np.ones(shape, dtype=np.int64)
            mask[0, shape[1] // 2 :] = 0  # padding on one row: the mask must matter
            feeds[name] = mask
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _assert_close(got: np.ndarray, want: np.ndarray, name: str) -> None:
    scale = float(np.max(np.abs(want)))
    assert scale > 1e-6, f"{name}: degenerate reference output"
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL_OF_SCALE * scale, err_msg=name)


# ---- offline: export names, honest ratios, cut tensors ----------------------------------------


@pytest.mark.parametrize("name", hf_models.ALL)
def test_inputs_and_outputs_are_named_from_the_model(built, name):
    inputs, outputs = EXPECTED_IO[name]
    manifest = _get(built, name).manifest
    assert tuple(s.name for s in manifest.inputs) == inputs
    assert tuple(s.name for s in manifest.outputs) == outputs


@pytest.mark.parametrize("name", hf_models.ALL)
def test_ratios_are_reached_or_refused_cleanly_and_labelled_by_what_they_achieve(built, name):
    item = _get(built, name)
    assert item.manifest.partitions
    for part in item.manifest.partitions:
        assert f"r{part.achieved_ratio:.3f}" in part.head
        if item.off_target is None:
            assert abs(part.achieved_ratio - part.ratio) <= 0.03 + 1e-9
    if item.off_target is not None:
        assert "unreachable" in item.off_target and "--allow-off-target" in item.off_target
        assert "\n" not in item.off_target
        assert any(
            abs(p.ratio - min(round(p.achieved_ratio, 3), 0.999)) < 1e-9
            for p in item.manifest.partitions
        )


@pytest.mark.parametrize("name", hf_models.ALL)
def test_every_cut_tensor_has_the_batch_as_dim_0(built, hf_store, name):
    _get(built, name)
    with zipfile.ZipFile(hf_store / f"{name}.mar") as mar:
        for part in _get(built, name).manifest.partitions:
            tail = onnx.load_from_string(mar.read(part.tail))
            for value in tail.graph.input:
                dims = value.type.tensor_type.shape.dim
                assert dims and dims[0].dim_param == "batch", (part.tail, value.name)


def test_detr_tails_recompute_shapes_from_cut_tensors_instead_of_receiving_them(built, hf_store):
    """DETR's reshapes read Shape(...) of head tensors (its .mar used to fail to load when a
    1-D shape tensor crossed); the tail rebuilds those shapes from the cut tensors it receives,
    so no shape tensor crosses."""
    rebuilt = 0
    with zipfile.ZipFile(hf_store / "detr.mar") as mar:
        for part in _get(built, "detr").manifest.partitions:
            tail = onnx.load_from_string(mar.read(part.tail))
            rebuilt += sum(TAIL_SHAPE_SUFFIX in n.name for n in tail.graph.node)
            assert "pixel_values" not in {i.name for i in tail.graph.input}
    assert rebuilt > 0


def test_gpt2_reaches_both_ratios_by_splitting_its_lm_head(built, hf_store):
    """GPT-2's lm_head is a third of the FLOPs here (84% at full vocabulary): no cut of whole
    nodes reaches 0.75 or 0.85. The partitioner splits it into column chunks, says so in the
    manifest, and the chunks' stages still equal torch (served tests below)."""
    item = _get(built, "gpt2")
    assert item.off_target is None
    (split,) = item.manifest.producer["split_ops"]
    assert split["op_type"] == "MatMul" and split["parts"] >= 2
    assert split["columns"] == hf_models.VOCAB
    assert sorted(p.ratio for p in item.manifest.partitions) == list(RATIOS)
    for part in item.manifest.partitions:
        assert abs(part.achieved_ratio - part.ratio) <= 0.03 + 1e-9
    with zipfile.ZipFile(hf_store / "gpt2.mar") as mar:
        whole = onnx.load_model_from_string(mar.read("model.onnx"))
    names = {n.name for n in whole.graph.node}
    assert split["node"] not in names
    assert {f"{split['node']}_part{k}" for k in range(split["parts"])} <= names


def test_bert_archive_records_its_sequence_axis(built):
    dims = DynamicDims.from_json(_get(built, "bert").manifest.dynamic_dims)
    assert dims.axes == {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    assert dims.bounds["seq"] == (1, BERT_SEQ_MAX)
    assert dims.sizes["seq"] == hf_models.SEQ


# ---- served by TorchServe ---------------------------------------------------------------------


@pytest.mark.parametrize("name", hf_models.ALL)
def test_served_json_equals_torch(built, server, name):
    item = _get(built, name)
    feeds = _inputs(item, 2, seed=3)
    body = {k: v.tolist() for k, v in feeds.items()}
    resp = server.predict(name, json.dumps(body).encode())
    assert resp.status == 200, resp.body
    want = item.reference(feeds)
    outputs = resp.json()["outputs"]
    assert set(outputs) == set(want)
    for out, value in want.items():
        _assert_close(np.asarray(outputs[out], dtype=np.float32), value, f"{name}.{out}")


@pytest.mark.parametrize("name", hf_models.ALL)
def test_served_kserve_v2_equals_torch(built, server, name):
    item = _get(built, name)
    feeds = _inputs(item, 3, seed=4)
    datatype = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}
    body = {"id": f"{name}-1", "inputs": [
        {"name": k, "shape": list(v.shape), "datatype": datatype[v.dtype], "data": v.ravel().tolist()}
        for k, v in feeds.items()
    ]}
    resp = server.predict(name, json.dumps(body).encode())
    assert resp.status == 200, resp.body
    doc = resp.json()
    assert doc["id"] == f"{name}-1"
    want = item.reference(feeds)
    got = {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]) for o in doc["outputs"]}
    assert set(got) == set(want)
    for out, value in want.items():
        _assert_close(got[out], value, f"{name}.{out}")


@pytest.mark.parametrize("seq", [5, hf_models.SEQ, BERT_SEQ_MAX])
def test_bert_serves_three_sequence_lengths_from_one_archive(server, built, seq):
    item = _get(built, "bert")
    feeds = _inputs(item, 2, seed=seq, seq=seq)
    resp = server.predict("bert", json.dumps({k: v.tolist() for k, v in feeds.items()}).encode())
    assert resp.status == 200, resp.body
    want = item.reference(feeds)
    got = resp.json()["outputs"]
    assert np.asarray(got["last_hidden_state"]).shape == (2, seq, 32)
    for out, value in want.items():
        _assert_close(np.asarray(got[out], dtype=np.float32), value, f"bert@{seq}.{out}")


def test_bert_refuses_inputs_that_disagree_on_seq_or_exceed_its_bound(server, built):
    item = _get(built, "bert")
    feeds = _inputs(item, 1, seed=9, seq=8)
    feeds["attention_mask"] = np.ones((1, 9), dtype=np.int64)
    resp = server.predict("bert", json.dumps({k: v.tolist() for k, v in feeds.items()}).encode())
    assert resp.status == 400, resp.body
    assert "seq" in resp.body.decode() and "attention_mask" in resp.body.decode()
    long = _inputs(item, 1, seed=9, seq=BERT_SEQ_MAX + 1)
    resp = server.predict("bert", json.dumps({k: v.tolist() for k, v in long.items()}).encode())
    assert resp.status == 400, resp.body
    assert f"{BERT_SEQ_MAX}" in resp.body.decode()
