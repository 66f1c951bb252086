"""Private scratch directories of an evaluator (its working directory, PoCL's cache).

An evaluator is started in a directory its starter made for it alone (the worker's sandbox
directory, removed by the worker even after a kill). Scratch directories go inside it, so a
killed evaluator leaves nothing behind; only when the working directory is shared (a
checkout, ``/``) do they go to the temporary directory.
"""

from __future__ import annotations

import os
import tempfile

__all__ = ["private_dir"]


def private_dir(prefix: str) -> str:
    """A new 0700 directory, in the working directory when only we can use it."""
    here = os.getcwd()
    st = os.stat(here)
    private = st.st_uid == os.geteuid() and not st.st_mode & 0o077
    return tempfile.mkdtemp(prefix=prefix, dir=here if private else None)
