"""A cosmic-ray session filter: mark as skipped every mutation outside the functions a module's
config names, and every mutation inside a logging call's arguments.

Used by run.py between `cosmic-ray init` and `cosmic-ray exec`, the way cosmic-ray's own
cr-filter-pragma is used (cosmic_ray.tools.filters.filter_app):

    python tests/mutation/filter.py CONFIG SESSION

The config's table `[cosmic-ray.filters.function-filter]` takes:

    include = ["Dispatcher.recover", "Dispatcher.run / if not router.take_token(now):"]
        qualified names (Class.method, outer.inner) of the functions to mutate; with " / " and
        the first line of a statement of that function, only that statement (its whole block).
        Absent: the whole module is mutated. A name that matches nothing is an error, so a
        renamed function cannot silently leave a module untested.
    skip-logging-calls = true
        skip mutations inside `log.<level>(...)` calls, and the negation of the condition of an
        `if` whose only statements are such calls: what a log line says, or whether it is
        written, decides nothing.
    exclude-operators = ["regex", ...]
        skip the operators whose name matches (as cr-filter-operators does).

Mutations inside annotations are always skipped: every module here has
`from __future__ import annotations`, so an annotation is never evaluated and mutating one
(`int | None` -> `int & None`) cannot change anything.
"""

from __future__ import annotations

import ast
import re
import sys
from argparse import ArgumentParser, Namespace
from pathlib import Path

from cosmic_ray.config import load_config
from cosmic_ray.tools.filters.filter_app import FilterApp
from cosmic_ray.work_db import WorkDB
from cosmic_ray.work_item import WorkerOutcome, WorkResult

_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}

Span = tuple[tuple[int, int], tuple[int, int]]  # (line, col) start and end, lines 1-based


def _span(node: ast.AST) -> Span:
    return (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]


def _inside(position: tuple[int, int], span: Span) -> bool:
    return span[0] <= position < span[1]


def function_spans(tree: ast.Module) -> dict[str, ast.AST]:
    """Every function of the module by qualified name (decorators included in its span)."""
    found: dict[str, ast.AST] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found[name] = child
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def statement_span(function: ast.AST, first_line: str, lines: list[str]) -> Span | None:
    """The span of the first statement in `function` whose first source line, stripped, is
    `first_line`."""
    for node in ast.walk(function):
        if isinstance(node, ast.stmt) and node is not function:
            if lines[node.lineno - 1].strip() == first_line:
                return _span(node)
    return None


def included_spans(source: str, include: list[str]) -> list[Span]:
    tree = ast.parse(source)
    lines = source.splitlines()
    functions = function_spans(tree)
    spans = []
    for entry in include:
        name, _, statement = (part.strip() for part in entry.partition(" / "))
        if name not in functions:
            raise SystemExit(f"filter: no function {name!r} in the module (known: "
                             f"{', '.join(sorted(functions))})")
        function = functions[name]
        if statement:
            span = statement_span(function, statement, lines)
            if span is None:
                raise SystemExit(f"filter: no statement {statement!r} in {name}")
            spans.append(span)
        else:
            first = min([function.lineno] + [d.lineno for d in function.decorator_list])  # type: ignore[attr-defined]
            spans.append(((first, 0), (function.end_lineno + 1, 0)))  # type: ignore[attr-defined]
    return spans


def _is_logging_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in ("log", "logging") and node.func.attr in _LOG_METHODS)


def logging_spans(source: str) -> list[Span]:
    """Logging calls."""
    return [_span(node) for node in ast.walk(ast.parse(source)) if _is_logging_call(node)]


def log_only_conditions(source: str) -> list[Span]:
    """The conditions of the `if`s whose only statements are logging calls: negating one
    changes only whether a line is logged (a call inside it still runs)."""
    return [_span(node.test) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.If) and not node.orelse
            and all(isinstance(s, ast.Expr) and _is_logging_call(s.value) for s in node.body)]


_NEGATIONS = re.compile(r"core/(AddNot|ReplaceUnaryOperator_Delete_Not)$")


def annotation_spans(source: str) -> list[Span]:
    tree = ast.parse(source)
    if not any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and any(alias.name == "annotations" for alias in node.names)
               for node in tree.body):
        return []
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                     arguments.vararg, arguments.kwarg]
            spans += [_span(a.annotation) for a in every if a is not None and a.annotation]
            if node.returns is not None:
                spans.append(_span(node.returns))
        elif isinstance(node, ast.AnnAssign):
            spans.append(_span(node.annotation))
    return spans


def skip_reason(position: tuple[int, int], operator: str, included: list[Span] | None,
                logging: list[Span], log_conditions: list[Span],
                annotations: list[Span]) -> str | None:
    if included is not None and not any(_inside(position, s) for s in included):
        return "outside the functions this module's config names"
    if any(_inside(position, s) for s in logging):
        return "inside a logging call"
    if _NEGATIONS.match(operator) and any(_inside(position, s) for s in log_conditions):
        return "negates a condition that only decides whether to log"
    if any(_inside(position, s) for s in annotations):
        return "inside an annotation (never evaluated)"
    return None


class FunctionFilter(FilterApp):
    """Skip the mutations outside the configured functions and inside logging calls."""

    def description(self) -> str:
        return __doc__ or ""

    def add_args(self, parser: ArgumentParser) -> None:
        parser.add_argument("config", help="the module's cosmic-ray config")

    def filter(self, work_db: WorkDB, args: Namespace) -> None:
        config = load_config(args.config).sub("filters", "function-filter")
        include = config.get("include")
        skip_logging = bool(config.get("skip-logging-calls", False))
        excluded = [re.compile(e) for e in config.get("exclude-operators", ())]
        cache: dict[Path, tuple[list[Span] | None, list[Span], list[Span], list[Span]]] = {}
        for item in work_db.pending_work_items:
            for mutation in item.mutations:
                path = Path(mutation.module_path)
                if path not in cache:
                    source = path.read_text()
                    cache[path] = (included_spans(source, list(include)) if include else None,
                                   logging_spans(source) if skip_logging else [],
                                   log_only_conditions(source) if skip_logging else [],
                                   annotation_spans(source))
                reason = skip_reason(tuple(mutation.start_pos), mutation.operator_name,
                                     *cache[path])
                if reason is None and any(e.search(mutation.operator_name) for e in excluded):
                    reason = "an excluded operator"
                if reason is not None:
                    work_db.set_result(item.job_id, WorkResult(
                        output=f"skipped: {reason}", worker_outcome=WorkerOutcome.SKIPPED))
                    break


def main(argv: list[str] | None = None) -> int:
    return FunctionFilter().main(argv)


if __name__ == "__main__":
    sys.exit(main())
