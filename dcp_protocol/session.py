"""The worker's side of a session with a scheduler, sans I/O (docs/protocol.md section 2).

:class:`WorkerSession` is fed every frame the scheduler sends (:meth:`WorkerSession.receive`)
and returns what happened as events; what it must send waits in
:meth:`WorkerSession.data_to_send`. It answers the challenge, checks the handshake's order,
numbers requests, matches each reply to its request by ``re``, and keeps every frame within the
limit the scheduler announced. It reads no socket and no clock; ``dcp_worker.connection`` runs
it over a websocket, and tests drive it with frames.

States::

    AWAITING_HELLO --hello--> AWAITING_WELCOME --welcome--> OPEN
          \\                          \\                       \\
           +--------- anything else, an error, a bad frame ---> CLOSED (Failed)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from . import policy, signing
from .codec import BINARY_VERSION, decode_frame, encode_as
from .errors import ErrorCode, ProtocolError
from .limits import MAX_FRAME_BYTES
from .messages import SCHEDULER_MESSAGES, Auth, Error, GroupProof, Hello, Message, Welcome

__all__ = [
    "Event",
    "Failed",
    "Opened",
    "Replied",
    "SessionState",
    "Unsolicited",
    "WorkerSession",
]


class SessionState(StrEnum):
    AWAITING_HELLO = "awaiting_hello"
    AWAITING_WELCOME = "awaiting_welcome"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Opened:
    """The scheduler accepted the session."""

    welcome: Welcome


@dataclass(frozen=True)
class Replied:
    """The reply to request ``rid``."""

    rid: int
    message: Message


@dataclass(frozen=True)
class Unsolicited:
    """A frame that answers no pending request (an error naming none, or a late reply)."""

    message: Message


@dataclass(frozen=True)
class Failed:
    """The session cannot go on: close it. ``code`` names the protocol reason (a wire code),
    ``fatal`` says that opening another cannot help (the scheduler refused this identity);
    ``pending`` are the requests that will never be answered."""

    code: str
    reason: str
    fatal: bool = False
    pending: tuple[int, ...] = ()


Event = Opened | Replied | Unsolicited | Failed


class WorkerSession:
    """One session's protocol state on the worker's side.

    Args:
        address: the worker's identity (its checksummed address).
        sign: signs a payload with that identity (returns the hex signature).
        payment_address: where its credits go.
        agent: the ``auth.agent`` string (program/version).
        groups: join key -> join hash (hex) of the compute groups to prove membership of.
        leave_public_group: ask for no public work.
        binary: send MessagePack frames (protocol version 2) to a scheduler whose ``hello``
            announces it; False keeps every frame JSON (version 1).
    """

    def __init__(
        self,
        address: str,
        sign: Callable[[bytes], str],
        payment_address: str,
        agent: str = "",
        groups: Mapping[str, str] | None = None,
        leave_public_group: bool = False,
        binary: bool = True,
    ) -> None:
        self.address = address
        self._sign = sign
        self.payment_address = payment_address
        self.agent = agent
        self.groups = dict(groups or {})
        self.leave_public_group = leave_public_group
        self.state = SessionState.AWAITING_HELLO
        self.welcome: Welcome | None = None
        #: The largest frame either side sends: MAX_FRAME_BYTES until welcome says less.
        self.max_frame_bytes = MAX_FRAME_BYTES
        self._allow_binary = binary
        #: Whether this session's frames go as MessagePack (from ``auth`` on): the
        #: scheduler's ``hello`` announced version 2 and ``binary`` allows it. A transport
        #: sends them as binary websocket messages, JSON ones as text.
        self.binary = False
        self._outgoing: list[bytes] = []
        self._next_id = 1
        self._pending: set[int] = set()

    # ------------------------------------------------------------------ input

    def receive(self, data: str | bytes) -> list[Event]:
        """Handle one frame from the scheduler; the events it caused, in order."""
        if self.state is SessionState.CLOSED:
            return []
        try:
            message, _binary = decode_frame(data, SCHEDULER_MESSAGES, self.max_frame_bytes)
        except ProtocolError as exc:
            # A frame we cannot read leaves its request unanswered for good.
            return [self._fail(exc.code.value, f"bad frame: {exc.message}")]
        if self.state is SessionState.AWAITING_HELLO:
            if not isinstance(message, Hello):
                return [self._unexpected("hello", message)]
            self.binary = self._allow_binary and message.protocol >= BINARY_VERSION
            self._answer(message)
            self.state = SessionState.AWAITING_WELCOME
            return []
        if self.state is SessionState.AWAITING_WELCOME:
            if isinstance(message, Error):
                return [
                    self._fail(
                        message.code,
                        f"the scheduler refused the session: {message.code} {message.message}",
                        fatal=message.code
                        in (ErrorCode.AUTH_FAILED.value, ErrorCode.BLOCKED.value),
                    )
                ]
            if not isinstance(message, Welcome):
                return [self._unexpected("welcome", message)]
            self.welcome = message
            self.max_frame_bytes = message.max_frame_bytes
            self.state = SessionState.OPEN
            return [Opened(message)]
        re = getattr(message, "re", None)
        if isinstance(re, int) and re in self._pending:
            self._pending.discard(re)
            return [Replied(re, message)]
        return [Unsolicited(message)]

    # ------------------------------------------------------------------ output

    def request(self, build: Callable[[int], Message]) -> tuple[int, bytes | Error]:
        """Number a request and encode it: ``(rid, frame)`` to send, or ``(rid, error)``, the
        local ``frame_too_large`` answer of a frame above the limit (nothing is sent, as the
        scheduler would have refused it)."""
        if self.state is not SessionState.OPEN:
            raise RuntimeError(f"the session is {self.state.value}")
        rid = self._next_id
        self._next_id += 1
        data = encode_as(build(rid), self.binary)
        if len(data) > self.max_frame_bytes:
            return rid, Error(
                re=rid,
                code=ErrorCode.FRAME_TOO_LARGE.value,
                message=f"frame of {len(data)} bytes exceeds the limit of "
                f"{self.max_frame_bytes} bytes (not sent)",
            )
        self._pending.add(rid)
        return rid, data

    def forget(self, rid: int) -> None:
        """Request ``rid`` was not sent after all (the connection failed under it)."""
        self._pending.discard(rid)

    def data_to_send(self) -> list[bytes]:
        """Frames the protocol itself must send now (the ``auth`` after ``hello``)."""
        out, self._outgoing = self._outgoing, []
        return out

    def connection_lost(self) -> Failed:
        """The transport closed: the session ends; the requests left pending never get their
        replies."""
        return self._fail("", "the connection to the scheduler closed")

    # ------------------------------------------------------------------ internals

    def _answer(self, hello: Hello) -> None:
        payload = signing.session_payload(hello.challenge, hello.server, self.address)
        auth = Auth(
            id=0,
            address=self.address,
            signature=self._sign(payload),
            payment_address=self.payment_address,
            agent=self.agent,
            groups=tuple(
                GroupProof(key, policy.group_proof(hash_, hello.challenge, self.address))
                for key, hash_ in sorted(self.groups.items())
            ),
            leave_public_group=self.leave_public_group,
        )
        self._outgoing.append(encode_as(auth, self.binary))

    def _unexpected(self, wanted: str, got: Message) -> Failed:
        return self._fail(ErrorCode.UNEXPECTED_MESSAGE.value, f"expected {wanted}, got {got.type}")

    def _fail(self, code: str, reason: str, fatal: bool = False) -> Failed:
        self.state = SessionState.CLOSED
        pending, self._pending = tuple(sorted(self._pending)), set()
        return Failed(code, reason, fatal, pending)
