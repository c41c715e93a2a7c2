"""`clbench run`: one strategy through every stage, every task evaluated after each (see ``Strategy``'s
docstring for the loop). The environment pieces live in ``clbench.runtime``, the files in ``clbench.recorder``."""


from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Generator

from clbench.bn_audit import BatchNormAudit
from clbench.build import Setup, prepare
from clbench.config import RunConfig
from clbench.recorder import Recorder
from clbench.resources import Timer, budget_checks, device_name, latency_ms, peak_memory_mb, reset_peak_memory
from clbench.runtime import (
    Session,
    resolve_device,
)
from clbench.stage import (
    InStage,
    checkpoint,
    evaluate_stage,
    log_resources,
    open_trackers,
    run_stage,
    stage1_cache_fits,
    stage_context,
    stage_settings,
    stage_steps,
    start,
)
from clbench.trackers import Trackers


def run(config: RunConfig, *, stage1_cache: Path | None = None, on_stage: Callable[[int, str], None] | None = None,
        session: Session | None = None, resume: bool = False, group: tuple[str, Path] | None = None) -> Path:
    """Train and evaluate every stage; returns the run folder. Finished stages stay on disk if a later one fails.

    ``stage1_cache``: a file holding the model right after stage-1 training for exactly this configuration
    (but the strategy); used if present and the strategy declares ``shares_first_stage``, written if absent.
    ``on_stage(stage, task)`` is called before each stage (progress displays). ``session``: shared caches
    (a comparison passes one to all its cells). ``resume``: ``out/run_id`` holds an interrupted run of this
    configuration; continue it after its last readable stage checkpoint (every later stage is redone).
    ``group``: (name, folder) the trackers file this run under (a comparison: its name and folder; default
    ("clbench", out)).
    """
    stages = run_stages(config, stage1_cache=stage1_cache, on_stage=on_stage, session=session, resume=resume,
                        group=group)
    while True:
        try:
            next(stages)
        except StopIteration as finished:
            return finished.value


def run_stages(config: RunConfig, *, stage1_cache: Path | None = None,
               on_stage: Callable[[int, str], None] | None = None, session: Session | None = None,
               resume: bool = False, group: tuple[str, Path] | None = None,
               last_stage: int | None = None) -> Generator[int, None, Path]:
    """``run`` as a generator: yields each stage's number once its checkpoint and rows are on disk (0: the
    stage-0 evaluation of a new run), then ``DONE`` once resources.json is written; returns the run folder.
    ``last_stage``: stop after that stage (no resources.json: the run stays resumable)."""
    session = session or Session()
    peak_rss = reset_peak_memory(resolve_device(config.device))   # this run's peak, not an earlier cell's
    setup = prepare(config, session)
    recorder, audit, done = start(setup, session, resume)
    if done == 0:
        yield 0
    trackers = open_trackers(setup, recorder, done, group or ("clbench", Path(config.out)))
    try:
        for stage, experience in enumerate(setup.stream.train_stream, start=1):
            if last_stage is not None and stage > last_stage:
                trackers.close()
                return recorder.run_dir
            if stage > done:
                if on_stage:
                    on_stage(stage, setup.stage_task(stage).name)
                run_and_commit(setup, recorder, audit, trackers, stage, experience, stage1_cache)
                yield stage
        write_resources(recorder, setup, session, peak_rss)
        log_resources(trackers, recorder.resources)
    except BaseException as exc:
        trackers.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    trackers.close()
    yield DONE
    return recorder.run_dir


DONE = -1  # what run_stages yields once the run is complete


def run_and_commit(setup: Setup, recorder: Recorder, audit: BatchNormAudit, trackers: Trackers, stage: int,
                   experience: Any, stage1_cache: Path | None) -> None:
    """One stage: train (or restore), after_stage, evaluate and audit, checkpoint and rows, trackers."""
    ctx = stage_context(setup, stage, experience)
    use_cache = stage == 1 and setup.strategy.shares_first_stage
    if use_cache and stage1_cache is not None and not stage1_cache_fits(stage1_cache, setup.config):
        stage1_cache.unlink()   # made without the curve this run asks for: trained again (bit for bit) and rewritten
    in_stage = InStage(setup, recorder, trackers, stage, offset=sum(stage_steps(setup)[: stage - 1]))
    run_stage(recorder, ctx, setup.strategy, stage_settings(setup.config, ctx.task.name, setup.precision),
              progress=setup.config.progress, cache=stage1_cache if use_cache else None, in_stage=in_stage)
    evaluate_stage(recorder, audit, setup, stage)
    recorder.commit(stage, checkpoint(setup, ctx, audit))
    trackers.stage(stage, recorder.rows, setup.specs)


def write_resources(recorder: Recorder, setup: Setup, session: Session, peak_rss: str) -> None:
    """resources.json: the stages' times plus latency in float32 and under --amp (once per session, architecture
    and device), memory, budgets, and which path each task's training data took."""
    model, specs, device, sizes = setup.model, setup.specs, setup.device, setup.config.latency_sizes
    amp = setup.precision
    key = (tuple((n, p.shape) for n, p in model.named_parameters()), tuple(t.name for t in specs), str(device), sizes,
           amp.name)
    if key not in session.latency:
        session.latency[key] = {
            precision_name: {t.name: {size: latency_ms(model, t, size, device, autocast=autocast) for size in sizes}
                             for t in specs}
            for precision_name, autocast in (("fp32", None), (amp.name, amp.autocast())) if precision_name != "off"}
    resources = recorder.resources
    resources.device, resources.memory = device_name(device), peak_memory_mb(device, peak_rss)
    resources.latency_ms = session.latency[key]["fp32"]
    resources.latency_amp_ms = session.latency[key].get(amp.name, {})
    resources.latency_detail = {"timer": Timer(device).name, "batch": 1, "amp": amp.to_dict()["autocast_dtype"],
                                "includes": "forward + the task's post-processing (decode + NMS, label map, class)"}
    resources.training_data = setup.training_data()
    resources.budgets = budget_checks(model.parameter_counts()["total"],
                                      {t: v.get(512) for t, v in resources.latency_ms.items()}, resources.device)
    recorder.write_resources()
