"""``minWorkers``/``maxWorkers: auto``: resolved on the archiving box, recorded, and served.

The resolution is a pure function of the config and the box facts (tested with tables); the
session's archive (conftest.tiny_mar) is built with the shipped model-config, so it carries
what ``auto`` became on this machine, and one real TorchServe serves it as shipped.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from handlers.artifact.manifest import MANIFEST_NAME
from handlers.hardware.topology import default_workers, parse_cpu_list, probe
from hetserve.tsprocess import start_torchserve
from partitioner.auto_workers import PRODUCER_KEY, resolve, visible_gpus, workers_here

REPO = Path(__file__).resolve().parent.parent
SHIPPED = yaml.safe_load((REPO / "config" / "model-config.yaml").read_text())


def test_the_shipped_default_asks_for_auto() -> None:
    assert SHIPPED["minWorkers"] == SHIPPED["maxWorkers"] == "auto"


@pytest.mark.parametrize(("config", "physical", "gpus", "expected", "auto_keys"), [
    ({"minWorkers": "auto", "maxWorkers": "auto"}, 2, 0, (2, 2), ("minWorkers", "maxWorkers")),
    ({"minWorkers": "auto", "maxWorkers": "auto"}, 16, 0, (4, 4), ("minWorkers", "maxWorkers")),
    ({"minWorkers": "auto", "maxWorkers": "auto"}, 16, 1, (1, 1), ("minWorkers", "maxWorkers")),
    ({"minWorkers": "auto", "maxWorkers": "auto"}, 1, 0, (1, 1), ("minWorkers", "maxWorkers")),
    # one key explicit: the other follows it, min <= max kept
    ({"minWorkers": "auto", "maxWorkers": 1}, 16, 0, (1, 1), ("minWorkers",)),
    ({"minWorkers": "auto", "maxWorkers": 8}, 16, 0, (4, 8), ("minWorkers",)),
    ({"minWorkers": 6, "maxWorkers": "auto"}, 16, 0, (6, 6), ("maxWorkers",)),
    ({"minWorkers": 1, "maxWorkers": "auto"}, 2, 0, (1, 2), ("maxWorkers",)),
    # absent counts as auto when the other key says auto
    ({"minWorkers": "auto"}, 2, 0, (2, 2), ("minWorkers",)),
])
def test_resolve_table(config, physical, gpus, expected, auto_keys) -> None:
    resolved, choice = resolve({**config, "batchSize": 4}, physical, gpus)
    assert (resolved["minWorkers"], resolved["maxWorkers"]) == expected
    assert resolved["batchSize"] == 4
    assert choice is not None
    assert (choice.min_workers, choice.max_workers, choice.auto_keys) == (*expected, auto_keys)
    assert choice.to_json()["auto"] is True


def test_explicit_counts_are_left_alone_and_nothing_is_recorded() -> None:
    config = {"minWorkers": 1, "maxWorkers": 1, "hetserve": {"ratio": 1.0}}
    assert resolve(config, 16, 0) == (config, None)
    assert resolve({"batchSize": 4}, 16, 0) == ({"batchSize": 4}, None)


def test_the_note_says_what_was_chosen_and_why() -> None:
    _, choice = resolve({"minWorkers": "auto", "maxWorkers": "auto"}, 2, 0)
    assert choice is not None and choice.note() == "workers: 2 (auto: 2 physical cores, no GPU)"
    _, choice = resolve({"minWorkers": "auto", "maxWorkers": "auto"}, 16, 2)
    assert choice is not None and choice.note() == "workers: 1 (auto: 16 physical cores, 2 GPUs)"
    _, choice = resolve({"minWorkers": 1, "maxWorkers": "auto"}, 8, 0)
    assert choice is not None and choice.note() == "workers: min 1, max 2 (auto: 8 physical cores, no GPU)"


def test_workers_here_reads_auto_as_this_box_default() -> None:
    assert workers_here("auto") == default_workers(len(probe().cores), visible_gpus())
    assert workers_here(3) == 3
    assert workers_here(None) == 1


# ---------------------------------------------------------------------------------------------
# the session's archive, built with the shipped model-config on this box


def _archive(mar: Path) -> tuple[dict, dict]:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml")), json.loads(z.read(MANIFEST_NAME))


def _box_default() -> int:
    return default_workers(len(probe().cores), visible_gpus())


def test_the_archive_holds_integers_derived_here_and_records_them(tiny_mar) -> None:
    config, manifest = _archive(tiny_mar)
    n = _box_default()
    assert (config["minWorkers"], config["maxWorkers"]) == (n, n)
    assert manifest["producer"][PRODUCER_KEY] == {
        "auto": True, "auto_keys": ["minWorkers", "maxWorkers"], "minWorkers": n, "maxWorkers": n,
        "physical_cores": len(probe().cores), "gpus": visible_gpus(),
    }


def test_a_set_override_wins_over_auto() -> None:
    """``--set minWorkers=1`` reaches package() as an integer: no derivation, nothing recorded."""
    from hetserve.cli import _overrides
    from partitioner.archive import model_config

    config = model_config(None, _overrides(["minWorkers=1", "maxWorkers=1"]))
    assert resolve(config, 64, 0) == (config, None)
    assert (config["minWorkers"], config["maxWorkers"]) == (1, 1)


@pytest.fixture(scope="module")
def auto_server(tiny_mar, tmp_path_factory):
    """tiny_mar as built (shipped model-config, auto workers), on config/config.properties as
    shipped (its CPU launcher gives each worker its own share of the cores)."""
    store = tmp_path_factory.mktemp("auto-store")
    (store / "auto.mar").write_bytes(tiny_mar.read_bytes())
    ts = start_torchserve(tmp_path_factory.mktemp("ts-auto"), store, {"auto": "auto.mar"}, timeout=300)
    yield ts
    ts.stop()


def _cpus_allowed(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return set(parse_cpu_list(line.split(":", 1)[1]))
    raise AssertionError(f"/proc/{pid}/status has no Cpus_allowed_list")


@pytest.mark.server
def test_the_default_archive_serves_its_box_default_workers_on_their_own_cores(auto_server, tiny_mar, tmp_path):
    n = _box_default()
    described = auto_server.request("GET", "/models/auto", api="management")
    assert described.status == 200, described.body
    workers = described.json()[0]["workers"]
    assert len(workers) == n and all(w["status"] == "READY" for w in workers), workers

    with zipfile.ZipFile(tiny_mar) as z:
        z.extract("model.onnx", tmp_path)
        z.extract("weights.bin", tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(19)
    for _ in range(2 * n):
        x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
        resp = auto_server.predict("auto", x.tobytes(), "application/octet-stream", {"X-Tensor-Shape": "1,3,64,64"})
        assert resp.status == 200, resp.body
        expected = session.run(None, {"image": x})[0]
        np.testing.assert_allclose(np.frombuffer(resp.body, np.float32).reshape(expected.shape), expected,
                                   rtol=1e-4, atol=1e-4)

    pids = auto_server.worker_pids()
    assert len(pids) == n, pids
    if n >= 2:
        affinities = [_cpus_allowed(pid) for pid in pids]
        assert all(affinities), affinities
        seen: set[int] = set()
        for cpus in affinities:
            assert not cpus & seen, f"workers share cores: {affinities}"
            seen |= cpus
