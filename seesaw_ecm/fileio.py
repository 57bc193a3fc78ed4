"""Atomic file writes: readers see the old file or the new one, never a partial one."""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def open_atomic(path):
    """Binary file object for writing `path` in pieces (large outputs that should not be held in
    memory): a temporary file in the same folder, fsynced and moved over `path` with os.replace
    when the block ends without error, removed otherwise."""
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path, data):
    """Write bytes or text to `path` through a temporary file in the same folder + os.replace,
    so that readers see the old file or the new one, never a partial one."""
    if isinstance(data, str):
        data = data.encode()
    with open_atomic(path) as f:
        f.write(data)


def write_figure(fig, path, dpi=120):
    """Lay out a matplotlib figure, save it as PNG through :func:`write_atomic` (folders
    created) and close it."""
    import io

    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
