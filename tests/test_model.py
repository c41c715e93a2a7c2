import pytest
import timm
import torch

from clbench import ClbenchError
from clbench.model import DEFAULT_ANCHORS, UniHeadNet, slice_table


@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("head_stride", [8, 16])
def test_output_shapes_at_256_and_512(specs, size, head_stride):
    model = UniHeadNet(tasks=specs, head_stride=head_stride).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, size, size))
    grid = size // head_stride
    assert out["det"].shape == (1, len(DEFAULT_ANCHORS), grid, grid, 5 + 10)
    assert out["seg"].shape == (1, 6, grid, grid)
    assert out["cls"].shape == (1, 10)


def test_slices_partition_the_output_conv_exactly(specs):
    model = UniHeadNet(tasks=specs, backbone="test_efficientnet", head_channels=8)
    covered = sorted(c for s in model.slices.values() for c in range(s.start, s.stop))
    assert covered == list(range(model.head_out.out_channels))
    assert model.slices["det"].stop - model.slices["det"].start == 3 * (5 + 10)
    assert model.slices["seg"].stop - model.slices["seg"].start == 6


def test_slice_table_follows_task_order(specs):
    table = slice_table(list(reversed(specs)), num_anchors=2)
    assert table == {"cls": slice(0, 10), "det": slice(10, 40), "seg": slice(40, 46)}


def test_default_parameter_count_is_within_budget(specs):
    counts = UniHeadNet(tasks=specs).parameter_counts()
    assert 3_500_000 <= counts["total"] <= 6_000_000 < 8_000_000
    assert counts["trainable"] == counts["total"]


def test_trainable_count_excludes_frozen_parameters(specs):
    model = UniHeadNet(tasks=specs, backbone="test_efficientnet", head_channels=8)
    frozen = sum(p.numel() for p in model.backbone.parameters())
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    counts = model.parameter_counts()
    assert counts["trainable"] == counts["total"] - frozen


def test_unknown_backbone_is_a_clear_error(specs):
    with pytest.raises(ClbenchError, match="no model named 'efficientnet_b99'"):
        UniHeadNet(tasks=specs, backbone="efficientnet_b99")


def test_missing_pretrained_file_is_an_error_not_random_init(specs, tmp_path):
    with pytest.raises(ClbenchError, match="nope.pth: pretrained weight file not found"):
        UniHeadNet(tasks=specs, backbone="test_efficientnet", pretrained_file=str(tmp_path / "nope.pth"))


def test_pretrained_file_from_a_timm_checkpoint_is_loaded(specs, tmp_path):
    source = timm.create_model("test_efficientnet")  # the full classifier, as timm saves it
    path = tmp_path / "w.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = UniHeadNet(tasks=specs, backbone="test_efficientnet", pretrained_file=str(path))
    assert torch.equal(model.backbone.conv_stem.weight, source.conv_stem.weight)
    assert torch.equal(model.backbone.blocks[1][0].bn1.running_var, source.blocks[1][0].bn1.running_var)


def test_pretrained_file_of_another_architecture_is_rejected(specs, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(ClbenchError, match="backbone tensors missing"):
        UniHeadNet(tasks=specs, backbone="test_efficientnet", pretrained_file=str(path))


def test_unreachable_hub_weights_fail_loudly(specs, monkeypatch):
    real = timm.create_model

    def offline(name, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to the hub")
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ClbenchError, match="could not load timm's pretrained weights"):
        UniHeadNet(tasks=specs, backbone="test_efficientnet", pretrained=True)
