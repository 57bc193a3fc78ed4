"""The error type for bad input (config, dataset file, statistics)."""


class SeesawEcmError(ValueError):
    """Bad input: the message names the problem and the fix. train_net.py reports it without a
    traceback."""
