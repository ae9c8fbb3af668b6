"""The worker's training loop, run by Ray Train on every worker.

Top to bottom: typed config, data, base model, adapter, strategy, optimizer, then the steps.
The loss of a step is the sum of token losses over the whole global batch divided by its
number of target tokens, and adapter gradients are summed over workers, so any number of
workers computes the same update as one process with the same global batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator import adapters, checkpoint
from orchestrator.config.schema import RunConfig, as_dict
from orchestrator.config.typed import to_typed
from orchestrator.data import IGNORE_INDEX, GlobalBatchSampler, collate, encode_rows, read_rows
from orchestrator.model import fingerprint, load_base, load_tokenizer
from orchestrator.optim import build_optimizer, build_scheduler
from orchestrator.strategies import build_strategy
from orchestrator.tracking import NullTracker, Tracker

log = logging.getLogger("orchestrator")


class TrainingDiverged(RuntimeError):
    """Loss or gradients went bad: stop at once instead of training on garbage."""


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @classmethod
    def current(cls, use_gpu: bool) -> "Dist":
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cpu")
        if use_gpu:
            from ray.train.torch import get_device  # the GPU Ray assigned to this worker

            device = get_device()
            torch.cuda.set_device(device)
        return cls(rank, world, local, device)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        value = value.detach().clone().to(self.device)
        if self.world > 1:
            dist.all_reduce(value, op=op)
        return value


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


def split_rows(run: RunConfig) -> tuple[list[dict], list[dict]]:
    """Train and eval rows; the eval split is a seeded random subset, the same on every worker."""
    rows = read_rows(run.data.path, run.data.format)
    if run.data.eval_path:
        return rows, read_rows(run.data.eval_path, run.data.format)
    n_eval = int(len(rows) * run.data.eval_fraction)
    if n_eval == 0:
        return rows, []
    g = torch.Generator().manual_seed(run.trainer.seed)
    perm = torch.randperm(len(rows), generator=g).tolist()
    eval_idx = set(perm[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [rows[i] for i in sorted(eval_idx)]


def target_tokens(examples, indices) -> int:
    # The model shifts labels by one: the first position is never a target.
    return sum(sum(1 for t in examples[i][1][1:] if t != IGNORE_INDEX) for i in indices)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def total_steps(run: RunConfig, sampler: GlobalBatchSampler) -> int:
    return run.trainer.max_steps if run.trainer.max_steps > 0 else run.trainer.epochs * sampler.steps_per_epoch


def check_step(step: int, loss: float, grad_norm: float) -> None:
    """The silent failures of 4-bit bases under sharding (integer storage flattened, weights not
    gathered) show up as a loss of exactly 0 or as non-finite values: stop there, loudly."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"step {step}: loss is {loss}; check lr, data and the base weights")
    if loss == 0.0:
        raise TrainingDiverged(
            f"step {step}: loss is exactly 0, which a language model does not reach honestly; "
            "the base weights are likely not gathered or dequantized correctly"
        )
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(f"step {step}: adapter grad norm is {grad_norm}; lower trainer.lr or optim.max_grad_norm")


def evaluate(model, examples, d: Dist, micro: int, pad_id: int) -> dict:
    """Mean token loss over the eval rows, split across workers. Every worker runs the same number
    of forward passes (sharded forwards are collective), padding its last batches with weight 0."""
    if not examples:
        return {}
    model.eval()
    per_pass = micro * d.world
    passes = math.ceil(len(examples) / per_pass)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for b in range(passes):
            start = b * per_pass + d.rank * micro
            chunk = examples[start : start + micro]
            weight = 1.0 if chunk else 0.0
            rows = chunk or examples[:1]  # a stand-in batch keeps this worker in the collectives
            batch = {k: v.to(d.device) for k, v in collate(rows, pad_id).items()}
            n = target_tokens(rows, range(len(rows)))
            out = model(**batch, num_items_in_batch=max(n, 1))
            loss_sum += weight * out.loss.double().cpu() * max(n, 1)
            tokens += weight * n
    model.train()
    loss_sum, tokens = d.all_reduce(loss_sum), d.all_reduce(tokens)
    loss = (loss_sum / tokens.clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def manifest(run: RunConfig, step: int, base_fp: dict) -> dict:
    import hashlib

    import bitsandbytes
    import peft
    import transformers

    import orchestrator

    cfg = as_dict(run)
    cfg.pop("output_dir")
    return {
        "base_model_path": str(Path(run.model.path).resolve()),
        "base_fingerprint": base_fp,
        "adapter": as_dict(run.adapter),
        "quant": as_dict(run.quant),
        "step": step,
        "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest(),
        "versions": {
            "orchestrator": orchestrator.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
    }


STATE_FILE = "trainer_state.json"


def resume_point(run: RunConfig) -> Path | None:
    """The checkpoint to continue from: the newest committed one in output_dir (also after Ray
    restarts the worker group), else an explicit resume path, else none."""
    if run.resume == "never":
        return None
    found = checkpoint.newest(Path(run.output_dir) / "checkpoints")
    if found is None and run.resume != "auto":
        found = Path(run.resume)
    return found


class BaseMismatch(RuntimeError):
    """An adapter meets a base other than the one it was trained on."""


def check_base(manifest_path: Path, current: dict) -> None:
    saved = json.loads(manifest_path.read_text())["base_fingerprint"]
    if saved["sha256"] != current["sha256"]:
        differs = [k for k in current["parts"] if saved["parts"].get(k) != current["parts"][k]]
        raise BaseMismatch(
            f"{manifest_path.parent} was trained on a different base: its {', '.join(differs)} differ from "
            "model.path's (architecture config, tokenizer/chat template, weight files, or quantization)"
        )


def restore_adapter(peft_model, ckpt: Path, expected: dict, base_fp: dict) -> None:
    """Load step-<N>/adapter into the model, after checking it belongs to this base; any missing
    or unexpected key is an error."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    check_base(ckpt / "adapter" / "manifest.json", base_fp)
    saved = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        raise adapters.AdapterIntegrityError(f"{ckpt}: adapter keys do not match this run's adapter (missing {missing[:5]}, unexpected {extra[:5]})")
    set_peft_model_state_dict(peft_model, saved)


def trim_metrics(out: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from, so each step appears once."""
    path = out / "metrics.jsonl"
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def save_state(state_dir: Path, step: int, run: RunConfig, d: Dist, strategy, model, optimizer, scheduler,
               eval_loss: float | None = None) -> None:
    """Everything needed to continue exactly: optimizer (by the strategy), scheduler, step, and
    every rank's RNG states. The data position is the step itself (the sampler is seekable)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    strategy.save_state(model, optimizer, state_dir)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, state_dir / f"rng-{d.rank}.pt")
    if d.rank == 0:
        torch.save(scheduler.state_dict(), state_dir / "scheduler.pt")
        (state_dir / STATE_FILE).write_text(json.dumps({
            "step": step, "world_size": d.world, "strategy": run.strategy.name, "global_batch": run.global_batch(),
            "eval_loss": eval_loss,
        }) + "\n")


def resume_state(ckpt: Path, run: RunConfig, d: Dist, strategy, model, optimizer, scheduler) -> int:
    state_dir = ckpt / "state"
    meta = json.loads((state_dir / STATE_FILE).read_text())
    if run.strategy.name.startswith("zero") and meta["world_size"] != d.world:
        raise RuntimeError(
            f"{ckpt} was written by {meta['world_size']} DeepSpeed workers; its optimizer partitions cannot be loaded "
            f"by {d.world}. Resume with cluster.num_workers={meta['world_size']}, or use strategy=fsdp/ddp, whose "
            "state loads on any number of workers"
        )
    strategy.load_state(model, optimizer, state_dir)
    scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=False))
    rng_file = state_dir / f"rng-{d.rank}.pt"
    if rng_file.is_file():  # a worker that did not exist before keeps its fresh seed
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return int(meta["step"])


def train_loop(config: dict) -> None:
    run = to_typed(config["run"], RunConfig)
    d = Dist.current(run.cluster.use_gpu)
    _quiet_non_zero_ranks(d.rank)
    torch.manual_seed(run.trainer.seed + d.rank)  # dropout masks differ per worker, like their data

    tokenizer = load_tokenizer(run.model)
    train_rows, eval_rows = split_rows(run)
    train = encode_rows(train_rows, run.data.format, tokenizer, run.data.max_seq_len)
    evals = encode_rows(eval_rows, run.data.format, tokenizer, run.data.max_seq_len)

    strategy = build_strategy(run)
    with strategy.load_context():
        base = load_base(run.model, run.quant, d.device)
    peft_model = adapters.attach_adapter(base, run.adapter)
    expected = adapters.adapter_shapes(peft_model)
    n_trainable, n_total = peft_model.get_nb_trainable_parameters()
    out = Path(run.output_dir)
    if d.rank == 0:
        for torn in checkpoint.clean_torn(out / "checkpoints"):
            log.warning("removed incomplete checkpoint %s (never committed)", torn)
    d.barrier()
    base_fp = fingerprint(run.model, run.quant)
    ckpt = resume_point(run)
    if ckpt is not None:
        restore_adapter(peft_model, ckpt, expected, base_fp)
    model, optimizer = strategy.prepare(peft_model, lambda ps: build_optimizer(ps, run.optim, run.trainer.lr))
    model.train()

    sampler = GlobalBatchSampler(len(train), run.trainer.micro_batch_size, run.trainer.grad_accum, d.world, d.rank, run.trainer.seed)
    steps = total_steps(run, sampler)
    scheduler = build_scheduler(optimizer, run.optim, steps)
    start = 0
    if ckpt is not None:
        start = resume_state(ckpt, run, d, strategy, model, optimizer, scheduler)
        log.info("resuming from %s at step %d", ckpt, start)
    held = strategy.param_bytes(model)
    frozen_per_worker = d.all_reduce(torch.tensor(float(held["frozen"])), op=dist.ReduceOp.MAX).item()

    if d.rank == 0:
        trim_metrics(out, start)
    tracker = Tracker(run, steps, start) if d.rank == 0 else NullTracker()
    log.info(
        "trainable params: %d of %d (%.3f%%) | strategy=%s workers=%d | base bytes per worker: %d (frozen) | "
        "%d train rows, %d eval rows, %d steps of %d sequences",
        n_trainable, n_total, 100 * n_trainable / n_total, run.strategy.name, d.world, held["frozen"],
        len(train), len(evals), steps, sampler.global_batch,
    )
    tracker.summary({"trainable_params": n_trainable, "total_params": n_total, "param_bytes_per_worker": frozen_per_worker})
    # Names only: says whether the submitting shell's credentials reached the workers.
    log.info("credentials in the worker environment: %s",
             ", ".join(k for k in run.cluster.secret_env if os.environ.get(k)) or "none")

    def save(target: Path, step: int, with_state: bool, eval_loss: float | None = None) -> None:
        """Adapter (rank 0) and, for step checkpoints, the training state (all ranks) into one
        staging directory, published and marked committed only once everyone has written."""
        adapter_state = strategy.adapter_state_dict(model)  # collective for sharded adapters
        tmp = checkpoint.stage(target) if d.rank == 0 else checkpoint.staging_dir(target)
        d.barrier()
        if d.rank == 0:
            adapter_dir = tmp / "adapter" if with_state else tmp
            adapters.save_adapter(peft_model, adapter_state, expected, adapter_dir, manifest(run, step, base_fp))
        if with_state:
            save_state(tmp / "state", step, run, d, strategy, model, optimizer, scheduler, eval_loss)
        d.barrier()
        if d.rank == 0:
            checkpoint.publish(tmp, target)
            if with_state:
                checkpoint.prune(out / "checkpoints", run.trainer.keep_last, run.trainer.keep_best)
        d.barrier()

    failed = True
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            global_rows = sampler.all_step_indices(step)
            n_target = target_tokens(train, global_rows)
            n_seen = sum(len(train[i][0]) for i in global_rows)
            loss = torch.zeros((), device=d.device)
            for micro in sampler.step_indices(step):
                batch = {k: v.to(d.device) for k, v in collate([train[i] for i in micro], tokenizer.pad_token_id).items()}
                result = model(**batch, num_items_in_batch=max(n_target, 1))
                strategy.backward(result.loss)
                loss += result.loss.detach().float()
            grad_norm = strategy.optimizer_step(optimizer, run.optim.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            # The loss and whether any rank sees a preemption request travel in one all-reduce, so
            # the request costs no extra collective and every rank stops at the same step.
            asked = torch.tensor(float((out / checkpoint.PREEMPT_REQUEST).exists()), device=d.device)
            loss_val, stop = d.all_reduce(torch.stack([loss, asked])).tolist()
            check_step(step + 1, loss_val, float(grad_norm))
            done = step + 1
            tracker.advance()
            if done % run.trainer.log_every == 0 or done == steps:
                elapsed = time.perf_counter() - t0
                peak = d.all_reduce(torch.tensor(float(peak_memory_bytes(d.device))), op=dist.ReduceOp.MAX).item()
                tracker.log(done, {
                    "loss": loss_val, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": n_seen / elapsed,
                    "target_tokens": n_target, "peak_memory_bytes": peak, "param_bytes_per_worker": frozen_per_worker,
                    "epoch": step // sampler.steps_per_epoch,
                })
            evaluated = {}
            if run.trainer.eval_every and done % run.trainer.eval_every == 0 and done != steps:
                evaluated = evaluate(model, evals, d, run.trainer.micro_batch_size, tokenizer.pad_token_id)
                tracker.log(done, evaluated)
            saved = bool(run.trainer.save_every) and done % run.trainer.save_every == 0
            if saved:
                save(out / "checkpoints" / f"step-{done}", done, with_state=True, eval_loss=evaluated.get("eval_loss"))
            if stop and done < steps:
                if not saved:
                    save(out / "checkpoints" / f"step-{done}", done, with_state=True)
                log.warning("preemption requested: committed step-%d, stopping so the job can be requeued", done)
                failed = False
                return
        final_eval = evaluate(model, evals, d, run.trainer.micro_batch_size, tokenizer.pad_token_id)
        if final_eval:
            tracker.log(steps, final_eval)
        save(out / "adapter", steps, with_state=False)
        failed = False
    finally:
        tracker.finish(failed)
