#!/usr/bin/env bash
# Set-up of a Debian 12 machine, as root, for rinha's local stack and its tests.
#
# Machine-wide it only installs Debian packages (below) and raises fs.mqueue.msg_max; everything
# from PyPI goes into .venv in this clone: rinha in editable mode with its lab and test extras, and
# tox. The Python is python3 on PATH (or $PYTHON), 3.11 or newer: Debian 12's own /usr/bin/python3
# or another one (pyenv). Idempotent: a second run only checks, in about a second, and changes
# nothing; it reinstalls into .venv when pyproject.toml, the C sources or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup.sh: $*"; }
die() { echo "setup.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run me as root: I install Debian packages and raise fs.mqueue.msg_max"

python=${PYTHON:-python3}
check_python() {  # rinha needs 3.11 (pyproject.toml: requires-python)
    command -v "$python" >/dev/null || die "no '$python' on PATH"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || die \
        "rinha needs Python 3.11 or newer; '$python' ($(command -v "$python")) is" \
        "$("$python" -V 2>&1). Put a Python >= 3.11 first on PATH, or set PYTHON=/path/to/it."
}
# A Python that is there already is checked before anything is installed; on a bare Debian,
# python3 comes with python3-dev and python3-venv below.
if command -v "$python" >/dev/null; then check_python; fi

# Debian packages, each for:
#   gcc libc6-dev python3-dev  building native_ledger's C extensions (and tox -e sanitizers' ASan)
#   python3-venv               python3 -m venv with Debian's own python3
#   nginx                      the load balancer of rinha stack and of the tests
#   libuv1 zlib1g              what socketify's binary links to
#   redis-server               the test suite's Redis server
#   git                        tests/unit/test_docs.py lists the repository's files with git
packages=(gcc libc6-dev python3-dev python3-venv nginx libuv1 zlib1g redis-server git)
installed=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "${packages[@]}" 2>/dev/null \
            | awk '$1 == "ii" {print $2}' || true)
missing=()
for package in "${packages[@]}"; do
    grep -qx "$package" <<<"$installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
check_python

# rinha serve creates a queue of QUEUE_MAX_MESSAGES (default 1000) messages; Linux allows
# fs.mqueue.msg_max (default 10) per queue. docker-compose.yml sets it per container; here the
# machine's value must be raised once (it resets at reboot).
wanted=1000
if [ "$(cat /proc/sys/fs/mqueue/msg_max)" -lt "$wanted" ]; then
    echo "$wanted" > /proc/sys/fs/mqueue/msg_max
fi

# The project's virtual environment. One whose Python is gone (a removed pyenv version) or too
# old is made again; anything else named .venv is left alone.
venv_ok() { .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -f .venv/pyvenv.cfg ] && ! venv_ok; then
    say ".venv does not run a Python >= 3.11 any more: making it again"
    rm -rf .venv
fi
if [ ! -e .venv ]; then
    "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
[ -f .venv/pyvenv.cfg ] || die ".venv exists and is not a virtual environment: move it away"

# rinha (editable: the .so files of native_ledger are built in place) and tox, again only when
# what they are built from changed, or a C extension does not import.
stamp=.venv/rinha-setup.sha256
digest=$( { .venv/bin/python -VV; cat scripts/setup.sh pyproject.toml native_ledger/*.[ch]; } \
          | sha256sum | cut -d' ' -f1)
extensions_import() {
    .venv/bin/python - <<'EOF' 2>/dev/null
import importlib, tomllib
with open("pyproject.toml", "rb") as f:
    for module in tomllib.load(f)["tool"]["setuptools"].get("ext-modules", []):
        importlib.import_module(module["name"])
EOF
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ] || ! extensions_import; then
    say "installing rinha (editable, extras lab and test) and tox into .venv"
    .venv/bin/python -m pip install --quiet -e ".[lab,test]" tox
    echo "$digest" > "$stamp"
fi

echo "rinha set-up done: $(.venv/bin/python -V) in .venv, nginx $(nginx -v 2>&1 | cut -d/ -f2)," \
     "fs.mqueue.msg_max=$(cat /proc/sys/fs/mqueue/msg_max)"
