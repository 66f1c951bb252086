#!/bin/sh
# Debian packages the Python environment and its tests need: libsystemd-dev and pkg-config
# to build systemd-python (the journal output and sd_notify); chromium for the web consoles'
# browser tests (tests/web/). Installed only when missing, as root, where apt-get exists;
# elsewhere it says what is missing (pip then reports the build error; the browser tests skip).
set -eu
missing=""
pkg-config --exists libsystemd 2>/dev/null || missing="libsystemd-dev pkg-config gcc"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
[ -n "$missing" ] || exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages:$missing" >&2
    apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null
else
    echo "missing Debian packages:$missing (apt-get install$missing)" >&2
fi
