"""The local lab: everything that runs rinha without Docker, and nothing a container runs.

`rinha processor` (emulator.py: a payment processor faithful to docs/contest.md), `rinha stack`
(stack.py: the compose topology as local processes, nginx rendered from the same nginx.conf by
nginx_conf.py, the contest limits read from docker-compose.yml by compose_limits.py and held
with cgroups by cgroups.py), and launcher.py, the one way the stack, the tests and the
benchmarks start and stop processes. Installed with the `lab` extra; the image has none of it.
"""
