#!/bin/sh
# Debian packages the Python environment needs to build: libsystemd-dev and pkg-config for
# systemd-python (the journal output and sd_notify). Installed only when missing, as root,
# where apt-get exists; elsewhere it says what is missing and pip reports the build error.
set -eu
if pkg-config --exists libsystemd 2>/dev/null; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing libsystemd-dev and pkg-config (for systemd-python)" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libsystemd-dev pkg-config gcc >/dev/null
else
    echo "systemd-python needs libsystemd-dev and pkg-config: apt-get install libsystemd-dev pkg-config" >&2
fi
