"""train_net.py that SIGKILLs itself at a chosen checkpoint, for tests/test_resume.py.

    CRASH="after:model_0000007.pth" python tests/crashing_train_net.py <train_net.py arguments>
    CRASH="during:model_0000007.pth" ...

"after": right after that checkpoint is written and tagged in last_checkpoint. "during": in the
middle of writing it (half of its bytes written), as a pre-empted or out-of-memory job dies.
"""
import io
import os
import runpy
import signal
import sys

import torch

from seesaw_ecm.checkpoint import AtomicCheckpointer

WHEN, NAME = os.environ["CRASH"].split(":")


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if WHEN == "after":
    tag = AtomicCheckpointer.tag_last_checkpoint

    def tag_then_die(self, basename):
        tag(self, basename)
        if basename == NAME:
            die()

    AtomicCheckpointer.tag_last_checkpoint = tag_then_die
else:
    save, save_checkpoint, current = torch.save, AtomicCheckpointer.save, [None]

    def save_checkpoint_marked(self, name, **kwargs):
        current[0] = f"{name}.pth"
        return save_checkpoint(self, name, **kwargs)

    def save_half_then_die(obj, f, *args, **kwargs):
        if current[0] != NAME:
            return save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        die()

    AtomicCheckpointer.save = save_checkpoint_marked
    torch.save = save_half_then_die

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.argv = [os.path.join(ROOT, "train_net.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
