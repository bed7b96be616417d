"""``python -m clap`` runs the command line."""

import sys

from clap.cli import main

sys.exit(main())
