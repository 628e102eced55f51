"""The benchmarks' archive cache (hetserve/bench_harness.py): a cached .mar is reused only while it
packs this checkout's serving code."""

from __future__ import annotations

import shutil
import zipfile

from hetserve.bench_harness import hetserve_archive, packed_runtime_is_current


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
