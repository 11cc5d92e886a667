"""`rinha status`: the /status of several instances side by side, for an operator's terminal.

Runs in its own short-lived process. Through nginx, GET /status reaches one instance at a time,
so this asks each instance on its own address: the ones given, or those a `rinha stack` run
directory's stack.json lists, or the local stack's defaults (127.0.0.1:9001 and :9002).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URLS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002")

Row = tuple[str, Callable[[dict[str, Any]], object]]


def _processor(name: str) -> list[Row]:
    def health(doc: dict[str, Any]) -> object:
        h = doc["processors"][name]["health"]
        if h["polledAt"] is None:
            return "not polled here"
        return f"{'FAILING' if h['failing'] else 'ok'}, min {h['minResponseTime']} ms"

    def circuit(doc: dict[str, Any]) -> object:
        c = doc["processors"][name]["circuit"]
        return f"{c['state']} ({c['consecutiveFailures']} failures)"

    return [(f"{name}: health", health), (f"{name}: circuit", circuit)]


def _recorded(region: str) -> Callable[[dict[str, Any]], object]:
    def cell(doc: dict[str, Any]) -> object:
        r = doc["recorded"][region]
        return (f"{r['default']['totalRequests']} + {r['fallback']['totalRequests']}"
                f" ({r['default']['totalAmount'] + r['fallback']['totalAmount']:.2f})")
    return cell


ROWS: list[Row] = [
    ("uptime s", lambda d: d["uptimeSeconds"]),
    *_processor("default"),
    *_processor("fallback"),
    ("queue depth", lambda d: f"{d['queue']['depth']} of {d['queue']['capacity']}"),
    ("held / in flight", lambda d: f"{d['payments']['held']} / {d['payments']['inFlight']}"),
    ("pinned / waiting", lambda d: f"{d['payments']['pinned']} / {d['payments']['waiting']}"),
    ("recorded own (def + fb)", _recorded("own")),
    ("recorded by the others (def + fb)", _recorded("mirrored")),
    ("sync", lambda d: f"{d['sync']['carrier']}: {len(d['sync']['peers'])} others heard of"
     if d["sync"] else "none"),
    ("sync last heard", lambda d: d["sync"]["lastHeard"] if d["sync"] else "-"),
    ("sync messages sent / received", lambda d: f"{d['sync']['messagesSent']} / "
     f"{d['sync']['messagesReceived']}" if d["sync"] else "-"),
    ("restarts", lambda d: ", ".join(f"{c['role']} {c['restarts']}" for c in d["children"])),
    ("accepted", lambda d: d["conservation"]["accepted"]),
    ("conservation difference", lambda d: d["conservation"]["difference"]),
]


def table(urls: list[str], documents: list[dict[str, Any] | str]) -> str:
    header = ["", *[doc["instance"] if isinstance(doc, dict) else url
                    for url, doc in zip(urls, documents, strict=True)]]
    lines = [header]
    for label, cell in ROWS:
        row = [label]
        for doc in documents:
            if isinstance(doc, str):
                row.append(doc if label == ROWS[0][0] else "")
            else:
                try:
                    row.append(str(cell(doc)))
                except (KeyError, TypeError):
                    row.append("?")
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths,
                                                                         strict=True)).rstrip()
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rinha status", description="The /status of each instance, side by side.")
    parser.add_argument("urls", nargs="*", help="instance base URLs (default: a stack's "
                        "instances, or 127.0.0.1:9001 and :9002)")
    parser.add_argument("--stack", type=Path, help="a rinha stack run directory: its "
                        "stack.json names the instances")
    parser.add_argument("--json", action="store_true", help="print the documents as JSON")
    args = parser.parse_args(argv)
    urls = list(args.urls)
    if args.stack is not None:
        described = json.loads((args.stack / "stack.json").read_text())
        urls += [entry["url"] for entry in described["instances"].values()]
    if not urls:
        urls = list(DEFAULT_URLS)
    documents: list[dict[str, Any] | str] = []
    for url in urls:
        try:
            response = httpx.get(url.rstrip("/") + "/status", timeout=2)
            response.raise_for_status()
            documents.append(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            documents.append(f"unreachable: {exc}")
    if args.json:
        print(json.dumps(documents, indent=2))
    else:
        print(table(urls, documents))
    return 0 if all(isinstance(doc, dict) for doc in documents) else 1


if __name__ == "__main__":
    sys.exit(main())
