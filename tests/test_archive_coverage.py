"""The manifest covers every file TorchServe reads from the archive; an operator can pin the whole
archive from outside it (issue 17, item 7). Real archives built by ``hetserve archive``."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from handlers.artifact.archive_digest import DIGEST_ENV, check_archive_digest, expected_digest
from handlers.artifact.manifest import MANIFEST_NAME, ManifestError, load_verified_manifest
from hetserve.pinned_archives import PinError, verify_mar
from hetserve.tsprocess import start_torchserve
from partitioner.archive import with_config

NAME = "tiny"  # the model name conftest.tiny_mar was built with (what a pinned digest names)


@pytest.fixture(scope="module")
def mar(tiny_mar) -> Path:
    """The session's shared archive, only read here: every edit goes to a copy."""
    return tiny_mar


def _digest(mar: Path) -> str:
    with zipfile.ZipFile(mar) as z:
        return hashlib.sha256(z.read(MANIFEST_NAME)).hexdigest()


def _edited(mar: Path, dst: Path, name: str, extra: bytes = b"\n# edited\n") -> Path:
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(dst, "w") as out:
        for item in src.infolist():
            data = src.read(item)
            out.writestr(item, data + extra if item.filename == name else data)
    return dst


def _extract(mar: Path, dst: Path) -> Path:
    with zipfile.ZipFile(mar) as z:
        z.extractall(dst)
    return dst


def test_the_manifest_lists_the_entry_handler_and_model_config(mar, tmp_path):
    with zipfile.ZipFile(mar) as z:
        files = json.loads(z.read(MANIFEST_NAME))["files"]
        names = {n for n in z.namelist() if not n.endswith("/")}
        for name in ("hetserve_handler.py", "model-config.yaml"):
            assert files[name]["sha256"] == hashlib.sha256(z.read(name)).hexdigest(), name
    assert names - set(files) == {MANIFEST_NAME, "MAR-INF/MANIFEST.json"}
    load_verified_manifest(_extract(mar, tmp_path / "ok"))


@pytest.mark.parametrize("name", ["hetserve_handler.py", "model-config.yaml"])
def test_an_edited_entry_handler_or_config_is_refused_at_load(mar, tmp_path, name):
    model_dir = _extract(_edited(mar, tmp_path / "bad.mar", name), tmp_path / "bad")
    with pytest.raises(ManifestError, match=name.replace(".", r"\.")):
        load_verified_manifest(model_dir)


def test_with_config_keeps_the_manifest_true_to_the_new_config(mar, tmp_path):
    derived = with_config(mar, tmp_path / "d.mar", {"batchSize": 2})
    load_verified_manifest(_extract(derived, tmp_path / "d"))
    assert _digest(derived) != _digest(mar)


def test_a_pinned_digest_is_checked_before_the_model_loads(mar, tmp_path):
    model_dir = _extract(mar, tmp_path / "m")
    good = _digest(mar)
    check_archive_digest(model_dir, {DIGEST_ENV: good})
    check_archive_digest(model_dir, {DIGEST_ENV: f"other={'0' * 64}"})  # pins another model only
    check_archive_digest(model_dir, {})
    with pytest.raises(ManifestError, match="not the archive the operator pinned"):
        check_archive_digest(model_dir, {DIGEST_ENV: f"{NAME}={'0' * 64}"})
    with pytest.raises(ManifestError, match="64 hex digits"):
        expected_digest(f"{NAME}=abc", NAME)


def test_a_pinned_archive_is_checked_before_torchserve_starts(mar, tmp_path):
    good = _digest(mar)
    assert verify_mar(mar, good) is True
    assert verify_mar(mar, "") is False
    edited = _edited(mar, tmp_path / f"{NAME}.mar", "hetserve_handler.py", b"\nimport os  # anything\n")
    # The manifest is untouched, so its digest still matches: the file check catches the edit.
    with pytest.raises(PinError, match="hetserve_handler.py"):
        verify_mar(edited, good)
    with pytest.raises(PinError, match="hetserve_handler.py"):
        start_torchserve(tmp_path / "ts", tmp_path, {NAME: f"{NAME}.mar"}, env={DIGEST_ENV: good})
    assert not (tmp_path / "ts").exists(), "refused before TorchServe was started"


def test_an_archive_built_before_the_coverage_is_refused_with_a_rebuild_hint(mar, tmp_path):
    model_dir = _extract(mar, tmp_path / "old")
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    del manifest["files"]["model-config.yaml"], manifest["files"]["hetserve_handler.py"]
    (model_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="rebuild it with hetserve archive"):
        load_verified_manifest(model_dir)
