"""The worker's configuration: shipped defaults < a TOML file < the command line.

The shipped defaults are ``etc/dcp-worker.toml``; :data:`DEFAULTS` holds the same values (a
test keeps them equal). Unknown keys and wrong types are errors naming the file and key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "WorkerConfig", "DEFAULTS", "load_config"]


class ConfigError(ValueError):
    """Bad configuration; the message names the source and the key."""


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
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{source}: {message}")
        return self


DEFAULTS = WorkerConfig()
_TYPES = {f.name: f.type for f in fields(WorkerConfig)}


def _coerce(key: str, value: Any, source: str) -> Any:
    expected = _TYPES[key]
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, not {value!r}")
    elif expected == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, not {value!r}")
        value = float(value)
    elif expected == "str" and not isinstance(value, str):
        raise ConfigError(f"{source}: {key} must be a string, not {value!r}")
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
