"""`python bench/memory.py ...` is `seedslot bench memory ...`; see seedslot.app.benchmarks."""

import sys

from seedslot.app.benchmarks import main

if __name__ == "__main__":
    sys.exit(main(["memory", *sys.argv[1:]]))
