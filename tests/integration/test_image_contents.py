"""What the image gets: the wheel the Dockerfile builds, from exactly what it copies, holds the
serving path and none of the lab, and needs no dependency of the lab."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVING_MODULES = ["rinha.__main__", "rinha.supervisor", "rinha.intake", "rinha.dispatcher",
                   "rinha.peers", "rinha.resources", "rinha.body_route", "rinha.listening"]


def test_the_wheel_built_from_the_docker_context_holds_only_the_serving_path(tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):  # the Dockerfile's COPY lines
        shutil.copy(REPO / name, context / name)
    for package in ("native_ledger", "rinha"):
        shutil.copytree(REPO / package, context / package,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path / "wheels"), str(context)], check=True, timeout=300)
    [wheel] = (tmp_path / "wheels").glob("rinha-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("rinha/dispatcher.py") for n in names)
    assert any(n.startswith("native_ledger/_intake") and n.endswith(".so") for n in names)
    assert not any(n.startswith("rinha_lab/") for n in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any("yaml" in line.lower() for line in requires), requires


def test_the_serving_path_imports_nothing_of_the_lab():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in SERVING_MODULES)
            + "print(sorted(m for m in sys.modules if m.startswith(('rinha_lab', 'yaml'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"
