"""Fixtures shared by the test modules: the small archive is built once per test run, and
workers may keep their history under pytest's temp dir.

``tiny_mar`` is zoo:resnet18-tiny cut at ratios 0.5 and 0.8 with the shipped model-config
(``minWorkers``/``maxWorkers: auto``, so as many workers as this box's default; see
test_auto_workers); ``tiny_variant`` derives a copy with model-config overrides
(``with_config``: only model-config.yaml changes, so no re-export and no re-cut), pinned to one
worker unless the overrides say otherwise: tests read one worker's pid, metrics and timeline,
and one worker loads fastest; ``tiny_named`` does the same and
also names the copy's model as ``hetserve archive --model-name`` would (responses carry that
name); ``tiny_model_dir`` is the archive unpacked, for tests that load the service in process.
Exporting and cutting the model is most of an archive's cost: tests that need resnet18-tiny
served with another config derive it here rather than building their own.

``shipped_server`` is one real TorchServe with config/config.properties as shipped (token auth
on, model API off) serving the variants in SHIPPED_MODELS; the modules that only send requests
to such a server share it (test_serving, test_security) rather than each starting its own. A
test that kills a worker or needs another config starts its own server.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

TINY_RATIOS = "0.5,0.8"
ONE_WORKER = {"minWorkers": 1, "maxWorkers": 1}
SHIPPED_BODY_LIMIT = 4 * 2**20  # the "sec" model's hetserve.limits.max_body_bytes
# name -> model-config overrides of tiny_mar, served together by shipped_server
SHIPPED_MODELS: dict[str, dict[str, Any]] = {
    # test_serving: batching on, up to 4 requests per batch, waiting up to 200 ms to gather them.
    # Split it stays: the load-time layout check (compare_whole) could otherwise keep the whole
    # model, and test_serving reads the head and tail stages' metrics.
    "split": {"batchSize": 4, "maxBatchDelay": 200, "hetserve": {"compare_whole": False}},
    "whole": {"hetserve": {"ratio": 1.0}},  # the unsplit model
    # test_security: a lower body limit the tests can reach.
    "sec": {"maxBatchDelay": 20, "hetserve": {"limits": {"max_body_bytes": SHIPPED_BODY_LIMIT}}},
}


@pytest.fixture(scope="session", autouse=True)
def state_roots_allow_the_test_temp_dir(tmp_path_factory):
    # Workers keep their history only under an allowed root (handlers/artifact/state_dir.py); the tests'
    # state directories live under pytest's base temp, which TorchServe's workers inherit here.
    base = str(tmp_path_factory.getbasetemp())
    old = os.environ.get("HETSERVE_STATE_ROOTS")
    os.environ["HETSERVE_STATE_ROOTS"] = os.pathsep.join(filter(None, [old, base]))
    yield
    if old is None:
        os.environ.pop("HETSERVE_STATE_ROOTS", None)
    else:
        os.environ["HETSERVE_STATE_ROOTS"] = old


@pytest.fixture(scope="session")
def tiny_mar(tmp_path_factory) -> Path:
    from hetserve.cli import main

    store = tmp_path_factory.mktemp("tiny-store")
    assert main([
        "archive", "--model", "zoo:resnet18-tiny", "--model-name", "tiny", "--export-path",
        str(store), "--cost", "flops", "--quiet", "--ratios", TINY_RATIOS,
    ]) == 0
    return store / "tiny.mar"


@pytest.fixture(scope="session")
def tiny_variant(tiny_mar) -> Callable[[Path, str, Mapping[str, Any]], Path]:
    """(store, name, model-config overrides) -> store/name.mar, derived from the shared archive,
    one worker unless ``overrides`` sets minWorkers/maxWorkers."""
    from partitioner.archive import with_config

    def make(store: Path, name: str, overrides: Mapping[str, Any]) -> Path:
        return with_config(tiny_mar, store / f"{name}.mar", {**ONE_WORKER, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_named(tiny_variant) -> Callable[[Path, str, Mapping[str, Any]], Path]:
    """(store, name, model-config overrides) -> store/name.mar whose model is called ``name`` in
    both manifests (TorchServe's MAR-INF and hetserve's), as if archived with --model-name name."""
    import json

    from handlers.artifact.manifest import MANIFEST_NAME

    def make(store: Path, name: str, overrides: Mapping[str, Any]) -> Path:
        staged = tiny_variant(store, f".{name}-unnamed", overrides)
        out = store / f"{name}.mar"
        with zipfile.ZipFile(staged) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename == MANIFEST_NAME:
                    data = _renamed(data, ("model_name",), name)
                elif item.filename == "MAR-INF/MANIFEST.json":
                    data = _renamed(data, ("model", "modelName"), name)
                dst.writestr(item, data)
        staged.unlink()
        return out

    def _renamed(raw: bytes, path: tuple[str, ...], name: str) -> bytes:
        document = json.loads(raw)
        node = document
        for key in path[:-1]:
            node = node[key]
        assert path[-1] in node, f"no {'.'.join(path)} to rename"
        node[path[-1]] = name
        return (json.dumps(document, indent=2) + "\n").encode()

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_mar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-unpacked")
    with zipfile.ZipFile(tiny_mar) as z:
        z.extractall(out)
    return out


@pytest.fixture(scope="session")
def shipped_server(tiny_named, tmp_path_factory):
    from hetserve.tsprocess import start_torchserve

    store = tmp_path_factory.mktemp("shipped-store")
    for name, overrides in SHIPPED_MODELS.items():
        tiny_named(store, name, overrides)
    ts = start_torchserve(tmp_path_factory.mktemp("ts-shipped"), store, {n: f"{n}.mar" for n in SHIPPED_MODELS})
    yield ts
    ts.stop()
