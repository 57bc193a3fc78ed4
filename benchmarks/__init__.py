"""Benchmarks of seesaw_ecm: the long-tail harness (benchmarks.harness, command line
benchmarks.long_tail), its synthetic evaluation data and the scripts that time one part of the
library. Outside the library: they import seesaw_ecm like any user. Run them from the
repository root, e.g. ``python -m benchmarks.long_tail --help``."""
