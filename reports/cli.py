"""`autotune report DIR`: rebuild report.md, trials.csv and plots/ of a run folder from its study."""
from __future__ import annotations

import argparse

from engine.config import ConfigError
from reports import build_report


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="autotune report", description=__doc__)
    parser.add_argument("run_dir", help="the folder `autotune search` wrote (its --out)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage line
        if e.code:
            raise ConfigError("give one run folder: autotune report DIR") from None
        return 0
    report = build_report(args.run_dir)
    print(f"wrote {report}")
    return 0
