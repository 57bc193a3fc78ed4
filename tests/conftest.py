import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)  # configs/ and train_net.py are addressed relative to the checkout


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """A small built-in-style dataset (12 classes): dict with train_json, val_json, image_root."""
    from seesaw_ecm.data.synthetic_lt import generate

    return generate(str(tmp_path_factory.mktemp("synthetic") / "small"), num_classes=12,
                    train_images=160, val_images=24, image_size=128, seed=0)


def pytest_configure(config):
    sys.path.insert(0, ROOT)
