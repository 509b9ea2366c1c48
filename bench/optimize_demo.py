"""The optimize reports of the demo's tabular models, into docs/optimize/<model>/ (issue 18).

    python bench/optimize_demo.py [--rounds 5]

Copies digits, breast-cancer, iris and diabetes out of the demo repository (built first if needed) into a
scratch repository, runs `forwardpass optimize` with every method on each (the guard at one point of
accuracy, or of R² for diabetes), and copies each report (report.md, report.json, report.png) into the
repository's docs/optimize/. The demo repository itself is not changed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "optimize"
MODELS = ("digits", "breast-cancer", "iris", "diabetes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from forwardpass import demo
    from forwardpass.optimize import optimize

    source = demo.repository(progress=print)
    with tempfile.TemporaryDirectory(prefix="fp-optimize-") as scratch:
        for name in MODELS:
            shutil.copytree(source / name, Path(scratch) / name)
            report = optimize(scratch, name, rounds=args.rounds)
            target = DOCS / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(report.folder, target)
            print(f"{name}: recommended {report.recommended} -> {target / 'report.md'}")


if __name__ == "__main__":
    main()
