#!/usr/bin/env bash
# Proves the README's two commands on a bare Debian 12: makes a fresh root with debootstrap
# (bookworm, variant minbase: no python3, gcc, nginx, git or curl), clones this repository's
# committed HEAD into /root/rinha there, and runs in it, exactly as the README writes them:
#   1. ./scripts/setup.sh && .venv/bin/rinha stack
#      until it prints "ready"; then `curl localhost:9999/payments-summary`, a POST /payments and
#      the summary again (the payment counted); then SIGTERM: the stack must exit by itself,
#      leaving port 9999 free;
#   2. ./scripts/setup.sh twice in a row: the second run must change nothing (no file newer in
#      .venv, dpkg's database or /etc) and take a few seconds at most;
#   3. ./scripts/setup.sh && .venv/bin/tox -e lint,tests,sanitizers: it must pass.
# Each runs in a chroot with its own mount, IPC and PID namespaces (unshare): /proc, /sys, /dev and
# a private /dev/shm are mounted inside, fs.mqueue.msg_max starts at Linux's default 10 (a new IPC
# namespace, like a fresh boot), and nothing it starts outlives it. The network is the host's (apt
# and pip need it), so port 9999 and the tests' ports must be free on the host while it runs.
# Only what a real Debian 12 has and debootstrap leaves out is added to the root: /etc/hosts,
# bookworm-updates and bookworm-security in sources.list, and /usr/sbin/policy-rc.d saying "do
# not start services" (as in Debian's container images: the nginx and redis-server services would
# otherwise start on the host's network). If the host's pip trusts an extra CA ($PIP_CERT: a
# TLS-intercepting egress proxy), that bundle is copied in and passed as PIP_CERT.
#
# Caveat: the kernel counts RLIMIT_MSGQUEUE per uid, not per namespace, so the tests in the root
# share root's queue budget with the host: run it while no other rinha test suite or stack runs
# on the host (it prints how many queues root can still create, and again after a failure).
#
# Not part of CI. As root, on Debian (installs debootstrap on the host if missing):
#   scripts/check-bare-debian.sh [ROOT]      ROOT defaults to /tmp/rinha-bare-debian, made anew
# and kept afterwards for inspection (logs in ROOT/check-*.log). MIRROR overrides
# http://deb.debian.org/debian. Takes about 4 minutes on 2 vCPUs (measured: 4 min 4 s): debootstrap
# 25-40 s, the first set-up ~30-50 s (Debian packages, then the venv), the test command ~3 min.
set -euo pipefail

ROOT=$(realpath -m "${1:-/tmp/rinha-bare-debian}")
MIRROR=${MIRROR:-http://deb.debian.org/debian}
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
PRODUCT='./scripts/setup.sh && .venv/bin/rinha stack'
TESTS='./scripts/setup.sh && .venv/bin/tox -e lint,tests,sanitizers'

say() { echo "[check-bare-debian $(date +%T)] $*"; }
die() { say "FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
case "$ROOT" in /|/tmp|/root|/work*) die "refusing ROOT=$ROOT" ;; esac

mounted_under_root() { grep -q " $ROOT/" /proc/self/mounts; }

# --- the root ------------------------------------------------------------------------------------
command -v debootstrap >/dev/null || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
if [ -e "$ROOT" ]; then
    mounted_under_root && die "something is mounted under $ROOT: unmount it first"
    rm -rf "$ROOT"
fi
started=$SECONDS
say "debootstrap bookworm (minbase) into $ROOT"
debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" > "$ROOT.debootstrap.log" 2>&1 ||
    die "debootstrap failed: see $ROOT.debootstrap.log"
mv "$ROOT.debootstrap.log" "$ROOT/check-debootstrap.log"
cat > "$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d" && chmod +x "$ROOT/usr/sbin/policy-rc.d"
env_extra=()
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    cp "$PIP_CERT" "$ROOT/etc/host-egress-ca.pem"
    env_extra=(PIP_CERT=/etc/host-egress-ca.pem)
fi
git clone -q "$REPO" "$ROOT/root/rinha"
clone=$ROOT/root/rinha
grep -qF -- "$PRODUCT" "$clone/README.md" || die "the committed README.md lacks: $PRODUCT"
grep -qF -- "$TESTS" "$clone/README.md" || die "the committed README.md lacks: $TESTS"
grep -qF -- "$TESTS" "$clone/.ci/run" || die "the committed .ci/run does not run: $TESTS"
say "root ready in $((SECONDS - started)) s: Debian $(cat "$ROOT/etc/debian_version"), rinha" \
    "$(git -C "$ROOT/root/rinha" log -1 --format='%h %s' | cut -c1-70)"
for tool in python3 gcc nginx git; do
    [ ! -e "$ROOT/usr/bin/$tool" ] && [ ! -e "$ROOT/usr/sbin/$tool" ] || die "$tool is already in the bare root"
done

# in_root COMMAND: bash -c COMMAND as root in /root/rinha inside ROOT, in new namespaces.
in_root() {
    unshare --mount --ipc --pid --fork --kill-child --propagation private sh -ec '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount --rbind /sys "$root/sys"    # with the cgroup hierarchies (rinha stack --limits)
        mount --rbind /dev "$root/dev"
        mount -t tmpfs -o mode=1777 shm "$root/dev/shm"
        exec chroot "$root" "$@"' sh "$ROOT" \
        /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        "${env_extra[@]}" /bin/bash -c "cd /root/rinha && $1"
}

descendants() {  # every process below PID
    local child
    for child in $(ps -o pid= --ppid "$1"); do echo "$child"; descendants "$child"; done
}
port_free() { ! (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

# The message-queue byte budget (RLIMIT_MSGQUEUE, 819200 B: about 6 queues of 1000 x 24 B) is
# counted per uid across every IPC namespace: the root's tests share root's budget with every
# queue root holds on the host (other test runs, queues left behind), and where CAP_SYS_RESOURCE
# is missing (gVisor here) the limit cannot be raised. So the check says how much is free.
queues_free() {  # how many more queues of 1000 x 24 B root can create now
    python3 - <<'PY' 2>/dev/null || echo "?"
import ctypes, os
rt = ctypes.CDLL("librt.so.1", use_errno=True)
class Attr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long),
                ("curmsgs", ctypes.c_long), ("reserved", ctypes.c_long * 4)]
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Attr)]
names = []
while len(names) < 100:
    name = f"/check-bare-debian-{os.getpid()}-{len(names)}".encode()
    if rt.mq_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600, Attr(0, 1000, 24, 0)) < 0:
        break
    names.append(name)
for name in names:
    rt.mq_unlink(name)
print(len(names))
PY
}

runner=
cleanup() { [ -n "$runner" ] && kill "$runner" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# --- 1. the product command ----------------------------------------------------------------------
port_free 9999 || die "port 9999 is taken on this host"
log=$ROOT/check-product.log
say "1. $PRODUCT"
started=$SECONDS
in_root "$PRODUCT" > "$log" 2>&1 &
runner=$!
until grep -qx ready "$log"; do
    kill -0 "$runner" 2>/dev/null || { cat "$log"; die "the product command exited before ready"; }
    [ $((SECONDS - started)) -lt 1200 ] || { cat "$log"; die "no ready after 20 min"; }
    sleep 1
done
say "   ready after $((SECONDS - started)) s (set-up included); the stack says:"
sed -n '/rinha set-up done/,$p' "$log" | sed 's/^/     | /'
summary=$(curl -fsS localhost:9999/payments-summary) || die "GET /payments-summary failed"
say "   GET /payments-summary -> $summary"
code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST localhost:9999/payments \
       -H 'Content-Type: application/json' \
       -d '{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 19.90}')
say "   POST /payments -> $code"
[ "$code" = 202 ] || die "POST /payments answered $code"
for _ in $(seq 50); do
    summary=$(curl -fsS localhost:9999/payments-summary)
    case "$summary" in *'"totalRequests":1'*) break ;; esac
    sleep 0.1
done
say "   GET /payments-summary -> $summary"
case "$summary" in *'"totalRequests":1'*) ;; *) die "the payment was not counted" ;; esac
stack_pid=
for pid in $(descendants "$runner"); do
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'bin/rinha stack $'; then
        stack_pid=$pid
    fi
done
[ -n "$stack_pid" ] || die "no rinha stack process found below $runner"
say "   SIGTERM to rinha stack (pid $stack_pid on the host)"
kill -TERM "$stack_pid"
stopped=$SECONDS
while kill -0 "$runner" 2>/dev/null && [ $((SECONDS - stopped)) -lt 30 ]; do sleep 0.2; done
kill -0 "$runner" 2>/dev/null && die "rinha stack still running 30 s after SIGTERM"
wait "$runner" && status=0 || status=$?
runner=
say "   stopped in $((SECONDS - stopped)) s, exit status $status; last lines:"
tail -n 3 "$log" | sed 's/^/     | /'
port_free 9999 || die "port 9999 still taken after the stack stopped"

# --- 2. set-up again: idempotent -----------------------------------------------------------------
log=$ROOT/check-setup-twice.log
say "2. ./scripts/setup.sh twice: the second run must change nothing"
in_root './scripts/setup.sh >/dev/null && touch /tmp/check-marker && sleep 1.1 \
    && TIMEFORMAT="second run: %R s" && time ./scripts/setup.sh \
    && echo "changed:" && find .venv /var/lib/dpkg /etc -newer /tmp/check-marker -print' \
    > "$log" 2>&1 || { cat "$log"; die "setup.sh failed"; }
sed 's/^/     | /' "$log"
[ "$(sed -n '/^changed:$/,$p' "$log" | wc -l)" = 1 ] || die "the second set-up changed files"

# --- 3. the test command -------------------------------------------------------------------------
log=$ROOT/check-tests.log
say "3. $TESTS"
say "   root can create $(queues_free) more queues of 1000 x 24 B now (an idle uid: 6)"
started=$SECONDS
in_root "$TESTS" > "$log" 2>&1 && status=0 || status=$?
say "   exit status $status after $((SECONDS - started)) s; summary lines:"
grep -E '^([0-9]+ (passed|failed).*|=+ .*(passed|failed|error).* =+|  [a-z]+: (OK|FAIL).*|  congratulations.*|  evaluation failed.*)' \
    "$log" | sed 's/^/     | /'
[ "$status" = 0 ] || die "the test command failed: see $log (root can create $(queues_free)" \
    "more queues of 1000 x 24 B now; EMFILE in the log means root's queue budget ran out)"
say "all three passed on a bare Debian $(cat "$ROOT/etc/debian_version") ($ROOT kept)"
