"""Fixtures shared by the test files.

Tests address configs/, train_net.py, tools/ and benchmarks/ relative to the checkout: pytest
runs from the repository root (pytest.ini's `pythonpath = .` makes `benchmarks` importable), and
the autouse fixture below keeps the working directory there for every test, wherever pytest was
started from.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _at_repository_root():
    """Run every test with the repository root as working directory; restore it afterwards."""
    old = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(old)


@pytest.fixture(scope="session")
def make_cfg():
    """make_cfg(config=None, *opts): a detectron2 config with seesaw_ecm's keys, merged from
    `config` (a path relative to the repository, or None), then from `opts` (KEY, VALUE, ...;
    values as strings or Python values)."""
    from detectron2.config import get_cfg

    from seesaw_ecm import add_seesaw_ecm_config

    def build(config=None, *opts):
        cfg = get_cfg()
        add_seesaw_ecm_config(cfg)
        if config:
            cfg.merge_from_file(str(REPO / config))
        cfg.merge_from_list(list(opts))
        return cfg

    return build


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """A small built-in-style dataset (12 classes): dict with train_json, val_json, image_root."""
    from seesaw_ecm.data.synthetic_lt import generate

    return generate(str(tmp_path_factory.mktemp("synthetic") / "small"), num_classes=12,
                    train_images=160, val_images=24, image_size=128, seed=0)


@pytest.fixture(scope="session")
def seesaw_run(small_synthetic, tmp_path_factory):
    """One short Seesaw training run of train_net.py (e2e.SEESAW with e2e.SEESAW_RUN_OPTS, 20
    iterations, checkpoints at 10 and 20, final evaluation) shared by the end-to-end tests that
    need a trained model: (run folder, the CompletedProcess). Tests must not write into it."""
    from e2e import SEESAW, SEESAW_RUN_OPTS, run_train_net

    out = tmp_path_factory.mktemp("seesaw_run")
    return out, run_train_net(small_synthetic, out, SEESAW, *SEESAW_RUN_OPTS)
