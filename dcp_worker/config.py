"""The worker's configuration: shipped defaults < a TOML file < the command line.

The shipped defaults are ``etc/dcp-worker.toml``; :data:`DEFAULTS` holds the same values (a
test keeps them equal). Unknown keys and wrong types are errors naming the file and key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .protocol import InvalidMessage, Wage, policy

__all__ = ["ConfigError", "GroupConfig", "WorkerConfig", "DEFAULTS", "load_config"]


class ConfigError(ValueError):
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
    scheduler: str = "http://127.0.0.1:8500"
    identity: str = ""
    passphrase_file: str = ""
    payment_address: str = ""
    sandboxes: int = 0
    prefetch: int = -1
    state_dir: str = "~/.local/state/dcp-worker"
    grace_seconds: float = 30.0
    reconnect_max_delay: float = 30.0
    max_wall_seconds: float = 300.0
    max_memory_bytes: int = 1024 * 1024 * 1024
    max_output_bytes: int = 16 * 1024 * 1024
    slices_per_evaluator: int = 1000
    # "" starts evaluators here; "tcp://127.0.0.1:9000" or a socket path reaches a manager.
    evaluator: str = ""
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
    # Who may run what, at what price (docs/configuration.md "Policy").
    leave_public_group: bool = False
    groups: tuple[GroupConfig, ...] = ()
    job_ids: tuple[str, ...] = ()
    job_owners: tuple[str, ...] = ()
    min_wage: Wage = field(default_factory=Wage)

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
        if self.sandboxes > 0:
            return self.sandboxes
        return max(1, int(0.9 * (os.cpu_count() or 1)))

    @property
    def effective_prefetch(self) -> int:
        return self.effective_sandboxes if self.prefetch < 0 else self.prefetch

    @property
    def outbox_path(self) -> Path:
        return Path(os.path.expanduser(self.state_dir)) / "outbox.sqlite"

    def validate(self, source: str = "configuration") -> WorkerConfig:
        checks = [
            (self.sandboxes >= 0, "sandboxes must be >= 0"),
            (self.prefetch >= -1, "prefetch must be >= -1"),
            (self.grace_seconds > 0, "grace_seconds must be > 0"),
            (self.reconnect_max_delay > 0, "reconnect_max_delay must be > 0"),
            (self.max_wall_seconds > 0, "max_wall_seconds must be > 0"),
            (self.max_memory_bytes > 0, "max_memory_bytes must be > 0"),
            (self.max_output_bytes > 0, "max_output_bytes must be > 0"),
            (self.slices_per_evaluator > 0, "slices_per_evaluator must be > 0"),
            (self.opencl_slots > 0, "opencl_slots must be > 0"),
            (0 < self.opencl_share <= 1, "opencl_share must be within (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{source}: {message}")
        return self


DEFAULTS = WorkerConfig()
_TYPES = {f.name: f.type for f in fields(WorkerConfig)}


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
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings")
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


def load_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any]) -> WorkerConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (None = unset).

    Raises:
        ConfigError: unreadable file, TOML syntax (with line), unknown key or wrong type.
    """
    config = DEFAULTS
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        unknown = sorted(set(data) - set(_TYPES))
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
        config = replace(config, **{k: _coerce(k, v, str(path)) for k, v in data.items()})
    given = {k: v for k, v in overrides.items() if v is not None}
    config = replace(config, **{k: _coerce(k, v, "command line") for k, v in given.items()})
    return config.validate(str(path) if path else "command line")
