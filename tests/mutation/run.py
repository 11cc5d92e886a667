"""Mutation testing of the serving path's decision modules with cosmic-ray, on a copy of the tree.

`tox -e mutation` runs this (tests/mutation/README.md). Never touches the tree it copies: the
copy is made in WORK_DIR (a temporary directory by default), the C extensions are built in
place there, and every test command runs there with PYTHONPATH at the copy, so the `rinha serve`
processes the integration tests start import the mutated module too.

    python tests/mutation/run.py [--rev REV] [--work-dir DIR] [--no-listed] [MODULE ...]

MODULE: a config name under tests/mutation/configs (routing, dispatcher, ...); none: all.
--rev REV: mutate the files committed at REV instead of the working tree (the working tree's
untracked files, such as tests not committed yet, come along).
At the end: per module, mutants, killed, survived (each with its place and mutation), skipped,
time; then the listed mutations (listed.toml), each of which must be killed (exit 1 if not).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CONFIGS = Path("tests/mutation/configs")
LISTED = Path("tests/mutation/listed.toml")
IGNORED = shutil.ignore_patterns("*.so", ".*", "__pycache__", "build", "*.egg-info", "benchmarks")


@dataclass
class Survivor:
    place: str  # rinha/x.py:LINE:COL (function)
    operator: str
    change: str  # the mutated line, before -> after


@dataclass
class ModuleResult:
    name: str
    mutants: int = 0
    killed: int = 0
    timeouts: int = 0
    incompetent: int = 0
    skipped: int = 0
    seconds: float = 0.0
    baseline_s: float = 0.0
    error: str | None = None
    survivors: list[Survivor] = field(default_factory=list)


def log(message: str) -> None:
    print(f"[mutation {time.strftime('%H:%M:%S')}] {message}", flush=True)


def copy_tree(dest: Path, rev: str | None) -> None:
    if rev is None:
        shutil.copytree(ROOT, dest, ignore=IGNORED, dirs_exist_ok=True)
        return
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    untracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--others", "--exclude-standard", "-z"],
        check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, untracked):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def build_in_place(src: Path, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-c", "from setuptools import setup; "
                    "setup(script_args=['-q', 'build_ext', '--inplace', '--force'])"],
                   cwd=src, env=env, check=True, stdout=subprocess.DEVNULL)


def run_command(command: str, src: Path, env: dict[str, str], timeout: float
                ) -> tuple[bool | None, str, float]:
    """(passed, output, seconds); passed None: timed out (the process group is killed)."""
    started = time.monotonic()
    process = subprocess.Popen(shlex.split(command), cwd=src, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        return None, output.decode(errors="replace"), time.monotonic() - started
    return process.returncode == 0, output.decode(errors="replace"), time.monotonic() - started


def first_failure(output: str) -> str:
    """The first failed test named in pytest's short summary (-ra), or what is known."""
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if match:
        return match.group(1)
    return "timeout" if output == "timeout" else "the test command failed"


def changed_line(diff: str | None) -> str:
    if not diff:
        return ""
    before = [line[1:].strip() for line in diff.splitlines()
              if line.startswith("-") and not line.startswith("---")]
    after = [line[1:].strip() for line in diff.splitlines()
             if line.startswith("+") and not line.startswith("+++")]
    return f"{' / '.join(before)}  ->  {' / '.join(after)}"


def mutate_module(name: str, src: Path, work: Path, env: dict[str, str]) -> ModuleResult:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    result = ModuleResult(name)
    config_path = src / CONFIGS / f"{name}.toml"
    config = tomllib.loads(config_path.read_text())["cosmic-ray"]
    started = time.monotonic()
    log(f"{name}: baseline ({config['test-command']})")
    passed, output, result.baseline_s = run_command(config["test-command"], src, env, 900)
    if not passed:  # once more: other suites on the machine can exhaust the queue budget
        log(f"{name}: baseline failed ({first_failure(output)}); once more")
        passed, output, result.baseline_s = run_command(config["test-command"], src, env, 900)
    if not passed:
        result.error = f"baseline failed: {first_failure(output)}"
        log(f"{name}: {result.error}\n{output[-3000:]}")
        result.seconds = time.monotonic() - started
        return result
    # Room for a loaded machine; a mutant that hangs past it counts as killed.
    timeout = max(float(config.get("timeout", 0)), 3 * result.baseline_s + 20)
    effective = work / f"{name}.toml"
    effective.write_text(re.sub(r"(?m)^timeout\s*=.*$", f"timeout = {timeout:.0f}",
                                config_path.read_text()))
    session = work / f"{name}.sqlite"
    cosmic_ray = [sys.executable, "-m", "cosmic_ray.cli"]
    subprocess.run([*cosmic_ray, "init", str(effective), str(session), "--force"], cwd=src,
                   env=env, check=True)
    subprocess.run([sys.executable, str(src / "tests/mutation/filter.py"), str(session),
                    str(effective)], cwd=src, env=env, check=True)
    with use_db(str(session), WorkDB.Mode.open) as db:
        pending = sum(1 for _ in db.pending_work_items)
        result.mutants = db.num_work_items
    log(f"{name}: {result.mutants} mutants, {pending} to run (timeout {timeout:.0f} s each, "
        f"baseline {result.baseline_s:.1f} s)")
    subprocess.run([*cosmic_ray, "exec", str(effective), str(session)], cwd=src, env=env,
                   check=True)
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, work_result in db.completed_work_items:
            mutation = item.mutations[0]
            if work_result.worker_outcome == WorkerOutcome.SKIPPED:
                result.skipped += 1
            elif work_result.worker_outcome == WorkerOutcome.NO_TEST:
                result.incompetent += 1
            elif work_result.test_outcome == TestOutcome.SURVIVED:
                line, col = mutation.start_pos
                result.survivors.append(Survivor(
                    f"{mutation.module_path}:{line}:{col} ({mutation.definition_name})",
                    mutation.operator_name.removeprefix("core/"),
                    changed_line(work_result.diff)))
            elif work_result.test_outcome == TestOutcome.INCOMPETENT:
                result.incompetent += 1
            else:
                result.killed += 1
                result.timeouts += work_result.output == "timeout"
    result.survivors.sort(key=lambda s: [int(p) if p.isdigit() else p
                                         for p in re.split(r"[:(]", s.place)])
    result.seconds = time.monotonic() - started
    return result


@dataclass
class ListedResult:
    name: str
    killed: bool
    by: str


def run_listed(src: Path, env: dict[str, str], names: list[str] | None) -> list[ListedResult]:
    """Each listed mutation (an exact text replacement), its module's test command: killed?"""
    results = []
    for entry in tomllib.loads((src / LISTED).read_text())["mutation"]:
        if names and entry["config"] not in names:
            continue
        path = src / entry["file"]
        original = path.read_text()
        if original.count(entry["find"]) != 1:
            results.append(ListedResult(entry["name"], False,
                                        f"'{entry['find']}' is not once in {entry['file']}"))
            continue
        config = tomllib.loads((src / CONFIGS / f"{entry['config']}.toml").read_text())
        command = entry.get("test-command", config["cosmic-ray"]["test-command"])
        try:
            path.write_text(original.replace(entry["find"], entry["replace"]))
            passed, output, seconds = run_command(command, src, env, 900)
        finally:
            path.write_text(original)
        by = "SURVIVED" if passed else ("timeout" if passed is None else first_failure(output))
        results.append(ListedResult(entry["name"], passed is False or passed is None, by))
        log(f"listed: {entry['name']}: {'killed by ' + by if not passed else 'SURVIVED'} "
            f"({seconds:.0f} s)")
    return results


def report(results: list[ModuleResult], listed: list[ListedResult], total_s: float) -> str:
    lines = ["", "Mutation testing (cosmic-ray), per module:", "",
             f"{'module':<12} {'mutants':>7} {'killed':>6} {'survived':>8} {'skipped':>7} "
             f"{'incompetent':>11} {'time':>8}"]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<12} {r.error}")
            continue
        lines.append(f"{r.name:<12} {r.mutants:>7} {r.killed:>6} {len(r.survivors):>8} "
                     f"{r.skipped:>7} {r.incompetent:>11} {r.seconds / 60:>6.1f} m")
    lines.append(f"total time {total_s / 60:.1f} min (killed includes timeouts: "
                 f"{sum(r.timeouts for r in results)})")
    for r in results:
        if r.survivors:
            lines += ["", f"Survivors in {r.name}:"]
            lines += [f"  {s.place} {s.operator}: {s.change}" for s in r.survivors]
    if listed:
        lines += ["", "Listed mutations (each must be killed):"]
        lines += [f"  {'killed' if x.killed else 'SURVIVED':<8} {x.name}: {x.by}" for x in listed]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="config names (default: all)")
    parser.add_argument("--rev", help="mutate the files committed at REV, not the working tree")
    parser.add_argument("--work-dir", type=Path, help="where the copy and sessions go")
    parser.add_argument("--no-listed", action="store_true", help="skip the listed mutations")
    args = parser.parse_args()
    available = sorted(p.stem for p in (ROOT / CONFIGS).glob("*.toml"))
    for name in args.modules:
        if name not in available:
            parser.error(f"no config {name!r}; known: {', '.join(available)}")
    modules = args.modules or available
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="rinha-mutation-"))
    work = work.resolve()
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    started = time.monotonic()
    log(f"copying {'the working tree' if args.rev is None else args.rev} of {ROOT} to {src}")
    copy_tree(src, args.rev)
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1",
           "RINHA_TEST_LOGS": str(work / "logs")}
    build_in_place(src, env)
    sys.path.insert(0, str(src))
    results = [mutate_module(name, src, work, env) for name in modules]
    listed = [] if args.no_listed else run_listed(src, env, args.modules or None)
    text = report(results, listed, time.monotonic() - started)
    (work / "report.txt").write_text(text + "\n")
    print(text)
    print(f"\n(report: {work / 'report.txt'}; sessions: {work}/*.sqlite, cr-report SESSION)")
    failed = any(r.error for r in results) or any(not x.killed for x in listed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
