"""A real pip install, used from outside the clone: wheel -> fresh venv -> archive -> one prediction.

The wheel must carry the defaults (config/ as package data) and everything the handler needs; the
venv never sees the clone (no PYTHONPATH, working directory elsewhere), so a path that still points
into the repository fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

from partitioner.auto_workers import resolve_here

REPO = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"  # first, in every venv: an unpinned resolve pulls a CUDA build

pytestmark = pytest.mark.server


def _run(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, a working directory outside the clone, an environment that cannot see it)."""
    root = tmp_path_factory.mktemp("install")
    # setuptools builds in the source tree; its scratch folders go to tmp, not into the clone.
    (root / "build.cfg").write_text(f"[build]\nbuild_base = {root / 'build'}\n[egg_info]\negg_base = {root}\n")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(root / "dist"), str(REPO)], cwd=root, timeout=300,
         env={**os.environ, "DIST_EXTRA_CONFIG": str(root / "build.cfg")})
    wheel = next((root / "dist").glob("hetserve-*.whl"))
    _run([sys.executable, "-m", "venv", str(root / "venv")], cwd=root, timeout=120)
    python = root / "venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    _run([str(python), "-m", "pip", "install", "-q", TORCH_PIN], cwd=root, timeout=600, env=env)
    _run([str(python), "-m", "pip", "install", "-q", str(wheel), TORCH_PIN], cwd=root, timeout=900, env=env)
    outside = root / "elsewhere"
    outside.mkdir()
    return python, outside, env


def test_wheel_ships_the_defaults_and_the_type_marker(installed):
    python, outside, env = installed
    probe = "import partitioner.defaults as d; print(d.config_dir())"
    where = Path(_run([str(python), "-c", probe], cwd=outside, timeout=60, env=env).strip())
    assert "site-packages" in where.parts and REPO not in where.parents, where
    for name in ("config.properties", "model-config.yaml", "log4j2.xml"):
        assert (where / name).read_bytes() == (REPO / "config" / name).read_bytes(), name
    assert (where.parent / "py.typed").is_file()


def test_installed_cli_archives_and_torchserve_answers_one_prediction(installed):
    python, outside, env = installed
    hetserve = python.parent / "hetserve"
    _run([str(hetserve), "archive", "--model", "zoo:resnet18-tiny", "--model-name", "tiny",
          "--export-path", "store", "--ratios", "0.8", "--cost", "flops", "--quiet"],
         cwd=outside, timeout=600, env=env)
    mar = outside / "store" / "tiny.mar"
    with zipfile.ZipFile(mar) as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
    shipped = yaml.safe_load((REPO / "config" / "model-config.yaml").read_text())
    # TorchServe reads integers: "auto" is this box's count (the installed CLI ran here too).
    expected, _ = resolve_here(shipped)
    assert config == expected, "the installed archive did not pack the shipped model-config.yaml"

    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from hetserve.tsprocess import start_torchserve
        server = start_torchserve(Path("ts"), Path("store"), {"tiny": "tiny.mar"}, timeout=300)
        try:
            body = json.dumps([[[[0.5] * 64] * 64] * 3]).encode()
            resp = server.predict("tiny", body)
            print(json.dumps({"status": resp.status, "body": resp.body.decode(errors="replace")}))
        finally:
            server.stop()
    """)
    out = _run([str(python), "-c", script], cwd=outside, timeout=600, env=env)
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["status"] == 200, answer["body"][-2000:]
    logits = json.loads(answer["body"])["outputs"]["logits"]
    assert len(logits) == 1 and len(logits[0]) > 1
