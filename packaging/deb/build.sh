#!/bin/sh
# Build dist/dcp-worker_<version>_amd64.deb (`make deb`): the project and every dependency as
# wheels (installed offline into /opt/dcp-worker/venv by postinst), the systemd units, the
# /etc/dcp-worker configuration, the docs, and /usr/bin links to the commands.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
cd "$ROOT"
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
BUILD=$ROOT/build/deb
STAGE=$BUILD/dcp-worker_${VERSION}_amd64
rm -rf "$BUILD"
mkdir -p "$STAGE/DEBIAN" "$STAGE/usr/share/dcp-worker/wheels" "$STAGE/usr/bin" \
    "$STAGE/lib/systemd/system" "$STAGE/etc/dcp-worker/conf.d" "$STAGE/usr/share/doc/dcp-worker"

# Wheels: the project and its dependencies for the interpreter building them (3.11), then the
# compiled dependencies again for every other python3 a supported distribution ships (Debian
# 13 and Ubuntu 24.04: 3.12, 3.13), so that postinst finds its ABI's offline. systemd-python
# is not among them: the package depends on the distribution's python3-systemd, which the
# environment sees through --system-site-packages (it is built for that very interpreter).
WHEELS=$STAGE/usr/share/dcp-worker/wheels
"$PY" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$WHEELS" "$ROOT"
"$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > "$BUILD/requirements.txt"
for version in 3.12 3.13; do
    abi=cp$(echo "$version" | tr -d .)
    "$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --python-version "$version" --implementation cp --abi "$abi" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --dest "$WHEELS" -r "$BUILD/requirements.txt"
done

install -m 0644 packaging/systemd/dcp-worker.service packaging/systemd/dcp-evaluator-manager.service \
    packaging/systemd/dcp-evaluator-manager.socket "$STAGE/lib/systemd/system/"
install -m 0644 etc/dcp-worker.toml "$STAGE/etc/dcp-worker/dcp-worker.toml"
install -m 0644 dcp_worker/defaults.toml "$STAGE/usr/share/dcp-worker/defaults.toml"
install -m 0644 README.md CHANGELOG.md docs/*.md "$STAGE/usr/share/doc/dcp-worker/"
install -D -m 0644 packaging/logrotate/dcp-worker "$STAGE/etc/logrotate.d/dcp-worker"
# Man pages from each command's --help (help2man; .ci/run installs it).
if ! command -v help2man >/dev/null; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "installing help2man (for the man pages)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q help2man >/dev/null
    else
        echo "build.sh: the man pages need help2man: apt-get install help2man" >&2
        exit 1
    fi
fi
mkdir -p "$STAGE/usr/share/man/man1"
for cmd in dcp-worker:"lend this machine to a DCP scheduler" dcp-wallet:"manage DCP keystores" \
    dcp-compute:"deploy DCP jobs and read their results" dcp-scheduler:"the reference DCP scheduler" \
    dcp-evaluator-start:"one sandboxed DCP evaluator on stdin and stdout" \
    dcp-evaluator-manager:"start DCP evaluators on demand, and stop them when the machine is busy"; do
    name=${cmd%%:*}
    help2man --no-info --no-discard-stderr --version-string "$VERSION" --name "${cmd#*:}" \
        "$(dirname "$PY")/$name" | gzip -9n > "$STAGE/usr/share/man/man1/$name.1.gz"
done
for cmd in dcp-worker dcp-wallet dcp-compute dcp-scheduler dcp-evaluator-start dcp-evaluator-manager; do
    ln -s "/opt/dcp-worker/venv/bin/$cmd" "$STAGE/usr/bin/$cmd"
done

SIZE=$(du -sk "$STAGE" | cut -f1)
sed -e "s/@VERSION@/$VERSION/g" -e "s/@SIZE@/$SIZE/" packaging/deb/control.in > "$STAGE/DEBIAN/control"
install -m 0644 packaging/deb/conffiles "$STAGE/DEBIAN/conffiles"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$STAGE/DEBIAN/"

mkdir -p dist
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "dist/dcp-worker_${VERSION}_amd64.deb" >/dev/null
echo "dist/dcp-worker_${VERSION}_amd64.deb"

# dcp-worker-pocl: OpenCL on the CPU, optional (58 MB that a machine with a GPU driver, or one
# that lends only WebAssembly, need not download). Its wheel is pure of Python ABI.
POCL=$BUILD/dcp-worker-pocl_${VERSION}_amd64
mkdir -p "$POCL/DEBIAN" "$POCL/usr/share/dcp-worker/pocl-wheels"
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
    --dest "$POCL/usr/share/dcp-worker/pocl-wheels" \
    "$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["pocl"][0])')"
SIZE=$(du -sk "$POCL" | cut -f1)
sed -e "s/@VERSION@/$VERSION/g" -e "s/@SIZE@/$SIZE/" packaging/deb/pocl/control.in > "$POCL/DEBIAN/control"
install -m 0755 packaging/deb/pocl/postinst packaging/deb/pocl/prerm "$POCL/DEBIAN/"
dpkg-deb --root-owner-group -Zxz --build "$POCL" "dist/dcp-worker-pocl_${VERSION}_amd64.deb" >/dev/null
echo "dist/dcp-worker-pocl_${VERSION}_amd64.deb"
