"""Hostile Python and JavaScript work functions (the ``python`` and ``js`` runtimes): each is
contained with a named error inside the wasm sandbox, reaches no host file, environment,
network or process, and the evaluator serves the next job's slice normally afterwards (after an
endless loop, which ends its evaluator, the fresh one that the worker starts)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import dcp_protocol as p
from dcp_protocol.evaluator_channel import MAY_END_EVALUATOR
from evaluator.process import EXIT_EXPIRED

from ..evaluator_client import EvaluatorClient
from ..test_interpreters import installed  # noqa: F401 (the fixture)

MIB = 1 << 20
#: name -> (runtime, source, limits, the error codes that contain it)
HOSTILE: dict[str, tuple[str, str, dict[str, object], set[str]]] = {
    "py_endless_loop": ("python", "def work(d):\n    while True:\n        pass\n",
                        {"wall_seconds": 1}, {"wasm_timeout"}),
    "js_endless_loop": ("js", "function work(d) { for (;;) {} }", {"wall_seconds": 1},
                        {"wasm_timeout"}),
    "py_memory_growth": ("python", "def work(d):\n    x = []\n    while True:\n"
                         "        x.append(bytearray(1 << 20))\n", {"memory_bytes": 96 * MIB},
                         {"memory_limit"}),
    "js_memory_growth": ("js", "function work(d) { const x = []; for (;;) x.push(new "
                         "Uint8Array(1 << 20).fill(1)); }", {"memory_bytes": 32 * MIB},
                         {"memory_limit"}),
    "py_deep_recursion": ("python", "def f(n):\n    return f(n + 1)\n\ndef work(d):\n"
                          "    return f(0)\n", {}, {"work_function_error", "wasm_trap"}),
    "js_deep_recursion": ("js", "function f(n) { return f(n + 1); }\n"
                          "function work(d) { return f(0); }", {},
                          {"work_function_error", "wasm_trap"}),
    "py_huge_output": ("python", "def work(d):\n    return 'x' * (8 << 20)\n",
                       {"output_bytes": 4096}, {"output_too_large"}),
    "js_huge_output": ("js", "function work(d) { return 'x'.repeat(8 << 20); }",
                       {"output_bytes": 4096}, {"output_too_large"}),
    "py_read_etc_passwd": ("python", "def work(d):\n    return open('/etc/passwd').read()\n",
                           {}, {"work_function_error", "sandbox_violation"}),
    "js_read_etc_passwd": ("js", "function work(d) { const f = std.open('/etc/passwd', 'r');\n"
                           " if (!f) throw new Error('no file'); return f.readAsString(); }",
                           {}, {"work_function_error", "sandbox_violation"}),
    "py_socket": ("python", "import socket\ndef work(d):\n    s = socket.socket()\n"
                  "    s.connect(('127.0.0.1', 22))\n    return 'connected'\n", {},
                  {"work_function_error", "sandbox_violation"}),
    "py_subprocess": ("python", "import subprocess\ndef work(d):\n"
                      "    return subprocess.run(['cat', '/etc/passwd']).returncode\n", {},
                      {"work_function_error", "sandbox_violation"}),
    "py_fork": ("python", "import os\ndef work(d):\n    return os.fork()\n", {},
                {"work_function_error"}),
    "js_exec": ("js", "function work(d) { return os.exec(['cat', '/etc/passwd']); }", {},
                {"work_function_error", "sandbox_violation"}),
    "py_missing_c_extension": ("python", "import numpy\ndef work(d):\n    return 1\n", {},
                               {"work_function_error"}),
    "py_ctypes": ("python", "import ctypes\ndef work(d):\n    return 1\n", {},
                  {"work_function_error"}),
    "py_returns_nothing": ("python", "def work(d):\n    d + 1\n", {}, {"work_function_error"}),
    "js_returns_nothing": ("js", "function work(d) { d + 1; }", {}, {"work_function_error"}),
    "py_no_work_function": ("python", "print('hello')\n", {}, {"work_function_error"}),
    "js_syntax_error": ("js", "function work(d) { return ; ; } }", {}, {"work_function_error"}),
    "py_unencodable_result": ("python", "def work(d):\n    return {'x': object()}\n", {},
                              {"work_function_error"}),
    "py_nan_result": ("python", "def work(d):\n    return [float('nan')]\n", {},
                      {"work_function_error"}),
    "py_circular_result": ("python", "def work(d):\n    x = []\n    x.append(x)\n    return x\n",
                           {}, {"work_function_error"}),
    # Host calls the epoch cannot interrupt are bounded: at most 1,024 iovecs a call.
    "py_writev_many_iovecs": ("python", "import os\ndef work(d):\n"
                              "    return os.writev(2, [b'x'] * 100000)\n", {},
                              {"work_function_error"}),
    "py_readv_many_iovecs": ("python", "import os\ndef work(d):\n"
                             "    return os.readv(0, [bytearray(1)] * 5000)\n", {},
                             {"work_function_error"}),
    "py_huge_write_to_fd_1": ("python", "import os\ndef work(d):\n"
                              "    return os.write(1, b'y' * (64 << 20))\n",
                              {"output_bytes": 4096}, {"output_too_large"}),
    "py_junk_on_fd_1": ("python", "import os\ndef work(d):\n    os.write(1, b'junk')\n"
                        "    return 1\n", {}, {"work_function_error"}),
    # JavaScript's ways out that do not exist (a module loader, fetch, a socket) and one that
    # would have written into the result.
    "js_require_missing_module": ("js", "function work(d) { return require('net').connect(22); }",
                                  {}, {"work_function_error"}),
    "js_dynamic_import": ("js", "function work(d) { return import('net'); }", {},
                          {"work_function_error"}),
    "js_fetch": ("js", "function work(d) { return fetch('http://127.0.0.1:22/'); }", {},
                 {"work_function_error"}),
    "js_socket_by_path": ("js", "function work(d) {\n"
                          "  const fd = os.open('/dev/tcp/127.0.0.1/22', os.O_RDWR);\n"
                          "  if (fd < 0) throw new Error('no socket: ' + fd); return fd; }", {},
                          {"work_function_error", "sandbox_violation"}),
    "js_junk_on_stdout": ("js", "function work(d) { std.puts('junk'); return 1; }", {},
                          {"work_function_error"}),
    "js_promise_never_settles": ("js", "function work(d) { return new Promise(() => {}); }",
                                 {"wall_seconds": 1}, {"wasm_timeout"}),
    "py_exit": ("python", "import sys\ndef work(d):\n    sys.exit(0)\n", {},
                {"work_function_error"}),
}  # fmt: skip


@pytest.fixture(scope="module")
def evaluator(installed: object) -> Iterator[EvaluatorClient]:  # noqa: F811
    """One evaluator for the module: each case checks that it serves the next job after."""
    client = EvaluatorClient()
    yield client
    assert client.close() == 0


def _next_job_still_works(client: EvaluatorClient, runtime: str) -> None:
    source = (
        b"def work(d, *a):\n    return [d, list(a)]\n"
        if runtime == "python"
        else b"function work(d, ...a) { return [d, a]; }"
    )
    assert isinstance(
        client.assign(source, ("x",), runtime=runtime, job="next", config={"datum": "json"}),
        p.Ack,
    )
    reply = client.run(b'{"still": "alive"}')
    assert isinstance(reply, p.SliceDone), reply
    assert reply.result == b'[{"still":"alive"},["x"]]'


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_work_function_is_contained(evaluator: EvaluatorClient, name: str) -> None:
    runtime, source, limits, codes = HOSTILE[name]
    defaults: dict[str, object] = {"wall_seconds": 20, "memory_bytes": 256 * MIB}
    reply = evaluator.assign(
        source.encode(), runtime=runtime, config={"datum": "json"}, **{**defaults, **limits}
    )
    assert isinstance(reply, p.Ack), reply
    reply = evaluator.run(b"1")
    assert isinstance(reply, p.Error), reply
    assert reply.code in codes, (reply.code, reply.message)
    assert reply.message and "root:" not in reply.message  # nothing of /etc/passwd
    if reply.code in MAY_END_EVALUATOR:  # as the worker does: a fresh evaluator
        status = evaluator.renew()
        # A loop ends its evaluator; a sleep (a promise that never settles) ends in its call.
        assert status == EXIT_EXPIRED if "loop" in name else status in (0, EXIT_EXPIRED)
    _next_job_still_works(evaluator, runtime)


@pytest.mark.parametrize("runtime", ["python", "js"])
def test_the_environment_is_empty_and_nothing_is_preopened(
    evaluator: EvaluatorClient, runtime: str
) -> None:
    source = {
        "python": "import os\ndef work(d):\n    try:\n        names = os.listdir('/')\n"
        "    except OSError as e:\n        names = [str(e)]\n"
        "    return [dict(os.environ), names]\n",
        "js": "function work(d) { const [names, err] = os.readdir('/');\n"
        "  return [std.getenviron(), names, err !== 0]; }",
    }[runtime]
    assert isinstance(
        evaluator.assign(source.encode(), runtime=runtime, config={"datum": "json"}), p.Ack
    )
    reply = evaluator.run(b"null")
    if runtime == "python":
        # The embedded standard library is the only tree there is; nothing of the host's.
        assert isinstance(reply, p.SliceDone), reply
        env, listing = p.nesting.loads(reply.result)
        assert env == {} and "etc" not in listing and "home" not in listing
    else:
        assert isinstance(reply, p.SliceDone), reply
        env, names, failed = p.nesting.loads(reply.result)
        assert env == {} and failed and not names
