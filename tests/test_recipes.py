"""Every shipped LVIS v1 recipe against the one table of official values (official_recipes.py)."""
import glob
import math
import os

import pytest
from detectron2.config import get_cfg

from official_recipes import ROWS, groups_for
from seesaw_ecm import add_seesaw_ecm_config

RECIPES = sorted(glob.glob("configs/LVISv1/*.yaml"))


def resolve(path):
    cfg = get_cfg()
    add_seesaw_ecm_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def lookup(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def same(value, official, rel_tol=1e-12):
    """Equal after lists -> tuples; floats to `rel_tol` (exact unless a row says otherwise)."""
    if isinstance(official, (tuple, list)):
        return (isinstance(value, (tuple, list)) and len(value) == len(official)
                and all(same(v, o, rel_tol) for v, o in zip(value, official)))
    if isinstance(official, bool) or isinstance(value, (bool, str)) or isinstance(official, str):
        return type(value) is type(official) and value == official
    return isinstance(value, (int, float)) and math.isclose(value, official, rel_tol=rel_tol)


def mismatches(cfg, groups):
    """[(key, recipe value, official value, source)] of every row that differs."""
    out = []
    for group in groups:
        for key, official, source, *tol in ROWS[group]:
            value = lookup(cfg, key)
            if not same(value, official, *tol):
                out.append((key, value, official, source))
    return out


def test_every_recipe_is_covered_and_every_row_is_sourced():
    assert len(RECIPES) >= 24
    used = {g for path in RECIPES for g in groups_for(os.path.basename(path))}
    assert used == set(ROWS)  # no dead rows
    for rows in ROWS.values():
        for key, official, source, *tol in rows:
            assert "/" in source and len(source) > 20, key  # names a repository and a file


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_matches_the_official_values(path):
    assert mismatches(resolve(path), groups_for(os.path.basename(path))) == []


def mutate(value):
    """A plausible mistake: another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, (tuple, list)):
        return tuple(value[:-1]) + (mutate(value[-1]),) if value else (1,)
    if isinstance(value, int):
        return value + 1
    return value * 1.01 if value else 1e-3


@pytest.mark.parametrize("name", ["mask_rcnn_R_50_FPN_2x_ce_random.yaml",
                                  "mask_rcnn_R_50_FPN_1x_ecm_rfs.yaml",
                                  "mask_rcnn_R_101_FPN_2x_seesaw_rfs.yaml",
                                  "cascade_mask_rcnn_R_101_FPN_2x_ecm_rfs.yaml",
                                  "htc_lite_R_50_FPN_2x_ecm_rfs.yaml",
                                  "mask_rcnn_R_50_FPN_2x_gol_normed_mask_rfs.yaml"])
def test_changing_any_recipe_value_fails_the_comparison(name):
    cfg = resolve("configs/LVISv1/" + name)
    groups = groups_for(name)
    keys = [row[0] for g in groups for row in ROWS[g]]
    for key in keys:
        broken = cfg.clone()
        *parents, leaf = key.split(".")
        node = lookup(broken, ".".join(parents))
        node[leaf] = mutate(node[leaf])
        assert key in [m[0] for m in mismatches(broken, groups)], key


def test_the_comparison_is_exact_unless_a_row_allows_rounding():
    assert not same(0.02, 0.0200001) and not same(4, 4.5) and not same("ceil", "stochastic")
    assert not same((16, 22), (16,)) and not same(True, 1) and same([0.5], (0.5,))
    # stage-3 regression weights: 1 / 0.033 and 1 / 0.067 written as 30.3 / 14.9 pass, 30 / 15 not
    row = next(r for r in ROWS["cascade_mmdet"]
               if r[0] == "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS")
    official, tol = row[1], row[3]
    assert same(official[:2] + ((30.3, 30.3, 14.9, 14.9),), official, tol)
    assert not same(official[:2] + ((30.0, 30.0, 15.0, 15.0),), official, tol)
