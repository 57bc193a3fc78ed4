"""The error types for bad input (config, dataset file, statistics)."""


class SeesawEcmError(ValueError):
    """Bad input: the message names the problem and the fix. train_net.py reports it without a
    traceback."""


class DatasetFormatError(SeesawEcmError):
    """An annotation file that is not in the format its loader reads (LVIS json, Open Images
    csv); the message names the file, the problem and the fix."""
