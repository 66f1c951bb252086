#!/bin/sh
# After `apt-get install ./dist/dcp-worker_*.deb`: the installed commands answer --help, the
# installed units verify, the dcp user and its files are in place, and the installed worker,
# running as dcp with the identity the package created, completes a short job against a local
# scheduler. Run by .ci/run as root.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
for cmd in dcp-worker dcp-wallet dcp-compute dcp-scheduler dcp-evaluator-start dcp-evaluator-manager; do
    "/usr/bin/$cmd" --help >/dev/null
    zcat "/usr/share/man/man1/$cmd.1.gz" | grep -q "^\.SH NAME"  # its man page
done
test -f /etc/logrotate.d/dcp-worker
if command -v logrotate >/dev/null; then
    logrotate --debug /etc/logrotate.d/dcp-worker >/dev/null 2>&1
fi
systemd-analyze verify --man=no /lib/systemd/system/dcp-worker.service \
    /lib/systemd/system/dcp-evaluator-manager.socket /lib/systemd/system/dcp-evaluator-manager.service
getent passwd dcp >/dev/null
test "$(stat -c %a:%U /etc/dcp-worker/identity.keystore)" = 600:dcp
test "$(stat -c %a:%U /etc/dcp-worker/passphrase)" = 600:dcp
test "$(stat -c %a:%U /var/lib/dcp-worker)" = 700:dcp
# The wheels carried resolve offline for every python3 the package accepts (3.11-3.13), not
# only for this one: postinst installs from them with no index.
for version in 3.11 3.12 3.13; do
    /opt/dcp-worker/venv/bin/python -m pip download --quiet --disable-pip-version-check \
        --no-index --find-links /usr/share/dcp-worker/wheels --only-binary=:all: \
        --python-version "$version" --implementation cp --abi "cp$(echo "$version" | tr -d .)" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$(mktemp -d)" dcp-worker >/dev/null
done

WORK=$(mktemp -d)
trap 'kill $SCHED $WORKER 2>/dev/null || true; rm -rf "$WORK"' EXIT
chmod 755 "$WORK"
PORT=18765
dcp-scheduler serve --db "$WORK/s.db" --listen 127.0.0.1:$PORT >"$WORK/scheduler.log" 2>&1 &
SCHED=$!
printf 'owner\n' > "$WORK/pw"
OWNER=$(dcp-wallet create --out "$WORK/owner.json" --passphrase-file "$WORK/pw" --kdf-iterations 1024)
for _ in $(seq 100); do grep -q listening "$WORK/scheduler.log" && break; sleep 0.1; done
dcp-scheduler bank mint --db "$WORK/s.db" "$OWNER" 10 >/dev/null

# The service's settings (/etc/dcp-worker/dcp-worker.toml and the unit's environment), as dcp.
install -d -o dcp -g dcp -m 0700 "$WORK/state"
setpriv --reuid dcp --regid dcp --init-groups \
    env HOME=/var/lib/dcp-worker DCP_WORKER_STATE_DIR="$WORK/state" \
    dcp-worker --scheduler http://127.0.0.1:$PORT -o console -v --sandboxes 2 >"$WORK/worker.log" 2>&1 &
WORKER=$!
cat > "$WORK/job.toml" <<JOB
name = "smoke"
module = "$ROOT/examples/echo/echo.wasm"
offer = 0.01
[inputs]
values = ["one", "two", "three", "four"]
JOB
JOB=$(dcp-compute --scheduler http://127.0.0.1:$PORT deploy --identity "$WORK/owner.json" \
    --passphrase-file "$WORK/pw" "$WORK/job.toml")
timeout 120 dcp-compute --scheduler http://127.0.0.1:$PORT results --wait "$JOB" \
    --identity "$WORK/owner.json" --passphrase-file "$WORK/pw" > "$WORK/results"
DONE=$(grep -c '"state": "done"' "$WORK/results" || true)
setpriv --reuid dcp --regid dcp --init-groups dcp-worker status --socket "$WORK/state/control.sock"
kill -TERM $WORKER  # (a background job of sh ignores SIGINT; TERM is the same graceful stop)
RC=0
wait $WORKER || RC=$?
if [ "$RC" != 0 ]; then
    tail -20 "$WORK/worker.log" >&2
    echo "smoke test: the worker exited $RC after SIGTERM" >&2
    exit 1
fi
if [ "$DONE" != 4 ]; then
    cat "$WORK/results" "$WORK/worker.log" >&2
    echo "smoke test: $DONE of 4 slices done" >&2
    exit 1
fi
echo "smoke test: the installed worker completed 4/4 slices as user dcp"
