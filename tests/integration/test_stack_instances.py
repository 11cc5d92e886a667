"""`rinha stack --instances 3`: three instances peered with each other behind one nginx."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx

from tests.integration.test_stack import stop, wait_ready
from tests.processes import free_port, post_payments, wait_until


def test_three_instances_balanced_peered_and_agreeing(tmp_path):
    ports = [free_port() for _ in range(6)]
    sync = [free_port(socket.SOCK_DGRAM) for _ in range(3)]
    stack = subprocess.Popen(
        [sys.executable, "-m", "rinha", "stack", "--instances", "3", "--run-dir", str(tmp_path),
         "--port", str(ports[0]), "--api-ports", ",".join(map(str, ports[1:4])),
         "--processor-ports", f"{ports[4]},{ports[5]}",
         "--sync-ports", ",".join(map(str, sync)),
         "--instance-prefix", f"test{os.getpid()}-{ports[0]}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        wait_ready(stack)
        description = json.loads((tmp_path / "stack.json").read_text())
        instances = description["instances"]
        assert sorted(instances) == ["api1", "api2", "api3"]
        conf = (tmp_path / "nginx.conf").read_text()
        assert [f"127.0.0.1:{p}" in conf for p in ports[1:4]] == [True] * 3
        url = f"http://127.0.0.1:{ports[0]}"
        assert post_payments(url, 300, concurrency=24).count(202) == 300
        processor = f"http://127.0.0.1:{ports[4]}/admin/payments-summary"

        def processed() -> int:
            return httpx.get(processor, headers={"X-Rinha-Token": "123"}).json()["totalRequests"]

        wait_until(lambda: processed() == 300, 30)
        summaries = [instances[name]["url"] + "/payments-summary" for name in sorted(instances)]
        wait_until(lambda: all(httpx.get(s).json()["default"]["totalRequests"] == 300
                               for s in summaries), 5)
        statuses = [httpx.get(instances[n]["url"] + "/status").json() for n in sorted(instances)]
        # Each was given a share by nginx, each mirrors the two others, only api1 polls.
        assert all(s["recorded"]["own"]["default"]["totalRequests"] > 0 for s in statuses)
        assert all(len(s["sync"]["peers"]) == 2 for s in statuses)
        assert [s["sync"]["to"] for s in statuses] == [
            [f"127.0.0.1:{p}" for p in sync if p != mine] for mine in sync]
    finally:
        stop(stack)
