"""benchmarks.profile_iteration: the forward-hook part timer and the table."""
import time

import torch

from benchmarks.profile_iteration import PartTimer, format_table


class Sleep(torch.nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


class ToyRCNN(torch.nn.Module):
    """The attribute layout PartTimer hooks: backbone, proposal_generator, roi_heads with a
    cascade's ModuleList of box heads and a mask head."""

    def __init__(self):
        super().__init__()
        self.backbone = Sleep(0.02)
        self.proposal_generator = Sleep(0.0)
        self.roi_heads = torch.nn.Module()
        self.roi_heads.box_head = torch.nn.ModuleList([Sleep(0.01), Sleep(0.01)])
        self.roi_heads.mask_head = Sleep(0.03)

    def forward(self, x):
        x = self.proposal_generator(self.backbone(x))
        for head in self.roi_heads.box_head:
            x = head(x)
        return self.roi_heads.mask_head(x)


def test_part_timer_sums_hooked_modules_per_part_and_resets():
    model = ToyRCNN()
    timer = PartTimer(model)
    model(torch.zeros(1))
    parts = timer.take()
    assert set(parts) == {"backbone", "rpn", "box head", "mask head"}
    assert parts["box head"] >= 0.02  # both cascade stages summed
    assert parts["mask head"] >= 0.03 and parts["backbone"] >= 0.02
    assert parts["rpn"] < parts["backbone"]
    assert timer.take() == {}


def test_table_shares_and_ratio():
    result = {"base": {"backward": 0.5, "total": 1.0, "ratio": 1.0},
              "new": {"backward": 0.3, "total": 0.6, "ratio": 0.6}}
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in format_table(result).splitlines()]
    assert rows[0] == ["part", "base (ms)", "new (ms)", "share of new"]
    assert next(row for row in rows if row[0] == "backward") == ["backward", "500", "300", "50%"]
    assert rows[-1] == ["ratio to base", "1.000", "0.600", ""]
