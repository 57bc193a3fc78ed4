"""Atomic file writes: readers see the old file or the new one, never a partial one."""
import os
import tempfile


def write_atomic(path, data):
    """Write bytes or text to `path` through a temporary file in the same folder + os.replace,
    so that readers see the old file or the new one, never a partial one."""
    if isinstance(data, str):
        data = data.encode()
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
