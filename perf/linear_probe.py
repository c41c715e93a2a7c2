"""A linear probe of the pretrained backbone on a classification task: what the backbone's ImageNet features give
without training them, the yardstick for the recipe's classification stage (issue: a recipe for real data).

Features: the backbone's last feature map (stride 32), average-pooled, from the packaged EfficientNet-Lite0 weights
(``--pretrained lite0``), images read exactly as a run reads them (same resize and normalisation). A multinomial
logistic regression (full-batch L-BFGS) on the training images left after the validation split that a run with
the same --val-fraction/--val-seed holds out; its L2 weight picked on that validation split; top-1 reported on the
test set. Prints one line per weight and the result.

    python perf/linear_probe.py --data-root DATA [--task cls] [--image-size 256] [--val-fraction 0.2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from clbench.benchmarks import load_task
from clbench.model import _create_backbone
from clbench.pretrained import normalization

L2 = (1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def features(backbone: torch.nn.Module, dataset: object) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in range(len(dataset)):
        image, label = dataset[i]
        xs.append(backbone(image[None])[-1].mean((2, 3))[0])
        ys.append(int(label))
    return torch.stack(xs), torch.tensor(ys)


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return head


def top1(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--task", default="cls")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--val-seed", type=int, default=0)
    args = parser.parse_args()
    norm = normalization("auto", backbone="tf_efficientnet_lite0", pretrained="lite0", pretrained_file=None)
    task = load_task(args.data_root, "cls", image_size=args.image_size, normalization=norm.normalization,
                     name=args.task, val_fraction=args.val_fraction, val_seed=args.val_seed)
    backbone = _create_backbone("tf_efficientnet_lite0", "lite0", None, 8).eval()
    start = time.perf_counter()
    (xt, yt), (xv, yv), (xs, ys) = (features(backbone, d) for d in (task.train, task.validation, task.test))
    classes = task.spec.num_classes
    scores = {}
    for l2 in L2:
        scores[l2] = top1(fit(xt, yt, classes, l2), xv, yv)
        print(f"L2 {l2:g}: validation top-1 {scores[l2]:.3f}")
    best = max(L2, key=lambda v: (scores[v], v))
    test = top1(fit(xt, yt, classes, best), xs, ys)
    print(f"linear probe ({classes} classes; {len(xt)} train / {len(xv)} validation / {len(xs)} test images): L2 {best:g} "
          f"picked on validation ({scores[best]:.3f}); test top-1 {test:.3f}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
