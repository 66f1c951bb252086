"""The evaluator manager (``dcp-evaluator-manager``): a daemon that starts one hardened
evaluator per connection and stops or refuses them when the machine is busy.

``daemon``: the listener, who may connect, and the evaluators it runs; ``monitors``: the pure
policy of when the machine is busy (fed readings, no I/O of their own); ``cli``: the command.
The worker reaches it through :mod:`evaluator.client`, which needs only the token prefix.
"""

from __future__ import annotations

from .daemon import (
    TOKEN_PREFIX,
    Access,
    Manager,
    ManagerError,
    activated_sockets,
    bind_tcp,
    bind_unix,
    opencl_withheld,
    read_token,
)

__all__ = [
    "TOKEN_PREFIX",
    "Access",
    "Manager",
    "ManagerError",
    "activated_sockets",
    "bind_tcp",
    "bind_unix",
    "opencl_withheld",
    "read_token",
]
