"""The archive contract: one reader for .mar files and model directories, one state-file rule."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from handlers.artifact.contract import (
    cpu_layout,
    histories_of,
    read_archive,
    serves_split,
    state_file,
)
from handlers.artifact.history_key import history_key
from handlers.artifact.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    Partition,
    TensorSpec,
    write_manifest,
)
from handlers.hardware.topology import Core, Topology
from handlers.runtime.config import ConfigError, RuntimeConfig


def _model_dir(tmp_path, config_text="hetserve:\n  micro_batch: 2\n"):
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    (folder / "whole.onnx").write_bytes(b"not read here")
    manifest = Manifest(
        model_name="tiny",
        inputs=(TensorSpec("x", "float32", (None, 3)),),
        outputs=(TensorSpec("y", "float32", (None, 2)),),
        whole_model="whole.onnx",
        partitions=(),
        files={"whole.onnx": FileEntry(hashlib.sha256(b"not read here").hexdigest(), 13)},
    )
    write_manifest(manifest, folder)
    if config_text is not None:
        (folder / "model-config.yaml").write_text(config_text)
    return folder


def test_a_model_directory_and_its_mar_read_the_same(tmp_path):
    folder = _model_dir(tmp_path)
    mar = tmp_path / "tiny.mar"
    with zipfile.ZipFile(mar, "w") as z:
        for path in folder.iterdir():
            z.write(path, path.name)
    from_dir, from_mar = read_archive(folder), read_archive(mar)
    assert from_dir == from_mar
    assert from_mar.manifest.inputs[0].sample_shape == (3,)
    assert from_mar.config == RuntimeConfig.from_model_yaml({"hetserve": {"micro_batch": 2}})
    assert not from_mar.partitioned
    digest = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
    assert from_mar.manifest_digest == digest


def test_the_offline_tools_find_the_state_file_the_runtime_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("HETSERVE_STATE_DIR", str(tmp_path / "env-state"))
    archive = read_archive(_model_dir(tmp_path, config_text=None))
    config = RuntimeConfig()
    # The runtime keys the file by the served stages and core-group shape (issue 17, item 5).
    key = history_key(archive.manifest, config.ratio, config.core_groups, config.cpu_head_groups)
    runtime_path = config.state_path("tiny", archive.manifest_digest, key=key)
    assert archive.state_path() == runtime_path == state_file("tiny", archive.manifest_digest, key=key)
    assert runtime_path.parent == tmp_path / "env-state"
    assert runtime_path.name == f"tiny-{archive.manifest_digest[:12]}-{key}-perf.json"
    # An archive whose config names a state_dir is found there, as its worker would write it.
    configured = tmp_path / "configured"
    with_dir = read_archive(_model_dir(tmp_path / "b", f"hetserve:\n  state_dir: {configured}\n"))
    assert with_dir.state_path().parent == configured
    assert with_dir.state_path(tmp_path / "cli").parent == tmp_path / "cli"  # explicit wins
    configured.mkdir()
    with_dir.state_path().write_text("{}")
    assert histories_of("tiny", configured) == [with_dir.state_path()]


def test_anything_but_a_hetserve_archive_is_refused_with_the_reason(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="not a hetserve archive"):
        read_archive(tmp_path / "empty")
    (tmp_path / "junk.mar").write_bytes(b"PK not really")
    with pytest.raises(ManifestError, match="not a readable model archive"):
        read_archive(tmp_path / "junk.mar")


def test_the_cpu_layout_groups_cores_as_the_runtime_does():
    two = Topology(tuple(Core(cpu=i, siblings=(i,), core_id=i, socket=0, numa=0) for i in range(2)))
    assert cpu_layout(RuntimeConfig(core_groups="size:1"), False, two) == {"whole": ("cpu0", "cpu1")}
    split = cpu_layout(RuntimeConfig(core_groups="size:1", cpu_head_groups=1), True, two)
    assert split == {"head": ("cpu0",), "tail": ("cpu1",)}


def test_an_archives_hetserve_section_is_read_by_the_runtimes_validator(tmp_path):
    # the offline tools refuse what a worker would refuse, naming the knob, instead of defaults
    archive = read_archive(_model_dir(tmp_path, "hetserve:\n  core_group: size:1\n"))
    with pytest.raises(ConfigError, match="core_group"):
        archive.state_path()


def test_split_or_whole_is_the_rule_the_manifest_serves_by():
    cut = Partition(ratio=0.5, achieved_ratio=0.5, method="metis", head="h.onnx", tail="t.onnx",
                    cut_tensors=(), cut_bytes_per_sample=0, head_cost=1.0, tail_cost=1.0, max_abs_err=0.0)
    for default in (None, 0.5, 1.0):
        manifest = Manifest("m", (), (), "whole.onnx", (cut,), {}, default_ratio=default)
        for ratio in (None, 0.3, 0.5, 0.99, 1.0, 1.5):
            if ratio is None and default is None:
                continue
            served = manifest.partition_for(ratio) is not None
            assert serves_split(ratio, default) == served, (ratio, default)
