"""Work done once, on the main process, whose outcome every rank shares."""
import sys

from detectron2.utils import comm

from .errors import SeesawEcmError


def on_main_process(fn, *args):
    """``fn(*args)`` run on the main process only; its (picklable) result is returned on every
    rank.

    If ``fn`` raises there, every rank raises: the main process its own exception (traceback
    kept), the other ranks a SeesawEcmError with its message. Only that message string crosses
    processes: an exception object may not pickle, and a pickling failure on the main process
    would leave the other ranks waiting in the all-gather forever. When the main process's
    exception is a SeesawEcmError, every rank's has ``all_ranks = True`` (for
    :func:`report_error`).
    """
    result = error = message = None
    if comm.is_main_process():
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001  (raised again below, on every rank)
            error = e
            message = str(e) if isinstance(e, SeesawEcmError) else (
                f"{type(e).__name__} on the main process: {e}")
    bad_input = isinstance(error, SeesawEcmError)
    result, message, bad_input = comm.all_gather((result, message, bad_input))[0]
    if message is None:
        return result
    error = error or SeesawEcmError(message)
    error.all_ranks = bad_input
    raise error


def report_error(error):
    """Print a SeesawEcmError as one message on stderr, without a traceback. An error that every
    rank raised (``all_ranks``) is printed by the main process only, and every rank returns
    after it did so (a launcher that stops the other processes when one exits cannot cut the
    message off)."""
    all_ranks = getattr(error, "all_ranks", False)
    if comm.is_main_process() or not all_ranks:
        print(f"ERROR: {error}", file=sys.stderr, flush=True)
    if all_ranks:
        comm.synchronize()
