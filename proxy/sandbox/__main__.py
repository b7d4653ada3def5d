"""`python -m proxy.sandbox up|status|down` (same as `rwproxy sandbox ...`)."""

import sys

from proxy.sandbox.cli import main

sys.exit(main(["sandbox", *sys.argv[1:]]))
