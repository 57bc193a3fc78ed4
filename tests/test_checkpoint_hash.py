"""Weights checked: each trainer checkpoint gets a sha256 record that the loader verifies; a
corrupted, truncated or missing checkpoint, --eval-only without weights and weights that do not
fit the config (missing loss statistics, another classifier shape) are refused with one message
(SeesawEcmError; train_net.py: exit 2, no traceback)."""
import hashlib
import subprocess
import sys

import pytest
import torch
from e2e import SEESAW, train_net_args, train_net_in_process
from torch import nn

from seesaw_ecm.checkpoint import AtomicCheckpointer, check_weights_file
from seesaw_ecm.errors import SeesawEcmError


class _Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.fc = nn.Linear(4, classes)
        self.register_buffer("counts", torch.arange(float(classes)))


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip(path, at, n=4096):
    data = bytearray(path.read_bytes())
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


@pytest.fixture
def saved(tmp_path):
    """A folder with model_0000009.pth of a _Net, saved by the trainer's checkpointer."""
    torch.manual_seed(0)
    AtomicCheckpointer(_Net(), str(tmp_path)).save("model_0000009")
    return tmp_path / "model_0000009.pth"


def test_checkpoint_gets_its_sha256_and_loads_back(saved):
    record = saved.parent / "model_0000009.pth.sha256"
    assert record.read_text() == f"{_sha256(saved)}  model_0000009.pth\n"  # sha256sum -c format
    assert (saved.parent / "last_checkpoint").read_text() == "model_0000009.pth"
    net = _Net()
    AtomicCheckpointer(net, str(saved.parent)).resume_or_load("", resume=True)
    assert torch.equal(net.fc.weight, torch.load(saved, weights_only=True)["model"]["fc.weight"])


def test_corrupted_checkpoint_is_refused_naming_both_hashes(saved):
    expected = _sha256(saved)
    _flip(saved, 100, 64)
    actual = _sha256(saved)
    with pytest.raises(SeesawEcmError) as e:
        AtomicCheckpointer(_Net(), str(saved.parent)).resume_or_load("", resume=True)
    assert str(e.value).startswith(
        f"{saved} is corrupted: {saved}.sha256 expects sha256 {expected}, but the file's sha256 "
        f"is {actual} ({saved.stat().st_size} bytes). The file was truncated or modified; copy "
        "it again, or (named by ")
    # the same through MODEL.WEIGHTS, and before anything is built (train_net.py's setup)
    cfg = _cfg_with(str(saved.parent / "unused"), weights=str(saved))
    with pytest.raises(SeesawEcmError, match=f"expects sha256 {expected}, .* is {actual} "):
        check_weights_file(cfg, eval_only=True, resume=False)


def test_truncated_checkpoint_without_record_is_refused(saved):
    (saved.parent / "model_0000009.pth.sha256").unlink()
    saved.write_bytes(saved.read_bytes()[:300])
    with pytest.raises(SeesawEcmError, match=r"model_0000009.pth \(300 bytes\), named by .*"
                       r"last_checkpoint \(--resume\), cannot be read: .* It is truncated or not "
                       "a PyTorch checkpoint"):
        AtomicCheckpointer(_Net(), str(saved.parent)).resume_or_load("", resume=True)


def test_cut_checkpoint_without_record_is_refused_before_anything(saved):
    """torch.save's zip format keeps its directory at the end: a cut file is refused by the
    check before anything is built or written; the whole file passes it."""
    (saved.parent / "model_0000009.pth.sha256").unlink()
    cfg = _cfg_with(str(saved.parent / "unused"), weights=str(saved))
    check_weights_file(cfg, eval_only=True, resume=False)
    size = saved.stat().st_size
    saved.write_bytes(saved.read_bytes()[: size - 100])
    with pytest.raises(SeesawEcmError, match=rf"model_0000009.pth \({size - 100} bytes\), named "
                       r"by MODEL.WEIGHTS, cannot be read: BadZipFile"):
        check_weights_file(cfg, eval_only=True, resume=False)


def test_missing_checkpoint_is_refused(saved):
    saved.unlink()
    folder = saved.parent
    fix = "write the name of an existing checkpoint of the folder into last_checkpoint"
    with pytest.raises(SeesawEcmError, match=f"Checkpoint {saved}, named by .*last_checkpoint "
                       rf"\(--resume\), does not exist: {fix}"):
        AtomicCheckpointer(_Net(), str(folder)).resume_or_load("", resume=True)
    with pytest.raises(SeesawEcmError, match=fix):
        check_weights_file(_cfg_with(str(folder)), eval_only=False, resume=True)
    with pytest.raises(SeesawEcmError, match="named by MODEL.WEIGHTS, does not exist: check the"):
        check_weights_file(_cfg_with(str(folder), weights=str(folder / "nope.pth")), False, False)


def test_strict_loading_names_missing_keys_and_shapes(saved):
    with pytest.raises(SeesawEcmError, match=r"fc.weight: the config's model has \(5, 4\), the "
                       r"weights \(3, 4\); fc.bias: the config's model has \(5,\), the weights "
                       r"\(3,\)"):
        AtomicCheckpointer(_Net(classes=5), strict=True).load(str(saved))
    state = torch.load(saved, weights_only=True)
    del state["model"]["counts"]
    torch.save(state, saved.parent / "no_counts.pth")
    with pytest.raises(SeesawEcmError, match=r"the weights lack 1 keys of the config's model "
                       r"\(counts\)"):
        AtomicCheckpointer(_Net(), strict=True).load(str(saved.parent / "no_counts.pth"))
    AtomicCheckpointer(_Net(classes=5)).load(str(saved))  # training: detectron2's warnings


def _cfg_with(out, weights=""):
    from detectron2.config import get_cfg
    cfg = get_cfg()
    cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS = out, weights
    return cfg


def test_eval_only_without_weights_is_refused_before_anything(tmp_path):
    with pytest.raises(SeesawEcmError, match="--eval-only needs the weights to evaluate, but "
                       "MODEL.WEIGHTS is empty"):
        check_weights_file(_cfg_with(str(tmp_path)), eval_only=True, resume=True)
    check_weights_file(_cfg_with(str(tmp_path)), eval_only=False, resume=True)  # from scratch


@pytest.mark.parametrize("case", ["eval_only_no_weights", "resume_corrupted"])
def test_train_net_refuses_with_exit_2_and_writes_nothing(small_synthetic, tmp_path, case):
    out = tmp_path / "out"
    if case == "eval_only_no_weights":
        extra, message = ["--eval-only"], "--eval-only needs the weights to evaluate"
    else:
        out.mkdir()
        AtomicCheckpointer(_Net(), str(out)).save("model_0000009")
        _flip(out / "model_0000009.pth", 200, 16)
        extra, message = ["--resume"], "model_0000009.pth is corrupted: "
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    proc = subprocess.run([sys.executable, "train_net.py",
                           *train_net_args(small_synthetic, out, SEESAW, *extra)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


@pytest.fixture(scope="module")
def seesaw_weights(small_synthetic, tmp_path_factory, make_cfg):
    """A state_dict of the Seesaw config's model on the small set (12 classes), untrained."""
    from detectron2.modeling import build_model
    cfg = make_cfg(SEESAW, "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", 12)
    return build_model(cfg).state_dict()


@pytest.mark.parametrize("case", ["ecm_config", "no_counts", "13_classes"])
def test_eval_only_refuses_weights_that_do_not_fit(small_synthetic, tmp_path, seesaw_weights,
                                                   case, make_cfg):
    from detectron2.modeling import build_model
    config, state = SEESAW, dict(seesaw_weights)
    if case == "ecm_config":
        config = "configs/Synthetic/mask_rcnn_R18_FPN_ecm.yaml"
        message = r"the weights lack 3 keys .*cls_loss.sample_counts"
    elif case == "no_counts":
        del state["roi_heads.box_predictor.cls_loss.cum_samples"]
        message = r"lack 1 keys of the config's model \(roi_heads.box_predictor.cls_loss.cum_"
    else:
        state = build_model(make_cfg(SEESAW, "MODEL.DEVICE", "cpu",
                                     "MODEL.ROI_HEADS.NUM_CLASSES", 13)).state_dict()
        message = (r"roi_heads.box_predictor.cls_score.weight: the config's model has \(12, 256\), "
                   r"the weights \(13, 256\)")
    weights = tmp_path / "weights.pth"
    torch.save({"model": state}, weights)
    with pytest.raises(SeesawEcmError, match=f"The weights {weights} \\(MODEL.WEIGHTS\\) do not "
                       f"fit the config: .*{message}"):
        train_net_in_process(small_synthetic, tmp_path / "out", config, "--eval-only",
                             "MODEL.WEIGHTS", str(weights))
