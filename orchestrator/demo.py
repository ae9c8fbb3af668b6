"""Demo assets built locally (no hub access): a byte-level BPE tokenizer with a chat template,
a tiny randomly initialised causal LM, and the generators of the shipped JSONL data."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.rundir import orchestrator_home

if TYPE_CHECKING:  # transformers is imported lazily: importing this module must stay cheap
    from transformers import PreTrainedTokenizerFast

    from orchestrator.config.schema import RunConfig

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
DEMO_DATA: Path = ASSETS / "demo_alpaca.jsonl"
DEMO_CHAT_DATA: Path = ASSETS / "demo_chat.jsonl"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "tool": "<|tool|>"}
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS.values()]
MARKER = ".complete"

# Role tags are string literals (not built as '<|' + role + '|>') so that transformers can infer the
# control tokens for sanitize_control_tokens. Assistant turns end with the EOS text and the generation
# prompt is exactly the assistant header, so a rendered prefix is always a string prefix of the whole;
# the newline after each tag stays its own pre-token, so the token prefix holds too.
CHAT_TEMPLATE = (
    "{% set tags = {'system': '<|system|>', 'user': '<|user|>', 'assistant': '<|assistant|>', 'tool': '<|tool|>'} %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ tags[message['role']] }}\n{{ message['content'] }}"
    # An assistant turn ends at EOS and nothing after it, so the learned span stops at EOS too.
    # The newline is an expression because transformers renders with trim_blocks, which drops a
    # literal newline right after a block tag.
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def demo_dir() -> Path:
    env = os.environ.get("ORCHESTRATOR_DEMO_DIR")
    return Path(env) if env else orchestrator_home() / "demo"


def build_tokenizer(out_dir: Path, texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it as a transformers tokenizer in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte level: any input string is encodable (no <unk>), and decoding round-trips exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # add_bos_token makes transformers write the BOS post-processor itself (and record it in
    # tokenizer_config.json), so tok(text) starts with BOS as the alpaca encoder expects.
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=512,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf


CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def build_tiny_model(
    out_dir: Path,
    tokenizer_dir: Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 192,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """A randomly initialised causal LM of `arch` with the tokenizer beside it, saved in `out_dir`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch not in CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(CONFIGS)}")
    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, CONFIGS[arch])(
        vocab_size=len(tok),  # len() counts the added special tokens, vocab_size does not
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        # Adapters leave the random head frozen, and the largest logit gap it allows scales with its
        # init: the usual 0.02 caps logits near +-1.3 at this width, so LoRA could barely lower the
        # loss. 1/sqrt(hidden) lets a trained hidden state single out one token.
        initializer_range=hidden_size**-0.5,
    )
    # fork_rng keeps the caller's global RNG untouched while making the weights a function of `seed`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    tok.save_pretrained(out_dir)
    return out_dir


# The published shapes of Llama-3 (config.json fields), for planning and for GPU harnesses that
# build a model of that shape with random weights.
LLAMA3_SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}


def write_llama3_config(out_dir: Path, size: str, tokenizer_dir: Path | None = None) -> Path:
    """A model directory with a Llama-3-`size` config.json (and the demo tokenizer beside it, if
    given) and no weights: enough for `orchestrator plan`, which never reads weights."""
    from transformers import LlamaConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        **LLAMA3_SHAPES[size],
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ).save_pretrained(out_dir)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, out_dir / f.name)
    return out_dir


def _dataset_texts() -> Iterator[str]:
    for line in DEMO_DATA.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        yield (
            "### Instruction:\n"
            + row["instruction"]
            + "\n\n### Input:\n"
            + row["input"]
            + "\n\n### Response:\n"
            + row["output"]
        )
    for line in DEMO_CHAT_DATA.read_text(encoding="utf-8").splitlines():
        for m in json.loads(line)["messages"]:
            yield m["content"]


def ensure_demo_assets(root: Path | None = None) -> Path:
    """`<root>/tiny-llama`, built on first use. Safe under concurrent callers: each builds in its own
    temp dir and renames it into place atomically; a loser of the race discards its copy."""
    root = Path(root) if root is not None else demo_dir()
    target = root / "tiny-llama"
    if (target / MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log.info("building demo model and tokenizer in %s (first use only)", target)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tiny-llama-"))
    try:
        build_tokenizer(tmp, _dataset_texts())
        build_tiny_model(tmp, tokenizer_dir=tmp, arch="llama")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is read like any model directory
        (tmp / MARKER).write_text("ok\n")  # last, so a directory with it is known to be whole
        for _ in range(3):
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                if (target / MARKER).is_file():
                    return target  # another process won the race; its copy is as good as ours
                # A leftover without the marker (not built by this code, or hand-edited): move it
                # aside before deleting so that no other process ever sees it half removed.
                stale = root / f".stale-{uuid.uuid4().hex}"
                try:
                    os.rename(target, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                except FileNotFoundError:
                    pass
        raise RuntimeError(f"could not move the demo model into {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def localise(run: RunConfig) -> None:
    """Point a demo config at this machine's demo assets, building the model on first use.

    A config composed on another machine (a job submitted to a cluster) names that machine's
    demo paths; only paths that look like the demo's and do not exist here are replaced."""
    model = Path(run.model.path)
    if model == demo_dir() / "tiny-llama" or (
        model.name == "tiny-llama" and model.parent.name == "demo" and not _exists(model)
    ):
        run.model.path = str(ensure_demo_assets())
    for field in ("path", "eval_path"):
        value = getattr(run.data, field)
        if value and not _exists(Path(value)) and Path(value).parent.name == "assets":
            shipped = ASSETS / Path(value).name
            if shipped in (DEMO_DATA, DEMO_CHAT_DATA):
                setattr(run.data, field, str(shipped))


def _exists(path: Path) -> bool:
    """Path.exists() that says False for a path no file can have (too long, a NUL byte): validation names those."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


# --- data generators -------------------------------------------------------------------------

WORDS = [
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "fish",
    "bird",
    "rock",
    "rain",
    "star",
    "milk",
    "book",
    "door",
    "hat",
    "cup",
    "leaf",
    "ship",
    "lamp",
    "frog",
    "bell",
    "cake",
    "snow",
    "wind",
    "rose",
]
LETTERS = "abcdefghijklmnopqrstuvwxy"  # no z: its successor is undefined
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _task(rng: random.Random) -> tuple[str, str, str]:
    """One (instruction, input, output) from a small set of templated tasks whose answers follow a
    rule a tiny model can pick up in a few dozen steps."""
    kind = rng.randrange(7)
    if kind == 0:
        ws = rng.sample(WORDS, rng.randint(3, 4))
        return "Reverse the order of the words.", " ".join(ws), " ".join(reversed(ws))
    if kind == 1:
        w = rng.choice(WORDS)
        return "Write the word in uppercase.", w, w.upper()
    if kind == 2:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    if kind == 3:
        c = rng.choice(LETTERS)
        return "Which letter comes next in the alphabet?", c, chr(ord(c) + 1)
    if kind == 4:
        w, n = rng.choice(WORDS), rng.randint(2, 4)
        return f"Repeat the word {n} times.", w, " ".join([w] * n)
    if kind == 5:
        xs = rng.sample(range(10, 100), 3)
        return "Sort the numbers from smallest to largest.", ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs)))
    n = rng.randint(0, 9)
    return f"Write the number {n} as a word.", "", NUMBER_WORDS[n]  # exercises rows without input


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def generate_demo_data(path: Path, n: int = 320, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction, inp, out = _task(rng)
        rows.append({"instruction": instruction, "input": inp, "output": out})
    _write_jsonl(Path(path), rows)


SYSTEM_PROMPTS = ["You are a concise assistant.", "Answer with as few words as possible."]


def generate_chat_data(path: Path, n: int = 64, seed: int = 1) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs: list[dict] = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if i % 4 == 1:
            # Two assistant turns: the follow-up refers back to the first answer.
            w = rng.choice(WORDS)
            msgs += [
                {"role": "user", "content": f"Write {w} in uppercase."},
                {"role": "assistant", "content": w.upper()},
                {"role": "user", "content": "Now repeat it twice."},
                {"role": "assistant", "content": f"{w.upper()} {w.upper()}"},
            ]
        else:
            instruction, inp, out = _task(rng)
            user = f"{instruction} {inp}" if inp else instruction
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
        rows.append({"messages": msgs})
    _write_jsonl(Path(path), rows)


if __name__ == "__main__":
    generate_demo_data(DEMO_DATA)
    generate_chat_data(DEMO_CHAT_DATA)
    print(f"wrote {DEMO_DATA} and {DEMO_CHAT_DATA}")
