"""Where the worker's logs go: several outputs at once (DCP allows one).

``console`` (stderr), ``logfile`` (append; reopened on SIGHUP for logrotate), ``syslog`` (through
:class:`logging.handlers.SysLogHandler`: RFC 5424 over udp and tcp, syslog(3)'s local form on a
Unix socket), ``journal`` (systemd's journal with structured fields, through systemd-python) and
``dashboard`` (the Textual UI's log pane, fed from :class:`RecentLogs`). ``detect`` picks the
dashboard on a terminal, the journal under systemd (where journald listens), the console
otherwise; never from ``LANG`` alone (DCP's rule drew dashboards into pipes and services).

Structured fields: a log call may pass ``extra={"DCP_JOB": ..., "DCP_SLICE": ...}``; the journal
keeps them as fields (``journalctl DCP_JOB=...``); the other outputs show only the message.
"""

from __future__ import annotations

import collections
import datetime
import logging
import logging.handlers
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from .config import ConfigError, WorkerConfig
from .levels import NOTICE

__all__ = [
    "JOURNAL_SOCKET",
    "NOTICE",
    "LocalSyslogFormatter",
    "LogSetup",
    "RecentLogs",
    "Rfc5424Formatter",
    "detect_outputs",
    "setup_logging",
    "verbosity_level",
]

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def verbosity_level(verbose: int) -> int:
    """Notices and warnings by default, -v info (connections, refusals), -vv debug (every
    fetch and result), as DCP's levels plus the notices."""
    return (NOTICE, logging.INFO, logging.DEBUG)[min(verbose, 2)]


def under_systemd(env: Mapping[str, str] = os.environ) -> bool:
    """Started by systemd: its stderr is the journal (JOURNAL_STREAM) or it was invoked as a
    unit (INVOCATION_ID)."""
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))


#: Where journald takes native messages (sd_journal_send, hence systemd-python, writes here).
JOURNAL_SOCKET = "/run/systemd/journal/socket"


def detect_outputs(
    outputs: tuple[str, ...],
    env: Mapping[str, str] = os.environ,
    tty: bool | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> tuple[str, ...]:
    """``detect``: the journal under systemd (when journald listens: a unit's stderr goes
    wherever the unit says otherwise), the dashboard on a terminal of ours, else the console."""
    if outputs != ("detect",):
        return outputs
    if under_systemd(env):
        return ("journal",) if _listening(journal_socket) else ("console",)
    if tty if tty is not None else _terminal_is_ours():
        return ("dashboard",)
    return ("console",)


def _terminal_is_ours() -> bool:
    """A terminal on stdin and stdout, and this process in its foreground: a worker started
    in the background (``dcp-worker ... &``) would be stopped by the terminal (SIGTTOU) the
    moment a dashboard drew on it, so it logs to the console instead."""
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        return False
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except OSError:
        return False


class ReopeningFileHandler(logging.FileHandler):
    """Append to a file; :meth:`reopen` (on SIGHUP) starts writing to whatever file now has
    the name, after logrotate moved the old one."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(path, mode="a", encoding="utf-8", delay=False)

    def reopen(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()


class RecentLogs(logging.Handler):
    """The last records, numbered, for the dashboard's log pane and the control socket's
    ``logs`` command."""

    def __init__(self, size: int = 500) -> None:
        super().__init__()
        self.records: collections.deque[tuple[int, str, str]] = collections.deque(maxlen=size)
        self._seq = 0
        self._mutex = threading.Lock()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
            return
        with self._mutex:
            self._seq += 1
            self.records.append((self._seq, record.levelname, line))

    def after(self, seq: int) -> list[tuple[int, str, str]]:
        with self._mutex:
            return [r for r in self.records if r[0] > seq]


class LogSetup:
    """The handlers installed on the root logger; :meth:`reopen` is SIGHUP's action."""

    def __init__(self, handlers: list[logging.Handler], recent: RecentLogs) -> None:
        self.handlers = handlers
        self.recent = recent

    def reopen(self) -> None:
        for handler in self.handlers:
            if isinstance(handler, ReopeningFileHandler):
                handler.reopen()

    def remove_console(self) -> None:
        """The dashboard owns the terminal: console output would tear it."""
        root = logging.getLogger()
        for handler in list(self.handlers):
            if type(handler) is logging.StreamHandler:
                root.removeHandler(handler)
                self.handlers.remove(handler)


class _SysLog(logging.handlers.SysLogHandler):
    """Messages the syslog daemon cannot take (it restarts, say) are dropped with one line on
    stderr a minute, instead of a traceback per record."""

    _complained = 0.0
    priority_map = {**logging.handlers.SysLogHandler.priority_map, "NOTICE": "notice"}

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - the base's name
        now = time.monotonic()
        if now - self._complained > 60:
            self._complained = now
            sys.stderr.write(f"dcp-worker: syslog {self.address}: cannot deliver; dropping\n")


def _listening(path: str) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(path)
            except OSError:
                continue
            return True
    return False


class Rfc5424Formatter(logging.Formatter):
    """What follows the handler's ``<PRI>`` in an RFC 5424 message: ``1 TIMESTAMP HOSTNAME
    APP-NAME PROCID MSGID STRUCTURED-DATA MSG``, the time in UTC to the microsecond, no
    MSGID and no structured data (``-``); MSG is the record's text (UTF-8, no BOM: RFC 5424's
    MSG-ANY). ``lines``: for a stream framed by newlines (RFC 6587 non-transparent framing),
    a message's own newlines are sent as ``#012`` (as rsyslog writes them) and one ends it."""

    def __init__(self, hostname: str, lines: bool = False) -> None:
        super().__init__("%(message)s")
        # RFC 5424 HOSTNAME: 1..255 printable ASCII characters, no spaces; "-" if unknown.
        self.hostname = "".join(c for c in hostname if 33 <= ord(c) <= 126)[:255] or "-"
        self.lines = lines

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        text = super().format(record)
        line = (
            f"1 {when:%Y-%m-%dT%H:%M:%S.%f}Z {self.hostname} {APP_NAME} {record.process} - - {text}"
        )
        return line.replace("\n", "#012") + "\n" if self.lines else line


class LocalSyslogFormatter(logging.Formatter):
    """What follows ``<PRI>`` on the local syslog socket, as syslog(3) writes it: ``Mmm dd
    hh:mm:ss APP-NAME[PID]: MSG`` (RFC 3164's local form). The daemon on ``/dev/log`` (journald
    or rsyslog) reads this form, and adds the host itself; journald takes no RFC 5424 there."""

    _MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        stamp = f"{self._MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}"
        return f"{stamp}:{t.tm_sec:02d} {APP_NAME}[{record.process}]: {super().format(record)}"


APP_NAME = "dcp-worker"


def _syslog(config: WorkerConfig) -> logging.Handler:
    """Over udp and tcp, RFC 5424 messages (a remote collector needs the time and the host);
    on a Unix socket, the local form of syslog(3). No trailing NUL but on a Unix stream socket,
    where syslog(3) ends each message with one."""
    facility = logging.handlers.SysLogHandler.facility_names[config.syslog_facility]
    address: str | tuple[str, int]
    if config.syslog_transport == "unix":
        address = config.syslog_address
        socktype = None
    else:
        host, sep, port = config.syslog_address.rpartition(":")
        if not sep:
            host, port = config.syslog_address, "514"
        if not port.isdigit():
            raise ConfigError(f"syslog_address {config.syslog_address!r}: expected HOST[:PORT]")
        address = (host.strip("[]"), int(port))
        socktype = socket.SOCK_STREAM if config.syslog_transport == "tcp" else socket.SOCK_DGRAM
    where = f"syslog {config.syslog_transport} {config.syslog_address}"
    try:
        handler = _SysLog(address, facility, socktype)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    if isinstance(address, str) and not _listening(address):
        handler.close()  # the library would defer the failed connect to every record
        raise ConfigError(f"{where}: no syslog daemon listens there")
    if config.syslog_transport == "unix":
        handler.append_nul = handler.socktype == socket.SOCK_STREAM
        handler.setFormatter(LocalSyslogFormatter())
    else:
        handler.append_nul = False
        lines = config.syslog_transport == "tcp"
        handler.setFormatter(Rfc5424Formatter(socket.gethostname(), lines=lines))
    return handler


def _journal(journal_socket: str = JOURNAL_SOCKET) -> logging.Handler:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        raise ConfigError(
            "output journal needs systemd-python (pip install 'dcp-worker[systemd]')"
        ) from None
    if not _listening(journal_socket):
        # sd_journal_send would drop every record without a word, as syslog to a socket
        # nobody reads would: both are errors at start.
        raise ConfigError(
            f"output journal: no journald listens on {journal_socket} (not under systemd?); "
            "choose another output (-o console, logfile or syslog)"
        )

    class _Journal(JournalHandler):  # type: ignore[misc]  # systemd-python has no types
        @staticmethod
        def map_priority(levelno: int) -> int:
            if logging.INFO < levelno <= NOTICE:
                return 5  # LOG_NOTICE; the library knows only the five standard levels
            return int(JournalHandler.map_priority(levelno))

    handler: logging.Handler = _Journal(SYSLOG_IDENTIFIER="dcp-worker")
    return handler


def setup_logging(config: WorkerConfig, outputs: tuple[str, ...], verbose: int) -> LogSetup:
    """Install one handler per output on the root logger (replacing any).

    Raises:
        ConfigError: an output cannot be opened (no syslog daemon on its Unix socket, an
            unwritable logfile, no journald listening, no systemd-python for the journal).
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.setLevel(verbosity_level(verbose))
    recent = RecentLogs()
    handlers: list[logging.Handler] = [recent]
    for output in outputs:
        if output == "console":
            handler: logging.Handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(FORMAT))
        elif output == "logfile":
            try:
                handler = ReopeningFileHandler(config.logfile_path)
            except OSError as exc:
                raise ConfigError(f"logfile {config.logfile_path}: {exc.strerror}") from None
            handler.setFormatter(logging.Formatter(FORMAT))
        elif output == "syslog":
            handler = _syslog(config)
        elif output == "journal":
            handler = _journal()
        else:  # dashboard: the UI reads RecentLogs
            continue
        handlers.append(handler)
    for handler in handlers:
        root.addHandler(handler)
    return LogSetup(handlers, recent)
