"""One results file per benchmark run: the figures with the machine that made them.

Every benchmark calls :func:`add_options` on its parser and :func:`save` with
its figures (the same object ``--json`` prints). The file is
``benchmarks/results/<name>-<UTC time>.json``::

    {"benchmark": "counting", "time_utc": "2026-12-06T18:02:11Z",
     "options": {"shape": [1024, 1536], ...}, "machine": {...}, "figures": {...}}

``machine`` holds the CPU model, the cores (all and usable by this process),
the load average, the OS, the versions of Python and the packages the
figures depend on, and the commit of this checkout, so a figure in
``benchmarks/README.md`` can be traced to its run and compared only with runs
on the same kind of machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_DIR", "add_options", "machine_info", "save"]

#: Where results files go unless ``--results DIR`` says otherwise.
RESULTS_DIR = Path(__file__).resolve().parent / "results"

_PACKAGES = ("streamstore", "numpy", "numba", "pyzmq", "h5py", "blosc2", "hdf5plugin", "stempy")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The repository's commit, with ``+dirty`` when tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        return None
    return head + ("+dirty" if dirty else "")  # fmt: skip


def machine_info() -> dict[str, Any]:
    """The machine and software a run measured.

    Returns
    -------
    dict
        ``cpu_model``, ``cores`` (``os.cpu_count()``), ``usable_cores`` (this
        process's CPU affinity), ``load_average`` (1, 5, 15 min; None where
        the OS has none), ``platform``, ``python``, ``packages`` (installed
        version of each, None when absent) and ``commit`` (of this checkout,
        None outside one).
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count()
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "commit": _commit(),
    }


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--results DIR`` and ``--no-save`` to a benchmark's parser."""
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR,
        metavar="DIR",
        help="folder for this run's results file (default: benchmarks/results)",
    )
    parser.add_argument("--no-save", action="store_true", help="write no results file")


def save(name: str, figures: Any, args: argparse.Namespace) -> Path | None:
    """Write ``figures`` with :func:`machine_info` to ``<args.results>/<name>-<UTC>.json``.

    Parameters
    ----------
    name : str
        The benchmark's name (its module name).
    figures : JSON-serialisable object
        What the run measured (what ``--json`` prints).
    args : argparse.Namespace
        The parsed options, with ``results`` and ``no_save`` from :func:`add_options`.

    Returns
    -------
    pathlib.Path or None
        The file written; None with ``--no-save``. Its path is also printed
        on stderr, so ``--json`` still prints one JSON object on stdout.
    """
    if args.no_save:
        return None
    now = _dt.datetime.now(_dt.UTC).replace(microsecond=0)
    record = {
        "benchmark": name,
        "time_utc": now.isoformat().replace("+00:00", "Z"),
        "options": {k: v for k, v in vars(args).items() if k not in ("results", "no_save")},
        "machine": machine_info(),
        "figures": figures,
    }
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    text = json.dumps(record, indent=1, default=str) + "\n"
    for k in range(1000):  # two runs within one second get -1, -2, ...
        path = folder / (f"{stem}.json" if k == 0 else f"{stem}-{k}.json")
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
        except FileExistsError:
            continue
        print(f"results: {path}", file=sys.stderr)
        return path
    raise FileExistsError(f"{folder}: too many results files named {stem}-*.json")
