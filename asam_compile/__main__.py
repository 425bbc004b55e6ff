"""`python -m asam_compile`: the `asam-compile` command line (`bench`, `explain`)."""

import sys

from asam_compile.cli import main

if __name__ == "__main__":
    sys.exit(main())
