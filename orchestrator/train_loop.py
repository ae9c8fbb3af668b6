"""The worker's recipe, run by Ray Train on every worker: setup, steps, finish.

The loss of a step is the sum of token losses over the whole global batch divided by its
number of target tokens, and adapter gradients are summed over workers, so any number of
workers computes the same update as one process with the same global batch.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orchestrator import start_gate
from orchestrator.config.schema import RunConfig
from orchestrator.config.typed import to_typed
from orchestrator.data import GlobalBatchSampler, collate, target_tokens
from orchestrator.data.dataset import TokenizedRows, open_data
from orchestrator.data.packing import PackedRows
from orchestrator.distributed import (
    Dist,
    current_memory_bytes,
    keep_freed_blocks_unmapped,
    peak_memory_bytes,
    release_freed_heap,
    reset_peak_memory,
    unmaps_freed_blocks,
)
from orchestrator.flops import FlopCounter, peak_flops
from orchestrator.imports import SETUP_LIBRARIES, preload, resume_collector
from orchestrator.loss import LossFn, build_loss
from orchestrator.model import fingerprint, load_model, load_tokenizer
from orchestrator.optim import build_optimizer, build_scheduler, state_bytes
from orchestrator.rundir import INTERRUPT
from orchestrator.strategies import Strategy, build_strategy
from orchestrator.tracking import NullTracker, Tracker
from orchestrator.train_state import Checkpointer

log = logging.getLogger("orchestrator")


class TrainingDiverged(RuntimeError):
    """Loss or gradients went bad: stop at once instead of training on garbage."""


@dataclass
class Job:
    """What the steps need, built once by setup()."""

    run: RunConfig
    d: Dist
    pad_id: int
    train: TokenizedRows | PackedRows
    evals: TokenizedRows
    sampler: GlobalBatchSampler
    strategy: Strategy
    model: nn.Module
    loss: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ckpt: Checkpointer
    tracker: Tracker | NullTracker
    steps: int
    start: int
    frozen_bytes: float
    flops: FlopCounter
    peak_flops: float
    window: int = 1
    """Steps until the next sync (see sync()); the first step syncs alone, to measure step time."""
    step_s: float = 0.0
    """This worker's wall time per step over the last window, sent with the next sync."""
    optimizer_bytes: float = 0.0
    """The largest optimizer state of any worker, measured after this attempt's first step."""
    memory: dict[str, float] = field(default_factory=dict)
    """start_memory_bytes (held when setup began) and load_peak_memory_bytes (the peak of setup),
    the largest over workers: what the planner's load figures are calibrated against."""
    frees_memory: bool = False
    """A CPU worker of a distributed run: the heap's free pages go back after each step
    (distributed.release_freed_heap)."""


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function. config: {"run": the run's config}, or {"gate": a
    StartGate's path} for workers started while the command validated the run (driver.EarlyFit)."""
    if not gc.isenabled():  # paused while the worker process started (imports.pause_collector)
        resume_collector()
    run_dict = config["run"] if "run" in config else start_gate.wait(config["gate"])
    if run_dict is None:
        return  # the command found the run's input invalid; nothing was loaded
    run = to_typed(run_dict, RunConfig)
    d = Dist.current(run.cluster.use_gpu)
    tracker = Tracker(run) if d.is_main else NullTracker()  # W&B starts while the worker loads
    failed = True
    try:
        job = setup(run, d, tracker)
        if run_steps(job):
            finish(job)
        failed = False
    finally:
        tracker.finish(failed)


def setup(run: RunConfig, d: Dist, tracker: Tracker | NullTracker) -> Job:
    """Data, base, adapter, strategy, optimizer and schedule, restored from the newest committed
    checkpoint when there is one."""
    frees_memory = unmaps_freed_blocks(d.device.type, d.world)
    if frees_memory:
        keep_freed_blocks_unmapped()
    reset_peak_memory(d.device)
    start_memory = current_memory_bytes(d.device)
    preload(*SETUP_LIBRARIES)
    _quiet_non_zero_ranks(d.rank)
    torch.manual_seed(run.trainer.seed + d.rank)  # dropout masks differ per worker, like their data

    tokenizer = load_tokenizer(run.model)
    # Tokenized once by validation on the driver: memory-mapped here, read a micro-batch at a time.
    train, evals = open_data(run, tokenizer)

    strategy = build_strategy(run)
    peft_model, (n_trainable, n_total) = load_model(run.model, run.quant, run.adapter, d.device, strategy.shard_layer)
    flops = FlopCounter.of(peft_model, peft_model.config)
    loss_fn = build_loss(peft_model, run.trainer.loss_chunk_tokens)
    ckpt = Checkpointer(run, d, strategy, peft_model, fingerprint(run.model, run.quant))
    ckpt.clean_torn()
    resume_from = ckpt.resume_point()
    if resume_from is not None:
        ckpt.restore_adapter(resume_from)  # into the whole adapter (only the base is sharded yet)
    model, optimizer = strategy.prepare(peft_model, lambda ps: build_optimizer(ps, run.optim, run.trainer.lr))
    model.train()
    if run.trainer.compile:
        compile_layers(model)

    t = run.trainer
    grouped = run.data.group_by_length and isinstance(train, TokenizedRows)  # packed rows need none
    sampler = GlobalBatchSampler(
        len(train), t.micro_batch_size, t.grad_accum, d.world, d.rank, t.seed, train.lengths() if grouped else None
    )
    steps = total_steps(run, sampler)
    scheduler = build_scheduler(optimizer, run.optim, steps)
    start = ckpt.restore_state(resume_from, model, optimizer, scheduler) if resume_from is not None else 0
    ckpt.trim_metrics(start)
    frozen_bytes = d.max(strategy.param_bytes(model)["frozen"])
    memory = {"start_memory_bytes": d.max(start_memory), "load_peak_memory_bytes": d.max(peak_memory_bytes(d.device))}
    reset_peak_memory(d.device)  # from here on the peak is the steps' own (steady state)

    tracker.open(steps, start)
    peak, peak_source = peak_flops(d.device, run.model.dtype, run.trainer.peak_tflops) if d.is_main else (0.0, "")
    log.info(
        "trainable params: %d of %d (%.3f%%) | strategy=%s workers=%d (%d threads each) | base bytes per worker: "
        "%d (frozen) | %d train rows, %d eval rows, %d steps of %d sequences",
        n_trainable,
        n_total,
        100 * n_trainable / n_total,
        run.strategy.name,
        d.world,
        torch.get_num_threads(),
        frozen_bytes,
        len(train),
        len(evals),
        steps,
        sampler.global_batch,
    )
    tracker.summary(
        {"trainable_params": n_trainable, "total_params": n_total, "param_bytes_per_worker": frozen_bytes, **memory}
    )
    if d.is_main:
        log.info("MFU against %.1f TFLOP/s per worker (%s)", peak / 1e12, peak_source)
    # Names only: says whether the submitting shell's credentials reached the workers.
    log.info(
        "credentials in the worker environment: %s",
        ", ".join(k for k in run.cluster.secret_env if os.environ.get(k)) or "none",
    )
    return Job(
        run,
        d,
        tokenizer.pad_token_id,
        train,
        evals,
        sampler,
        strategy,
        model,
        loss_fn,
        optimizer,
        scheduler,
        ckpt,
        tracker,
        steps,
        start,
        frozen_bytes,
        flops,
        peak,
        memory=memory,
        frees_memory=frees_memory,
    )


def run_steps(job: Job) -> bool:
    """The optimizer steps from job.start on. False when a stop request ended them early, after
    a checkpoint of the last step was committed."""
    t = job.run.trainer
    pending: list[Pending] = []
    for step in range(job.start, job.steps):
        if not pending:
            window_start = time.perf_counter()
        global_rows = job.sampler.all_step_indices(step)
        n_target = target_tokens(job.train, global_rows)
        lengths = [n for i in global_rows for n in job.train.example_lengths(i)]
        loss = torch.zeros((), device=job.d.device)
        for micro in job.sampler.step_indices(step):
            batch = _to(job.d, job.train.collate([job.train[i] for i in micro], job.pad_id))
            micro_loss = job.loss(job.model, batch, n_target)
            job.strategy.backward(micro_loss)
            loss += micro_loss.detach().float()
        grad_norm = job.strategy.optimizer_step(job.optimizer, job.run.optim.max_grad_norm)
        if job.frees_memory:
            release_freed_heap()
        if step == job.start:
            report_optimizer_bytes(job)
        pending.append(Pending(step + 1, loss, grad_norm, job.scheduler.get_last_lr()[0], n_target, lengths))
        job.scheduler.step()

        done = step + 1
        evaluating = bool(t.eval_every) and done % t.eval_every == 0 and done != job.steps
        saving = bool(t.save_every) and done % t.save_every == 0
        if len(pending) < job.window and not (evaluating or saving or done == job.steps):
            continue
        stop = sync(job, pending, window_start)
        pending = []
        evaluated = {}
        if evaluating:
            evaluated = evaluate(job)
            job.tracker.log(done, evaluated)
        if saving:
            job.ckpt.save_step(done, job.model, job.optimizer, job.scheduler, evaluated.get("eval_loss"))
        if stop and done < job.steps:
            if not saving:
                job.ckpt.save_step(done, job.model, job.optimizer, job.scheduler)
            if job.ckpt.dir.stop_reason() == INTERRUPT:
                log.warning("interrupted: committed step-%d, stopping", done)
            else:
                log.warning("preemption requested: committed step-%d, stopping so the job can be requeued", done)
            return False
    return True


@dataclass
class Pending:
    """A step computed but not synced yet: its loss (this worker's share) and grad norm are still
    on the device."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    n_target: int
    lengths: list[int]


MAX_WINDOW = 100
"""The most steps between two syncs, however short a step."""


def sync(job: Job, pending: list[Pending], window_start: float) -> bool:
    """Wait for the pending steps, agree on their losses and on whether any worker sees a stop
    request, check and log them; True when the run is to stop.

    Waiting for the device and for the other workers after every step would cost a collective,
    a file check and the host-device round trip per step, and keep the host from queueing the next
    step's kernels while the device works. So they happen once per window of steps, sized to
    trainer.sync_every_s from the previous window's step time. Every worker must pick the same
    windows (the sync is collective), so that step time travels in the same all-reduce as the
    losses and the window is computed from the sum all workers get."""
    d, t = job.d, job.run.trainer
    asked = float(job.ckpt.dir.stop_requested())
    local = torch.cat([torch.stack([p.loss for p in pending]), torch.tensor([asked, job.step_s], device=d.device)])
    *losses, stop, step_s = d.all_reduce(local).tolist()
    grad_norms = torch.stack([p.grad_norm.to(d.device).float() for p in pending]).tolist()
    seconds = time.perf_counter() - window_start
    job.step_s = seconds / len(pending)
    step_s /= d.world
    job.window = max(1, min(MAX_WINDOW, int(t.sync_every_s / step_s))) if step_s > 0 else 1
    for p, loss, grad_norm in zip(pending, losses, grad_norms):
        check_step(p.step, loss, grad_norm, p.n_target)
    logged = [
        (p, loss, g)
        for p, loss, g in zip(pending, losses, grad_norms)
        if p.step % t.log_every == 0 or p.step == job.steps
    ]
    if logged:
        _log_window(job, pending, logged, seconds)
    job.tracker.advance(len(pending))  # after the rows: the bar shows the newest loss
    return bool(stop)


def _log_window(job: Job, pending: list[Pending], logged: list[tuple[Pending, float, float]], seconds: float) -> None:
    d = job.d
    # One rate for the window: with the device running ahead of the host, one step's wall time
    # is not measurable without a sync of its own.
    lengths = [n for p in pending for n in p.lengths]
    tokens_per_s = sum(lengths) / seconds
    mfu = job.flops.batch(lengths) / (seconds * d.world * job.peak_flops) if job.peak_flops else None
    memory = _memory_metrics(job)  # collective: every worker logs the same steps
    for p, loss, grad_norm in logged:
        job.tracker.log(
            p.step,
            {
                "loss": loss,
                "lr": p.lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "mfu": mfu,
                "target_tokens": p.n_target,
                **memory,
                "param_bytes_per_worker": job.frozen_bytes,
                "optimizer_bytes_per_worker": job.optimizer_bytes,
                "epoch": (p.step - 1) // job.sampler.steps_per_epoch,
            },
        )


def finish(job: Job) -> None:
    """Final evaluation, then the final adapter."""
    final_eval = evaluate(job)
    if final_eval:
        job.tracker.log(job.steps, final_eval)
    job.ckpt.save_final(job.steps, job.model)


# --- the pieces ---------------------------------------------------------------------------------


def report_optimizer_bytes(job: Job) -> None:
    """Log the optimizer state per worker (the largest over workers). Optimizers create their
    state at their first step, so this runs after it rather than with the start-up figures."""
    job.optimizer_bytes = job.d.max(state_bytes(job.optimizer))
    log.info("optimizer state bytes per worker: %d (%s)", job.optimizer_bytes, job.run.optim.name)
    job.tracker.summary({"optimizer_bytes_per_worker": job.optimizer_bytes})


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer in place, as torchtune does: the layers share one graph
    (their parameters are its inputs), the sharding hooks around them stay eager, and the loss,
    which chunks the output head, is left out."""
    from orchestrator.strategies.fsdp import decoder_layers

    for layer in decoder_layers(model):
        layer.compile()


def _memory_metrics(job: Job) -> dict[str, float]:
    """peak_memory_bytes covers the whole run so far (setup included), steady_peak_memory_bytes
    the steps alone."""
    steady = job.d.max(peak_memory_bytes(job.d.device))
    return {
        "peak_memory_bytes": max(steady, job.memory.get("load_peak_memory_bytes", 0.0)),
        "steady_peak_memory_bytes": steady,
        **job.memory,
    }


def total_steps(run: RunConfig, sampler: GlobalBatchSampler) -> int:
    return run.trainer.max_steps if run.trainer.max_steps > 0 else run.trainer.epochs * sampler.steps_per_epoch


def _to(d: Dist, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(d.device) for k, v in batch.items()}


def check_step(step: int, loss: float, grad_norm: float, n_target: int | None = None) -> None:
    """The silent failures of 4-bit bases under sharding (integer storage flattened, weights not
    gathered) show up as a loss of exactly 0 or as non-finite values: stop there, loudly.
    n_target: the step's target tokens; with none the loss is 0 for want of data, said as such."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"step {step}: loss is {loss}; check lr, data and the base weights")
    if loss == 0.0 and n_target == 0:
        raise TrainingDiverged(
            f"step {step}: loss is 0 because the step's global batch holds no target token: truncation to "
            "data.max_seq_len cut every response in it away; raise data.max_seq_len or shorten the prompts"
        )
    if loss == 0.0:
        raise TrainingDiverged(
            f"step {step}: loss is exactly 0, which a language model does not reach honestly; "
            "the base weights are likely not gathered or dequantized correctly"
        )
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(
            f"step {step}: adapter grad norm is {grad_norm}; lower trainer.lr or optim.max_grad_norm"
        )


def evaluate(job: Job) -> dict[str, float]:
    """Mean token loss over the eval rows, split across workers. Every worker runs the same number
    of forward passes (sharded forwards are collective), padding its last batches with weight 0."""
    examples, d, micro, model = job.evals, job.d, job.run.trainer.micro_batch_size, job.model
    if not examples:
        return {}
    model.eval()
    per_pass = micro * d.world
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for b in range(math.ceil(len(examples) / per_pass)):
            start = b * per_pass + d.rank * micro
            chunk = examples[start : start + micro]
            weight = 1.0 if chunk else 0.0
            rows = chunk or examples[:1]  # a stand-in batch keeps this worker in the collectives
            n = target_tokens(rows, range(len(rows)))
            loss_sum += weight * job.loss(model, _to(d, collate(rows, job.pad_id)), n).double().cpu() * max(n, 1)
            tokens += weight * n
    model.train()
    loss_sum, tokens = d.all_reduce(loss_sum), d.all_reduce(tokens)
    loss = (loss_sum / tokens.clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _quiet_non_zero_ranks(rank: int) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if rank != 0:
        transformers.utils.logging.set_verbosity_error()
        logging.getLogger().setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
    else:
        # Expected on CPU (paged optimizers fall back to plain memory) or deprecation chatter of
        # the libraries: not something the user can act on.
        warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        log.setLevel(logging.INFO)
        if not log.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(h)
            log.propagate = False
