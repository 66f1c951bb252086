#!/bin/sh
# Debian packages the Python environment and its tests need: libsystemd-dev and pkg-config
# to build systemd-python (the journal output and sd_notify); chromium for the web consoles'
# browser tests (tests/web/); postgresql, the server binaries (initdb, pg_ctl) that the
# tests, the benchmarks and `make cluster` start clusters of their own with (tests/postgres.py).
# Installed only when missing, as root, where apt-get exists; elsewhere it says what is missing
# (pip then reports the build error; the browser and PostgreSQL tests skip).
#
# Debian's postgresql also creates a `main` cluster (its postinst) and, where services may
# start, starts it: harmless. Ours listen on no TCP port and keep their sockets in their own
# directories, so they never meet it on 5432 or /run/postgresql; none of this enables or
# starts the service itself.
set -eu
missing=""
pkg-config --exists libsystemd 2>/dev/null || missing="libsystemd-dev pkg-config gcc"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
# initdb is not on PATH in Debian: it lives in /usr/lib/postgresql/VERSION/bin.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 ||
    missing="$missing postgresql"
[ -n "$missing" ] || exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages:$missing" >&2
    apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null
else
    echo "missing Debian packages:$missing (apt-get install$missing)" >&2
fi
