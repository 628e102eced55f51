"""TorchServe's ``max_response_size``, read by the worker the way the frontend reads it (issue 22).

TorchServe 0.12 does not tell a worker its response limit. The load request carries the model's
path, name, handler, envelope, batch size, GPU and ``limitMaxImagePixels``; ``context.
system_properties`` the same few; the worker's environment is the frontend's own plus
``TS_DECODE_INPUT_REQUEST``, ``TS_IPEX_ENABLE`` and ``TS_IPEX_GPU_ENABLE``
(``ConfigManager.getBackendConfiguration``). What a worker can do is read the config.properties
the frontend read: the one ``TS_CONFIG_FILE`` names (the worker inherits the frontend's
environment), else the ``-f`` argument of the Java frontend the worker descends from
(``torchserve --ts-config`` passes it on). Then, as the frontend does: with
``enable_envvars_config=true`` a ``TS_MAX_RESPONSE_SIZE`` variable wins, ``$$VAR$$`` is
replaced from the environment, and a missing key is the frontend's default, 6553500 bytes.

A frontend started without a config file reads a config snapshot or ./config.properties; that,
a missing /proc, or a value the frontend itself could not parse leaves the limit unknown (None).
No TorchServe types: the adapter (``hetserve_handler``) calls this and hands the service a number.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# ConfigManager.getMaxResponseSize()'s default in TorchServe 0.12 (the jar's own constant).
FRONTEND_DEFAULT_MAX_RESPONSE_SIZE = 6553500
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"
KEY = "max_response_size"
ENV_KEY = "TS_MAX_RESPONSE_SIZE"
# A worker's parent is the frontend, or torch.backends.xeon.run_cpu with cpu_launcher_enable.
MAX_ANCESTORS = 4
_ENV_REFERENCE = re.compile(r"\$\$([^$]+[^$])\$\$")  # ConfigManager's pattern
_JAVA_INT_MAX = 2**31 - 1
_PROPERTY = re.compile(r"((?:\\.|[^=:\s\\])+)\s*[=:]?\s*(.*)$")


@dataclass(frozen=True)
class FrontendLimit:
    bytes: int
    source: str  # where it was read, for messages: "/srv/ts/config.properties", "TS_MAX_RESPONSE_SIZE"


def parse_properties(text: str) -> dict[str, str]:
    """The key/value pairs of a Java .properties text (``#``/``!`` comments, ``=``/``:``/space
    separators, backslash continuations): enough for TorchServe's config files."""
    props: dict[str, str] = {}
    pending = ""
    for raw in [*text.splitlines(), ""]:
        stripped = raw.lstrip()
        if not pending and (not stripped or stripped[0] in "#!"):
            continue
        line = pending + stripped
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1 and raw:  # an odd number of backslashes: the line goes on
            pending = line[:-1]
            continue
        pending = ""
        match = _PROPERTY.match(line)
        if match:
            props[re.sub(r"\\(.)", r"\1", match.group(1))] = match.group(2)
    return props


def max_response_size(
    props: Mapping[str, str], env: Mapping[str, str], source: str
) -> FrontendLimit | None:
    """The frontend's limit given its config file's ``props`` and its environment."""
    if props.get("enable_envvars_config", "false").strip().lower() == "true" and ENV_KEY in env:
        value, source = env[ENV_KEY], ENV_KEY
    elif KEY in props:
        value = props[KEY]
    else:
        return FrontendLimit(FRONTEND_DEFAULT_MAX_RESPONSE_SIZE, f"{source} (TorchServe's default)")
    for name in _ENV_REFERENCE.findall(value):
        if name not in env:
            return None  # the frontend refuses to start on an unknown variable
        value = value.replace(f"$${name}$$", env[name])
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return FrontendLimit(number, source) if 0 < number <= _JAVA_INT_MAX else None


def frontend_config_file(
    env: Mapping[str, str], pid: int, proc: Path = Path("/proc")
) -> Path | None:
    """The config.properties the frontend that started worker ``pid`` read, if it can be told."""
    frontend = _frontend(pid, proc)
    named = env.get("TS_CONFIG_FILE")
    if not named and frontend is not None:
        named = _config_argument(frontend[1])
    if not named:
        return None
    path = Path(named)
    if not path.is_absolute():  # relative to the frontend's working directory
        if frontend is None:
            return None
        try:
            path = (proc / str(frontend[0]) / "cwd").resolve() / path
        except OSError:
            return None
    return path


def read_frontend_max_response_size(
    env: Mapping[str, str] | None = None, pid: int | None = None, proc: Path = Path("/proc")
) -> FrontendLimit | None:
    """TorchServe's ``max_response_size`` for this worker, or None when it cannot be known."""
    env = os.environ if env is None else env
    path = frontend_config_file(env, os.getpid() if pid is None else pid, proc)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return max_response_size(parse_properties(text), env, str(path))


def _frontend(pid: int, proc: Path) -> tuple[int, list[str]] | None:
    """(pid, argv) of the Java frontend among ``pid``'s ancestors."""
    current = pid
    for _ in range(MAX_ANCESTORS):
        current = _parent(current, proc)
        if current <= 1:
            return None
        try:
            argv = (proc / str(current) / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return None
        if FRONTEND_CLASS in argv:
            return current, argv
    return None


def _parent(pid: int, proc: Path) -> int:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return 0
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ')'.
    fields = stat[stat.rfind(")") + 1:].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0


def _config_argument(argv: list[str]) -> str | None:
    """The value of the frontend's ``-f`` / ``--ts-config-file`` (after its main class)."""
    args = argv[argv.index(FRONTEND_CLASS) + 1:]
    for i, arg in enumerate(args):
        if arg in ("-f", "--ts-config-file") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--ts-config-file="):
            return arg.split("=", 1)[1]
    return None
