"""Every command the README shows runs in the suite, as written (issue 22, item 2).

Every ```bash block of README.md is read into commands (``\\`` continuations joined, comments
dropped). COVERAGE names, for each command, the test that runs it; a command the README gains
without an entry fails ``test_every_readme_command_is_covered``, and so does an entry whose
command left the README. The tests take each command's text from the COVERAGE key, which that
check ties to the README, so an edited flag is run as edited.

Each fenced block runs in a fresh directory of its own, as a reader would try it, with the files
its text names put there: ``./bert-sst2`` and ``./vit-face-expression`` (tiny random-weight
Hugging Face directories from tests/hf_fixtures.py), ``my_models.py`` (a tiny BERT factory),
``kitten.jpg`` (a real photo: matplotlib's grace_hopper.jpg) and ``imagenet.txt`` (one name per
class of the tiny ResNet). The text itself changes only as ``runnable`` says (small models,
one tuner trial, short measurements, the suite's server address). One TorchServe serves every
command that needs a server: its working directory is ``.hetserve/run`` in the first block's
directory, as under scripts/serve.sh, so ``--key-file .hetserve/run/key_file.json`` is read as
written; ``$KEY`` is that file's inference key.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from hetserve.cli import build_parser, main
from hetserve.tsprocess import TorchServe, start_torchserve

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# Tests that start a TorchServe carry the "server" mark; the README parsing checks stay cheap.

# ---------------------------------------------------------------- the README's commands
# "The two commands"
SERVE_SH = "scripts/serve.sh"
TEST_SH = "scripts/test.sh"
# "Using it"
ARCHIVE = ("hetserve archive --model zoo:resnet18 --model-name resnet18 --export-path model_store "
           "--ratios 0.5,0.75,0.8,0.85,0.9 [--method metis|exact|prefix] [--cost profile|flops] "
           "[--profile-device cpu|cuda] [--profile-batch N] "
           "[--set batchSize=8 --set hetserve.micro_batch=2]")
PARTITION = "hetserve partition --model zoo:googlenet --method metis,exact,prefix --report cuts.json"
TOPOLOGY = "hetserve topology --policy numa"
BENCH = ("hetserve bench --url http://127.0.0.1:8080/predictions/resnet18 --shape 1,3,224,224 "
         "--key-file .hetserve/run/key_file.json --sweep --p99-ms 500 --out bench.json --png bench.png")
ADVISE = "hetserve advise --mar model_store/resnet18.mar --rate 10 --rate 40"
TUNE = "hetserve tune --mar model_store/resnet18.mar --trials 12 --p99-ms 500 --out tune/"
TUNE_LOCAL = ("hetserve tune --mar model_store/resnet18.mar --trials 4 --objective goodput "
              "--search local --out tune/")
# "Bringing your own (Hugging Face) model"
OWN_MODEL = ("hetserve archive --model my_models.py:bert --model-name bert --ratios 0.75,0.85 "
             "--dynamic input_ids:1=seq --dynamic attention_mask:1=seq --dim seq=128 --dim 'seq<=512'")
# "Images, text and labels"
IMAGE_ARCHIVE = ("hetserve archive --model zoo:resnet18 --model-name resnet18 --image-processor imagenet "
                 "--labels imagenet.txt")
CURL_IMAGE = 'curl -T kitten.jpg -H "Authorization: Bearer $KEY" http://127.0.0.1:8080/predictions/resnet18'
VIT_ARCHIVE = "hetserve archive --model hf:./vit-face-expression --task image-classification --model-name vit"
TEXT_ARCHIVE = ("hetserve archive --model hf:./bert-sst2 --task text-classification --model-name bert "
                "--max-length 128")
CURL_TEXT = ('curl -H "Authorization: Bearer $KEY" -H "Content-Type: text/plain" -d "a great movie" '
             "http://127.0.0.1:8080/predictions/bert")
CURL_TEXTS = ('curl -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" '
              "-d '{\"text\": [\"great\", \"awful plot\"]}' http://127.0.0.1:8080/predictions/bert")
# "int8 on CPU"
INT8_ARCHIVE = ("hetserve archive --model zoo:resnet18 --model-name resnet18-int8 --image-processor imagenet "
                "--labels imagenet.txt --quantize int8 --calibration photos/ --set hetserve.precision=int8")

# README command -> the test (in this module) that runs it.
COVERAGE = {
    SERVE_SH: "test_serve_sh_steps_the_suite_can_run",
    TEST_SH: "test_test_sh_is_what_ci_runs",
    ARCHIVE: "test_archive_example_writes_every_ratio",
    PARTITION: "test_partition_example_reports_every_ratio_and_method",
    TOPOLOGY: "test_topology_example_prints_the_core_groups",
    BENCH: "test_bench_example_sweeps_the_served_model",
    ADVISE: "test_advise_example_reads_the_served_history",
    TUNE: "test_tune_examples_write_a_report_and_the_winner",
    TUNE_LOCAL: "test_tune_examples_write_a_report_and_the_winner",
    OWN_MODEL: "test_own_model_example_records_the_dynamic_dim",
    IMAGE_ARCHIVE: "test_image_example_labels_a_photo_sent_with_curl",
    CURL_IMAGE: "test_image_example_labels_a_photo_sent_with_curl",
    VIT_ARCHIVE: "test_vit_example_packs_its_image_processor",
    TEXT_ARCHIVE: "test_text_example_answers_the_curl_requests",
    CURL_TEXT: "test_text_example_answers_the_curl_requests",
    CURL_TEXTS: "test_text_example_answers_the_curl_requests",
    INT8_ARCHIVE: "test_int8_example_records_its_accuracy_and_serves_int8",
}

# ---------------------------------------------------------------- what the suite changes
# The text names big models; the suite runs the smallest of the same family. ResNet-18 keeps its
# graph at a quarter of the width (10 classes) and the README's 224x224 input, so --shape
# 1,3,224,224 and the imagenet processor's 224 crop stay as written.
MODELS = {"zoo:resnet18": "zoo:resnet18-tiny?image_size=224", "zoo:googlenet": "zoo:googlenet-tiny"}
# The README's server address; the suite's TorchServe listens on free ports.
SERVER_ADDRESS = "127.0.0.1:8080"
# One tuner trial (the shipped default): the search itself is tested in test_tuner.py.
OPTION_VALUES = {"--trials": "1"}
# Appended: measurements the README leaves at their defaults (minutes long), and the tuner's
# scratch folder (its default, /tmp/hetserve-tune, is shared by everything on the host).
BUDGET = {
    "bench": ["--duration", "1", "--warmup", "0.2", "--start-rate", "5", "--factor", "4",
              "--max-rate", "20", "--refine", "0"],
    "tune": ["--duration", "1", "--warmup", "0.2", "--jvm-warmup", "0", "--trial-warmup", "0.5",
             "--start-rate", "5", "--factor", "4", "--max-rate", "20", "--refine", "0"],
}
# Appended to every archive and partition: the ratios a per-node profile reaches move by a few
# points with the machine's load. Measured on the 2-core build machine with other jobs running,
# default ratios plus 0.5: zoo:resnet18 missed 0.9 in 2 of 6 profiles, resnet18-tiny at 224
# missed 0.5 in 3 of 8 (|achieved - asked| > --tolerance 0.03), failing the command. A product
# matter (a profile's noise), not the README's text; the cut the flag keeps is labelled with the
# ratio it achieves, and scripts/serve.sh passes the same flag for the same reason.
OFF_TARGET = {"archive": "--allow-off-target", "partition": "--allow-off-target"}
# "[--flag a|b]": the plain form runs; every alternative is parsed (test_archive_example_options).
BRACKETS = re.compile(r"\s*\[[^\]]*\]")
PLACEHOLDERS = {"N": "2"}


def runnable(command: str, address: str | None = None, work: Path | None = None) -> list[str]:
    """The README's ``hetserve`` command as the suite runs it (see the tables above)."""
    words = [MODELS.get(w, w) for w in shlex.split(BRACKETS.sub("", command))]
    if address is not None:
        words = [w.replace(SERVER_ADDRESS, address) for w in words]
    for i, word in enumerate(words[:-1]):
        if word in OPTION_VALUES:
            words[i + 1] = OPTION_VALUES[word]
    assert words[0] == "hetserve", command
    sub = words[1]
    if sub in OFF_TARGET and OFF_TARGET[sub] not in words:
        words.append(OFF_TARGET[sub])
    words += BUDGET.get(sub, [])
    if sub == "tune":
        assert work is not None, "tune needs a scratch folder"
        words += ["--work", str(work)]
    return words


def optional_forms(command: str) -> list[list[list[str]]]:
    """Each "[...]" group of ``command``: the words of each of its alternatives."""
    groups = []
    for group in re.findall(r"\[([^\]]*)\]", command):
        words = [PLACEHOLDERS.get(w, w) for w in shlex.split(group)]
        choice = next((i for i, w in enumerate(words) if "|" in w), None)
        if choice is None:
            groups.append([words])
        else:
            groups.append([[*words[:choice], alt, *words[choice + 1:]] for alt in words[choice].split("|")])
    return groups


# ---------------------------------------------------------------- reading the README


def _without_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def readme_commands(text: str) -> list[str]:
    commands = []
    for body in re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, re.M | re.S):
        for line in re.sub(r"[ \t]*\\\n\s*", " ", body).splitlines():
            command = _without_comment(line)
            if command:
                commands.append(command)
    return commands


def test_every_readme_command_is_covered():
    commands = readme_commands(README.read_text())
    assert commands, "no ```bash block found in README.md"
    missing = [c for c in commands if c not in COVERAGE]
    assert not missing, (
        "README commands no test runs; add each to COVERAGE in tests/test_readme_commands.py "
        "with the test that runs it:\n" + "\n".join(missing))
    stale = [c for c in COVERAGE if c not in commands]
    assert not stale, "COVERAGE names commands the README no longer shows:\n" + "\n".join(stale)
    for name in set(COVERAGE.values()):
        assert name.startswith("test_") and callable(globals().get(name)), f"no test {name} here"


def test_commands_are_read_from_every_fence_with_continuations_and_comments():
    text = ("```bash\nhetserve a --x 1 \\\n    --y '#not' # said\n# only a comment\n\n```\n"
            "```json\n{\"no\": 1}\n```\n```sh\ncurl -d \"a # b\" u   # c\n```\n")
    assert readme_commands(text) == ["hetserve a --x 1 --y '#not'", 'curl -d "a # b" u']


def test_runnable_applies_only_the_documented_changes(tmp_path):
    assert runnable(BENCH, address="127.0.0.1:5") == [
        "hetserve", "bench", "--url", "http://127.0.0.1:5/predictions/resnet18", "--shape", "1,3,224,224",
        "--key-file", ".hetserve/run/key_file.json", "--sweep", "--p99-ms", "500", "--out", "bench.json",
        "--png", "bench.png", *BUDGET["bench"]]
    assert runnable(TUNE, work=tmp_path)[:9] == [
        "hetserve", "tune", "--mar", "model_store/resnet18.mar", "--trials", "1", "--p99-ms", "500", "--out"]
    plain = runnable(ARCHIVE)
    assert "[--method" not in " ".join(plain) and plain[3] == MODELS["zoo:resnet18"]
    assert plain[-1] == "--allow-off-target"


# ---------------------------------------------------------------- running them


@contextlib.contextmanager
def working_dir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@dataclass
class Ran:
    code: int | None  # None: the command raised
    output: str

    def __str__(self) -> str:
        return f"exit {self.code}:\n{self.output[-4000:]}"


def run_cli(words: list[str], cwd: Path) -> Ran:
    """``hetserve ...`` through the CLI's main() in this process (imports are shared with the
    rest of the suite), in ``cwd`` as the reader's shell would be."""
    out = io.StringIO()
    with working_dir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(words[1:])
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the README command failed: report it
            print(f"{type(exc).__name__}: {exc}", file=out)
            code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else None
            return Ran(code, out.getvalue())
    return Ran(code, out.getvalue())


def run_shell(command: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command line through bash, with this venv's console scripts first on PATH (an activated
    venv) and this checkout's code imported."""
    venv_bin = str(Path(sys.executable).parent)
    full_env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **(env or {})}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> dict[str, Path]:
    """One fresh directory per README block: "using" (Using it), "own" (Bringing your own
    model), "media" (Images, text and labels), "int8" (int8 on CPU)."""
    return {name: tmp_path_factory.mktemp(f"readme-{name}") for name in ("using", "own", "media", "int8")}


@pytest.fixture(scope="module")
def using_archive(blocks) -> Ran:
    return run_cli(runnable(ARCHIVE), blocks["using"])


@pytest.fixture(scope="module")
def media_archives(blocks) -> dict[str, Ran]:
    """The three archives of "Images, text and labels", in the README's order, with the files
    they name."""
    pytest.importorskip("transformers")
    import matplotlib

    from tests.hf_fixtures import write_bert_sst2_dir, write_vit_dir

    here = blocks["media"]
    shutil.copy(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg", here / "kitten.jpg")
    (here / "imagenet.txt").write_text("".join(f"{name}\n" for name in IMAGE_LABELS))
    write_vit_dir(here / "vit-face-expression")
    write_bert_sst2_dir(here / "bert-sst2")
    return {name: run_cli(runnable(command), here)
            for name, command in (("resnet18", IMAGE_ARCHIVE), ("vit", VIT_ARCHIVE), ("bert", TEXT_ARCHIVE))}


IMAGE_LABELS = [f"label-{i}" for i in range(10)]  # one per class of resnet18-tiny


@dataclass
class Served:
    ts: TorchServe
    address: str
    state_dir: Path  # the workers' performance histories (HETSERVE_STATE_DIR)

    @property
    def key(self) -> str:
        return self.ts.keys["inference"]


@pytest.fixture(scope="module")
def readme_server(blocks, using_archive, media_archives, tmp_path_factory) -> Iterator[Served]:
    """One TorchServe for every command that needs one: "resnet18" is the image example's
    archive (it takes raw tensors too, so bench's --shape works on it), "bert" the text
    example's when it was built, "plain-resnet18" the "Using it" archive, served so that its
    workers write the history ``advise`` reads."""
    store = tmp_path_factory.mktemp("readme-store")
    built = {
        "plain-resnet18": blocks["using"] / "model_store" / "resnet18.mar",
        "resnet18": blocks["media"] / "model_store" / "resnet18.mar",
        "bert": blocks["media"] / "model_store" / "bert.mar",
    }
    models = {}
    for name, mar in built.items():
        if mar.exists():
            shutil.copy(mar, store / f"{name}.mar")
            models[name] = f"{name}.mar"
    state = tmp_path_factory.mktemp("readme-state")
    ts = start_torchserve(blocks["using"] / ".hetserve" / "run", store, models,
                          env={"HETSERVE_STATE_DIR": str(state)})
    yield Served(ts, f"127.0.0.1:{ts.ports['inference']}", state)
    ts.stop()


def curl(command: str, served: Served, cwd: Path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    done = run_shell(command.replace(SERVER_ADDRESS, served.address), cwd, {"KEY": served.key})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def mar_member(mar: Path, name: str) -> bytes:
    with zipfile.ZipFile(mar) as z:
        return z.read(name)


# ---------------------------------------------------------------- "The two commands"


def test_test_sh_is_what_ci_runs():
    """scripts/test.sh is the suite itself: CI (.ci/run) runs it on a clean clone, as written."""
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line and not line.startswith("#")][-1] == f"exec bash {TEST_SH}"
    assert os.access(REPO / TEST_SH, os.X_OK), f"{TEST_SH} must be executable: the README runs it directly"


@pytest.mark.server
def test_serve_sh_steps_the_suite_can_run(readme_server, blocks):
    """scripts/serve.sh itself is not run here: it installs into the project's venv
    (scripts/setup_venv.sh) and binds the fixed ports 8080-8082. What it runs besides is
    checked: the script parses, its archive flags are the CLI's, and its last step, the
    example client, gets a 200 in every body format from the README's archive served like
    serve.sh serves it."""
    script = REPO / SERVE_SH
    assert os.access(script, os.X_OK), f"{SERVE_SH} must be executable: the README runs it directly"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    variables = {"$model": "zoo:resnet18", "$name": "resnet18", "$ratios": "0.5,0.75,0.8,0.85,0.9",
                 "$run_dir": ".hetserve/run", "$repo_root": str(REPO)}

    def expand(line: str) -> list[str]:
        for var, value in variables.items():
            line = line.replace(var, value)
        return shlex.split(line)

    archive = re.search(r"^\s*(hetserve archive .*)$", re.sub(r"\\\n\s*", " ", text), re.M)
    assert archive, "serve.sh no longer runs hetserve archive: update this test"
    build_parser().parse_args(expand(archive.group(1))[1:])  # exits (fails) on an unknown flag

    client = re.search(r'^python "\$repo_root/examples/predict.py" (.*)$', text, re.M)
    assert client, "serve.sh no longer ends with examples/predict.py: update this test"
    words = expand(client.group(1))
    words[words.index("--model") + 1] = "plain-resnet18"
    ports = readme_server.ts.ports
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "predict.py"), *words,
         "--port", str(ports["inference"]), "--management-port", str(ports["management"])],
        cwd=blocks["using"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("-> 200") == 5, done.stdout  # every format but the deliberate bad one


# ---------------------------------------------------------------- "Using it"


def test_archive_example_writes_every_ratio(using_archive, blocks):
    assert using_archive.code == 0, using_archive
    rows = re.findall(r"^metis\s+(\d\.\d+)\s", using_archive.output, re.M)
    assert sorted(float(r) for r in rows) == [0.5, 0.75, 0.8, 0.85, 0.9], using_archive
    mar = blocks["using"] / "model_store" / "resnet18.mar"
    manifest = json.loads(mar_member(mar, "hetserve-manifest.json"))
    assert manifest["model_name"] == "resnet18" and manifest["partitions"]


def test_archive_example_options_are_the_cli_flags():
    """Each "[...]" of the archive example, every alternative, parses and changes what runs;
    the --set pair passes the checks archive makes before exporting."""
    from hetserve import archive_checks
    from hetserve.cli import _overrides
    from partitioner.archive import model_config

    parser = build_parser()
    plain = runnable(ARCHIVE)[1:]
    base = vars(parser.parse_args(plain))
    groups = optional_forms(ARCHIVE)
    assert [len(g) for g in groups] == [3, 2, 2, 1, 1], groups
    for forms in groups:
        parsed = [vars(parser.parse_args([*plain, *form])) for form in forms]
        if len(forms) == 1:
            assert parsed[0] != base, f"{forms[0]} changes nothing"
        else:  # alternatives: each one a different value (one of them may be the default)
            assert len({json.dumps(p, sort_keys=True, default=str) for p in parsed}) == len(forms), forms
        for form, values in zip(forms, parsed, strict=True):
            if "--set" in form:
                archive_checks.check_model_config(model_config(None, _overrides(values["set"])))


def test_partition_example_reports_every_ratio_and_method(blocks):
    ran = run_cli(runnable(PARTITION), blocks["using"])
    assert ran.code == 0, ran
    rows = json.loads((blocks["using"] / "cuts.json").read_text())["rows"]
    assert {(r["method"], r["ratio"]) for r in rows} == {
        (m, r) for m in ("metis", "exact", "prefix") for r in (0.75, 0.8, 0.85, 0.9)}
    fields = {"method", "ratio", "achieved_ratio", "cut_bytes", "valid", "max_abs_err", "seconds"}
    for row in rows:
        assert set(row) >= fields and row["valid"] and row["max_abs_err"] <= 1e-4, row
    for ratio in (0.75, 0.8, 0.85, 0.9):  # the MILP's proven optimum is never worse than METIS
        by = {r["method"]: r for r in rows if r["ratio"] == ratio}
        if by["exact"]["optimal"] and by["metis"]["within_tolerance"]:
            assert by["exact"]["cut_bytes"] <= by["metis"]["cut_bytes"], by


def test_topology_example_prints_the_core_groups(blocks):
    """Through the installed console script, as a reader types it."""
    done = run_shell(TOPOLOGY, blocks["using"])
    assert done.returncode == 0, done.stderr
    assert "physical cores" in done.stdout and re.search(r"^group \S+: cpus \[", done.stdout, re.M), done.stdout


@pytest.mark.server
def test_bench_example_sweeps_the_served_model(readme_server, blocks):
    ran = run_cli(runnable(BENCH, address=readme_server.address), blocks["using"])
    # 1: it ran and no rate met the criteria (a busy machine, one-second points): still a run
    assert ran.code in (0, 1), ran
    results = json.loads((blocks["using"] / "bench.json").read_text())
    points = results["curves"]["default"]["points"]
    assert [p["target_rate"] for p in points] == [5.0, 20.0]
    assert all(p["ok"] > 0 and not p["errors"] for p in points), points
    assert (blocks["using"] / "bench.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.server
def test_advise_example_reads_the_served_history(readme_server, blocks):
    done = run_shell(ADVISE, blocks["using"], {"HETSERVE_STATE_DIR": str(readme_server.state_dir)})
    assert done.returncode == 0, done.stdout + done.stderr
    for rate in (10, 40):
        assert re.search(rf"^  {rate} req/s: (batchSize=\d+ maxBatchDelay=|no batch size)", done.stdout, re.M), done.stdout


@pytest.mark.server
@pytest.mark.parametrize("command", [TUNE, TUNE_LOCAL], ids=["tpe", "local-goodput"])
def test_tune_examples_write_a_report_and_the_winner(command, using_archive, blocks, tmp_path):
    assert using_archive.code == 0, using_archive
    out = blocks["using"] / "tune"
    shutil.rmtree(out, ignore_errors=True)
    ran = run_cli(runnable(command, work=tmp_path / "work"), blocks["using"])
    assert ran.code == 0, ran
    report = json.loads((out / "tune_report.json").read_text())
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (report["objective"], report["options"]["search"]) == (args.objective, args.search)
    assert report["best"] and [t["state"] for t in report["trials"]] == ["COMPLETE"], report["trials"]
    assert yaml.safe_load((out / "model-config.yaml").read_text())["hetserve"]
    assert "inference_address=" in (out / "config.properties").read_text()


# ---------------------------------------------------------------- "Bringing your own model"

MY_MODELS = '''\
import torch
import transformers


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=512)
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(1))
    return transformers.BertModel(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
'''


def test_own_model_example_records_the_dynamic_dim(blocks):
    pytest.importorskip("transformers")
    (blocks["own"] / "my_models.py").write_text(MY_MODELS)
    ran = run_cli(runnable(OWN_MODEL), blocks["own"])
    assert ran.code == 0, ran
    manifest = json.loads(mar_member(blocks["own"] / "model_store" / "bert.mar", "hetserve-manifest.json"))
    assert manifest["dynamic_dims"]["sizes"] == {"seq": 128}
    assert manifest["dynamic_dims"]["bounds"]["seq"][1] == 512


# ---------------------------------------------------------------- "Images, text and labels"


@pytest.mark.server
def test_image_example_labels_a_photo_sent_with_curl(media_archives, readme_server, blocks):
    assert media_archives["resnet18"].code == 0, media_archives["resnet18"]
    answer = curl(CURL_IMAGE, readme_server, blocks["media"])
    assert isinstance(answer, dict) and len(answer) == 5 and set(answer) <= set(IMAGE_LABELS), answer
    scores = list(answer.values())
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores), answer


def test_vit_example_packs_its_image_processor(media_archives, blocks):
    assert media_archives["vit"].code == 0, media_archives["vit"]
    mar = blocks["media"] / "model_store" / "vit.mar"
    processors = yaml.safe_load(mar_member(mar, "model-config.yaml"))["hetserve"]["processors"]
    assert {"image", "labels"} <= set(processors), processors


# The README's text example, archived with the default cost model (profiling) on a BERT
# directory with two token types: it crashed until example inputs were bounded by the tables
# they index (issue 22, item 1).
@pytest.mark.server
def test_text_example_answers_the_curl_requests(media_archives, readme_server, blocks):
    assert media_archives["bert"].code == 0, media_archives["bert"]
    labels = {"negative", "positive"}
    one = curl(CURL_TEXT, readme_server, blocks["media"])
    assert isinstance(one, dict) and set(one) == labels, one
    two = curl(CURL_TEXTS, readme_server, blocks["media"])
    assert isinstance(two, list) and len(two) == 2 and all(set(a) == labels for a in two), two


def test_int8_example_records_its_accuracy_and_serves_int8(blocks):
    """The int8 example on real photos (its ``photos/``: matplotlib's and scikit-image's samples):
    it archives, records the accuracy it measured on held-out photos, and ships int8 as the
    served precision; the archive's own load check served that precision before writing it
    (serving it on TorchServe is tests/test_quantize.py's)."""
    from handlers.artifact.manifest import Manifest
    from tests.photos import SKIMAGE_PHOTOS, sample_photo

    here = blocks["int8"]
    (here / "imagenet.txt").write_text("".join(f"{name}\n" for name in IMAGE_LABELS))
    photos = here / "photos"
    photos.mkdir()
    for name in ("grace_hopper", *SKIMAGE_PHOTOS):
        photo = sample_photo(name)
        for turn in range(2):  # each photo upright and mirrored: 8 calibration inputs
            (photo if turn == 0 else photo.transpose(0)).save(photos / f"{name}-{turn}.jpg", quality=90)
    ran = run_cli(runnable(INT8_ARCHIVE), here)
    assert ran.code == 0, ran
    mar = here / "model_store" / "resnet18-int8.mar"
    manifest = Manifest.from_json(json.loads(mar_member(mar, "hetserve-manifest.json")))
    record = manifest.quantization
    assert record["passed"] is True and record["calibration"]["source"] == "directory", record
    assert record["calibration"]["kinds"] == {"image": 8}, record
    assert "int8" in manifest.precisions
    config = yaml.safe_load(mar_member(mar, "model-config.yaml"))
    assert config["hetserve"]["precision"] == "int8", config
