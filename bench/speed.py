"""`python bench/speed.py ...` is `seedslot bench speed ...`; see seedslot.benchmarks."""

import sys

from seedslot.benchmarks import main

if __name__ == "__main__":
    sys.exit(main(["speed", *sys.argv[1:]]))
