"""The ``--plot JSON`` option the engine-level bench tools share: redraw a committed run's chart
from its raw JSON without running anything (matplotlib is needed only then)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable


def parse(p: argparse.ArgumentParser, argv, plot: Callable[[dict, str], None], name: str,
          required: str) -> argparse.Namespace | None:
    """Adds ``--plot`` and parses ``argv``. With ``--plot``, draws ``--out/NAME.png`` from that
    JSON and returns None (the whole job); else checks that ``--REQUIRED`` was given."""
    p.add_argument("--plot", default=None, metavar="JSON",
                   help=f"only draw {name}.json's chart to --out/{name}.png")
    ns = p.parse_args(argv)
    if ns.plot:
        plot(json.loads(Path(ns.plot).read_text()), str(Path(ns.out or ".") / f"{name}.png"))
        return None
    if not getattr(ns, required.replace("-", "_")):
        p.error(f"--{required} is required (unless --plot)")
    return ns
