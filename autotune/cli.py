"""`autotune <command> [--flags] [hydra overrides]`: profile, estimate, search, train, report, emit, export,
validate, calibrate.

Each command lives in its own module and exposes `cli(argv) -> int`; this file only dispatches
and turns a user's mistake (ConfigError) into one `error: ...` line and exit status 2.
"""
from __future__ import annotations

import importlib
import sys

from autotune.engine.config import ConfigError

COMMANDS = {
    "profile": ("autotune.profile", "the model and hardware profile -> profile.json"),
    "estimate": ("autotune.estimate.cli", "predicted memory and step time of one plan"),
    "search": ("autotune.search.command", "find the fastest plan that fits; writes best.yaml, ds_config.json, launch.sh"),
    "train": ("autotune.engine.train", "train from a config (launches torchrun when the plan needs several "
              "processes); with --deepspeed DS_CONFIG under DeepSpeed's engine"),
    "emit": ("autotune.emit", "best.yaml, ds_config.json and launch.sh for a training config"),
    "export": ("autotune.export", "a trained run's checkpoint as a Hugging Face model folder"),
    "report": ("autotune.reports.cli", "rebuild report.md, trials.csv and plots from a run folder"),
    "validate": ("autotune.validate.cli", "the cost model against measured runs (docs/runs.md): errors, tau, plot"),
    "calibrate": ("autotune.validate.calibrate", "fit the hardware factors to measured runs -> calib.json"),
}

USAGE = "usage: autotune {" + ",".join(COMMANDS) + "} [--flags] [key=value ...]\n\n" + "\n".join(
    f"  {name:9s} {doc}" for name, (_, doc) in COMMANDS.items()
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(_module_of(name, rest))
        return int(module.cli(rest) or 0)
    except ConfigError as e:
        from autotune.storage import hide_secrets  # the error may quote a storage URL given as an override

        print(f"error: {hide_secrets(str(e))}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # a path the user gave that cannot be read or written (e.g. --out naming a file)
        print(f"error: {e.filename}: {e.strerror}; give a path that can be used", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _module_of(name: str, rest: list[str]) -> str:
    """The module of a command: `train --deepspeed` is DeepSpeed's engine on the same config."""
    if name == "train" and any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in rest):
        return "autotune.engine.deepspeed_train"
    return COMMANDS[name][0]


if __name__ == "__main__":
    sys.exit(main())
