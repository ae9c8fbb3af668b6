"""zero2, zero3, zero3_offload: DeepSpeed ZeRO behind the Strategy Protocol.

The DeepSpeed config is generated from the run (micro batch, grad accum, clipping, precision,
stage, offload, buckets); a user JSON (strategy.ds_config) is merged in only where it does not
contradict those settings.

Gradient semantics match the replicated strategies: the loop's loss is normalised by the global
number of target tokens, so the single-process gradient is the SUM over workers. DeepSpeed
divides the loss by its gradient_accumulation_steps and averages gradients over the
data-parallel world, so `backward` multiplies the loss by world_size * grad_accum first. The
loop's micro-batches are DeepSpeed's accumulation micro-steps: `backward` calls engine.step()
after every micro-batch but the last (DeepSpeed only counts there), and `optimizer_step` calls
the boundary engine.step() that reduces, clips and updates once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.config.schema import ZERO_STAGES as STAGES
from orchestrator.config.schema import RunConfig, StrategyConfig, flatten
from orchestrator.strategies import OptimizerFactory


class DeepSpeedConfigConflict(ValueError):
    """A user DeepSpeed JSON contradicts what the run configuration sets."""


def _same(a: Any, b: Any) -> bool:
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return float(a) == float(b)
    return a == b


def merge_user_config(generated: dict, user: dict, source: str = "strategy.ds_config") -> dict:
    """generated + user, where every leaf the user sets must either be absent from `generated`
    or equal to it. All conflicts are reported in one error. Precision sections the run turns off
    (e.g. user bf16 on an fp32 run) conflict too."""
    gen_flat, user_flat = flatten(generated), flatten(user)
    conflicts = []
    for key, uval in user_flat.items():
        if key in gen_flat and not _same(gen_flat[key], uval):
            conflicts.append(f"{key}: run sets {gen_flat[key]!r}, {source} sets {uval!r}")
    for section in ("bf16", "fp16"):
        if section not in generated and flatten({section: user.get(section, {})}).get(f"{section}.enabled") is True:
            conflicts.append(f"{section}.enabled: run sets false (model.dtype), {source} sets True")
    if conflicts:
        raise DeepSpeedConfigConflict(
            f"{source} contradicts the run configuration; change the run (or drop the keys from the JSON):\n  "
            + "\n  ".join(conflicts)
        )

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(generated, user)


def build_ds_config(
    cfg: StrategyConfig,
    *,
    micro_batch_size: int,
    grad_accum: int,
    max_grad_norm: float,
    dtype: str,
    world_size: int = 1,
) -> dict:
    """The DeepSpeed config for a run, with the user JSON (cfg.ds_config) merged in."""
    if cfg.name not in STAGES:
        raise ValueError(f"strategy.name={cfg.name!r} is not a DeepSpeed strategy ({', '.join(STAGES)})")
    stage = STAGES[cfg.name]
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": int(cfg.reduce_bucket_size)}
    if stage == 2:
        zero["allgather_bucket_size"] = int(cfg.allgather_bucket_size)
    else:
        zero["stage3_prefetch_bucket_size"] = int(cfg.prefetch_bucket_size)
        zero["stage3_max_live_parameters"] = int(cfg.max_live_parameters)
        zero["stage3_param_persistence_threshold"] = int(cfg.param_persistence_threshold)
    if cfg.offload or cfg.name == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.name == "zero3_offload":
        zero["offload_param"] = {"device": "cpu"}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum),
        "train_batch_size": int(micro_batch_size) * int(grad_accum) * int(world_size),
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": zero,
        # The optimizer is ours (bitsandbytes), built over the trainable parameters only.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        out["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        out["fp16"] = {"enabled": True}
    if cfg.ds_config:
        path = Path(cfg.ds_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"strategy.ds_config: cannot read DeepSpeed JSON {path}: {e}") from e
        if not isinstance(user, dict):
            raise ValueError(f"strategy.ds_config: {path} must hold a JSON object")
        out = merge_user_config(out, user, f"strategy.ds_config ({path})")
    return out


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _init_deepspeed_dist() -> None:
    """Reuse the process group Ray Train (or the caller) created; create one only if none."""
    import deepspeed

    if "LOCAL_RANK" not in os.environ:
        local = 0
        try:
            import ray.train

            local = ray.train.get_context().get_local_rank()
        except Exception:  # noqa: BLE001 - not under Ray Train: a single local process
            pass
        os.environ["LOCAL_RANK"] = str(local)
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    else:
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class _ZeroMatmul4bit(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul for a ZeRO-3 weight: bitsandbytes' own saves a view of the
    weight, which keeps the gathered 4-bit storage alive after ZeRO releases the parameter, so
    every layer's stayed resident until backward (the whole 4-bit base on every worker). This
    saves the parameter itself, as DeepSpeed's linear does, and gathers it again in backward if
    ZeRO has not. The same kernels, forward and backward, as bitsandbytes'."""

    @staticmethod
    def forward(ctx, A, B, bias, quant_state, matmul):  # noqa: ANN001, ANN205 - autograd.Function
        ctx.save_for_backward(B)
        ctx.state = quant_state
        ctx.bias_dtype = None if bias is None else bias.dtype
        return matmul(A, B, quant_state, bias=bias)  # grad is off here: bitsandbytes' forward kernel

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        import bitsandbytes.functional as bnbf
        from deepspeed.runtime.zero import ZeroParamStatus

        (B,) = ctx.saved_tensors
        gathered_here = getattr(B, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE
        if gathered_here:
            B.all_gather()
        try:
            grad_A = grad_bias = None
            if ctx.needs_input_grad[0]:
                dequantized = bnbf.dequantize_4bit(B.view(-1, 1), ctx.state).to(grad_output.dtype)
                grad_A = torch.matmul(grad_output, dequantized)
            if ctx.needs_input_grad[2]:
                grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0, dtype=ctx.bias_dtype)
            return grad_A, None, grad_bias, None, None
        finally:
            if gathered_here:
                B.partition()


def _release_4bit_weights_after_forward() -> None:
    """Routes bitsandbytes' 4-bit matmul through _ZeroMatmul4bit for ZeRO-3 parameters that need a
    gradient through them; process-wide, as DeepSpeed's own linear is, and once."""
    import bitsandbytes as bnb

    original = bnb.matmul_4bit
    if getattr(original, "zero3", False):
        return

    def matmul_4bit(A, B, quant_state, out=None, bias=None):  # noqa: ANN001, ANN202 - bitsandbytes' signature
        grad = torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))
        if out is None and grad and hasattr(B, "ds_id"):
            return _ZeroMatmul4bit.apply(A, B, bias, quant_state, original)
        return original(A, B, quant_state, out=out, bias=bias)

    matmul_4bit.zero3 = True
    bnb.matmul_4bit = matmul_4bit


def _unwrap(model: nn.Module) -> nn.Module:
    from deepspeed import DeepSpeedEngine

    return model.module if isinstance(model, DeepSpeedEngine) else model


class DeepSpeedStrategy:
    """ZeRO-2/3 (optionally CPU-offloaded) over a PEFT model with a frozen base."""

    def __init__(self, cfg: StrategyConfig, run: RunConfig):
        if cfg.name not in STAGES:
            raise ValueError(f"DeepSpeedStrategy does not handle strategy.name={cfg.name!r}")
        self.name = cfg.name
        self.cfg = cfg
        self.stage = STAGES[cfg.name]
        self.grad_accum = run.trainer.grad_accum
        self.quant_kind = run.quant.kind
        self._config_args = dict(
            micro_batch_size=run.trainer.micro_batch_size,
            grad_accum=run.trainer.grad_accum,
            max_grad_norm=run.optim.max_grad_norm,
            dtype=run.model.dtype,
        )
        self.engine = None
        self._partitioner = None
        self._params: list[nn.Parameter] = []
        self._micro = 0

    def ds_config(self, world_size: int | None = None) -> dict:
        return build_ds_config(self.cfg, world_size=world_size or _world_size(), **self._config_args)

    def shard_layer(self, module: nn.Module) -> None:
        """ZeRO-3: partition the module's frozen base parameters as the loader completes each layer,
        so no worker ever holds all of them; the adapter stays whole (a resumed adapter is restored
        into it) until deepspeed.initialize partitions what is left. bf16 and NF4 alike (the packed
        4-bit storage is a float tensor DeepSpeed flattens; its quant state stays on every worker).
        A no-op for zero2, which keeps parameters whole."""
        if self.stage != 3:
            return
        frozen = [p for p in module.parameters() if not p.requires_grad and not hasattr(p, "ds_id")]
        if not frozen:
            return
        if self._partitioner is None:
            import deepspeed

            _init_deepspeed_dist()
            # zero.Init with module= would partition the adapter too; converting a parameter list
            # partitions only the frozen base, but leaves F.linear unpatched, so it is patched here.
            self._partitioner = deepspeed.zero.Init(config_dict_or_path=self.ds_config())
            if self._partitioner.mem_efficient_linear:
                # torch's F.linear saves weight.t() for backward, a view that keeps the gathered
                # weight alive after ZeRO releases the parameter: every layer's gathered weights
                # stayed resident until backward, the whole base (measured: 1.3 of 1.5 GiB).
                # DeepSpeed's linear saves the parameter itself and gathers it again in backward.
                self._partitioner._enable_mem_efficient_linear()
                if self.quant_kind == "nf4":
                    _release_4bit_weights_after_forward()
        self._partitioner._convert_to_zero_parameters(frozen)

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed

        _init_deepspeed_dist()
        self._params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(self._params)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config())
        self.engine = engine
        self._micro = 0
        # The scheduler drives the client optimizer: ZeRO steps it over its own flat partitions
        # but keeps its param_groups (and their lr).
        return engine, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        e = self.engine
        e.backward(loss * (e.dp_world_size * self.grad_accum))
        self._micro += 1
        if self._micro < self.grad_accum:
            e.step()  # not a boundary: DeepSpeed only advances its micro-step counter

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        e = self.engine
        if self._micro != self.grad_accum or not e.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"{self.name}: optimizer_step after {self._micro} backward calls, but trainer.grad_accum="
                f"{self.grad_accum}; the DeepSpeed config was generated for that many micro-batches per step"
            )
        e.step()
        self._micro = 0
        norm = e.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"))
        return norm.detach().float().cpu() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full fp32 trainable tensors by the PeftModel's parameter names. Collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        inner = _unwrap(model)
        out = {}
        for n, p in inner.named_parameters():
            if not p.requires_grad:
                continue
            full = safe_get_full_fp32_param(p)  # gathers ZeRO partitions (collective)
            if full is None:
                full = self._gathered(p)
            out[n.removeprefix("module.")] = (
                full.detach()
                .to("cpu", torch.float32)
                .clone()
                .reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
            )
        return out

    @staticmethod
    def _gathered(p: nn.Parameter) -> torch.Tensor:
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return p.data.detach().clone()
        return p.detach().clone()

    TAG = "zero"

    def save_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state_dir: Path) -> None:
        """DeepSpeed's own sharded checkpoint (every rank writes its partitions), adapter only."""
        self.engine.save_checkpoint(str(state_dir), tag=self.TAG, exclude_frozen_parameters=True, save_latest=False)

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state_dir: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(state_dir),
            tag=self.TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {state_dir}")

    def param_bytes(self, model: nn.Module) -> dict[str, int]:
        """Bytes this worker holds: for ZeRO-3 parameters its partition (ds_tensor), or the whole
        tensor where DeepSpeed keeps it persistent (below param_persistence_threshold)."""
        out = {"frozen": 0, "trainable": 0}
        for p in _unwrap(model).parameters():
            if hasattr(p, "ds_tensor"):
                t = p.ds_tensor
                n = p.ds_numel if getattr(p, "ds_persist", False) else t.numel()
                if getattr(p, "ds_persist", False):
                    n += t.numel()  # DeepSpeed keeps the partition alongside the whole tensor
                size = n * t.element_size()
            else:
                size = p.numel() * p.element_size()
            out["trainable" if p.requires_grad else "frozen"] += size
        return out
