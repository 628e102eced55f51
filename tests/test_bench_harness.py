"""The benchmarks' archive cache (hetserve/benchmarking/harness.py): a cached .mar is reused only while it
packs this checkout's serving code."""

from __future__ import annotations

import os
import shutil
import time
import zipfile

import pytest

from hetserve.benchmarking.harness import hetserve_archive, packed_runtime_is_current


def _rewrite(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = edit(item.filename, zin.read(item))
            if data is not None:
                zout.writestr(item, data)


def test_an_archive_built_from_this_checkout_is_current(tiny_mar):
    assert packed_runtime_is_current(tiny_mar)


def test_an_archive_with_other_serving_code_is_not(tiny_mar, tmp_path):
    edited = tmp_path / "edited.mar"
    _rewrite(tiny_mar, edited, lambda name, data: data + b"\n# older\n" if name == "handlers/service.py" else data)
    assert not packed_runtime_is_current(edited)
    missing = tmp_path / "missing.mar"
    _rewrite(tiny_mar, missing, lambda name, data: None if name == "handlers/runtime/flow.py" else data)
    assert not packed_runtime_is_current(missing)


def test_a_stale_cached_archive_is_rebuilt_and_a_current_one_reused(tiny_mar, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    cached = store / "tiny.mar"
    _rewrite(tiny_mar, cached, lambda name, data: data + b"\n# older\n" if name == "handlers/errors.py" else data)
    options = ("--ratios", "0.8", "--cost", "flops")
    mar = hetserve_archive(store, "tiny", "zoo:resnet18-tiny", *options)
    assert mar == cached and packed_runtime_is_current(mar)  # rebuilt from this checkout
    shutil.copy(tiny_mar, cached)
    before = cached.stat().st_mtime_ns
    assert hetserve_archive(store, "tiny", "zoo:resnet18-tiny", *options) == cached
    assert cached.stat().st_mtime_ns == before  # reused, not rebuilt


# ---- the in-process ceiling: the best of its layouts, named ------------------------------------


def test_the_ceiling_times_every_layout_and_names_the_best(tiny_mar, tmp_path):
    from hetserve.benchmarking.harness import (
        CEILING_LAYOUTS,
        ONE_SESSION_ALL_CORES_PINNED,
        SESSION_PER_CORE,
        in_process_ceiling,
        physical_cores,
        whole_model_files,
    )

    whole, _ = whole_model_files(tiny_mar, tmp_path)
    cores = physical_cores()
    report = in_process_ceiling(whole, batch=4, seconds=0.2)
    assert set(report["layouts"]) == set(CEILING_LAYOUTS)
    rates = {name: row["samples_per_s"] for name, row in report["layouts"].items()}
    assert all(rate > 0 for rate in rates.values()), rates
    assert report["samples_per_s"] == max(rates.values())
    assert rates[report["layout"]] == report["samples_per_s"]
    assert (report["threads"], report["batch"]) == (cores, 4)  # the keys older reports had
    per_core = report["layouts"][SESSION_PER_CORE]
    assert (per_core["sessions"], per_core["threads_per_session"], per_core["pinned"]) == (cores, 1, True)
    pinned = report["layouts"][ONE_SESSION_ALL_CORES_PINNED]
    assert (pinned["sessions"], pinned["threads_per_session"], pinned["pinned"]) == (1, cores, True)


def test_a_session_per_core_that_cannot_load_fails_loudly_rather_than_hanging(tmp_path):
    from hetserve.benchmarking.harness import session_per_core_samples_per_s

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    started = time.monotonic()
    with pytest.raises(Exception, match="(?i)protobuf|load|invalid"):
        session_per_core_samples_per_s(broken, batch=4, seconds=0.2)
    assert time.monotonic() - started < 30  # every driver thread came back


def test_main_threads_affinity_is_left_alone_by_the_pinned_drivers(tiny_mar, tmp_path):
    from hetserve.benchmarking.harness import session_per_core_samples_per_s, whole_model_files

    whole, _ = whole_model_files(tiny_mar, tmp_path)
    before = os.sched_getaffinity(0)
    assert session_per_core_samples_per_s(whole, batch=2, seconds=0.1, cores=1) > 0
    assert os.sched_getaffinity(0) == before  # pinning is per driver thread, not the process
