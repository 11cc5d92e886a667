"""Listening on a TCP port through uWS's C API, with the host string kept alive.

Runs in each worker. socketify 0.0.31's `App.listen(AppListenOptions(host=...))` stores a
temporary `ffi.new("char[]", host)` into the listen config's `host` field: cffi frees that
buffer as soon as the expression ends, so uSockets reads freed memory as the host name. Whether
that memory still holds the name depends on what Python allocated in between (the working
directory's length was enough to change it), and when it does not, getaddrinfo fails and the
worker reports "cannot listen" without ever creating its socket. Here the buffer lives until
uWS has answered.
"""

from __future__ import annotations

from typing import Any

from socketify.native import ffi, lib


def listen(app: Any, host: str, port: int) -> bool:
    """Listen on host:port (SO_REUSEPORT, as uSockets always does); True if it listens."""
    host_buffer = ffi.new("char[]", host.encode())  # owned here, for the whole call
    config = ffi.new("uws_app_listen_config_t *")
    config.port = port
    config.host = host_buffer
    config.options = 0
    listening: list[bool] = []
    handle = ffi.new_handle(listening)
    lib.uws_app_listen_with_config(app.SSL, app.app, config[0], _on_listen, handle)
    return bool(listening)


@ffi.callback("void(struct us_listen_socket_t*, uws_app_listen_config_t, void*)")
def _on_listen(listen_socket: Any, config: Any, user_data: Any) -> None:
    # uWS calls back before uws_app_listen_with_config returns, with NULL on failure.
    ffi.from_handle(user_data).append(listen_socket != ffi.NULL)
