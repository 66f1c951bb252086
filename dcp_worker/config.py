"""The worker's configuration, in layers, lowest first:

1. the shipped defaults (``dcp_worker/defaults.toml``, equal to :data:`DEFAULTS`; never edited
   in place),
2. the system files: ``/etc/dcp-worker/dcp-worker.toml``, then ``/etc/dcp-worker/conf.d/*.toml``
   in name order,
3. the user's file (``$XDG_CONFIG_HOME/dcp-worker/dcp-worker.toml``) or the one given with
   ``--config``,
4. ``DCP_WORKER_<KEY>`` environment variables,
5. the command line.

:func:`resolve` returns the merged configuration and, for each key, where its value came from
(``--show-config`` prints both). Unknown keys and wrong types are errors naming the file and
line, the variable or the option.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dcp_protocol import DcpError, InvalidMessage, Wage, nesting, policy

__all__ = [
    "ConfigError",
    "GroupConfig",
    "WorkerConfig",
    "DEFAULTS",
    "KEYS",
    "OUTPUTS",
    "Resolved",
    "load_config",
    "resolve",
]


class ConfigError(DcpError, ValueError):
    """Bad configuration; the message names the source and the key."""


@dataclass(frozen=True)
class GroupConfig:
    """A compute group to join: its key and its secret, or the hash of both."""

    join_key: str
    join_secret: str = ""
    join_hash: str = ""

    @classmethod
    def parse(cls, value: str) -> GroupConfig:
        """``KEY,SECRET`` or ``KEY,gh1-<64 hex digits>`` (the command line's ``--join``)."""
        key, sep, rest = value.partition(",")
        if not sep or not key or not rest:
            raise ConfigError(f"--join {value!r}: expected KEY,SECRET or KEY,gh1-<hash>")
        if rest.startswith(HASH_PREFIX):
            return cls(key, join_hash=rest.removeprefix(HASH_PREFIX)).checked("--join")
        return cls(key, join_secret=rest).checked("--join")

    def checked(self, source: str) -> GroupConfig:
        if not self.join_key:
            raise ConfigError(f"{source}: a group needs a join_key")
        if bool(self.join_secret) == bool(self.join_hash):
            raise ConfigError(
                f"{source}: group {self.join_key!r} needs a join_secret or a join_hash (one)"
            )
        if self.join_hash and not (
            len(self.join_hash) == 64 and all(c in "0123456789abcdef" for c in self.join_hash)
        ):
            raise ConfigError(f"{source}: group {self.join_key!r}: join_hash is 64 hex digits")
        return self


HASH_PREFIX = "gh1-"


@dataclass(frozen=True)
class WorkerConfig:
    # The ``scheduler`` key: one URL, or several replicas sharing one database, tried in turn
    # (docs/protocol.md "Several schedulers"). The key is singular, as before replicas; a
    # string in a file, a variable or an option is a list of one.
    schedulers: tuple[str, ...] = ("http://127.0.0.1:8500",)
    identity: str = ""
    passphrase_file: str = ""
    payment_address: str = ""
    sandboxes: int = 0
    prefetch: int = -1
    state_dir: str = "~/.local/state/dcp-worker"
    grace_seconds: float = 30.0
    # While an evaluator manager holds work (the machine is busy): how often to ask it again.
    busy_retry_seconds: float = 5.0
    reconnect_max_delay: float = 30.0
    max_wall_seconds: float = 300.0
    max_memory_bytes: int = 1024 * 1024 * 1024
    max_output_bytes: int = 16 * 1024 * 1024
    slices_per_evaluator: int = 10000
    # "" starts evaluators here; a Unix socket path or "tcp://127.0.0.1:9000" reaches a manager.
    evaluator: str = ""
    # For a tcp:// manager: the file holding its secret (the manager's --token-file).
    evaluator_token_file: str = ""
    # OpenCL devices this worker lends: device-name patterns it never uses, the device
    # indices it may use (empty: all), and how many OpenCL slices may run at once.
    opencl_banned_devices: tuple[str, ...] = ("llvmpipe",)
    opencl_devices: tuple[int, ...] = ()
    opencl_slots: int = 1
    opencl_share: float = 1.0
    # OpenCL kernels run as native code in the evaluator process (on a CPU device nothing
    # checks their memory accesses), so only the process layers contain them. As root, with no
    # unprivileged account to drop to, OpenCL is not offered unless this says so.
    opencl_as_root: bool = False
    # Frames to the scheduler as JSON text (protocol version 1) even where it speaks version 2
    # (MessagePack, bytes as they are): readable in -vv wire logs, larger and slower.
    json_frames: bool = False
    # Who may run what, at what price (docs/configuration.md "Policy").
    leave_public_group: bool = False
    groups: tuple[GroupConfig, ...] = ()
    job_ids: tuple[str, ...] = ()
    job_owners: tuple[str, ...] = ()
    min_wage: Wage = field(default_factory=Wage)
    # DCP's --max-sandboxes: at most this many evaluator processes (0: no cap).
    max_sandboxes: int = 0
    # Where logs go, several at once: console, dashboard, journal, syslog, logfile; "detect"
    # picks dashboard on a terminal, journal under systemd, console otherwise.
    output: tuple[str, ...] = ("detect",)
    logfile: str = ""  # "": state_dir/dcp-worker.log; reopened on SIGHUP
    syslog_transport: str = "unix"  # unix, udp or tcp
    syslog_address: str = "/dev/log"  # a socket path, or HOST[:PORT] (514)
    syslog_facility: str = "local7"
    # The local control socket (status, pause, resume, stop); "": state_dir/control.sock.
    control_socket: str = ""
    # Prometheus metrics on HOST:PORT (loopback only); "": off.
    metrics: str = ""
    # The local web page (docs/console.md): -1 off, 0 any free port, else that port.
    console_port: int = -1
    console_host: str = "127.0.0.1"
    # Listen on a non-loopback console_host (the token still guards every request).
    console_allow_remote: bool = False

    @property
    def scheduler(self) -> str:
        """The first scheduler URL: where a connection starts, and the one URL when there is
        one (the supervisor tracks which replica it is on now)."""
        return self.schedulers[0]

    def runtime_options(self) -> dict[str, dict[str, Any]]:
        """What each runtime of the evaluator needs to know of this worker's settings."""
        opencl: dict[str, Any] = {"banned_devices": list(self.opencl_banned_devices)}
        if self.opencl_devices:
            opencl["devices"] = list(self.opencl_devices)
        return {"opencl": opencl}

    def group_hashes(self) -> dict[str, str]:
        """join key -> join hash, for every configured group."""
        return {
            g.join_key: g.join_hash or policy.join_hash(g.join_key, g.join_secret)
            for g in self.groups
        }

    @property
    def effective_sandboxes(self) -> int:
        n = self.sandboxes if self.sandboxes > 0 else max(1, int(0.9 * (os.cpu_count() or 1)))
        return min(n, self.max_sandboxes) if self.max_sandboxes > 0 else n

    @property
    def control_path(self) -> Path:
        if self.control_socket:
            return Path(os.path.expanduser(self.control_socket))
        return Path(os.path.expanduser(self.state_dir)) / "control.sock"

    @property
    def console_token_path(self) -> Path:
        """The web page's token: beside the control socket, with the same readers."""
        return self.control_path.with_name("console.token")

    @property
    def logfile_path(self) -> Path:
        if self.logfile:
            return Path(os.path.expanduser(self.logfile))
        return Path(os.path.expanduser(self.state_dir)) / "dcp-worker.log"

    @property
    def outbox_path(self) -> Path:
        return Path(os.path.expanduser(self.state_dir)) / "outbox.sqlite"

    def validate(self, origins: Mapping[str, str] | None = None) -> WorkerConfig:
        """Check ranges; an error names where the offending value came from."""
        checks = [
            ("scheduler", bool(self.schedulers), "needs at least one URL"),
            *(
                (
                    "scheduler",
                    _scheduler_url(url),
                    # Name the entry when there are several: the bad one of three replicas.
                    f"{_SCHEDULER_RULE}, not {url!r}"
                    + (
                        f" (entry {i} of {len(self.schedulers)})"
                        if len(self.schedulers) > 1
                        else ""
                    ),
                )
                for i, url in enumerate(self.schedulers, 1)
            ),
            ("sandboxes", self.sandboxes >= 0, "must be >= 0 (0: 90% of the CPU cores)"),
            ("max_sandboxes", self.max_sandboxes >= 0, "must be >= 0 (0: no cap)"),
            ("prefetch", self.prefetch >= -1, "must be >= -1"),
            ("grace_seconds", self.grace_seconds > 0, "must be > 0"),
            ("busy_retry_seconds", self.busy_retry_seconds > 0, "must be > 0"),
            ("reconnect_max_delay", self.reconnect_max_delay > 0, "must be > 0"),
            ("max_wall_seconds", self.max_wall_seconds > 0, "must be > 0"),
            ("max_memory_bytes", self.max_memory_bytes > 0, "must be > 0"),
            ("max_output_bytes", self.max_output_bytes > 0, "must be > 0"),
            ("slices_per_evaluator", self.slices_per_evaluator > 0, "must be > 0"),
            (
                "evaluator_token_file",
                bool(self.evaluator_token_file) or not self.evaluator.startswith("tcp://"),
                "must name the manager's token file when evaluator is tcp://",
            ),
            ("opencl_slots", self.opencl_slots >= 0, "must be >= 0 (0: no OpenCL)"),
            ("opencl_share", 0 < self.opencl_share <= 1, "must be within (0, 1]"),
            (
                "output",
                bool(self.output) and set(self.output) <= OUTPUTS,
                f"must be a list of {', '.join(sorted(OUTPUTS))}",
            ),
            (
                "output",
                "detect" not in self.output or len(self.output) == 1,
                "'detect' cannot be combined with other outputs",
            ),
            (
                "syslog_transport",
                self.syslog_transport in ("unix", "udp", "tcp"),
                "must be unix, udp or tcp",
            ),
            (
                "syslog_facility",
                self.syslog_facility in _FACILITIES,
                f"must be one of {', '.join(_FACILITIES)}",
            ),
            ("metrics", not self.metrics or _loopback(self.metrics), _METRICS_RULE),
            ("console_port", -1 <= self.console_port <= 65535, "must be -1 (off) to 65535"),
            (
                "console_host",
                self.console_allow_remote or _loopback(f"{self.console_host}:1"),
                "must be a loopback address (127.0.0.1, ::1 or localhost) unless "
                f"console_allow_remote is true, not {self.console_host!r}",
            ),
        ]
        for key, ok, message in checks:
            if not ok:
                where = (origins or {}).get(key, "configuration")
                raise ConfigError(f"{where}: {key} {message}")
        return self


OUTPUTS = frozenset({"detect", "console", "dashboard", "journal", "syslog", "logfile"})
_FACILITIES = "user daemon local0 local1 local2 local3 local4 local5 local6 local7".split()
_METRICS_RULE = "must be HOST:PORT on loopback (127.0.0.1, ::1 or localhost)"


_SCHEDULER_RULE = "must be an http://, https://, ws:// or wss:// URL with a host"


def _scheduler_url(url: str) -> bool:
    """What :func:`dcp_worker.connection.websocket_url` can connect to: http(s) or ws(s),
    or a bare HOST:PORT (http), with a host."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        return parts.scheme in ("http", "https", "ws", "wss") and bool(parts.hostname)
    except ValueError:  # an unbalanced [IPv6 address
        return False


def _loopback(listen: str) -> bool:
    host, sep, port = listen.rpartition(":")
    return (
        bool(sep)
        and port.isdigit()
        and int(port) < 65536
        and host.strip("[]") in ("127.0.0.1", "::1", "localhost")
    )


DEFAULTS = WorkerConfig()
#: Configuration keys whose field has another name: the ``scheduler`` key fills
#: ``schedulers`` (files, variables and options written for one URL keep working).
_FIELD_OF_KEY = {"scheduler": "schedulers"}
_KEY_OF_FIELD = {name: key for key, name in _FIELD_OF_KEY.items()}
_TYPES = {_KEY_OF_FIELD.get(f.name, f.name): f.type for f in fields(WorkerConfig)}
#: Every configuration key, in the order of :class:`WorkerConfig`'s fields.
KEYS = tuple(_TYPES)


def _coerce(key: str, value: Any, source: str) -> Any:
    expected = _TYPES[key]
    where = f"{source}: {key}"
    if expected == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
    elif expected == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
    elif expected == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        value = float(value)
    elif expected == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {value!r}")
    elif expected == "tuple[str, ...]":
        if key in _ONE_OR_MANY and isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            either = "a string or " if key in _ONE_OR_MANY else ""
            raise ConfigError(f"{where} must be {either}a list of strings")
        value = tuple(value)
    elif expected == "tuple[int, ...]":
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        ):
            raise ConfigError(f"{where} must be a list of device indices")
        value = tuple(value)
    elif expected == "Wage":
        if isinstance(value, Wage):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table (cpu_hour, gpu_hour, mb_in, mb_out)")
        unknown = set(value) - {"cpu_hour", "gpu_hour", "mb_in", "mb_out"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value.values()):
            raise ConfigError(f"{where}: wages are numbers of credits")
        try:
            value = Wage(**{k: float(v) for k, v in value.items()})
        except InvalidMessage as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
    elif expected == "tuple[GroupConfig, ...]":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list of tables")
        groups = []
        for i, item in enumerate(value):
            if isinstance(item, GroupConfig):
                groups.append(item)
                continue
            if not isinstance(item, dict) or set(item) - {"join_key", "join_secret", "join_hash"}:
                raise ConfigError(f"{where}[{i}] takes join_key and join_secret (or join_hash)")
            if not all(isinstance(v, str) for v in item.values()):
                raise ConfigError(f"{where}[{i}]: values are strings")
            groups.append(GroupConfig(**item).checked(f"{where}[{i}]"))
        value = tuple(groups)
    return value


#: List keys that also take one string, a list of one (``scheduler = "http://..."``).
_ONE_OR_MANY = frozenset({"scheduler"})

SYSTEM_DIR = Path("/etc/dcp-worker")
SHIPPED = Path(__file__).with_name("defaults.toml")
ENV_PREFIX = "DCP_WORKER_"
#: Environment variables of ours that are not configuration keys.
ENV_RESERVED = frozenset({"DCP_WORKER_SYSTEM_CONFIG"})


def user_config_file(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "dcp-worker" / "dcp-worker.toml"


def system_config_files(directory: Path = SYSTEM_DIR) -> list[Path]:
    """``dcp-worker.toml`` then ``conf.d/*.toml`` (name order), those that exist."""
    files = [directory / "dcp-worker.toml"]
    conf_d = directory / "conf.d"
    if os.path.isdir(conf_d):
        files += sorted(conf_d.glob("*.toml"))
    return [f for f in files if os.path.isfile(f)]


@dataclass(frozen=True)
class Resolved:
    config: WorkerConfig
    #: key -> where its value came from ("default", "/etc/dcp-worker/dcp-worker.toml:12",
    #: "environment DCP_WORKER_SANDBOXES", "command line --sandboxes").
    origins: dict[str, str]

    def describe(self) -> str:
        """The merged configuration as TOML, each key with its origin."""
        lines = []
        c = self.config
        for f in fields(WorkerConfig):
            if f.name in ("min_wage", "groups"):
                continue
            key = _KEY_OF_FIELD.get(f.name, f.name)
            value = getattr(c, f.name)
            if key in _ONE_OR_MANY and len(value) == 1:
                value = value[0]  # as it is usually written
            lines.append(f"{key} = {_toml(value)}  # {self.origins[key]}")
        for g in c.groups:
            lines.append(f"\n[[groups]]  # {self.origins['groups']}")
            lines.append(f"join_key = {_toml(g.join_key)}")
            if g.join_secret:
                lines.append('join_secret = "(set; not shown)"')
            else:
                lines.append(f"join_hash = {_toml(g.join_hash)}")
        lines.append(f"\n[min_wage]  # {self.origins['min_wage']}")
        for name in ("cpu_hour", "gpu_hour", "mb_in", "mb_out"):
            lines.append(f"{name} = {_toml(getattr(c.min_wage, name))}")
        return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(type(value))


def resolve(
    config_files: Iterable[str | os.PathLike[str]] = (),
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    option_names: Mapping[str, str] | None = None,
) -> Resolved:
    """Merge the layers: defaults, each TOML file of ``config_files`` in order, the
    ``DCP_WORKER_*`` variables of ``env``, then ``overrides`` (None means unset).

    ``option_names`` maps a key to the option that set it, for messages.

    Raises:
        ConfigError: unreadable file, TOML syntax, unknown key or wrong type (with file and
            line), an unknown or malformed variable, a value out of range.
    """
    values: dict[str, Any] = {}
    origins = {key: "default" for key in KEYS}
    for path in config_files:
        for key, (value, origin) in _read_file(Path(path)).items():
            values[key] = value
            origins[key] = origin
    for name, text in sorted((env or {}).items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        key = name.removeprefix(ENV_PREFIX).lower()
        if key not in _TYPES:
            raise ConfigError(f"environment {name}: no configuration key {key!r}")
        values[key] = _coerce(key, _from_env(key, text, name), f"environment {name}")
        origins[key] = f"environment {name}"
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        option = (option_names or {}).get(key, "--" + key.replace("_", "-"))
        values[key] = _coerce(key, value, f"command line {option}")
        origins[key] = f"command line {option}"
    config = replace(DEFAULTS, **{_FIELD_OF_KEY.get(k, k): v for k, v in values.items()})
    return Resolved(config.validate(origins), origins)


def load_config(
    config_file: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None
) -> WorkerConfig:
    """Defaults, one TOML file (if any), then ``overrides``: no system, user or environment
    layer (what a library caller or a test wants)."""
    return resolve([config_file] if config_file is not None else [], overrides).config


def _read_file(path: Path) -> dict[str, tuple[Any, str]]:
    """key -> (value, "path:line") for every key of one TOML file, checked."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        nesting.check_toml(text)  # tomllib recurses once per level
        data = tomllib.loads(text)
    except (nesting.NestingTooDeep, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    out = {}
    for key, value in data.items():
        where = f"{path}:{_line_of(text, key) or '?'}"
        if key not in _TYPES:
            hint = _suggest(key)
            raise ConfigError(
                f"{where}: unknown key {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            )
        out[key] = (_coerce(key, value, where), where)
    return out


def _line_of(text: str, key: str) -> int | None:
    """The line where a top-level key (``key = ...``, ``key.x = ...``) or its table
    (``[key]``, ``[[key]]``) first appears."""
    pattern = re.compile(
        rf"""^\s*(?:(?:["']?{re.escape(key)}["']?)\s*[=.]|\[\[?\s*["']?{re.escape(key)}["']?\s*[\].])"""
    )
    in_table = False
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line) and (not in_table or line.lstrip().startswith("[")):
            return number
        if line.lstrip().startswith("["):
            in_table = True
    return None


def _suggest(key: str) -> str | None:
    import difflib

    close = difflib.get_close_matches(key, list(_TYPES), n=1, cutoff=0.75)
    return close[0] if close else None


def _from_env(key: str, text: str, name: str) -> Any:
    """A variable's text as the value its key takes (lists: comma separated)."""
    expected = _TYPES[key]
    text = text.strip()
    try:
        if expected == "bool":
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if expected == "int":
            return int(text)
        if expected == "float":
            return float(text)
        if expected == "tuple[str, ...]":
            return [v.strip() for v in text.split(",") if v.strip()]
        if expected == "tuple[int, ...]":
            return [int(v) for v in text.split(",") if v.strip()]
        if expected == "Wage":
            numbers = [float(v) if v.strip() else 0.0 for v in text.split(",")]
            if len(numbers) > 4:
                raise ValueError
            return dict(zip(("cpu_hour", "gpu_hour", "mb_in", "mb_out"), numbers, strict=False))
        if expected == "tuple[GroupConfig, ...]":
            return [GroupConfig.parse(v) for v in text.split()]
    except ValueError:
        raise ConfigError(f"environment {name}: cannot read {text!r} as {expected}") from None
    return text
