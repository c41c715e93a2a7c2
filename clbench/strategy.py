"""The plugin base class and the strategy registry.

The whole contract a strategy is held to is in the ``Strategy`` class docstring (``help(Strategy)``).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from clbench import ClbenchError
from clbench.config import parse_bool
from clbench.protocol import Protocol
from clbench.tasks import TaskSpec
from clbench.tensors import to_device


@dataclass(frozen=True)
class StageContext:
    """What a hook may read about the current stage."""

    model: nn.Module
    stage: int                      # 1-based; stage k trains ``task`` (tasks[k - 1] with one stage per task)
    seed: int                       # the run's --seed: derive every random draw of a strategy from it
    task: TaskSpec
    tasks: tuple[TaskSpec, ...]     # every task, in stream order
    train_loader: DataLoader        # or clbench.memory.MemoryLoader (a set kept in memory): either way iterating
                                    # yields (images, targets, task labels); the in-memory one's are already on
                                    # the device; ``.dataset`` reads single items, ``.generator`` drives the shuffles
    device: torch.device
    task_loss: Callable[[TaskSpec, dict[str, torch.Tensor], Any], torch.Tensor]
    # A benchmark file's experiences (DESIGN.md §8); left out: one stage per task, every class at once.
    stages: int | None = None       # how many stages the run has
    step: int = 0                   # which of ``task``'s class steps this stage trains (0: its first)
    earlier: tuple[TaskSpec, ...] | None = None   # the other tasks an earlier stage trained
    seen: Mapping[str, tuple[int, ...]] | None = None   # per task, its classes introduced so far (this stage's too)

    @property
    def earlier_tasks(self) -> tuple[TaskSpec, ...]:
        """The tasks, other than this stage's, that an earlier stage trained."""
        return self.tasks[: self.stage - 1] if self.earlier is None else self.earlier

    @property
    def is_last(self) -> bool:
        """No stage follows: whatever an after_stage hook prepares for later stages would go unused."""
        return self.stage == (len(self.tasks) if self.stages is None else self.stages)

    @property
    def distilled(self) -> tuple[tuple[TaskSpec, tuple[int, ...] | None], ...]:
        """What a distillation keeps: every earlier task with its classes seen so far (None: all of them), and this
        stage's task with its earlier classes when it has some (class-incremental)."""
        seen = self.seen or {}
        earlier = tuple((t, seen.get(t.name) if t.incremental else None) for t in self.earlier_tasks)
        return earlier + (((self.task, self.old_classes),) if self.old_classes else ())

    @property
    def old_classes(self) -> tuple[int, ...]:
        """This stage's task's classes that earlier stages introduced (class-incremental; () otherwise)."""
        return self.task.class_steps.old(self.step)

    @property
    def new_classes(self) -> tuple[int, ...]:
        """The classes this stage introduces (every class of the task when it has one step)."""
        return self.task.class_steps.new(self.step)

    @property
    def future_classes(self) -> tuple[int, ...]:
        """The classes of this stage's task that later stages introduce: masked out of training and prediction."""
        return self.task.class_steps.future(self.step)

    def device_batches(self) -> Iterator[tuple[torch.Tensor, Any]]:
        """(images, targets) of the stage's training set on the device: for Fisher and importance passes."""
        for images, targets, _ in self.train_loader:
            yield to_device(images, self.device), to_device(targets, self.device)

    def generator(self, purpose: int = 0) -> torch.Generator:
        """A CPU generator seeded from (run seed, stage, ``purpose``): the same draws on every rerun of this
        stage, other draws under another seed."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + self.stage) * 1_009 + purpose) % 2**63)


class Strategy:
    """A forgetting strategy: subclass, register with ``@register("name")``, override the hooks you need.

    Eight hooks, each returning a value or None; the loop (``clbench.run`` + ``clbench.loop``) combines what
    they return. For stage k = 1..S that trains task T (tasks[k - 1] with one stage per task; with a benchmark
    file, the task of experience k, on the classes ``ctx.new_classes``)::

        evaluate every task (stage 0)                 # see "evaluate" below
        for each stage k:
            if k == 1 and cached stage 1 exists and strategy.shares_first_stage:   # `clbench compare` only
                model, RNG and loader state <- the cache   # before_stage, before_epoch, loss_term,
                                                           # after_backward and after_step are NOT called
            else:
                strategy.before_stage(ctx)          # freeze parameters, snapshot a teacher, ...
                optimizer = AdamW(p for p in model.parameters() if p.requires_grad)   # built AFTER before_stage
                for epoch in range(epochs[T]):
                    model.train()
                    strategy.before_epoch(ctx)      # e.g. put BatchNorm layers back into eval mode
                    for images, targets, task_labels in ctx.train_loader:
                        with autocast (--amp):                  # images, targets already on ctx.device
                            outputs = model(images)
                            loss = strategy.task_loss(ctx, images, outputs, targets)   # a replacement, or None:
                            if loss is None:                                           # the task's own loss
                                loss = ctx.task_loss(T, outputs, targets)   # classes not yet introduced masked out
                            term = strategy.loss_term(ctx, images, outputs)   # a value: the loop adds it in float32
                        (loss + term).backward(); unscale (fp16)
                        grads = {name: p.grad for every trainable p that has one}
                        new = strategy.after_backward(ctx, grads)         # replacement gradients (None = keep)
                        p.grad <- new[name] for every name in new
                        clip the gradient norm; optimizer.step()        # fp16: skipped if the gradients overflowed
                        if the optimizer stepped: strategy.after_step(ctx)
            strategy.after_stage(ctx)               # always, cached or not: restore slices, a Fisher, a buffer, ...
            evaluate every task (+ BN audit); save checkpoint {model, strategy.state_dict(), evaluation states};
            only then write the stage's rows to metrics.csv (a stage is in the tables only if its checkpoint exists)

        evaluate task U (after any stage, in `clbench run`, `clbench eval` and the BN audit alike):
            state = strategy.evaluation_state(model, U)   # tensors to serve U with (None = the model as it is)
            with those tensors loaded into the model (and the model's own restored afterwards):
                model.eval(); forward the test set; metrics

    Hooks return values; they never reach into the loop's variables. ``ctx`` (a ``StageContext``) is what a
    hook may read; ``ctx.seed`` / ``ctx.generator()`` are where a strategy's randomness comes from;
    ``ctx.task_loss(task, outputs, targets)`` is any task's own loss on a batch of that task.

    Helpers a strategy builds on (functions, not hooks): ``clbench.teacher.frozen_teacher`` (a deep copy in
    eval mode that never updates BN statistics), ``clbench.teacher.FeatureTaps`` (named backbone and neck
    features of the forward pass that saw a given input, for student and teacher), ``clbench.freezing.
    no_bn_update`` (forward passes that leave every BN running statistic bit-identical: every teacher, Fisher,
    importance and buffer pass runs in it) and ``clbench.buffer.Buffer`` (at most N stored images per task).

    Stage-1 sharing is opt-in. ``clbench compare`` trains stage 1 once per seed and serves it to every
    strategy that sets ``shares_first_stage = True``: a promise that before_stage, before_epoch, loss_term,
    after_backward and after_step change nothing and record nothing in stage 1 (so stage 1 equals naive
    fine-tuning, and after_stage alone sees it). A strategy that does not declare it always trains its own
    stage 1. ``clbench.testing.smoke_test`` checks the promise: a declared strategy must give the same metrics
    from the cache as from training.

    Every stage checkpoint is also a resume point. A resumed run (``clbench run --resume``, an interrupted
    comparison cell) rebuilds the strategy, calls ``load_state_dict`` with what ``state_dict`` returned after
    the last finished stage, restores the model and the RNGs, and continues with the next stage's
    ``before_stage``: whatever a strategy carries from one stage to the next belongs in ``state_dict``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    shares_first_stage: ClassVar[bool] = False
    # Why this strategy cannot be combined with others (``a+b``); empty = it can.
    not_combinable: ClassVar[str] = ""
    # A reference row (a bound such as ``frozen``), not a method: kept out of ``--strategies all``.
    bound: ClassVar[bool] = False
    # What it protects: "classes" = earlier tasks and a class-incremental task's earlier classes (it may run on any
    # benchmark file); "tasks" = earlier tasks only (a run whose benchmark file trains a task over several class
    # steps refuses it, saying so); "none" = nothing of either (naive).
    protects: ClassVar[str] = "classes"

    def task_loss(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor],
                  targets: Any) -> torch.Tensor | None:
        """The loss to train this stage's task with on this batch *instead of* its own (``ctx.task_loss``), e.g.
        MiB's unbiased cross-entropy; None = the task's own. At most one part of a composite may replace it."""
        return None

    def before_stage(self, ctx: StageContext) -> None:
        """Before the optimizer is built: freezing here keeps parameters out of it."""

    def before_epoch(self, ctx: StageContext) -> None:
        """Right after the loop's ``model.train()``."""

    def loss_term(self, ctx: StageContext, images: torch.Tensor,
                  outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """An extra loss term for this step, or None."""
        return None

    def after_backward(self, ctx: StageContext, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Between ``backward()`` and ``optimizer.step()`` (before clipping; unscaled under AMP): every trainable
        parameter's gradient by name. Return the gradients to use instead (any subset), or None."""
        return None

    def after_step(self, ctx: StageContext) -> None:
        """After ``optimizer.step()``."""

    def after_stage(self, ctx: StageContext) -> None:
        """After the last epoch, before evaluation and the checkpoint."""

    def evaluation_state(self, model: nn.Module, task: TaskSpec) -> dict[str, torch.Tensor] | None:
        """Tensors (``model.state_dict()`` names) to load while ``task`` is evaluated or served; the model's own
        are put back afterwards. None = evaluate the model as it is."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ClbenchError(f"strategy {self.name!r} keeps no state but the checkpoint has {sorted(state)}")


def check_protects(strategy: Strategy, protocol: Protocol) -> None:
    """A strategy that protects earlier tasks only cannot run a benchmark file that trains a task over several class
    steps: it would leave that task's earlier classes unprotected while its name says otherwise."""
    stepped = [t for t in protocol.order if sum(e.task == t for e in protocol.experiences) > 1]
    if stepped and strategy.protects == "tasks":
        raise ClbenchError(f"strategy {strategy.name!r} protects earlier tasks only, not a task's earlier classes; "
                           f"benchmark {protocol.name!r} trains {stepped[0]!r} over several class steps (`clbench "
                           "strategies` says what each one protects)")


# The hooks the loop calls, in the order it calls them within a stage (the evaluation hook last).
HOOKS = ("before_stage", "before_epoch", "task_loss", "loss_term", "after_backward", "after_step", "after_stage",
         "evaluation_state")

REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: add a strategy under ``name``; a second class under the same name is an error."""
    def add(cls: type[Strategy]) -> type[Strategy]:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ClbenchError(f"strategy {name!r}: {cls!r} is not a subclass of clbench.strategy.Strategy")
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ClbenchError(f"strategy name {name!r} registered twice: by {REGISTRY[name].__module__}."
                               f"{REGISTRY[name].__qualname__} and by {cls.__module__}.{cls.__qualname__}")
        if "+" in name or not name:
            raise ClbenchError(f"strategy name {name!r}: must be non-empty and must not contain '+'")
        cls.name = name
        cls.description = cls.description or (cls.__doc__ or "").strip().split("\n")[0]
        REGISTRY[name] = cls
        return cls
    return add


@dataclass(frozen=True)
class HyperParameter:
    name: str
    type: Any
    default: Any


def hyperparameters(cls: type[Strategy]) -> dict[str, HyperParameter]:
    """The keyword-only, annotated constructor arguments of a strategy class."""
    if cls.__init__ is object.__init__:
        return {}
    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name == "self":
            continue
        if param.kind is not param.KEYWORD_ONLY or param.default is param.empty or param.name not in hints:
            raise ClbenchError(f"strategy {cls.name!r}: constructor argument {param.name!r} must be keyword-only, "
                               "annotated and have a default")
        out[param.name] = HyperParameter(param.name, hints[param.name], param.default)
    return out


def parse_value(hp: HyperParameter, value: Any, source: str) -> Any:
    """Convert a CLI string or YAML value to the hyperparameter's annotated type."""
    try:
        return _convert(hp.type, value)
    except (TypeError, ValueError) as exc:
        raise ClbenchError(f"{source}: {hp.name} = {value!r}: expected {_type_name(hp.type)} ({exc})") from None


def _convert(kind: Any, value: Any) -> Any:
    if kind is bool:
        return parse_bool(value)
    if typing.get_origin(kind) is tuple:
        items = [v for v in value.split(",") if v] if isinstance(value, str) else list(value)
        return tuple(_convert(typing.get_args(kind)[0], v) for v in items)
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError("not a whole number")
    return kind(value)


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind)) if typing.get_origin(kind) is not tuple else "a comma-separated list"


def summed(terms: list[torch.Tensor]) -> torch.Tensor | None:
    return sum(terms[1:], terms[0]) if terms else None


def loss_terms(strategy: Strategy, ctx: StageContext, images: torch.Tensor,
               outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each strategy's loss term by name (each part of a composite separately), those that returned one, in
    float32: under mixed precision a term computed from half-precision outputs is summed with the task loss in
    float32 (the built-in terms already compute in float32: ``clbench.distill`` casts its inputs)."""
    parts = strategy.parts if isinstance(strategy, Composite) else [strategy]
    terms = {part.name: part.loss_term(ctx, images, outputs) for part in parts}
    return {name: term.float() for name, term in terms.items() if term is not None}


class Composite(Strategy):
    """Several strategies at once: every hook of each, in the order given; loss terms are summed."""

    def __init__(self, parts: list[Strategy]) -> None:
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.shares_first_stage = all(p.shares_first_stage for p in parts)
        replacing = [p.name for p in parts if type(p).task_loss is not Strategy.task_loss]
        if len(replacing) > 1:
            raise ClbenchError(f"strategy {self.name!r}: {replacing[0]} and {replacing[1]} both replace the task loss; "
                               "combine at most one of them")
        scopes = {p.protects for p in parts}
        self.protects = "classes" if "classes" in scopes and "tasks" not in scopes else \
            "tasks" if "tasks" in scopes else "none"

    def _each(self, hook: str, ctx: StageContext) -> None:
        for part in self.parts:
            getattr(part, hook)(ctx)

    def before_stage(self, ctx: StageContext) -> None:
        self._each("before_stage", ctx)

    def before_epoch(self, ctx: StageContext) -> None:
        self._each("before_epoch", ctx)

    def task_loss(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor],
                  targets: Any) -> torch.Tensor | None:
        """The one part's replacement (two parts replacing the task loss are refused when the composite is built)."""
        for part in self.parts:
            loss = part.task_loss(ctx, images, outputs, targets)
            if loss is not None:
                return loss
        return None

    def loss_term(self, ctx: StageContext, images: torch.Tensor,
                  outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return summed(list(loss_terms(self, ctx, images, outputs).values()))

    def after_backward(self, ctx: StageContext, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Each part sees the gradients the parts before it returned."""
        changed: dict[str, torch.Tensor] = {}
        for part in self.parts:
            new = part.after_backward(ctx, {**grads, **changed})
            changed.update(new or {})
        return changed or None

    def after_step(self, ctx: StageContext) -> None:
        self._each("after_step", ctx)

    def after_stage(self, ctx: StageContext) -> None:
        self._each("after_stage", ctx)

    def evaluation_state(self, model: nn.Module, task: TaskSpec) -> dict[str, torch.Tensor] | None:
        """The parts' states merged; two parts that both set one tensor are refused (neither would be served)."""
        merged: dict[str, torch.Tensor] = {}
        for part in self.parts:
            state = part.evaluation_state(model, task) or {}
            clash = sorted(set(state) & set(merged))
            if clash:
                raise ClbenchError(f"{self.name}: two parts set {clash[0]!r} for evaluating {task.name}; "
                                   "combine strategies that serve different tensors")
            merged.update(state)
        return merged or None

    def state_dict(self) -> dict[str, Any]:
        return {p.name: p.state_dict() for p in self.parts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for part in self.parts:
            part.load_state_dict(state.get(part.name, {}))
