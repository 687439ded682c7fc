import sys

from autotune.profile.cli import cli

sys.exit(cli(sys.argv[1:]))
