"""Prints its arguments as one JSON line and exits with the status given after --exit (a stand-in measuring
process for loadtest.procs.rotating_rounds' tests)."""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    print("a line before the result")
    print(json.dumps({"argv": args}))
    sys.exit(int(args[args.index("--exit") + 1]) if "--exit" in args else 0)
