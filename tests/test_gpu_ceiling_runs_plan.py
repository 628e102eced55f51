"""scripts/gpu_ceiling_runs.sh's plan, read through its dry run: the steps of each phase in order of
importance, and a step left out when the phase's budget cannot hold its estimate."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_ceiling_runs.sh"


def plan(tmp_path: Path, phase: str, **env: str) -> tuple[int, list[str]]:
    run = subprocess.run(["bash", str(SCRIPT), phase], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), **env})
    return run.returncode, [re.sub(r"^\[\d+ s\] ", "", line) for line in run.stdout.splitlines()]


def test_phase_one_runs_the_checks_first_and_the_bound_last(tmp_path):
    code, lines = plan(tmp_path, "1")
    assert code == 0
    steps = [line.split(": ", 1)[1].split()[1] for line in lines if line.startswith("run ")]
    assert steps == ["scripts/gpu_check.sh", "benchmarks/gpu_ceilings.py", "benchmarks/gpu_ceilings.py",
                     "benchmarks/gpu_serving.py", "benchmarks/gpu_serving.py", "benchmarks/timeline.py",
                     "benchmarks/timeline.py", "benchmarks/offload_bound.py"]
    text = "\n".join(lines)
    # The first sweep runs under the co-tenant, the second on the idle GPU, with their own state.
    co, idle = text.index("state-co"), text.index("state-idle")
    assert text.index("co-tenant on") < co < idle
    assert "--tag=-co0.5-r0.8" in text and "--tag=-idle-r0.8" in text
    assert lines[-1] == "phase 1 done"


def test_steps_the_budget_cannot_hold_are_skipped_not_cut_short(tmp_path):
    code, lines = plan(tmp_path, "1", BUDGET="50", MODEL="nfnet", RATIO="0.75")
    assert code == 0
    skipped = [line for line in lines if line.startswith("skip")]
    assert any("gpu_check.sh" in line for line in skipped)  # ~60 s > 50
    assert any("gpu_ceilings.py host" in line for line in skipped)  # ~90 s
    ran = [line for line in lines if line.startswith("run ")]
    assert any("gpu_ceilings.py device --device cuda --models nfnet --ratio 0.75" in line
               for line in ran)
    limits = [int(re.search(r"at most (\d+) s", line).group(1)) for line in ran]
    assert limits and all(limit <= 50 for limit in limits)  # never past what is left


def test_phase_two_compares_stock_ort_and_hetserve_through_torchserve(tmp_path):
    code, lines = plan(tmp_path, "2", WORKERS="8", GRAPH="1")
    assert code == 0
    text = "\n".join(lines)
    assert "gpu_ceilings.py frontend --device cuda --workers 1,8" in text
    assert "gpu_torchserve.py --models googlenet --rows s,a" in text
    assert '"cuda_graph": true' in text and "--from-work" in text


def test_an_unknown_phase_is_refused(tmp_path):
    code, _ = plan(tmp_path, "9")
    assert code == 2
