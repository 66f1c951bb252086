#!/bin/sh
# After dcp-worker's smoke test: the worker's environment has no OpenCL device of its own
# (no PoCL: this machine has no GPU driver); installing dcp-worker-pocl gives it PoCL's CPU
# device, reinstalling dcp-worker keeps it, removing dcp-worker-pocl takes it away. Run by
# .ci/run as root.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
devices() {
    /opt/dcp-worker/venv/bin/python -c \
        'from evaluator.opencl import OpenCLRuntime; print(len(OpenCLRuntime().describe().get("devices", [])))'
}
export DEBIAN_FRONTEND=noninteractive
test "$(devices)" = 0
apt-get install -y -q "$ROOT"/dist/dcp-worker-pocl_*_amd64.deb >/dev/null
test "$(devices)" -ge 1
apt-get install -y -q --reinstall "$ROOT"/dist/dcp-worker_*_amd64.deb >/dev/null
test "$(devices)" -ge 1
apt-get remove -y -q dcp-worker-pocl >/dev/null
test "$(devices)" = 0
echo "pocl smoke test: OpenCL on the CPU comes and goes with dcp-worker-pocl"
