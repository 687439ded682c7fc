"""`autotune report DIR`: rebuild report.md, trials.csv and plots/ of a run folder from its study."""
from __future__ import annotations

from autotune.engine.config import ConfigError
from autotune.reports import build_report

USAGE = "usage: autotune report DIR\n\n" + __doc__.split(": ", 1)[1]


def cli(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        raise ConfigError(f"autotune report takes one run folder (the --out of autotune search), got {argv}")
    print(f"wrote {build_report(argv[0])}")
    return 0
