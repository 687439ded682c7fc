import sys

from autotune.estimate.cli import cli

sys.exit(cli(sys.argv[1:]))
