"""The ``seedslot`` command: training loop, sweeps and their plots, benchmarks, the GPU acceptance
run, data loaders and multi-process launch. Built on the library (:mod:`seedslot`), which never
imports this package."""
