
import pandas as pd
import pytest
import torch

from clbench import ClbenchError
from clbench.config import resolve
from clbench.distill import distillation_loss
from clbench.freezing import name_matches
from clbench.model import UniHeadNet
from clbench.plugins import registered
from clbench.regularization import accumulate, diagonal_fisher, normalise_importance, quadratic_penalty
from clbench.run import run
from clbench.strategy import StageContext
from clbench.testing import smoke_test

BUILTINS = sorted(name for name, found in registered().items() if found.origin == "built-in")


def checkpoints(run_dir):
    return {k: torch.load(run_dir / "checkpoints" / f"stage{k}.pt", weights_only=True) for k in (1, 2, 3)}


def run_with(tiny_args, strategy, **options):
    return run(resolve(None, {**tiny_args, "strategy": strategy, "run_id": strategy, "set": options}))


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_strategy_completes_a_tiny_three_stage_run(name, tmp_path):
    rows = smoke_test(name, workdir=tmp_path)
    assert set(rows["strategy"]) == {name}


def test_builtins_are_the_documented_fourteen_and_the_frozen_bound():
    assert BUILTINS == ["agem", "bn_frozen", "bn_per_task", "der", "ewc", "freeze_restore", "frozen", "had", "lwf",
                        "mas", "mib", "naive", "pod", "replay", "si"]
    from clbench.plugins import builtins
    everything = builtins()                                  # `all`: the methods, the baseline first, no bound
    assert everything[0] == "naive" and sorted(everything) == [b for b in BUILTINS if b != "frozen"]


# freeze_restore ---------------------------------------------------------------------------------------------

def test_name_patterns_respect_dot_boundaries():
    assert name_matches("backbone.blocks.1.0.conv_pw.weight", "blocks.1")
    assert not name_matches("backbone.blocks.10.0.conv_pw.weight", "blocks.1")
    assert name_matches("head_out.bias", "head_out")


def test_freeze_restore_keeps_earlier_slices_bit_identical_and_frozen_blocks_unchanged(tiny_args):
    ckpt = checkpoints(run_with(tiny_args, "freeze_restore"))
    model = UniHeadNet(tasks=_specs(tiny_args), backbone="test_efficientnet", head_channels=16)
    seg, det = model.slices["seg"], model.slices["det"]
    for key in ("head_out.weight", "head_out.bias"):
        assert torch.equal(ckpt[3]["model"][key][seg], ckpt[1]["model"][key][seg])   # restored after 2 and 3
        assert torch.equal(ckpt[3]["model"][key][det], ckpt[2]["model"][key][det])
    frozen = [k for k in ckpt[1]["model"] if name_matches(k, "blocks.0") or name_matches(k, "blocks.1")]
    frozen = [k for k in frozen if k.endswith("weight") and "bn" not in k]
    assert frozen and all(torch.equal(ckpt[3]["model"][k], ckpt[1]["model"][k]) for k in frozen)
    trained = "backbone.blocks.2.0.conv_pwl.weight"
    assert not torch.equal(ckpt[2]["model"][trained], ckpt[1]["model"][trained])  # the rest did train
    cls = model.slices["cls"]
    assert not torch.equal(ckpt[3]["model"]["head_out.weight"][cls], ckpt[2]["model"]["head_out.weight"][cls])
    assert torch.equal(ckpt[3]["model"]["head.0.0.weight"], ckpt[2]["model"]["head.0.0.weight"])  # last stage: slice only


def test_freeze_restore_optimizer_holds_no_frozen_parameter(tiny_args, monkeypatch):
    seen = []
    real = torch.optim.AdamW

    class Recording(real):
        def __init__(self, params, **kwargs):
            params = list(params)
            seen.append([p.requires_grad for p in params])
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    run_with(tiny_args, "freeze_restore")
    assert len(seen) == 3 and all(all(flags) for flags in seen)
    assert len(seen[0]) > len(seen[1]) > len(seen[2]) == 2   # stage 3: head_out weight and bias only


# bn_frozen --------------------------------------------------------------------------------------------------

def test_bn_frozen_keeps_every_running_statistic_bit_identical_after_stage_1(tiny_args):
    run_dir = run_with(tiny_args, "bn_frozen")
    ckpt = checkpoints(run_dir)
    stats = [k for k in ckpt[1]["model"] if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
    assert len(stats) > 30
    assert all(torch.equal(ckpt[3]["model"][k], ckpt[1]["model"][k]) for k in stats)
    assert not torch.equal(ckpt[3]["model"]["backbone.conv_stem.weight"], ckpt[1]["model"]["backbone.conv_stem.weight"])
    # the BN attribution has nothing to attribute: the own-stage statistics are the current ones
    final = pd.read_csv(run_dir / "metrics.csv").query("stage == 3").set_index("metric")
    assert final.loc["mIoU_own_bn", "value"] == final.query("eval_task == 'seg'").loc["mIoU", "value"]
    assert final.loc["mAP_own_bn", "value"] == final.query("eval_task == 'det'").loc["mAP", "value"]


def test_without_bn_frozen_the_statistics_drift(tiny_args):
    ckpt = checkpoints(run_with(tiny_args, "naive"))
    assert not torch.equal(ckpt[3]["model"]["backbone.bn1.running_mean"], ckpt[1]["model"]["backbone.bn1.running_mean"])


def test_bn_frozen_can_freeze_the_affine_parameters_too(tiny_args):
    ckpt = checkpoints(run_with(tiny_args, "bn_frozen", **{"bn_frozen.freeze_affine": "true"}))
    assert torch.equal(ckpt[3]["model"]["backbone.bn1.weight"], ckpt[1]["model"]["backbone.bn1.weight"])
    assert torch.equal(ckpt[3]["model"]["head.0.1.bias"], ckpt[1]["model"]["head.0.1.bias"])


# lwf --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, shape", [("cls", (2, 10)), ("seg", (2, 6, 4, 4)), ("det", (2, 3, 4, 4, 15))])
def test_distillation_is_zero_for_equal_outputs_and_grows_with_divergence(kind, shape):
    torch.manual_seed(0)
    teacher = torch.randn(shape)
    assert distillation_loss(kind, teacher.clone(), teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(shape)
    losses = [distillation_loss(kind, teacher + scale * noise, teacher, 2.0).item() for scale in (0.1, 0.5, 2.0)]
    assert 0 < losses[0] < losses[1] < losses[2]


def test_lwf_teacher_receives_no_gradient(specs):
    from clbench.strategies.lwf import LwF
    model = UniHeadNet(tasks=specs, backbone="test_efficientnet", head_channels=8)
    ctx = StageContext(model=model, stage=2, task=specs[1], tasks=tuple(specs), seed=0, train_loader=None,
                       device=torch.device("cpu"), task_loss=None)
    lwf = LwF(lam=1.0, temperature=2.0)
    lwf.before_stage(ctx)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.head_out.weight.add_(0.1)  # student moves away from the snapshot
    term = lwf.loss_term(ctx, images, model(images))
    term.backward()
    assert term.item() > 0
    assert all(p.grad is None and not p.requires_grad for p in lwf.teacher.parameters())
    assert model.head_out.weight.grad is not None


# ewc --------------------------------------------------------------------------------------------------------

def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic_around_it(specs):
    model = UniHeadNet(tasks=specs, backbone="test_efficientnet", head_channels=8)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    assert quadratic_penalty(model, fisher, anchor).item() == 0.0
    with torch.no_grad():
        model.head_out.bias.add_(0.5)
    expected = 2.0 * 0.25 * model.head_out.bias.numel()
    assert quadratic_penalty(model, fisher, anchor).item() == pytest.approx(expected)


def test_fisher_is_non_negative_and_non_zero_only_where_the_task_reaches(specs):
    from clbench.loop import task_loss
    model = UniHeadNet(tasks=specs, backbone="test_efficientnet", head_channels=8).eval()
    cls = specs[2]
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])) for _ in range(2)]
    fisher = diagonal_fisher(model, batches, lambda x, y: task_loss(model, cls, model(x), y, (32, 32)), max_batches=2)
    assert all((f >= 0).all() for f in fisher.values())
    rows = fisher["head_out.weight"].sum(dim=(1, 2, 3))
    assert (rows[model.slices["cls"]] > 0).all()
    assert (rows[model.slices["det"]] == 0).all() and (rows[model.slices["seg"]] == 0).all()
    assert normalise_importance(fisher)["head_out.bias"].sum() > 0


def test_accumulate_decays_as_specified():
    previous, new = {"w": torch.tensor([4.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])}
    assert accumulate(previous, new, gamma=0.5)["w"].tolist() == [3.0, 2.0]
    assert accumulate(None, new, gamma=0.5)["w"].tolist() == [1.0, 1.0]


def test_ewc_online_keeps_one_decayed_fisher(tiny_args):
    ckpt = checkpoints(run_with(tiny_args, "ewc", **{"ewc.online": "true", "ewc.gamma": "0.5"}))
    assert set(ckpt[3]["strategy"]["fisher"]) == {"online"}
    per_task = checkpoints(run_with({**tiny_args, "out": tiny_args["out"] + "2"}, "ewc"))
    assert set(per_task[2]["strategy"]["fisher"]) == {"seg", "det"}
    # no Fisher after the last stage: nothing is trained after it
    assert set(per_task[3]["strategy"]["fisher"]) == {"seg", "det"}


# replay -----------------------------------------------------------------------------------------------------

def test_replay_buffer_is_bounded_from_earlier_tasks_and_checkpointed(tiny_args, monkeypatch):
    from clbench.strategies.replay import Replay
    replayed = []
    real = Replay.loss_term

    def spy(self, ctx, images, outputs):
        assert set(self.buffer.tasks) == {t.name for t in ctx.earlier_tasks}   # only tasks already trained
        replayed.append(ctx.stage)
        return real(self, ctx, images, outputs)

    monkeypatch.setattr(Replay, "loss_term", spy)
    ckpt = checkpoints(run_with(tiny_args, "replay", **{"replay.per_task": "5", "replay.batch": "2"}))
    buffer = ckpt[3]["strategy"]["buffer"]
    assert set(buffer) == {"seg", "det", "cls"} and all(len(b["images"]) == 5 for b in buffer.values())
    assert set(ckpt[1]["strategy"]["buffer"]) == {"seg"}
    assert len(buffer["det"]["targets"]) == 5 and "boxes" in buffer["det"]["targets"][0]
    assert set(replayed) == {1, 2, 3}


# composition and options ------------------------------------------------------------------------------------

def test_composed_strategies_run_every_part(tiny_args):
    run_dir = run_with(tiny_args, "bn_frozen+freeze_restore")
    ckpt = checkpoints(run_dir)
    assert torch.equal(ckpt[3]["model"]["backbone.bn1.running_var"], ckpt[1]["model"]["backbone.bn1.running_var"])
    seg = slice(0, 6)
    assert torch.equal(ckpt[3]["model"]["head_out.weight"][seg], ckpt[1]["model"]["head_out.weight"][seg])
    assert set(ckpt[3]["strategy"]) == {"bn_frozen", "freeze_restore"}


def test_resolved_hyperparameters_are_saved_in_the_config(tiny_args):
    import yaml
    run_dir = run_with(tiny_args, "lwf", **{"lwf.lam": "3"})
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["set"] == {"lwf.lam": 3.0, "lwf.temperature": 2.0}
    assert resolve(run_dir / "config.yaml", {}).set == saved["set"]   # the saved config loads back


def _specs(tiny_args):
    from clbench.benchmarks import load_tasks
    return [t.spec for t in load_tasks(tiny_args["data_root"], ("seg", "det", "cls"), image_size=64)]


def test_the_per_sample_fisher_is_the_mean_of_each_samples_squared_gradient():
    """Against a hand computation on a linear model with loss ½‖Wx + b − t‖² per sample: ∂ℓ_n/∂W = (Wx_n + b − t_n)
    x_nᵀ. The batched Fisher squares each batch's mean gradient instead: another number."""
    from clbench.regularization import per_sample_fisher
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, t = torch.randn(6, 3), torch.randn(6, 2)
    batches = [(x[:4], t[:4]), (x[4:], t[4:]), (torch.randn(2, 3), torch.randn(2, 2))]   # the third is not used

    def loss(xb, tb):
        return 0.5 * ((model(xb) - tb) ** 2).sum(dim=1).mean()
    with torch.no_grad():
        residual = x @ model.weight.T + model.bias - t                          # (6, 2)
        per_sample_w = residual[:, :, None] * x[:, None, :]                     # (6, 2, 3)
    fisher = per_sample_fisher(model, batches, loss, max_batches=2)
    assert torch.allclose(fisher["weight"], (per_sample_w ** 2).mean(0), atol=1e-6)
    assert torch.allclose(fisher["bias"], (residual ** 2).mean(0), atol=1e-6)
    batched = diagonal_fisher(model, batches, loss, max_batches=2)
    expected = ((per_sample_w[:4].mean(0) ** 2) + (per_sample_w[4:].mean(0) ** 2)) / 2
    assert torch.allclose(batched["weight"], expected, atol=1e-6)
    assert not torch.allclose(batched["weight"], fisher["weight"], rtol=0.1)


def test_ewc_with_the_per_sample_fisher_runs_every_kind(tiny_args):
    ckpt = checkpoints(run_with(tiny_args, "ewc", **{"ewc.fisher": "per_sample", "ewc.fisher_batches": "1"}))
    assert set(ckpt[2]["strategy"]["fisher"]) == {"seg", "det"}
    assert all(torch.isfinite(f).all() for f in ckpt[2]["strategy"]["fisher"]["det"].values())
    with pytest.raises(ClbenchError, match="fisher 'exact': expected one of batched, per_sample"):
        run_with({**tiny_args, "out": tiny_args["out"] + "x"}, "ewc", **{"ewc.fisher": "exact"})
