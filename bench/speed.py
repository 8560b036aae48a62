"""`python bench/speed.py ...` is `seedslot bench speed ...`; see seedslot.app.benchmarks."""

import sys

from seedslot.app.benchmarks import main

if __name__ == "__main__":
    sys.exit(main(["speed", *sys.argv[1:]]))
