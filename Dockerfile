# The rinha API image: one `rinha serve` per container (supervisor, socketify workers,
# dispatcher). Two stages: the builder compiles native_ledger (C) and turns the project and
# every dependency into wheels; the runtime stage installs those wheels offline, without a
# compiler.
#
# linux/amd64 is a contest rule, and socketify ships only a linux-amd64 libsocketify.so.

# hadolint ignore=DL3029
FROM --platform=linux/amd64 python:3.11-slim-bookworm AS builder

# gcc and libc6-dev build native_ledger/_ledger.c (the Python headers come with the image).
# Unpinned: the Debian release (bookworm) pins the toolchain; a point-release pin would break
# the build on every security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Exactly what the serving path needs to build: the metadata, its readme, and its two packages.
# The lab (rinha_lab: emulator, stack) is not copied, so the wheel cannot contain it
# (tests/unit/test_dockerfile.py checks the list, tests/integration/test_image_contents.py
# builds the wheel from these alone).
COPY pyproject.toml README.md ./
COPY native_ledger ./native_ledger
COPY rinha ./rinha

# One wheel for the project and one for each dependency pyproject.toml declares, resolved from
# pyproject.toml itself, so the image can never miss a dependency the project added.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .


# hadolint ignore=DL3029
FROM --platform=linux/amd64 python:3.11-slim-bookworm

# socketify loads the system libuv.so.1 and zlib at import time.
# Unpinned for the same reason as in the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libuv1 zlib1g \
    && rm -rf /var/lib/apt/lists/*

# Install the project wheel offline: --no-index makes a dependency without a wheel in /wheels
# fail the build instead of being fetched or skipped. The bind mount keeps the wheels out of
# every layer of the final image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/rinha-*.whl

# Not root: POSIX message queues and /dev/shm segments need no privilege (the queue's size comes
# from the compose file's sysctls and ulimits). Numeric, so a runtime can verify it is not 0.
RUN groupadd --system --gid 10001 rinha \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin rinha
USER 10001:10001

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

EXPOSE 8080
ENTRYPOINT ["rinha"]
CMD ["serve"]
