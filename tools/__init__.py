"""Command-line tools of the repository (export, plots, the GPU check, the epoch schedule, the
SLURM launcher).
Outside the library: they import seesaw_ecm like any user. Run them from the repository root,
e.g. ``python -m tools.export_model --help``."""
