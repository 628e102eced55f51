"""The CPU executor: one core group, its ORT sessions pinned to the group's cores.

Its ORT intra-op threads are pinned to the group's cores (``session.intra_op_thread_affinities``)
and its own thread, which is ORT's calling thread and does a share of the work, pins itself to
the group's first core. ORT releases the GIL, so executors on different groups run truly in
parallel inside one TorchServe worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from handlers.executors.base import Executor, RunObserver, TransferObserver, host_feeds
from handlers.hardware.topology import CoreGroup, ort_affinity_string
from handlers.observability.tracing import COMPUTE, TRANSFER


def cpu_session_options(group: CoreGroup, spinning: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(group.cpus)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    affinities = ort_affinity_string(group)
    if affinities:
        options.add_session_config_entry("session.intra_op_thread_affinities", affinities)
    # Spinning threads burn cores the neighbouring group's executor needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class CpuExecutor(Executor):
    """Runs its stages on one core group."""

    device = "cpu"

    def __init__(
        self,
        group: CoreGroup,
        models: Mapping[str, Path],
        spinning: bool = False,
        observer: RunObserver | None = None,
        pin: bool = True,
        transfer_observer: TransferObserver | None = None,
    ) -> None:
        super().__init__(group.name, observer, transfer_observer)
        self.group = group
        self._models = dict(models)
        self._spinning = spinning
        self._pin = pin
        self._sessions: dict[str, Any] = {}
        self._output_names: dict[str, list[str]] = {}
        self._input_names: dict[str, list[str]] = {}

    def _on_thread_start(self) -> None:
        # Pin first, load second: the sessions' weights are then first touched from this core's
        # NUMA node.
        if self._pin:
            os.sched_setaffinity(0, {self.group.cpus[0]})

    def _load(self) -> list[str]:
        import onnxruntime as ort

        options = cpu_session_options(self.group, self._spinning)
        for stage, path in self._models.items():
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._sessions[stage] = session
            self._input_names[stage] = [i.name for i in session.get_inputs()]
            self._output_names[stage] = [o.name for o in session.get_outputs()]
        return list(self._sessions)

    def input_names(self, stage: str) -> list[str]:
        return self._input_names[stage]

    def _run(self, stage: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._sessions[stage]
        names = self._output_names[stage]
        inputs = {k: feeds[k] for k in self._input_names[stage]}
        started = time.perf_counter()
        host = host_feeds(inputs, self.transfer_observer)
        pulled = time.perf_counter()
        pulls = [v for v in inputs.values() if not isinstance(v, np.ndarray)]
        if pulls:  # a stage output left on a GPU was copied here: the cut tensor's transfer
            self.trace(self.name, TRANSFER, f"{pulls[0].device}->cpu", started, pulled,
                       sum(v.nbytes for v in pulls))
        values = session.run(names, host, self.run_options())
        self.trace(self.name, COMPUTE, stage, pulled, time.perf_counter())
        return dict(zip(names, values, strict=True))

    def _unload(self) -> None:
        self._sessions.clear()
