"""`python -m nodemesh.redirector`."""

import sys

from nodemesh.redirector.cli import main

sys.exit(main())
