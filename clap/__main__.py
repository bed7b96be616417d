"""``python -m clap`` runs the command line."""

import sys

from clap.app.cli import main

sys.exit(main())
