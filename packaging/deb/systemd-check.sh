#!/bin/sh
# The .deb under a real systemd (`make systemd-check`; run by .ci/run as root after the suite).
#
# A Debian tree from Debian's packages (debootstrap minbase with systemd) boots
# /lib/systemd/systemd as PID 1 of a new PID and mount namespace; the package is installed in
# it, and the units are tried as a volunteer's machine runs them:
#   * dcp-worker reaches `active` only after READY=1 (it is `activating` while no scheduler
#     answers, and `active` once one does);
#   * the evaluator manager is started by its socket on the worker's first connection;
#   * a job's slices run, and the journal entries carry the DCP_* fields;
#   * a worker killed with SIGKILL is restarted (Restart=on-failure);
#   * a hung worker (SIGSTOP) is killed by the watchdog (WatchdogSec=30) and restarted;
#   * `systemctl stop` ends it within its grace with every finished result delivered.
#
# The tree is bind-mounted on itself before the chroot, as a container's root is a mount
# point: systemd moves each unit's new root onto / (MS_MOVE), which fails with EINVAL when /
# is not a mount point (a plain chroot): that was the 226/NAMESPACE failure, not a directive.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
DEB=$(ls "$ROOT"/dist/dcp-worker_*_amd64.deb)
PORT=${PORT:-18561}
WORK=$(mktemp -d /tmp/dcp-systemd.XXXXXX)
TREE=$WORK/tree
PID1=""

cleanup() {
    if [ -n "$PID1" ]; then kill -9 "$PID1" 2>/dev/null || true; fi
    if [ -n "${SCHED:-}" ]; then kill "$SCHED" 2>/dev/null || true; fi
    sleep 1
    rm -rf "$WORK"
}
trap cleanup EXIT

in_tree() { nsenter -t "$PID1" -m -p -r -w "$@"; }
fail() { echo "systemd check FAILED: $*" >&2; in_tree journalctl --no-pager -n 40 >&2 || true; exit 1; }
# wait_until SECONDS COMMAND...: poll a condition, never a fixed sleep for its own sake.
wait_until() {
    limit=$1; shift
    i=0
    while ! "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -le $((limit * 5)) ] || return 1
        sleep 0.2
    done
}
state() { in_tree systemctl show -P ActiveState "$1"; }
is_state() { [ "$(state "$1")" = "$2" ]; }
restarts() { in_tree systemctl show -P NRestarts dcp-worker.service; }

command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
echo "systemd check: building a Debian tree (debootstrap)"
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,python3-venv,python3-systemd \
    bookworm "$TREE" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
cp /etc/resolv.conf "$TREE/etc/resolv.conf"
cp "$DEB" "$TREE/tmp/dcp-worker.deb"
mount -t proc proc "$TREE/proc"
chroot "$TREE" sh -c 'DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/dcp-worker.deb' \
    >"$WORK/install.log" 2>&1 || { umount "$TREE/proc"; tail -20 "$WORK/install.log" >&2; exit 1; }
umount "$TREE/proc"
# This machine's settings: the test scheduler, and a manager that does not hold work because
# the machine running the check is busy (its load is not the volunteer's).
sed -i "s|^scheduler = .*|scheduler = \"http://127.0.0.1:$PORT\"|" "$TREE/etc/dcp-worker/dcp-worker.toml"
# Debug logs, so that every slice's entry (with DCP_JOB and DCP_SLICE) reaches the journal.
mkdir -p "$TREE/etc/systemd/system/dcp-worker.service.d"
cat >"$TREE/etc/systemd/system/dcp-worker.service.d/verbose.conf" <<EOF
[Service]
ExecStart=
ExecStart=/usr/bin/dcp-worker -vv
EOF
mkdir -p "$TREE/etc/systemd/system/dcp-evaluator-manager.service.d"
cat >"$TREE/etc/systemd/system/dcp-evaluator-manager.service.d/load.conf" <<EOF
[Service]
ExecStart=
ExecStart=/usr/bin/dcp-evaluator-manager serve --no-tcp --group dcp --user nobody --max-load 1000
EOF

cat >"$WORK/boot.sh" <<EOF
#!/bin/sh
set -e
mount --make-rprivate /
mount --bind "$TREE" "$TREE"
mount -t proc proc "$TREE/proc"
mount --rbind /sys "$TREE/sys"
mount --rbind /dev "$TREE/dev"
mount -t tmpfs tmpfs "$TREE/run"
cd "$TREE"
exec chroot . /lib/systemd/systemd --system
EOF
chmod +x "$WORK/boot.sh"
unshare --pid --fork --mount "$WORK/boot.sh" >"$WORK/systemd.log" 2>&1 &
find_pid1() { PID1=$(pgrep -f "^/lib/systemd/systemd --system" | while read -r p; do
    [ "$(readlink "/proc/$p/root")" = "$TREE" ] && echo "$p"; done | head -1); [ -n "$PID1" ]; }
wait_until 30 find_pid1 || { cat "$WORK/systemd.log" >&2; exit 1; }
# (not is-system-running --wait: boot waits for dcp-worker's start, which waits for a scheduler)
wait_until 60 is_state basic.target active || fail "the tree's systemd did not reach basic.target"
echo "systemd check: systemd is PID 1 of the tree ($PID1)"

# 1. No scheduler yet: the worker must not be `active` (READY=1 comes once connected).
wait_until 60 is_state dcp-worker.service activating || fail "dcp-worker is $(state dcp-worker.service), not activating"
in_tree sleep 3  # a READY=1 sent too early would show now
is_state dcp-worker.service activating || fail "dcp-worker became $(state dcp-worker.service) with no scheduler"

# 2. A scheduler answers: active; the manager was started by its socket.
"$PY" -m scheduler serve --db "$WORK/s.db" --listen "127.0.0.1:$PORT" >"$WORK/scheduler.log" 2>&1 &
SCHED=$!
wait_until 90 is_state dcp-worker.service active || fail "dcp-worker did not become active"
echo "systemd check: active after READY=1"

# 3. A job: its slices run through the socket-activated manager; the journal has DCP_ fields.
printf 'owner\n' >"$WORK/pw"
OWNER=$("$ROOT/.venv/bin/dcp-wallet" create --out "$WORK/owner.json" --passphrase-file "$WORK/pw" --kdf-iterations 1024)
"$PY" -m scheduler bank mint --db "$WORK/s.db" "$OWNER" 10 >/dev/null
cat >"$WORK/job.toml" <<EOF
name = "systemd-check"
module = "$ROOT/examples/echo/echo.wasm"
offer = 0.01
[inputs]
values = ["one", "two", "three", "four", "five", "six"]
EOF
COMPUTE="$ROOT/.venv/bin/dcp-compute --scheduler http://127.0.0.1:$PORT"
JOB=$($COMPUTE deploy --identity "$WORK/owner.json" --passphrase-file "$WORK/pw" "$WORK/job.toml")
$COMPUTE results --wait --timeout 180 --identity "$WORK/owner.json" --passphrase-file "$WORK/pw" \
    "$JOB" >"$WORK/results.txt" 2>&1 || fail "the job did not finish: $(tail -3 "$WORK/results.txt")"
[ "$(wc -l <"$WORK/results.txt")" -ge 6 ] || fail "$(wc -l <"$WORK/results.txt") results of 6"
is_state dcp-evaluator-manager.service active || fail "the manager was not socket-activated"
in_tree journalctl -u dcp-worker.service -o json --no-pager | grep -q '"DCP_JOB"' ||
    fail "no journal entry with DCP_JOB"
echo "systemd check: a job ran through the socket-activated manager; the journal has DCP_JOB"

# 4. SIGKILL: restarted.
before=$(restarts)
in_tree systemctl kill --signal=SIGKILL dcp-worker.service
wait_until 60 sh -c "[ \"\$(nsenter -t $PID1 -m -p -r -w systemctl show -P NRestarts dcp-worker.service)\" -gt $before ]" ||
    fail "a killed worker was not restarted"
wait_until 90 is_state dcp-worker.service active || fail "the restarted worker did not become active"
echo "systemd check: a killed worker was restarted"

# 5. Hung (SIGSTOP): the watchdog kills it, and it is restarted.
before=$(restarts)
in_tree systemctl kill --signal=SIGSTOP dcp-worker.service
wait_until 120 sh -c "[ \"\$(nsenter -t $PID1 -m -p -r -w systemctl show -P NRestarts dcp-worker.service)\" -gt $before ]" ||
    fail "the watchdog did not restart a hung worker"
in_tree journalctl -u dcp-worker.service --no-pager | grep -qi watchdog || fail "no watchdog entry in the journal"
wait_until 90 is_state dcp-worker.service active || fail "the worker did not come back after the watchdog"
echo "systemd check: the watchdog restarted a hung worker"

# 6. systemctl stop: within the grace, exit 0, nothing left in the outbox.
start=$(date +%s)
in_tree systemctl stop dcp-worker.service
took=$(($(date +%s) - start))
[ "$took" -le 45 ] || fail "stopping took $took s"
[ "$(in_tree systemctl show -P ExecMainStatus dcp-worker.service)" = 0 ] || fail "the worker did not exit 0"
in_tree journalctl -u dcp-worker.service --no-pager | grep "stopped:" | tail -1 | grep -q "0 in the outbox" ||
    fail "results were left in the outbox"
echo "systemd check: systemctl stop took $took s, every result delivered"
echo "systemd check: passed"
