"""What every benchmark does at its end: write the JSON and the plot, print the table, and exit 1
when a target is missed; and the facts that trace a result to its code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
console = Console()


def git_version() -> str:
    """The checked-out commit, "-dirty" with local changes; read at the start and at the end of a run,
    so a result can be traced to the code it measured even when the tree moves meanwhile."""
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def finish(results: dict, out: Path, plot: Callable[[dict, Path], None], print_table: Callable[[dict], None]) -> int:
    """Write ``out`` (JSON) and its PNG, print the table; the exit code says whether every
    target in ``results["targets"]`` was met."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print_table(results)
    console.print(f"wrote {out} and {out.with_suffix('.png')}")
    missed = [name for name, check in results["targets"].items() if not check["met"]]
    if missed:
        console.print(f"[red]targets missed: {', '.join(missed)}")
    return 1 if missed else 0
