"""``hetserve bench`` end to end against a local HTTP server with one service slot (no mocks)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hetserve.cli import main

SERVICE_S = 0.02  # one slot: the server holds at most 50 requests/s


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        srv: _Server = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv.seen.append((dict(self.headers), len(body)))
        with srv.slot:
            time.sleep(SERVICE_S)
        status = int(body) if len(body) == 3 and body.isdigit() else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.slot = threading.Lock()
        self.seen: list[tuple[dict, int]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/predictions/m"


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def bench(*args: str) -> int:
    return main(["bench", "--duration", "1", "--warmup", "0.3", "--arrival", "constant", *args])


def test_sweep_finds_the_knee_below_capacity_and_merges_labels(server, tmp_path):
    body = tmp_path / "x.bin"
    body.write_bytes(b"\0" * 64)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = bench("--url", server.url, "--body-file", str(body), "--sweep", "--start-rate", "10", "--factor", "2",
                 "--max-rate", "160", "--refine", "0", "--p99-ms", "300", "--label", "one",
                 "--out", str(out), "--png", str(png))
    assert code == 0
    data = json.loads(out.read_text())
    curve = data["curves"]["one"]
    assert 10 <= curve["knee_rate"] < 1 / SERVICE_S
    rates = [p["target_rate"] for p in curve["points"]]
    assert rates[:2] == [10, 20] and max(rates) >= 80  # climbed past capacity, then stopped
    assert data["criteria"]["p99_ms"] == 300 and data["machine"]["logical_cpus"] >= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert bench("--url", server.url, "--body-file", str(body), "--rate", "10", "--rate", "20",
                 "--label", "two", "--out", str(out), "--png", str(png)) == 0
    data = json.loads(out.read_text())
    assert set(data["curves"]) == {"one", "two"}
    assert [p["target_rate"] for p in data["curves"]["two"]["points"]] == [10, 20]
    assert data["curves"]["one"]["knee_rate"] == curve["knee_rate"]


def test_errors_are_counted_by_http_code_and_block_the_knee(server, tmp_path, capsys):
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    good.write_bytes(b"{}")
    bad.write_bytes(b"503")
    out = tmp_path / "r.json"
    # No rate met the criteria: a failed run, like k6's thresholds.
    assert bench("--url", server.url, "--body-file", str(good), "--body-file", str(bad), "--rate", "10",
                 "--out", str(out)) == 1
    point = json.loads(out.read_text())["curves"]["default"]["points"][0]
    assert point["errors"]["503"] >= 4 and point["ok"] >= 4
    assert json.loads(out.read_text())["curves"]["default"]["knee_rate"] is None
    line = next(x for x in capsys.readouterr().out.splitlines() if "offered" in x)
    assert f"failed {point['offered'] - point['ok']}/{point['offered']}" in line and "503:" in line


def test_key_file_and_shape_make_an_authorized_raw_tensor_request(server, tmp_path):
    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"inference": {"key": "k123"}, "management": {"key": "m"}}))
    out = tmp_path / "r.json"
    assert bench("--url", server.url, "--shape", "1,3,8,8", "--key-file", str(keys), "--concurrency", "2",
                 "--out", str(out)) == 0
    headers, size = server.seen[-1]
    assert headers["Authorization"] == "Bearer k123"
    assert headers["X-Tensor-Shape"] == "1,3,8,8" and size == 3 * 8 * 8 * 4
    curve = json.loads(out.read_text())["curves"]["default"]
    assert curve["mode"] == "closed" and curve["points"][0]["concurrency"] == 2
    assert curve["points"][0]["ok"] > 0


def test_usage_errors_say_what_is_wrong(server, tmp_path, capsys):
    assert bench("--url", server.url, "--shape", "1,2", "--rate", "5", "--png", str(tmp_path / "x.png")) == 2
    assert "--png draws the curves of --out" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text("{\"something\": 1}")
    assert bench("--url", server.url, "--shape", "1,2", "--rate", "5", "--out", str(other)) == 2
    assert "not a hetserve bench results file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench("--url", server.url, "--shape", "a,b", "--rate", "5")
    assert "shape must look like 1,3,224,224" in capsys.readouterr().err
    assert not server.seen, "no request is sent when the command line is wrong"


def test_unreachable_server_fails_at_once_with_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    code = bench("--url", f"http://127.0.0.1:{port}/predictions/m", "--shape", "1,2", "--sweep", "--no-drain")
    err = capsys.readouterr().err
    assert code == 2 and "cannot connect to" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("content", "expected"), [
    (None, "does not exist"),
    ("not json", "is not TorchServe's key_file.json"),
    (json.dumps({"management": {"key": "m"}}), "has no inference key"),
])
def test_bad_key_file_is_one_line_before_any_request(server, tmp_path, capsys, content, expected):
    keys = tmp_path / "key_file.json"
    if content is not None:
        keys.write_text(content)
    assert bench("--url", server.url, "--shape", "1,2", "--rate", "5", "--key-file", str(keys)) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not server.seen


def test_a_refused_first_request_stops_before_measuring(server, tmp_path, capsys):
    body = tmp_path / "401.bin"
    body.write_bytes(b"401")
    assert bench("--url", server.url, "--body-file", str(body), "--sweep") == 2
    assert "refused the request (HTTP 401)" in capsys.readouterr().err
    assert len(server.seen) == 1, "one probe, no sweep"


def test_png_without_matplotlib_fails_before_measuring(server, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert bench("--url", server.url, "--shape", "1,2", "--rate", "5", "--out", str(tmp_path / "r.json"),
                 "--png", str(tmp_path / "r.png")) == 2
    assert "--png needs matplotlib" in capsys.readouterr().err
    assert not server.seen


def test_closed_loop_that_misses_the_p99_exits_1(server, tmp_path):
    out = tmp_path / "r.json"
    # One service slot of 20 ms and 8 clients: p99 is well above 5 ms.
    assert bench("--url", server.url, "--shape", "1,2", "--concurrency", "8", "--p99-ms", "5", "--out", str(out)) == 1
    assert json.loads(out.read_text())["curves"]["default"]["met"] is False
def test_images_and_texts_are_sent_with_their_content_types(server, tmp_path):
    from tests.hf_fixtures import jpeg

    images = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for i, path in enumerate(images):
        path.write_bytes(jpeg(seed=i))
    assert bench("--url", server.url, "--image", str(images[0]), "--image", str(images[1]), "--concurrency", "1") == 0
    sizes = {size for headers, size in server.seen if headers["Content-Type"] == "image/jpeg"}
    assert sizes == {len(p.read_bytes()) for p in images}
    server.seen.clear()
    lines = tmp_path / "texts.txt"
    lines.write_text("great movie\n\nthe plot was boring\n")
    assert bench("--url", server.url, "--text-file", str(lines), "--concurrency", "1") == 0
    assert bench("--url", server.url, "--text", "fun", "--concurrency", "1") == 0
    assert {size for _, size in server.seen} == {3, 11, 19}
    assert all(h["Content-Type"] == "text/plain; charset=utf-8" for h, _ in server.seen)
    mixed = tmp_path / "c.png"
    mixed.write_bytes(jpeg(fmt="PNG"))
    assert bench("--url", server.url, "--image", str(images[0]), "--image", str(mixed), "--rate", "5") == 2
