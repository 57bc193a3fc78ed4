"""The GPU check (``python -m tools.gpu_check.run``): install from a wheelhouse, then
correctness, throughput and training sections, each under its own time limit."""
