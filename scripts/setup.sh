#!/usr/bin/env bash
# One-time set-up of a Debian machine (as root) for rinha's local stack, tests and benchmark:
# system packages, the POSIX queue size, and the project itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

# nginx is the load balancer of the local stack; libuv1 is what socketify's binary links to.
apt-get update -qq
apt-get install -y -qq --no-install-recommends nginx libuv1 zlib1g >/dev/null

# rinha serve creates a queue of QUEUE_MAX_MESSAGES (default 1000) messages; Linux allows
# fs.mqueue.msg_max (default 10) per queue. docker-compose.yml sets it per container; here the
# machine's value must be raised once (it resets at reboot).
wanted=1000
current=$(cat /proc/sys/fs/mqueue/msg_max)
if [ "$current" -lt "$wanted" ]; then
    echo "$wanted" > /proc/sys/fs/mqueue/msg_max
fi

python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet tox -e ".[test]"
echo "rinha set-up done: nginx $(nginx -v 2>&1 | cut -d/ -f2), fs.mqueue.msg_max=$(cat /proc/sys/fs/mqueue/msg_max)"
