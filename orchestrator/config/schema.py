"""Typed run configuration.

The dataclasses are the schema of `conf/` and the one place defaults live: Hydra composes the
YAML options on top of them (`orchestrator.config.structured` registers an OmegaConf-compatible
copy as the structured config `run_schema`), so an option YAML holds only what it changes.
`orchestrator.config.typed.to_typed` then turns the result into a `RunConfig`, collecting every
type error and unknown key instead of stopping at the first. Each field's docstring is its
documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Dtype = Literal["bf16", "fp16", "fp32"]


@dataclass
class ModelConfig:
    path: str = "???"
    """Local Hugging Face causal-LM directory (config.json, weights, tokenizer)."""
    dtype: Dtype = "bf16"
    """Dtype of the frozen base and of 4-bit compute. fp32 is meant for CPU runs and tests."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant, works with a frozen base). Off for small
    models; model=hf turns it on, which is what an 8B+ model needs to fit its activations."""
    trust_remote_code: bool = False
    """Passed to from_pretrained; only for architectures that ship their own code."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to from_pretrained (sdpa, eager, flash_attention_2)."""


@dataclass
class QuantConfig:
    kind: Literal["none", "nf4"] = "none"
    """none: base in model.dtype. nf4: bitsandbytes 4-bit NormalFloat base (QLoRA)."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit/param)."""
    storage_dtype: Dtype | None = None
    """Dtype the packed 4-bit weights are stored in. Must be a float type that FSDP/ZeRO can
    flatten and equal to the dtype of the rest of the base; None means model.dtype."""


@dataclass
class AdapterConfig:
    kind: Literal["lora", "dora", "rslora"] = "lora"
    """lora; dora (weight-decomposed LoRA); rslora (alpha/sqrt(r) scaling)."""
    r: int = 16
    """Rank of the update matrices."""
    alpha: float = 32.0
    """Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) for rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Module names (or suffixes) to adapt, or 'all-linear' (every linear layer but the output head)."""
    init_seed: int = 0
    """Seed for adapter initialisation, so every worker starts from identical adapter weights."""


# The DeepSpeed strategies and their ZeRO stage: the one table that validation, the strategy
# factory and the DeepSpeed config builder derive from (StrategyConfig.name lists them for the
# documentation; tests check that the two agree).
ZERO_STAGES = {"zero2": 2, "zero3": 3, "zero3_offload": 3}


@dataclass
class StrategyConfig:
    name: Literal["fsdp", "ddp", "single", "zero2", "zero3", "zero3_offload"] = "fsdp"
    """fsdp: FSDP2 fully_shard per decoder layer + root (base sharded across workers).
    ddp: base replicated on every worker. single: one process, the reference for tests.
    zero2: DeepSpeed ZeRO-2 (adapter gradients and optimizer state partitioned, base replicated).
    zero3: DeepSpeed ZeRO-3 (base and adapter partitioned too). zero3_offload: zero3 with
    optimizer state and parameters offloaded to CPU memory."""
    reshard_after_forward: bool = True
    """FSDP: free gathered layers after forward (ZeRO-3-like); false keeps them (ZeRO-2-like)."""
    shard_optimizer: bool = True
    """fsdp, ddp: each of N workers keeps the adapter's optimizer state for only its ~1/N of the
    adapter tensors and the updated tensors are all-gathered after each step (ZeRO-1); the numbers
    are bit-identical to false, which keeps all of it on every worker, and checkpoints load either
    way. single has nothing to share; DeepSpeed strategies always partition it (false is refused)."""
    offload: bool = False
    """DeepSpeed: offload optimizer state to CPU (zero2, zero3); zero3_offload also offloads
    parameters and requires true."""
    ds_config: str | None = None
    """DeepSpeed: path to a user DeepSpeed JSON merged into the generated config; keys that
    contradict the run's own settings (micro batch, stage, clipping, precision...) are refused."""
    reduce_bucket_size: int = 500_000_000
    """DeepSpeed: elements per gradient reduce bucket (zero_optimization.reduce_bucket_size)."""
    allgather_bucket_size: int = 500_000_000
    """DeepSpeed zero2: elements per parameter all-gather bucket after the step."""
    prefetch_bucket_size: int = 50_000_000
    """DeepSpeed zero3: elements of parameters prefetched ahead of use (stage3_prefetch_bucket_size)."""
    max_live_parameters: int = 1_000_000_000
    """DeepSpeed zero3: elements of gathered parameters kept between uses once the first step has
    traced the module order (stage3_max_live_parameters; DeepSpeed's default). A base under this
    stays gathered whole from the second step on; lower it to trade all-gather overlap for memory."""
    param_persistence_threshold: int = 100_000
    """DeepSpeed zero3: parameters with fewer elements stay whole on every worker
    (stage3_param_persistence_threshold); 0 partitions everything."""


@dataclass
class OptimConfig:
    name: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"
    """bitsandbytes optimizers (paged variants fall back to non-paged on CPU); adamw is torch's."""
    weight_decay: float = 0.0
    """Decoupled weight decay on adapter weights."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of total steps spent warming up linearly from 0."""
    max_grad_norm: float = 1.0
    """Clip the global adapter grad norm to this; 0 disables clipping (the norm is still logged)."""


DataFormat = Literal["alpaca", "chat", "sharegpt", "completion", "text"]


@dataclass
class DataSource:
    """One dataset of a mixture (data.mix); its rows are read like data.path's."""

    path: str = "???"
    """What data.path takes: a file, directory, glob, save_to_disk directory or hub dataset name."""
    weight: float = 1.0
    """Times each of its training rows is used per epoch: 1 every row once, 0.25 a seeded quarter of
    them, 3 every row three times, 2.5 every row twice and a seeded half of them once more."""
    format: DataFormat | None = None
    """Its rows' format; None: data.format."""
    columns: dict[str, str] | None = None
    """Its column mapping; None: data.columns."""
    split: str | None = None
    """Its split (save_to_disk DatasetDicts, directories and hub datasets); None: data.split."""


@dataclass
class DataConfig:
    path: str | None = None
    """The training rows: a JSONL, JSON, Parquet, CSV or Arrow file; a directory or glob of them; a
    `datasets` save_to_disk directory; or a hub dataset name (org/name) read from the local Hugging
    Face cache (HF_HUB_OFFLINE=1: only from there). Required unless data.mix is given."""
    mix: list[DataSource] = field(default_factory=list)
    """Several datasets mixed with weights, instead of data.path, e.g.
    data.mix='[{path: a.parquet, weight: 2}, {path: org/chat, format: chat}]'."""
    format: DataFormat = "alpaca"
    """alpaca: instruction/input/output. chat: a `messages` list (system, user, assistant, tool roles,
    tool_calls) rendered by the chat template. sharegpt: `conversations` of {from, value}. completion:
    prompt/completion strings. text: a `text` field, all of it learned (continued pre-training)."""
    columns: dict[str, str] = field(default_factory=dict)
    """The dataset's names for the format's fields, e.g. {instruction: question, output: answer} or
    {messages: conversation}; sharegpt also maps `from` and `value`, the keys inside each turn."""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Which tokens carry loss: every assistant turn (responses, completions); only the last
    assistant turn (what templates that are not prefix-consistent, like Qwen3's, allow); all tokens."""
    split: str = "train"
    """The split read from a DatasetDict, a directory of split files or a hub dataset."""
    eval_split: str | None = None
    """The split read from data.eval_path; None: data.split."""
    max_seq_len: int = 512
    """Sequences are truncated to this many tokens; must fit the model's context."""
    eval_fraction: float = 0.0
    """Fraction of rows held out for evaluation (chosen deterministically from trainer.seed)."""
    eval_path: str | None = None
    """Separate evaluation rows (anything data.path takes); overrides eval_fraction."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A row that is not a row of the format (or that the tokenizer cannot encode): error refuses the
    data, naming the first 20 and counting the rest; skip leaves such rows out and says how many."""
    cache_dir: str | None = None
    """Where the tokenized data is cached (see rundir.data_cache_root); None: <storage_path>/.data-cache
    on a cluster, else $ORCHESTRATOR_HOME/data (~/.cache/orchestrator/data), so sweeps, resumes,
    requeues and later runs share it."""
    num_proc: int | None = None
    """Processes that tokenize on the driver; None: the machine's cores, at most 8."""
    packing: bool | None = None
    """Pack several training examples into each row of max_seq_len tokens, each attending only to
    itself (orchestrator/data/packing.py); trainer.micro_batch_size then counts packed rows. None: on
    where the model's transformers implementation reads packed rows from position ids (Llama, Qwen2,
    Mistral and most others), else off. Eval rows are never packed."""
    group_by_length: bool = False
    """Without packing: batch rows of similar length together (within groups of 64 global batches,
    in a seeded order), which cuts the padding of each micro-batch."""


@dataclass
class TrainerConfig:
    max_steps: int = -1
    """Optimizer steps to run; -1 means derive from epochs."""
    epochs: int = 1
    """Passes over the training rows, used when max_steps is -1."""
    micro_batch_size: int = 4
    """Sequences per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = micro_batch_size * grad_accum * workers."""
    lr: float = 2e-4
    """Peak learning rate."""
    seed: int = 42
    """Seed for data order, eval split and dropout."""
    log_every: int = 1
    """Log metrics every N steps."""
    sync_every_s: float = 1.0
    """Longest wall time, in seconds, between two points where the workers agree on the losses of
    the steps since the last one, check them, log them and look for a stop request. Steps in
    between run without waiting for the device or for each other, so a bad loss or a stop request
    is seen at most this much (plus one step) later; saves, evaluations and the last step always
    sync first. 0 syncs after every step."""
    save_every: int = 0
    """Save an adapter checkpoint every N steps; 0 saves only the final adapter."""
    eval_every: int = 0
    """Evaluate every N steps; 0 evaluates only at the end (when there is an eval split)."""
    keep_last: int = 0
    """Keep only the newest N step checkpoints; 0 keeps all."""
    keep_best: bool = False
    """With keep_last, also keep the step checkpoint with the lowest eval loss (checkpoints whose
    step has an eval, i.e. save_every a multiple of eval_every)."""
    loss_chunk_tokens: int = 256
    """Target positions per chunk of the output head and cross-entropy, computed together so that
    the full-vocabulary logits of the batch never exist (orchestrator/loss.py; Liger's fused
    kernel on CUDA when liger-kernel is installed). 0 computes transformers' full logits."""
    check_memory: bool = True
    """Before any worker starts, predict each worker's peak memory (what `orchestrator plan`
    prints) and refuse, showing the plan, a run that cannot fit the memory its workers will have
    (this node's GPU, or on CPU the host memory divided among the workers; not checked where that
    is unknown, e.g. on a remote cluster). false trains anyway."""
    device_memory: str | None = None
    """Memory of one worker's device for that check and for `orchestrator plan`, e.g. 24GiB or
    80GB; None: this node's GPU (cluster.use_gpu=true) or the host memory divided among the
    workers of a local run. Set it for a cluster whose GPUs this node cannot see."""
    compile: bool = False
    """torch.compile each decoder layer (strategies single, ddp and fsdp). The first steps pay for
    the compilation; bench/throughput.py measures whether later ones gain."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one worker's device, the denominator of the `mfu` metric. None looks
    it up for known GPUs (bf16/fp16 tensor-core rate, TF32 for fp32) and measures a matmul on CPU;
    see orchestrator/flops.py for how model FLOPs are counted."""


@dataclass
class SlurmConfig:
    """The allocation `cluster=slurm` asks sbatch for. Every value is shell-quoted in the script,
    except `setup`, which is shell on purpose."""

    nodes: int = 1
    """Nodes; cluster.num_workers is spread evenly over them (one Ray node each)."""
    gpus_per_node: int = 0
    """GPUs per node (--gpus-per-node); 0 on CPU-only partitions."""
    cpus_per_node: int | None = None
    """CPUs per node (--cpus-per-task); None = workers per node x cluster.cpus_per_worker + 1 for Ray."""
    mem: str | None = None
    """Memory per node (--mem), e.g. 200G; None takes the partition's default."""
    time: str = "04:00:00"
    """Wall-clock limit (--time)."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    """Node features (--constraint), e.g. h100."""
    job_name: str | None = None
    """Slurm job name; None uses the run name."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More sbatch options, one per item, e.g. ["--exclusive", "--reservation=x"]."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run on every node before Ray starts (module load, activate an environment)."""
    signal_grace_s: int = 300
    """Seconds before the time limit at which Slurm warns the job (SIGUSR1): it checkpoints and requeues."""
    requeue: bool = True
    """Requeue the job after a preemption or time-limit checkpoint so it resumes by itself."""


@dataclass
class ClusterConfig:
    kind: Literal["local", "ray", "slurm"] = "local"
    """Where the driver runs. local: Ray on this machine. ray: a Ray Job on an existing cluster
    (cluster.address). slurm: an sbatch job that starts Ray across its allocation."""
    num_workers: int = 2
    """Ray Train workers, one per GPU (or CPU process)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL backend; false runs on CPU with gloo."""
    cpus_per_worker: float | None = None
    """CPUs reserved for each worker; its torch uses that many threads. None: on a local run (no
    cluster.address), this machine's cores shared evenly by the workers; on a cluster, 1."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per worker (e.g. {accelerator_type:H100: 0.001})."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may attempt before the run fails. cluster=ray sets 1: a
    restart resumes from the last checkpoint in storage_path."""
    address: str | None = None
    """Ray cluster: the dashboard address (http://head:8265) for cluster=ray, else the address to
    connect to; None reads RAY_ADDRESS, or (local) starts a Ray instance."""
    autoscaling: bool = False
    """The Ray cluster adds nodes on demand: wait for resources instead of refusing a request the
    current nodes cannot hold."""
    python: str | None = None
    """Interpreter on the cluster that has the project's dependencies; None = the submitting one."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the job (not secrets: they are stored with the job)."""
    secret_env: list[str] = field(default_factory=lambda: ["WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
    """Names of variables passed from the submitting shell's environment to the job, never
    written to a file by the orchestrator."""
    pip: list[str] = field(default_factory=list)
    """cluster=ray: extra pip requirements installed in the job's runtime environment."""
    detach: bool = False
    """ray/slurm: print the job id and return instead of following the job to its end."""
    dry_run: bool = False
    """ray/slurm: print what would be submitted (sbatch script, or entrypoint and runtime env) and stop."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class TrackingConfig:
    backend: Literal["wandb", "none"] = "wandb"
    """wandb: log to Weights & Biases from rank 0. none: metrics.jsonl only."""
    project: str = "orchestrator"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    name: str | None = None
    """W&B run name; None derives it from the output directory."""
    group: str | None = None
    """W&B group, e.g. the sweep name."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    mode: Literal["online", "offline", "disabled"] = "offline"
    """offline writes the run locally (upload later with `wandb sync`)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "???"
    """Directory of this run: config, metrics, checkpoints, final adapter."""
    name: str | None = None
    """Run name (W&B, Ray, Slurm job). With storage_path it names the run's directory, so the same
    name continues the same run and a new run needs a new name."""
    storage_path: str | None = None
    """Root of run directories shared by every node (cluster=ray/slurm): the run lives in
    <storage_path>/<name>. None keeps the run in output_dir (single-machine runs)."""
    resume: str = "auto"
    """auto: continue from the newest committed checkpoint in output_dir, if any. never: refuse an
    output_dir that holds checkpoints. A path: start from that committed step-<N> checkpoint."""

    def storage_run_dir(self) -> str:
        """<storage_path>/<name>: where a run on shared storage lives (its name is its identity)."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def global_batch(self) -> int:
        t = self.trainer
        return t.micro_batch_size * t.grad_accum * self.cluster.num_workers


def as_dict(obj: Any) -> Any:
    """Plain-dict view of a config (what travels to Ray workers and into config.yaml)."""
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty mapping is a leaf of its own."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
