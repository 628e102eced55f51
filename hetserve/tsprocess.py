"""Start and stop a real TorchServe on 127.0.0.1 with the project's secure config (tests, benchmarks, tuner).

Each instance gets its own working directory (TorchServe writes key_file.json and logs there),
its own free ports and its own temp directory: TorchServe keeps its pid file in TMPDIR, and the
frontend puts the worker sockets (`.ts.sock.<initial_worker_port + n>`) and the unpacked models
in java.io.tmpdir, which `ts.model_server` sets from TEMP. Without both, two instances on one host
share sockets and unpacked weights.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hetserve.properties import merge_properties
from partitioner.defaults import CONFIG_PROPERTIES, default_file
from partitioner.defaults import LOG_CONFIG as _LOG_CONFIG_NAME

REPO = Path(__file__).resolve().parent.parent  # the clone, when run from one (tests scan it)
BASE_CONFIG = default_file(CONFIG_PROPERTIES)
LOG_CONFIG = default_file(_LOG_CONFIG_NAME)


BIND_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class TorchServe:
    workdir: Path
    ports: dict[str, int]
    process: subprocess.Popen
    keys: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                api: str = "inference", token: bool = True, timeout: float = 120.0) -> Response:
        headers = dict(headers or {})
        if token and api in self.keys:
            headers.setdefault("Authorization", f"Bearer {self.keys[api]}")
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[api], timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def predict(self, model: str, body: bytes, content_type: str = "application/json",
                headers: dict[str, str] | None = None, token: bool = True) -> Response:
        all_headers = {"Content-Type": content_type, **(headers or {})}
        return self.request("POST", f"/predictions/{model}", body, all_headers, token=token)

    def log_text(self) -> str:
        logs = self.workdir / "logs"
        return "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.log"))) if logs.exists() else ""

    def worker_pids(self) -> list[int]:
        """PIDs of the Python model workers (children of the Java frontend)."""
        import psutil

        try:
            parent = psutil.Process(self.process.pid)
        except psutil.NoSuchProcess:
            return []
        # With cpu_launcher_enable the worker's parent is torch.backends.xeon.run_cpu, whose own
        # command line also names model_service_worker.py: skip the launcher.
        return [
            p.pid for p in parent.children(recursive=True)
            if any("model_service_worker" in part for part in _cmdline(p))
            and not any("run_cpu" in part for part in _cmdline(p))
        ]

    def kill_worker(self, pid: object, sig: int = signal.SIGKILL) -> int:
        """Signal one model worker of this server, after checking that ``pid`` is one.

        TorchServe's management API reports pid -1 for a worker that is starting, and
        ``os.kill(-1, SIGKILL)`` signals every process the user can reach: a pid goes to
        ``os.kill`` only once it is > 1 and names a model worker this server started.
        """
        checked = checked_worker_pid(pid, self.worker_pids())
        os.kill(checked, sig)
        return checked

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


class NotAWorkerError(ValueError):
    """A pid that must not be signalled: not > 1, or not a model worker of this server."""


def checked_worker_pid(pid: object, workers: list[int]) -> int:
    """``pid`` as an int if it may be signalled as one of ``workers`` (the server's verified
    model-worker pids, see TorchServe.worker_pids); raises NotAWorkerError otherwise."""
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise NotAWorkerError(f"worker pid {pid!r} is not an integer")
    if pid <= 1:
        raise NotAWorkerError(f"refusing to signal pid {pid}: TorchServe reports -1 for a starting worker")
    if pid not in workers:
        raise NotAWorkerError(f"pid {pid} is not a model worker of this TorchServe (workers: {workers})")
    return pid


def _cmdline(proc) -> list[str]:
    try:
        return proc.cmdline()
    except Exception:  # noqa: BLE001 - a process that vanished has no command line
        return []


def write_config(workdir: Path, model_store: Path, ports: dict[str, int], overrides: dict[str, str],
                 base_config: Path = BASE_CONFIG) -> Path:
    replaced = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(model_store),
        **overrides,
    }
    path = workdir / "config.properties"
    path.write_text(merge_properties(base_config.read_text(), replaced))
    return path


def start_torchserve(workdir: Path, model_store: Path, models: dict[str, str],
                     overrides: dict[str, str] | None = None, timeout: float = 240.0,
                     env: dict[str, str] | None = None, base_config: Path = BASE_CONFIG,
                     log_config: Path = LOG_CONFIG) -> TorchServe:
    # TorchServe runs with cwd=workdir and rejects a relative TEMP: absolute paths throughout.
    workdir, model_store = Path(workdir).resolve(), Path(model_store).resolve()
    pinned = {**os.environ, **(env or {})}.get("HETSERVE_ARCHIVE_SHA256", "")
    if pinned.strip():  # checked before TorchServe imports the archives' entry handlers
        from hetserve.pinned_archives import verify_mar

        for mar in models.values():
            verify_mar(model_store / mar, pinned)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    # A port free_port() saw free can be taken before Java binds it (the kernel hands the same
    # range out as clients' source ports): a start that fails to bind retries on fresh ports.
    for attempt in range(1, BIND_ATTEMPTS + 1):
        try:
            return _start_once(workdir, model_store, models, overrides, timeout, env, base_config,
                               log_config)
        except RuntimeError as exc:
            if attempt == BIND_ATTEMPTS or "Address already in use" not in str(exc):
                raise
    raise AssertionError("unreachable")


def _start_once(workdir: Path, model_store: Path, models: dict[str, str],
                overrides: dict[str, str] | None, timeout: float, env: dict[str, str] | None,
                base_config: Path, log_config: Path) -> TorchServe:
    # TorchServe writes fresh keys at each start; a stale file would hand out dead tokens.
    (workdir / "key_file.json").unlink(missing_ok=True)
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
    overrides = {"initial_worker_port": str(free_port()), **(overrides or {})}
    config = write_config(workdir, model_store, ports, overrides, base_config)
    venv_bin = Path(sys.executable).parent
    # Without a venv (the GPU machine: packages unzipped onto PYTHONPATH) there is no console
    # script; the module is the same entry point.
    launcher = ([str(venv_bin / "torchserve")] if (venv_bin / "torchserve").exists()
                else [sys.executable, "-m", "ts.model_server"])
    cmd = [
        *launcher, "--start", "--foreground", "--ncs",
        "--model-store", str(model_store), "--ts-config", str(config), "--log-config", str(log_config),
        "--models", *[f"{name}={mar}" for name, mar in models.items()],
    ]
    process_env = {
        **os.environ,
        "TMPDIR": str(workdir / "tmp"),
        "TEMP": str(workdir / "tmp"),
        "LOG_LOCATION": str(workdir / "logs"),
        "METRICS_LOCATION": str(workdir / "logs"),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    log = open(workdir / "torchserve.out", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(cmd, cwd=workdir, env=process_env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    server = TorchServe(workdir, ports, process)
    try:
        _wait_ready(server, list(models), timeout)
    except BaseException:  # Ctrl-C too: never leave a TorchServe behind
        server.stop()
        raise
    return server


def _wait_ready(server: TorchServe, models: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    key_file = server.workdir / "key_file.json"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"TorchServe exited early:\n{(server.workdir / 'torchserve.out').read_text()[-3000:]}")
        if key_file.exists() and not server.keys:
            try:
                data = json.loads(key_file.read_text())
                server.keys = {"inference": data["inference"]["key"], "management": data["management"]["key"]}
            except (json.JSONDecodeError, KeyError):
                pass
        if server.keys:
            try:
                if all(_model_ready(server, m) for m in models):
                    return
            except OSError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"TorchServe not ready after {timeout:.0f} s:\n{server.log_text()[-5000:]}")


def _model_ready(server: TorchServe, model: str) -> bool:
    resp = server.request("GET", f"/models/{model}", api="management", timeout=5)
    if resp.status != 200:
        return False
    workers = resp.json()[0].get("workers", [])
    return bool(workers) and all(w.get("status") == "READY" for w in workers)
