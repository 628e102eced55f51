"""Responses too large for TorchServe, and two TorchServes side by side (issue 17, items 6 and 9;
issue 22, item 5).

One archive (resnet18-tiny: 10 float32 logits, 40 bytes per sample raw), served with
TorchServe's max_response_size lowered to 1 KiB and the archive's limits.max_response_bytes left
unset: the worker reads TorchServe's limit from the frontend's config file and follows it (one
knob). Before issue 17, any answer over it was "500 Worker died." and a restart; before issue 22,
the handler kept its own 16 MiB and the worker died the same way.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from handlers.artifact.manifest import TensorSpec
from handlers.errors import MESSAGE_CHARS
from handlers.frontend_limits import (
    FRONTEND_DEFAULT_MAX_RESPONSE_SIZE,
    FrontendLimit,
    frontend_config_file,
    max_response_size,
    parse_properties,
    read_frontend_max_response_size,
)
from handlers.protocol.response_size import (
    ResponseLimit,
    archive_warnings,
    min_response_bytes,
    too_large_message,
)
from hetserve.tsprocess import start_torchserve

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("soak", soak)
_spec.loader.exec_module(soak)

LIMIT = 1024
INPUT = "image"  # resnet18-tiny's input name (the zoo's)
SERVING = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 50, "responseTimeout": 60}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_variant) -> Path:
    store = tmp_path_factory.mktemp("limits-store")
    tiny_variant(store, "small", {**SERVING, "hetserve": {"ratio": 0.5, "state_dir": str(store / "state")}})
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    ts = start_torchserve(tmp_path_factory.mktemp("ts-a"), store, {"small": "small.mar"},
                          overrides={"max_response_size": str(LIMIT)})
    yield ts
    ts.stop()


def _raw(n: int, seed: int = 0) -> tuple[bytes, str, dict]:
    x = np.random.default_rng(seed).standard_normal((n, *soak.SAMPLE)).astype(np.float32)
    return x.tobytes(), "application/octet-stream", {"X-Tensor-Shape": ",".join(map(str, x.shape))}


def _json(n: int, seed: int = 0) -> tuple[bytes, str, dict]:
    x = np.random.default_rng(seed).standard_normal((n, *soak.SAMPLE)).astype(np.float32)
    return json.dumps(x.tolist()).encode(), "application/json", {}


def _v2(n: int, seed: int, binary: bool = False) -> tuple[bytes, str, dict]:
    x = np.random.default_rng(seed).standard_normal((n, *soak.SAMPLE)).astype(np.float32)
    document = {"inputs": [{"name": INPUT, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if binary:
        document["parameters"] = {"binary_data_output": True}
    return json.dumps(document).encode(), "application/json", {}


def test_a_response_over_the_limit_is_a_413_its_neighbours_run_and_the_worker_lives(server):
    pid = soak.model_worker_pid(server, "small")
    jobs = [("big-raw", _raw(64, 1)), ("small-raw", _raw(1, 2)), ("big-json", _json(8, 3)),
            ("small-json", _json(1, 4)), ("small-raw-2", _raw(4, 5)), ("big-v2", _v2(8, 6)),
            ("big-v2-binary", _v2(8, 7, binary=True))]
    results: dict[str, object] = {}

    def send(name, job):
        resp = server.predict("small", *job)
        results[name] = (resp.status, resp.body)

    for _ in range(3):  # concurrent, so they share TorchServe batches
        threads = [threading.Thread(target=send, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = {k: v[0] for k, v in results.items()}
        assert statuses == {"big-raw": 413, "small-raw": 200, "big-json": 413, "small-json": 200,
                            "small-raw-2": 200, "big-v2": 413, "big-v2-binary": 200}, results
    assert np.frombuffer(results["small-raw-2"][1], np.float32).shape == (40,)
    assert soak.model_worker_pid(server, "small") == pid, "no worker restart"
    # Every 413 names both limits and how to raise the one that binds (not "the server's limit").
    limits = (f"TorchServe's max_response_size={LIMIT}, which hetserve follows "
              "(hetserve.limits.max_response_bytes is not set)")
    raise_it = "Raise it: max_response_size=1048576 in config.properties"
    messages = {name: json.loads(results[name][1]) for name in ("big-raw", "big-json", "big-v2")}
    messages = {name: m.get("message") or m["error"] for name, m in messages.items()}
    for message in messages.values():
        assert limits in message and raise_it in message and "server's limit" not in message, message
    assert "would be at least 2560 bytes" in messages["big-raw"], messages["big-raw"]
    assert "fewer samples" in messages["big-raw"], messages["big-raw"]
    # ...and the smaller encoding that fits: 8 x 10 float32 logits are 320 bytes (big-v2-binary
    # above is that same answer, served).
    assert "Fits: .npy (Accept: application/x-npy" in messages["big-json"], messages["big-json"]
    assert "~448 bytes" in messages["big-json"], messages["big-json"]
    assert "binary v2 (parameters.binary_data_output: true), ~520 bytes" in messages["big-v2"], messages["big-v2"]
    # Where the worker read TorchServe's limit is in its log, not in answers to clients.
    assert f"read from {server.workdir / 'config.properties'}" in server.log_text()
    assert str(server.workdir) not in "".join(messages.values())


def test_two_instances_keep_sockets_and_unpacked_models_to_themselves(server, store, tmp_path_factory):
    other = start_torchserve(tmp_path_factory.mktemp("ts-b"), store, {"small": "small.mar"})
    try:
        seen = []
        for ts in (server, other):
            (pid,) = ts.worker_pids()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            sock = cmd[cmd.index(b"--sock-name") + 1].decode()
            cwd = Path(f"/proc/{pid}/cwd").resolve()
            own = (ts.workdir / "tmp").resolve()
            assert Path(sock).parent == own, (sock, own)
            assert own in cwd.parents, (cwd, own)  # the unpacked model
            seen.append((sock, cwd))
        assert seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]
        body = _raw(1, 9)
        assert other.predict("small", *body).body == server.predict("small", *body).body
    finally:
        other.stop()


def test_response_lower_bounds_and_archive_warning():
    logits = (TensorSpec("logits", "float32", (None, 50257)),)
    assert min_response_bytes(logits, "raw", 2) == 2 * 50257 * 4
    assert min_response_bytes(logits, "json", 1) == 50257 * 4
    two = (TensorSpec("a", "float32", (None, 10)), TensorSpec("b", "int64", (None, 2, None)))
    assert min_response_bytes(two, "npy", 1) == 16  # the smallest one tensor
    assert min_response_bytes(two, "kservev2", 1, ["a", "b"]) == 10 * 4 + 2 * 2
    gpt2 = (TensorSpec("logits", "float32", (None, 64, 50257)),)  # 12.9 MB per sample
    assert archive_warnings(gpt2, None) == []
    assert "413" in archive_warnings(gpt2, {"max_response_bytes": 8 * 2**20})[0]


def test_shipped_configs_make_the_handlers_limits_reachable():
    from handlers.protocol.validation import RequestLimits

    for path in (REPO / "config/config.properties", REPO / "deploy/kserve/config/config.properties"):
        props = dict(line.split("=", 1) for line in path.read_text().splitlines()
                     if "=" in line and not line.startswith("#"))
        assert int(props["max_request_size"]) > RequestLimits().max_body_bytes, path
        assert int(props["max_response_size"]) == RequestLimits().max_response_bytes, path


# ---- issue 22, item 5: one knob, and a 413 that says how to raise it ---------------------------

GPT2_V2_JSON = 65 * 10**6  # GPT-2's logits for one 64-token request as a v2 JSON answer (about)
GPT2_RAW = 64 * 50257 * 4


def test_hetserve_follows_torchserve_unless_the_archive_sets_its_own():
    raised = FrontendLimit(256 * 2**20, "/srv/ts/config.properties")
    assert ResponseLimit(torchserve=raised).bytes == 256 * 2**20  # the GPT-2 case: fits
    assert ResponseLimit(16 * 2**20, True, raised).bytes == 16 * 2**20  # the archive's, smaller
    assert ResponseLimit(512 * 2**20, True, raised).bytes == 256 * 2**20  # never past TorchServe's
    assert ResponseLimit().bytes == 16 * 2**20  # TorchServe's unreadable: hetserve's default


@pytest.mark.parametrize("limit, raise_it", [
    (ResponseLimit(), "Raise both to 65011712: max_response_size (config.properties); "
                      "hetserve archive --set hetserve.limits.max_response_bytes=65011712"),
    (ResponseLimit(16 * 2**20, True, FrontendLimit(256 * 2**20, "x")),
     "Raise it: hetserve archive --set hetserve.limits.max_response_bytes=65011712"),
    (ResponseLimit(torchserve=FrontendLimit(16 * 2**20, "x")),
     "Raise it: max_response_size=65011712 in config.properties"),
])
def test_the_413_names_both_limits_the_knob_that_binds_and_the_binary_answer(limit, raise_it):
    message = too_large_message(GPT2_V2_JSON, limit, False, "kservev2", GPT2_RAW, 1)
    assert raise_it in message, message
    assert "hetserve.limits.max_response_bytes" in message and "max_response_size" in message
    if limit.torchserve is None:
        assert "=16777216 (default); TorchServe's max_response_size unknown (default 6553500)" in message
    assert f"Fits: binary v2 (parameters.binary_data_output: true), ~{GPT2_RAW + 200} bytes" in message
    assert "server's limit" not in message


def test_no_smaller_encoding_is_named_when_none_fits_or_the_answer_is_binary_already():
    limit = ResponseLimit(torchserve=FrontendLimit(1024, "x"))
    assert "Fits" not in too_large_message(5000, limit, False, "kservev2", 4000, 1)
    assert "Fits" not in too_large_message(5000, limit, True, "raw", 600, 1)
    assert "fewer samples" in too_large_message(5000, limit, False, "kservev2", None, 1)
    assert ".npy per output (Accept: application/x-npy, X-Output-Name), >=800" in too_large_message(
        5000, limit, True, "json", 544, 2)


def test_the_longest_413_fits_whole_in_a_message():
    big = 2**31 - 1
    longest = max(
        (too_large_message(big, ResponseLimit(big - 1, True, ts), before, fmt, 2**30, outputs)
         for ts in (None, FrontendLimit(big - 1, "x")) for before in (True, False)
         for fmt in ("json", "kservev2", "raw") for outputs in (1, 12)), key=len)
    assert len(longest) <= MESSAGE_CHARS and not longest.endswith("..."), longest


def test_torchserve_s_limit_is_read_the_way_the_frontend_reads_it():
    props = parse_properties("# c\n ! c\nmax_response_size = 1024\nother: a b\nlong=1\\\n  2\n")
    assert props == {"max_response_size": "1024", "other": "a b", "long": "12"}
    assert max_response_size(props, {}, "f") == FrontendLimit(1024, "f")
    assert max_response_size({}, {}, "f").bytes == FRONTEND_DEFAULT_MAX_RESPONSE_SIZE == 6553500
    env = {"TS_MAX_RESPONSE_SIZE": "4096", "LIMIT": "2048"}
    assert max_response_size(props, env, "f").bytes == 1024  # env only with enable_envvars_config
    assert max_response_size({**props, "enable_envvars_config": "true"}, env, "f") == FrontendLimit(
        4096, "TS_MAX_RESPONSE_SIZE")
    assert max_response_size({"max_response_size": "$$LIMIT$$"}, env, "f").bytes == 2048
    assert max_response_size({"max_response_size": "16MB"}, env, "f") is None  # the frontend fails


def test_the_config_file_is_found_on_the_frontend_s_command_line(tmp_path):
    """A /proc-shaped tree: worker 30 <- launcher 20 <- java frontend 10 (cpu_launcher_enable)."""
    def process(pid, ppid, argv):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (py th) S {ppid} 1 1\n")
        (tmp_path / str(pid) / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")

    process(10, 1, ["java", "-cp", "x", "org.pytorch.serve.ModelServer", "--python", "py", "-f", "/etc/ts.properties"])
    process(20, 10, ["python", "-m", "torch.backends.xeon.run_cpu", "model_service_worker.py"])
    process(30, 20, ["python", "model_service_worker.py"])
    assert frontend_config_file({}, 30, tmp_path) == Path("/etc/ts.properties")
    assert frontend_config_file({"TS_CONFIG_FILE": "/other"}, 30, tmp_path) == Path("/other")
    assert frontend_config_file({}, 10, tmp_path) is None  # no frontend above it
    config = tmp_path / "config.properties"
    config.write_text("max_response_size=4096\n")
    (tmp_path / "10" / "cmdline").write_bytes(f"java\0org.pytorch.serve.ModelServer\0--ts-config-file={config}\0".encode())
    assert read_frontend_max_response_size({}, 30, tmp_path) == FrontendLimit(4096, str(config))
