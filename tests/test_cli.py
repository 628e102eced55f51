"""The ``hetserve`` command end to end: archive -> .mar contents, partition -> report."""

from __future__ import annotations

import json
import zipfile

import pytest
import yaml

from handlers.artifact.manifest import MANIFEST_NAME, sha256_file
from hetserve.cli import main


@pytest.fixture(scope="module")
def built_mar(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    extras = tmp_path_factory.mktemp("extras")
    (extras / "labels.json").write_text('["cat", "dog"]')
    (extras / "requirements.txt").write_text("numpy\n")
    (store / "tiny.mar").write_bytes(b"stale")  # -f replaces it
    code = main([
        "archive", "--model", "zoo:resnet18-tiny", "--model-name", "tiny", "--export-path", str(store),
        "--ratios", "0.6,0.8", "--cost", "flops", "--quiet", "--set", "batchSize=2",
        "--set", "hetserve.micro_batch=1", "-f", "--extra-files", str(extras / "labels.json"),
        "--requirements-file", str(extras / "requirements.txt"),
    ])
    assert code == 0
    return store / "tiny.mar"


def test_mar_holds_exactly_the_files_the_manifest_lists_with_their_hashes(built_mar, tmp_path):
    with zipfile.ZipFile(built_mar) as z:
        names = set(z.namelist())
        z.extractall(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) <= names
    for path, entry in manifest["files"].items():
        assert sha256_file(tmp_path / path) == entry["sha256"], path
        assert (tmp_path / path).stat().st_size == entry["size"]
    listed = set(manifest["files"]) | {MANIFEST_NAME, "MAR-INF/MANIFEST.json", "model-config.yaml", "hetserve_handler.py"}
    assert names == listed, "the archive holds files the manifest does not vouch for"
    assert {"labels.json", "requirements.txt"} <= set(manifest["files"]), "extra files must be hashed too"
    assert (tmp_path / "labels.json").read_text() == '["cat", "dog"]'
    ts_manifest = json.loads((tmp_path / "MAR-INF" / "MANIFEST.json").read_text())
    assert ts_manifest["model"]["requirementsFile"] == "requirements.txt"
    assert {p["ratio"] for p in manifest["partitions"]} == {0.6, 0.8}
    assert manifest["inputs"] == [{"name": "image", "dtype": "float32", "shape": [None, 3, 64, 64]}]


def test_mar_names_the_handler_and_carries_the_model_config(built_mar, tmp_path):
    with zipfile.ZipFile(built_mar) as z:
        ts_manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(z.read("model-config.yaml"))
        runtime_files = [n for n in z.namelist() if n.startswith("handlers/")]
    assert ts_manifest["model"]["handler"] == "hetserve_handler.py"
    assert config["batchSize"] == 2  # --set override
    assert config["hetserve"]["micro_batch"] == 1
    assert config["hetserve"]["core_groups"] == "numa"  # default kept
    assert "handlers/service.py" in runtime_files and "handlers/hetserve_handler.py" in runtime_files
    # copy_runtime copies the package tree; offline analysis stays out of what ships
    assert "handlers/runtime/flow.py" in runtime_files and "handlers/executors/cuda.py" in runtime_files
    assert not any("simulation" in n or "timeline_report" in n or "__pycache__" in n
                   for n in runtime_files)


def test_archive_refuses_to_overwrite_without_force(built_mar, capsys):
    code = main(["archive", "--model", "zoo:resnet18-tiny", "--model-name", "tiny",
                 "--export-path", str(built_mar.parent), "--cost", "flops", "--quiet"])
    assert code == 2
    assert "--force" in capsys.readouterr().err


# `hetserve partition`'s report (a row per ratio and method, exact no worse than METIS) is
# checked on the README's own partition command: tests/test_readme_commands.py.


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "zoo:no-such-model"], "unknown zoo model"),
    (["--model", "zoo:resnet18-tiny", "--weights", "w.pt"], "safetensors"),
    (["--model", "zoo:resnet18-tiny", "--ratios", "0.5,1.5"], "between 0 and 1"),
])
def test_user_errors_are_one_clear_line(args, message, tmp_path, capsys):
    code = main(["archive", *args, "--model-name", "x", "--export-path", str(tmp_path), "--cost", "flops", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
