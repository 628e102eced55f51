"""``hetserve archive`` refuses user mistakes before it exports anything: one line, exit 2.

Each bad-input case also names a model that does not exist (``zoo:no-such-model``): the command
loads the model before exporting it, so an error about the input (not the model) proves the check
ran first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hetserve import archive_checks as checks
from hetserve.cli import main

REPO = Path(__file__).resolve().parent.parent
MISSING_MODEL = "zoo:no-such-model"


def archive(tmp_path: Path, *extra: str, model: str = MISSING_MODEL, name: str = "m") -> list[str]:
    return ["archive", "--model", model, "--model-name", name, "--export-path", str(tmp_path / "store"),
            "--cost", "flops", "--quiet", *extra]


@pytest.mark.parametrize(("extra", "name", "expected"), [
    ((), "bad name", "is not a TorchServe model name"),
    ((), "_lead", "is not a TorchServe model name"),
    (("--set", "batchsize=8"), "m", "unknown model-config key 'batchsize' (did you mean 'batchSize'?)"),
    (("--set", "maxBatchDelay=fast"), "m", "maxBatchDelay must be a number of milliseconds >= 0, got 'fast'"),
    (("--set", "minWorkers=-1"), "m", "'minWorkers' must be an integer >= 0 or 'auto', got -1"),
    (("--set", "maxWorkers=atuo"), "m", "'maxWorkers' must be an integer >= 0 or 'auto', got 'atuo' (did you mean 'auto'?)"),
    (("--set", "minWorkers=AUTO"), "m", "got 'AUTO' (did you mean 'auto'?)"),
    (("--set", "minWorkers=2.5"), "m", "'minWorkers' must be an integer >= 0 or 'auto', got 2.5"),
    (("--set", "useJobTicket=3"), "m", "'useJobTicket' must be true or false"),
    (("--set", "hetserve.typo=1"), "m", "unknown option 'hetserve.typo'"),
    (("--set", "hetserve.micro_bach=2"), "m", "unknown option 'hetserve.micro_bach' (did you mean 'micro_batch'?)"),
    (("--set", "hetserve.core_groups=bogus"), "m", "hetserve.core_groups must be numa, socket or size:K"),
    (("--set", "hetserve.ratio=0.7", "--ratios", "0.8"), "m", "hetserve.ratio 0.7 is not among the archived ratios (0.8)"),
    (("--set", "hetserve=3"), "m", "'hetserve' must be a mapping"),
    (("--set", "batchSize=[1"), "m", "is not a YAML value"),
    (("--set", "=3"), "m", "--set expects KEY=VALUE"),
    (("--ratios", "0.8,1.5"), "m", "1.5 is not strictly between 0 and 1"),
    (("--ratios", "0.8,0.8"), "m", "lists a ratio twice"),
    (("--ratios", "0.8", "--default-ratio", "0.75"), "m", "--default-ratio 0.75 is not among the archived ratios"),
    (("--extra-files", "/no/such/file.txt"), "m", "--extra-files: /no/such/file.txt does not exist"),
    (("--requirements-file", "/no/such/req.txt"), "m", "--requirements-file: /no/such/req.txt is not a file"),
    (("--config-file", "/no/such/model-config.yaml"), "m", "does not exist"),
])
def test_user_mistakes_fail_before_export_with_one_line(tmp_path, capsys, extra, name, expected):
    code = main(archive(tmp_path, *extra, name=name))
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err
    assert "no-such-model" not in err, "the model was loaded before the inputs were checked"
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "store" / f"{name}.mar").exists()


def test_existing_archive_without_force_is_refused_before_export(tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    (store / "m.mar").write_bytes(b"old")
    assert main(archive(tmp_path)) == 2
    assert "pass -f/--force" in capsys.readouterr().err
    assert (store / "m.mar").read_bytes() == b"old"
    # With -f the same command gets past the checks and fails only at the (missing) model.
    assert main(archive(tmp_path, "-f")) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_a_user_mistake_prints_no_traceback_from_the_real_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hetserve", *archive(tmp_path, "--set", "hetserve.typo=1", name="a/b")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "hetserve archive: error: --model-name 'a/b' is not a TorchServe model name: start with a "
        "letter or digit, then letters, digits, '_', '-' or '.'"]


def test_the_shipped_model_config_passes_the_checks():
    checks.check_model_config(yaml.safe_load((REPO / "config" / "model-config.yaml").read_text()))


def test_every_torchserve_key_and_every_runtime_knob_is_accepted():
    from dataclasses import fields

    from handlers.runtime.config import RuntimeConfig

    samples = {"an integer >= 0": 1, "an integer >= 0 or 'auto'": "auto", "true or false": True, "a list of integers": [0],
               "a mapping": {}, "one of cpu, gpu, neuron": "cpu", "one of pp, tp, pptp, custom": "pp"}
    checks.check_model_config({key: samples[kind] for key, kind in checks.TORCHSERVE_KEYS.items()})
    defaults = RuntimeConfig()
    section = {f.name: getattr(defaults, f.name) for f in fields(RuntimeConfig) if f.name not in ("limits", "faults", "processors")}
    checks.check_model_config({"hetserve": section})


def test_did_you_mean_ignores_case_and_stays_quiet_for_nothing_close():
    assert checks.did_you_mean("BATCHSIZE", ["batchSize", "minWorkers"]) == " (did you mean 'batchSize'?)"
    assert checks.did_you_mean("zzz", ["batchSize"]) == ""
