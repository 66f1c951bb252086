"""A small synchronous client of a real evaluator process, for tests."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from collections.abc import Callable

import dcp_protocol as p
from evaluator.interpreters import interpreters_dir
from evaluator.process import EXIT_EXPIRED


class EvaluatorClient:
    def __init__(
        self,
        preexec_fn: Callable[[], None] | None = None,
        cwd: str = "/",
        interpreters: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start an evaluator in ``cwd``; ``preexec_fn`` runs in the child before exec
        (rlimits, nice); ``interpreters``: the directory it is told to find them in; ``env``
        its environment (default: empty, as the worker starts it)."""
        self._start = lambda: subprocess.Popen(
            [sys.executable, "-I", "-m", "evaluator", "--stdio"]
            + ["--interpreters", interpreters or str(interpreters_dir())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env or {},
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
        self.proc = self._start()
        self.decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
        self._id = 0
        self.progress: list[float] = []

    def renew(self) -> int:
        """Close this evaluator and start a fresh one in its place, as the worker does after
        an answer with one of MAY_END_EVALUATOR; returns the old one's exit status (0, or
        EXIT_EXPIRED where the slice's wall clock ended it)."""
        status = self.close()
        self.proc = self._start()
        self.decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
        return status

    def replace_expired(self) -> None:
        """After a slice that looped into its wall clock: its evaluator ended with
        EXIT_EXPIRED (checked here), and a fresh one takes its place."""
        assert self.renew() == EXIT_EXPIRED

    def next_id(self) -> int:
        self._id += 1
        return self._id

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def receive(self) -> p.Message:
        assert self.proc.stdout is not None
        while True:
            message = self.decoder.next_message()
            if message is None:
                chunk = self.proc.stdout.read1(1 << 16)
                if not chunk:
                    raise EOFError("evaluator closed its stdout")
                self.decoder.receive_data(chunk)
                continue
            if isinstance(message, p.Progress):
                self.progress.append(message.fraction)
                continue
            return message

    def request(self, message: p.Message) -> p.Message:
        self.send_raw(p.frame(message))
        return self.receive()

    def assign(
        self,
        module: bytes,
        argv: tuple[str, ...] = (),
        runtime: str = "wasm",
        config: dict[str, object] | None = None,
        job: str = "job",
        send_module: bool = True,
        **limits: object,
    ) -> p.Message:
        return self.request(
            p.Assign(
                id=self.next_id(),
                job=job,
                runtime=runtime,
                sha256=hashlib.sha256(module).hexdigest(),
                module=module if send_module else None,
                argv=argv,
                limits=p.Limits(**limits),  # type: ignore[arg-type]
                config=config or {},
            )
        )

    def run(self, datum: bytes) -> p.Message:
        return self.request(p.RunSlice(id=self.next_id(), slice=0, datum=datum))

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                self.request(p.Die(id=self.next_id()))
            except (EOFError, BrokenPipeError):
                pass
        try:
            return self.proc.wait(10)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    # A request written to an evaluator that died meanwhile is still buffered.
                    with contextlib.suppress(BrokenPipeError):
                        stream.close()
