"""Archives that must not load: corrupt, tampered, incomplete, from the future, or malicious.

In process, every case is refused by ``load_verified_manifest`` with a message naming the file
and the reason, before any ONNX Runtime session exists. Live, a real TorchServe serves a good
model next to the bad ones: the bad ones never become READY, their predictions get a prompt 5xx,
the model log carries one hetserve line per attempt naming file and reason, TorchServe's own
extraction writes nothing outside its model directory, and the good model keeps answering.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from handlers.artifact.archive_safety import external_refs
from handlers.artifact.manifest import MANIFEST_NAME, ManifestError, load_verified_manifest
from handlers.service import InferenceService
from hetserve.tsprocess import LOG_CONFIG, TorchServe, _wait_ready, free_port, write_config

SAMPLE = (3, 64, 64)  # resnet18-tiny
Edit = Callable[[dict[str, bytes]], None]  # mutates {archive name: bytes} in place


# -- building bad archives ----------------------------------------------------------------------


def read_mar(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist() if not info.is_dir()}


def write_mar(path: Path, files: dict[str, bytes], extra: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        for info, data in extra:
            z.writestr(info, data)
    return path


def manifest_of(files: dict[str, bytes]) -> dict:
    return json.loads(files[MANIFEST_NAME])


def set_manifest(files: dict[str, bytes], manifest: dict) -> None:
    files[MANIFEST_NAME] = json.dumps(manifest).encode()


def rehash(files: dict[str, bytes], name: str) -> None:
    """Make the manifest agree with ``files[name]`` so only the later checks can catch it."""

    manifest = manifest_of(files)
    manifest["files"][name] = {"sha256": hashlib.sha256(files[name]).hexdigest(), "size": len(files[name])}
    set_manifest(files, manifest)


def stage_names(files: dict[str, bytes]) -> tuple[str, str]:
    part = manifest_of(files)["partitions"][0]
    return part["head"], part["tail"]


def with_location(files: dict[str, bytes], name: str, location: str, offset: str | None = None) -> None:
    """Point the first external initializer of ONNX file ``name`` at ``location``, re-hashed."""
    model = onnx.load_from_string(files[name])
    tensor = next(t for t in model.graph.initializer if t.external_data)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
        if entry.key == "offset" and offset is not None:
            entry.value = offset
    files[name] = model.SerializeToString()
    rehash(files, name)


def corrupt_stage(files):
    head, _ = stage_names(files)
    files[head] = files[head][: len(files[head]) // 2]  # cuts a length-delimited field short
    rehash(files, head)


def tampered_weights(files):
    data = bytearray(files["weights.bin"])
    data[len(data) // 2] ^= 0xFF
    files["weights.bin"] = bytes(data)


def missing_stage(files):
    del files[stage_names(files)[1]]


def future_manifest(files):
    manifest = manifest_of(files)
    manifest["version"] = 99
    set_manifest(files, manifest)


def unsafe_manifest_path(files):
    manifest = manifest_of(files)
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    set_manifest(files, manifest)


def location_escape(files):
    with_location(files, stage_names(files)[0], "../../etc/passwd")


def location_absolute(files):
    with_location(files, stage_names(files)[1], "/etc/passwd")


def location_unlisted(files):
    # A plain name inside the model dir that the manifest does not vouch for: ORT would read it.
    # (model-config.yaml is listed since issue 17: the manifest itself is the one file left.)
    with_location(files, "model.onnx", MANIFEST_NAME)


def location_past_end(files):
    with_location(files, stage_names(files)[0], "weights.bin", offset=str(10**12))


# (case, edit, fragments the one-line reason must contain)
CASES: list[tuple[str, Edit, tuple[str, ...]]] = [
    ("corrupt", corrupt_stage, ("head.onnx", "not a valid ONNX protobuf")),
    ("tampered", tampered_weights, ("weights.bin", "SHA-256")),
    ("missing", missing_stage, ("tail.onnx", "missing from the archive")),
    ("future", future_manifest, (MANIFEST_NAME, "version 99 is not supported")),
    ("unsafepath", unsafe_manifest_path, (MANIFEST_NAME, "unsafe path")),
    ("escape", location_escape, ("head.onnx", "'../../etc/passwd' is not a plain file name")),
    ("absolute", location_absolute, ("tail.onnx", "'/etc/passwd' is not a plain file name")),
    ("unlisted", location_unlisted, ("model.onnx", f"'{MANIFEST_NAME}' is not listed")),
    ("pastend", location_past_end, ("head.onnx", "past the end of 'weights.bin'")),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_variant) -> Path:
    store = tmp_path_factory.mktemp("store")
    tiny_variant(store, "good", {"hetserve": {"calibration_runs": 1}})
    return store


@pytest.fixture(scope="module")
def good_files(store) -> dict[str, bytes]:
    return read_mar(store / "good.mar")


def extract(files: dict[str, bytes], dest: Path) -> Path:
    for name, data in files.items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return dest


# -- in process -----------------------------------------------------------------------------


def test_the_good_archive_loads_and_its_refs_match_onnx(good_files, tmp_path):
    model_dir = extract(good_files, tmp_path)
    manifest = load_verified_manifest(model_dir)
    for name in manifest.referenced_files():
        ours = {(r.tensor, r.entries) for r in external_refs(model_dir / name)}
        model = onnx.load(str(model_dir / name), load_external_data=False)
        theirs = {
            (t.name, tuple((e.key, e.value) for e in t.external_data))
            for t in model.graph.initializer if t.external_data
        }
        assert ours == theirs and ours, name


@pytest.mark.parametrize(("case", "edit", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_archives_are_refused_before_any_session(good_files, tmp_path, case, edit, fragments):
    files = dict(good_files)
    edit(files)
    model_dir = extract(files, tmp_path)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ManifestError) as info:
        InferenceService.load(model_dir, {"hetserve": {"calibration_runs": 0}})
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message and str(tmp_path) not in message
    started = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith("hetserve-") for name in started), "no executor may start"


def test_symlinked_files_are_refused(good_files, tmp_path):
    model_dir = extract(good_files, tmp_path / "model")
    outside = tmp_path / "outside.bin"
    shutil.move(model_dir / "weights.bin", outside)
    (model_dir / "weights.bin").symlink_to(outside)  # same bytes: only the link itself is wrong
    with pytest.raises(ManifestError, match="'weights.bin' is a symbolic link"):
        load_verified_manifest(model_dir)


def test_files_the_manifest_does_not_vouch_for_are_refused(good_files, tmp_path):
    model_dir = extract(good_files, tmp_path)
    (model_dir / "handlers" / "__pycache__").mkdir()
    (model_dir / "handlers" / "__pycache__" / "service.cpython-311.pyc").write_bytes(b"cache")
    load_verified_manifest(model_dir)  # TorchServe's files and Python's caches are expected
    (model_dir / "etc").mkdir()
    (model_dir / "etc" / "cron.d").write_bytes(b"* * * * * root sh")  # an absolute entry, extracted
    with pytest.raises(ManifestError, match="unexpected file 'etc/cron.d'"):
        load_verified_manifest(model_dir)
    (model_dir / "etc" / "cron.d").unlink()
    (model_dir / "etc" / "link").symlink_to("/etc")
    with pytest.raises(ManifestError, match="'etc/link' is a symbolic link"):
        load_verified_manifest(model_dir)


def test_external_data_in_constant_attributes_and_subgraphs_is_checked(good_files, tmp_path):
    """Initializers are not the only tensors ORT may load from a file."""
    files = dict(good_files)
    model = onnx.load_from_string(files["model.onnx"])
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["k"], value=onnx.helper.make_tensor("k", onnx.TensorProto.FLOAT, [1], [0.0]))],
        "branch", [], [onnx.helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [1])],
    )
    inner = branch.node[0].attribute[0].t
    inner.data_location = onnx.TensorProto.EXTERNAL
    inner.ClearField("float_data")
    for key, value in (("location", "/proc/self/environ"), ("offset", "0"), ("length", "4")):
        inner.external_data.add(key=key, value=value)
    model.graph.node.append(onnx.helper.make_node("If", ["cond"], ["unused"], then_branch=branch, else_branch=branch))
    files["model.onnx"] = model.SerializeToString()
    rehash(files, "model.onnx")
    refs = external_refs(extract(files, tmp_path) / "model.onnx")
    assert ("location", "/proc/self/environ") in {e for r in refs for e in r.entries}
    with pytest.raises(ManifestError, match="'/proc/self/environ' is not a plain file name"):
        load_verified_manifest(tmp_path)


@pytest.mark.parametrize("garbage", [b"\x00", b"\x0a\xff\xff\xff\xff\x0f", b"\x0b\x00", b"\x08" + b"\xff" * 11])
def test_malformed_protobuf_is_a_clear_error(tmp_path, garbage):
    path = tmp_path / "m.onnx"
    path.write_bytes(garbage)
    with pytest.raises(ValueError, match="not a valid ONNX protobuf"):
        external_refs(path)


# -- live TorchServe ----------------------------------------------------------------------------

LIVE = ["corrupt", "tampered", "missing", "future", "escape", "unlisted"]
MARKER = f"hetserve-zipslip-{uuid.uuid4().hex[:12]}"
ABSOLUTE = Path("/tmp") / f"{MARKER}-absolute.txt"
# What the handler says about the archives TorchServe extracts without complaint.
ZIP_CASES = {
    "absentry": ("unexpected file", f"{MARKER}-absolute.txt"),  # Java puts /tmp/x at <dir>/tmp/x
    "symlink": ("'weights.bin' has 11 bytes",),  # Java writes the link as a file of its target
}


def malicious_zip_entries() -> dict[str, list[tuple[zipfile.ZipInfo, bytes]]]:
    link = zipfile.ZipInfo("weights.bin")
    link.create_system = 3  # unix: the high half of external_attr is st_mode
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return {
        "zipslip": [(zipfile.ZipInfo(f"../../{MARKER}.txt"), b"escaped")],
        "absentry": [(zipfile.ZipInfo(str(ABSOLUTE)), b"escaped")],
        "symlink": [(link, b"/etc/passwd")],
    }


def start_with_bad_models(workdir: Path, store: Path, good: str, bad: list[str]) -> TorchServe:
    """tsprocess.start_torchserve waits for every model to be READY: start TorchServe the same
    way but wait for the good model only."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
    # Every retry of a bad worker would re-import torch in the CPU launcher: not the subject here.
    config = write_config(workdir, store, ports, {"cpu_launcher_enable": "false"})
    venv_bin = Path(sys.executable).parent
    cmd = [str(venv_bin / "torchserve"), "--start", "--foreground", "--ncs", "--model-store", str(store),
           "--ts-config", str(config), "--log-config", str(LOG_CONFIG),
           "--models", *[f"{name}={name}.mar" for name in [good, *bad]]]
    env = {**os.environ, "TMPDIR": str(workdir / "tmp"), "LOG_LOCATION": str(workdir / "logs"),
           "METRICS_LOCATION": str(workdir / "logs"), "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    with open(workdir / "torchserve.out", "wb") as out:
        process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = TorchServe(workdir, ports, process)
    try:
        _wait_ready(server, [good], 240)
    except Exception:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def live(store, good_files, tmp_path_factory):
    edits = {case: edit for case, edit, _ in CASES}
    for case in LIVE:
        files = dict(good_files)
        edits[case](files)
        write_mar(store / f"{case}.mar", files)
    for case, extra in malicious_zip_entries().items():
        files = {k: v for k, v in good_files.items() if not (case == "symlink" and k == "weights.bin")}
        write_mar(store / f"{case}.mar", files, extra)
    started = time.time() - 1
    server = start_with_bad_models(tmp_path_factory.mktemp("ts-bad"), store, "good", [*LIVE, *malicious_zip_entries()])
    server.started = started
    try:
        wait_for_load_failures(server, [*LIVE, *ZIP_CASES])
        yield server
    finally:
        server.stop()
        ABSOLUTE.unlink(missing_ok=True)


def failure_lines(server: TorchServe, model: str) -> list[str]:
    tag = f"hetserve: model {model} failed to load: "
    return [line.split(tag, 1)[1] for line in server.log_text().splitlines() if tag in line]


def wait_for_load_failures(server: TorchServe, models: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(failure_lines(server, m) for m in models):
            return
        time.sleep(1)
    missing = [m for m in models if not failure_lines(server, m)]
    raise AssertionError(f"no load-failure line for {missing}:\n{server.log_text()[-4000:]}")


def assert_clean_error(server: TorchServe, body: bytes) -> None:
    text = body.decode(errors="replace")
    assert "Traceback" not in text
    assert str(server.workdir) not in text and "/tmp/" not in text and "site-packages" not in text
    assert all(key not in text for key in server.keys.values())


@pytest.mark.server
@pytest.mark.parametrize("case", [*LIVE, *ZIP_CASES])
def test_a_bad_archive_never_serves_and_says_why_in_one_line(live, case):
    fragments = {c: f for c, _, f in CASES}.get(case) or ZIP_CASES[case]
    reasons = failure_lines(live, case)
    for fragment in fragments:
        assert fragment in reasons[0], reasons[0]
    assert set(reasons) == {reasons[0]}, "every retry fails the same way"
    described = live.request("GET", f"/models/{case}", api="management")
    assert described.status == 200, described.body
    assert all(w["status"] != "READY" for w in described.json()[0]["workers"])
    # Nothing half-loads: the runtime's plan ("head on ...") is never logged for this model.
    plan = re.compile(rf"W-\d+-{case}_1\.0-stdout MODEL_LOG - .*head on")
    assert not any(plan.search(line) for line in live.log_text().splitlines())


@pytest.mark.server
def test_predictions_for_a_model_that_never_loaded_never_succeed(live):
    """TorchServe 0.12 queues a request for a model whose worker is retrying its load (it only
    answers 503 when a model has no worker at all), so the client's timeout ends the wait;
    an archive TorchServe refused to register is a prompt 404."""
    outcomes: dict[str, object] = {}

    def ask(case: str) -> None:
        try:
            outcomes[case] = live.request("POST", f"/predictions/{case}", b"[1]",
                                          {"Content-Type": "application/json"}, timeout=3)
        except TimeoutError as exc:
            outcomes[case] = exc

    threads = [threading.Thread(target=ask, args=(case,)) for case in [*LIVE, *ZIP_CASES]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == sorted([*LIVE, *ZIP_CASES])
    for case, outcome in outcomes.items():
        if not isinstance(outcome, TimeoutError):
            assert outcome.status >= 500, (case, outcome.status, outcome.body)
            assert_clean_error(live, outcome.body)
    refused = live.predict("zipslip", b"[1]")
    assert refused.status == 404, refused.body
    assert_clean_error(live, refused.body)


@pytest.mark.server
def test_the_good_model_keeps_serving_next_to_bad_ones(live):
    x = np.random.default_rng(0).standard_normal((1, *SAMPLE)).astype(np.float32)
    resp = live.predict("good", x.tobytes(), "application/octet-stream", {"X-Tensor-Shape": "1,3,64,64"})
    assert resp.status == 200, resp.body
    assert np.frombuffer(resp.body, np.float32).shape == (10,)
    assert live.process.poll() is None


def extracted_dirs(since: float) -> list[Path]:
    """Archives TorchServe unpacked after ``since``: under the JVM's temp dir, /tmp (TMPDIR
    does not move it), shared with any other TorchServe on the machine."""
    return [p for p in Path("/tmp/models").glob("*") if p.is_dir() and p.stat().st_mtime >= since]


@pytest.mark.server
def test_zip_entries_cannot_escape_torchserves_model_directory(live):
    assert "Detected Zip Slip vulnerability" in live.log_text(), "the ../ entry was refused"
    assert live.request("GET", "/models/zipslip", api="management").status == 404
    assert not list(Path("/tmp").glob(f"{MARKER}*")) and not ABSOLUTE.exists()
    assert not list(live.workdir.parent.rglob(f"{MARKER}*"))
    # The absolute entry landed inside its own model directory, where the handler found it.
    ours = extracted_dirs(live.started)
    landed = [d for d in ours if (d / ABSOLUTE.relative_to("/")).is_file()]
    assert len(landed) == 1
    # Java's unzip writes a link entry as a plain file holding the link's target; never a link.
    links = [d / "weights.bin" for d in ours if (d / "weights.bin").is_symlink()]
    written = [d for d in ours
               if (d / "weights.bin").is_file() and (d / "weights.bin").read_bytes() == b"/etc/passwd"]
    assert not links and written
