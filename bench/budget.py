"""`python bench/budget.py ...` is `seedslot bench budget ...`; see seedslot.app.benchmarks."""

import sys

from seedslot.app.benchmarks import main

if __name__ == "__main__":
    sys.exit(main(["budget", *sys.argv[1:]]))
