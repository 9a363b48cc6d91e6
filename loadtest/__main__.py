"""``python -m loadtest``: run the side-by-side benchmark and write its results (JSON and a Markdown table)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loadtest.gen import hey_available
from loadtest.report import END, START, publish, table
from loadtest.run import ROOT, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-seconds", type=float, default=3.0, help="aimed length of one load run")
    parser.add_argument("--litellm", type=Path, default=ROOT / ".venv-litellm" / "bin" / "litellm",
                        help="the litellm executable (its own virtualenv)")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "latest.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args(argv)
    if not hey_available():
        print("error: hey is not installed (apt-get install hey)", file=sys.stderr)
        return 2
    litellm = None if args.no_litellm or not args.litellm.exists() else args.litellm
    results = run(args.rounds, args.run_seconds, litellm, lambda s: print(s, flush=True))
    publish(results, args.out, args.markdown, START, END, table(results))
    print(f"wrote {args.out} and the table in {args.markdown}")
    print(json.dumps(results["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
