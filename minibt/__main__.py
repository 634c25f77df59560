"""`python -m minibt` is the `minibt` command."""
import sys

from .tools.cli import main

sys.exit(main())
