"""Saving and restoring what a run needs to continue exactly.

A step checkpoint holds the adapter (PEFT format, with a manifest naming its base) and the
training state: the optimizer (written by the strategy), the scheduler, the step and every
rank's RNG states. The data position is the step itself, because the sampler computes any
step's rows directly. Everything is staged and committed through checkpoint.py, so a crash
mid-save never leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from orchestrator import adapters, checkpoint
from orchestrator.config.schema import RunConfig, as_dict
from orchestrator.distributed import Dist
from orchestrator.model import resolve_model_path
from orchestrator.rundir import ADAPTER, ADAPTER_WEIGHTS, MANIFEST, STATE, TRAINER_STATE, RunDir
from orchestrator.strategies import Strategy

log = logging.getLogger("orchestrator")


class BaseMismatch(RuntimeError):
    """An adapter meets a base other than the one it was trained on."""


class WorkerCountMismatch(RuntimeError):
    """DeepSpeed optimizer partitions written by N workers cannot be loaded by M."""


def check_base(manifest_path: Path, current: dict) -> None:
    saved = json.loads(manifest_path.read_text())["base_fingerprint"]
    if saved["sha256"] != current["sha256"]:
        differs = [k for k in current["parts"] if saved["parts"].get(k) != current["parts"][k]]
        raise BaseMismatch(
            f"{manifest_path.parent} was trained on a different base: its {', '.join(differs)} differ from "
            "model.path's (architecture config, tokenizer/chat template, weight files, or quantization)"
        )


def manifest(run: RunConfig, step: int, base_fp: dict) -> dict:
    """What an adapter carries about itself: its base (path and fingerprint), adapter and
    quantization settings, step, a hash of the config, and the library versions."""
    import bitsandbytes
    import peft
    import transformers

    import orchestrator

    cfg = as_dict(run)
    cfg.pop("output_dir")
    return {
        "base_model_path": str(resolve_model_path(run.model.path).resolve()),
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


class Checkpointer:
    """The run's checkpoint client: where to resume from, restoring, and committed saves."""

    def __init__(self, run: RunConfig, d: Dist, strategy: Strategy, peft_model: nn.Module, base_fp: dict):
        self.run, self.d, self.strategy, self.peft_model, self.base_fp = run, d, strategy, peft_model, base_fp
        self.dir = RunDir(Path(run.output_dir))
        # Full shapes, taken before any sharding: a save must hold whole tensors, never shards.
        self.expected = adapters.adapter_shapes(peft_model)

    def clean_torn(self) -> None:
        """Remove what a crash mid-save left behind (rank 0, before anyone reads checkpoints)."""
        if self.d.is_main:
            for torn in checkpoint.clean_torn(self.dir.checkpoints):
                log.warning("removed incomplete checkpoint %s (never committed)", torn)
        self.d.barrier()

    def resume_point(self) -> Path | None:
        """The newest committed checkpoint in the run directory (also after Ray restarts the
        worker group), else an explicit resume path, else none."""
        if self.run.resume == "never":
            return None
        found = checkpoint.newest(self.dir.checkpoints)
        if found is None and self.run.resume != "auto":
            found = Path(self.run.resume)
        return found

    def restore_adapter(self, ckpt: Path) -> None:
        """Load ckpt's adapter into the (not yet sharded) model, after checking it belongs to
        this base; a missing or unexpected key is an error."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        check_base(ckpt / ADAPTER / MANIFEST, self.base_fp)
        saved = load_file(ckpt / ADAPTER / ADAPTER_WEIGHTS)
        missing, extra = sorted(set(self.expected) - set(saved)), sorted(set(saved) - set(self.expected))
        if missing or extra:
            raise adapters.AdapterIntegrityError(
                f"{ckpt}: adapter keys do not match this run's adapter (missing {missing[:5]}, unexpected {extra[:5]})"
            )
        set_peft_model_state_dict(self.peft_model, saved)

    def restore_state(self, ckpt: Path, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler) -> int:
        """Optimizer, scheduler and RNG states from ckpt; returns the step to continue from."""
        state_dir = ckpt / STATE
        meta = json.loads((state_dir / TRAINER_STATE).read_text())
        if self.run.strategy.name.startswith("zero") and meta["world_size"] != self.d.world:
            raise WorkerCountMismatch(
                f"{ckpt} was written by {meta['world_size']} DeepSpeed workers; its optimizer partitions cannot be "
                f"loaded by {self.d.world}. Resume with cluster.num_workers={meta['world_size']}, or use "
                "strategy=fsdp/ddp, whose state loads on any number of workers"
            )
        self.strategy.load_state(model, optimizer, state_dir)
        scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=False))
        rng_file = state_dir / f"rng-{self.d.rank}.pt"
        if rng_file.is_file():  # a worker that did not exist before keeps its fresh seed
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        step = int(meta["step"])
        log.info("resuming from %s at step %d", ckpt, step)
        return step

    def save_step(
        self, step: int, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler, eval_loss: float | None = None
    ) -> None:
        """Commit checkpoints/step-<step> (adapter and training state), then prune old ones."""
        self._save(self.dir.step(step), step, model, (optimizer, scheduler, eval_loss))
        if self.d.is_main:
            checkpoint.prune(self.dir.checkpoints, self.run.trainer.keep_last, self.run.trainer.keep_best)
        self.d.barrier()

    def save_final(self, step: int, model: nn.Module) -> Path:
        """Commit the final adapter (no training state) as the run's adapter/ directory."""
        self._save(self.dir.adapter, step, model, None)
        return self.dir.adapter

    def _save(self, target: Path, step: int, model: nn.Module, state: tuple | None) -> None:
        """Adapter (rank 0) and, for step checkpoints, the training state (all ranks) into one
        staging directory, published and marked committed only once everyone has written."""
        d = self.d
        adapter_state = self.strategy.adapter_state_dict(model)  # collective for sharded adapters
        tmp = checkpoint.stage(target) if d.is_main else checkpoint.staging_dir(target)
        d.barrier()
        if d.is_main:
            adapter_dir = tmp / ADAPTER if state else tmp
            adapters.save_adapter(
                self.peft_model, adapter_state, self.expected, adapter_dir, manifest(self.run, step, self.base_fp)
            )
        if state:
            self._save_state(tmp / STATE, step, model, *state)
        d.barrier()
        if d.is_main:
            checkpoint.publish(tmp, target)
        d.barrier()

    def _save_state(
        self,
        state_dir: Path,
        step: int,
        model: nn.Module,
        optimizer: Optimizer,
        scheduler: LRScheduler,
        eval_loss: float | None,
    ) -> None:
        d = self.d
        state_dir.mkdir(parents=True, exist_ok=True)
        self.strategy.save_state(model, optimizer, state_dir)
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(rng, state_dir / f"rng-{d.rank}.pt")
        if d.is_main:
            torch.save(scheduler.state_dict(), state_dir / "scheduler.pt")
            (state_dir / TRAINER_STATE).write_text(
                json.dumps(
                    {
                        "step": step,
                        "world_size": d.world,
                        "strategy": self.run.strategy.name,
                        "global_batch": self.run.global_batch(),
                        "eval_loss": eval_loss,
                    }
                )
                + "\n"
            )

    def trim_metrics(self, step: int) -> None:
        """Drop metrics logged after `step` (by an attempt that died before its next checkpoint),
        so that each step appears once."""
        path = self.dir.metrics
        if self.d.is_main and path.is_file():
            keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))
