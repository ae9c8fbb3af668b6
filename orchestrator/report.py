"""`orchestrator sweep report <sweep_dir>`: one table and a few plots for a Hydra multirun.

Each run directory of a sweep (one per combination of overrides) is read on its own: its
config.yaml (or, for a run that failed before writing one, .hydra/overrides.yaml), its
metrics.jsonl, its committed adapter and its train.log. Nothing here needs the model, Ray or torch.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from orchestrator.rundir import ADAPTER, ADAPTER_WEIGHTS, CHECKPOINTS, RunDir

if TYPE_CHECKING:
    from rich.console import Console

COLUMNS = [
    "run",
    "r",
    "alpha",
    "overrides",
    "final_eval_loss",
    "best_eval_loss",
    "final_loss",
    "tokens_per_s",
    "mfu",
    "peak_memory_mib",
    "trainable_params",
    "steps",
    "status",
]
HEADERS = {
    "run": "run",
    "r": "r",
    "alpha": "alpha",
    "overrides": "other overrides",
    "final_eval_loss": "final eval loss",
    "best_eval_loss": "best eval loss",
    "final_loss": "final train loss",
    "tokens_per_s": "tokens/s (median)",
    "mfu": "MFU (median)",
    "peak_memory_mib": "peak memory (MiB)",
    "trainable_params": "trainable params",
    "steps": "steps",
    "status": "status",
}
SHORT_HEADERS = {  # for the terminal, where width is short
    "final_eval_loss": "final\neval",
    "best_eval_loss": "best\neval",
    "final_loss": "final\ntrain",
    "tokens_per_s": "tok/s\nmedian",
    "mfu": "MFU\nmedian",
    "peak_memory_mib": "peak\nMiB",
    "trainable_params": "trainable\nparams",
}
# Keys Hydra leaves out of the run directory's name (conf/config.yaml): not part of what a run is.
_IGNORED_KEYS = {"output_dir", "resume", "cluster.address", "tracking.mode"}
_AXIS_KEYS = {"adapter.r", "adapter.alpha"}
_SKIP_DIRS = {"report", ADAPTER, CHECKPOINTS, ".hydra"}
LOSS_UNIT = "nats/token"


# ---------------------------------------------------------------------------------------------
# collecting


def find_runs(sweep_dir: Path) -> list[Path]:
    """Every run directory under sweep_dir (sweep_dir itself when it is one), sorted by path."""
    if _is_run(sweep_dir):
        return [sweep_dir]
    runs: list[Path] = []
    for child in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        if child.name in _SKIP_DIRS or child.name.startswith("."):
            continue
        runs.extend(find_runs(child))
    return runs


def _is_run(d: Path) -> bool:
    return RunDir(d).config.is_file() or (d / ".hydra" / "overrides.yaml").is_file()


def _number(v: Any) -> Any:
    """Ints stay ints, integral floats become ints (alpha=16.0 reads as 16), the rest as is."""
    if isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _overrides(run_dir: Path) -> list[str]:
    f = run_dir / ".hydra" / "overrides.yaml"
    if f.is_file():
        try:
            return [str(o) for o in (yaml.safe_load(f.read_text()) or [])]
        except yaml.YAMLError:
            pass
    # No overrides.yaml: the directory name is Hydra's override_dirname (key=value,key=value).
    return [p for p in re.split(r",(?=[\w.+~/-]+=)", run_dir.name) if "=" in p]


def _split_override(o: str) -> tuple[str, str]:
    key, _, value = o.partition("=")
    return key.lstrip("+~"), value


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of metrics.jsonl; a half-written last line is skipped."""
    train, evals = [], []
    f = RunDir(run_dir).metrics
    if not f.is_file():
        return train, evals
    for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "step" not in row:
            continue
        if "eval_loss" in row:
            evals.append(row)
        if "loss" in row:
            train.append(row)
    return train, evals


def trainable_params(run_dir: Path) -> int | None:
    """Elements in the adapter's tensors, read from the safetensors header only. A run without a
    final adapter falls back to its newest checkpoint's."""
    from safetensors import safe_open

    from orchestrator.checkpoint import step_checkpoints

    rundir = RunDir(run_dir)
    candidates = [rundir.adapter / ADAPTER_WEIGHTS]
    candidates += [ckpt / ADAPTER / ADAPTER_WEIGHTS for _, ckpt in reversed(step_checkpoints(rundir.checkpoints))]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="np") as f:
                return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        except Exception:  # a file being written or damaged: try the next one
            continue
    return None


def _error(run_dir: Path) -> str | None:
    """The first `error: ...` line of the run's Hydra job log; a message ending in ':' gets its
    first detail line appended (ConfigError lists its problems on the lines below)."""
    for log in sorted(run_dir.glob("*.log")):
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines):
            m = re.search(r"(?:^|\s)error: (.*)", line)
            if not m:
                continue
            msg = m.group(1).strip()
            if msg.endswith(":") and i + 1 < len(lines) and lines[i + 1].startswith(" "):
                msg = f"{msg} {lines[i + 1].strip().removeprefix('- ')}"
            return msg or "error"
    return None


def collect(sweep_dir: Path) -> list[dict]:
    """One row per run directory of the sweep, sorted best first (see sort_rows)."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for run_dir in find_runs(sweep_dir):
        cfg: dict = {}
        if RunDir(run_dir).config.is_file():
            try:
                cfg = yaml.safe_load(RunDir(run_dir).config.read_text()) or {}
            except yaml.YAMLError:
                cfg = {}
        overrides = _overrides(run_dir)
        given = dict(_split_override(o) for o in overrides)
        adapter = cfg.get("adapter") or {}
        r = adapter.get("r", _yaml_value(given.get("adapter.r")))
        alpha = adapter.get("alpha", _yaml_value(given.get("adapter.alpha")))
        other = [o for o in overrides if _split_override(o)[0] not in _AXIS_KEYS | _IGNORED_KEYS]

        train, evals = read_metrics(run_dir)
        eval_losses = [float(e["eval_loss"]) for e in evals]
        tps = [float(t["tokens_per_s"]) for t in train if t.get("tokens_per_s") is not None]
        mfu = [float(t["mfu"]) for t in train if t.get("mfu") is not None]
        peaks = [float(t["peak_memory_bytes"]) for t in train if t.get("peak_memory_bytes") is not None]
        steps = [int(x["step"]) for x in train + evals]

        if RunDir(run_dir).is_complete():
            status = "done"
        else:
            err = _error(run_dir)
            status = f"failed: {err}" if err is not None else "running"

        rows.append(
            {
                "run": run_dir.relative_to(sweep_dir).as_posix() if run_dir != sweep_dir else run_dir.name,
                "r": _number(r),
                "alpha": _number(alpha),
                "overrides": ",".join(other),
                "final_eval_loss": eval_losses[-1] if eval_losses else None,
                "best_eval_loss": min(eval_losses) if eval_losses else None,
                "final_loss": float(train[-1]["loss"]) if train else None,
                "tokens_per_s": statistics.median(tps) if tps else None,
                "mfu": statistics.median(mfu) if mfu else None,
                "peak_memory_mib": max(peaks) / 2**20 if peaks else None,
                "trainable_params": trainable_params(run_dir),
                "steps": max(steps) if steps else 0,
                "status": status,
            }
        )
    return sort_rows(rows)


def _yaml_value(v: str | None) -> Any:
    if v is None:
        return None
    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def sort_rows(rows: list[dict]) -> list[dict]:
    """Best eval loss ascending; runs without an eval loss after those with one; failed runs last."""

    def key(row: dict) -> tuple:
        best = row["best_eval_loss"]
        return (row["status"].startswith("failed"), best is None, best if best is not None else 0.0, row["run"])

    return sorted(rows, key=key)


# ---------------------------------------------------------------------------------------------
# formatting


def _fmt(col: str, v: Any) -> str:
    if v is None or v == "":
        return "" if col == "overrides" else "-"
    if col in ("final_eval_loss", "best_eval_loss", "final_loss"):
        return f"{v:.4f}"
    if col == "tokens_per_s":
        return f"{v:,.0f}"
    if col == "mfu":
        return f"{100 * v:.1f}%"
    if col == "peak_memory_mib":
        return f"{v:,.1f}"
    if col == "trainable_params":
        return f"{v:,}"
    return str(v)


def _label(row: dict) -> str:
    return f"r={_fmt('r', row['r'])}, alpha={_fmt('alpha', row['alpha'])}"


def print_table(rows: list[dict], console: Console | None = None) -> None:
    """The report as a rich table on the terminal. Overrides shared by every run go under the
    table instead of into the "other overrides" column. Piped output is never wrapped; on a
    terminal too narrow for the whole table the run column (the directory name, which only
    repeats r, alpha and the overrides) is left out."""
    from rich.console import Console
    from rich.measure import Measurement

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=10_000)
    common = _common_overrides(rows)
    table = _rich_table(rows, common, with_run=True)
    if Measurement.get(console, console.options.update_width(10_000), table).maximum > console.width:
        table = _rich_table(rows, common, with_run=False)
    console.print(table)


def _rich_table(rows: list[dict], common: list[str], with_run: bool):
    from rich import box
    from rich.table import Table

    varying = [_varying(r, common) for r in rows]
    cols = [c for c in COLUMNS if (c != "overrides" or any(varying)) and (c != "run" or with_run)]
    caption = (
        "\n".join(
            ([f"common overrides: {','.join(common)}"] if common else [])
            + ([] if with_run else ["(run directory names left out: the terminal is too narrow)"])
        )
        or None
    )
    table = Table(
        title=f"Sweep report: {len(rows)} run(s), best eval loss first (losses in {LOSS_UNIT})",
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for c in cols:
        numeric = c not in ("run", "overrides", "status")
        table.add_column(
            SHORT_HEADERS.get(c, HEADERS[c]), justify="right" if numeric else "left", no_wrap=numeric, overflow="fold"
        )
    for row, other in zip(rows, varying):
        style = "red" if row["status"].startswith("failed") else ("yellow" if row["status"] == "running" else None)
        table.add_row(*(other if c == "overrides" else _fmt(c, row[c]) for c in cols), style=style)
    return table


def _common_overrides(rows: list[dict]) -> list[str]:
    split = [r["overrides"].split(",") if r["overrides"] else [] for r in rows]
    return [o for o in split[0] if all(o in s for s in split[1:])] if split else []


def _varying(row: dict, common: list[str]) -> str:
    return ",".join(o for o in (row["overrides"].split(",") if row["overrides"] else []) if o not in common)


def _markdown(rows: list[dict]) -> str:
    """Markdown table; as on the terminal, overrides shared by all runs are listed once above it."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    common = _common_overrides(rows)
    numeric = {c for c in COLUMNS if c not in ("run", "overrides", "status")}
    lines = [f"Overrides common to all runs: `{','.join(common)}`\n"] if common else []
    lines += [
        "| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |",
        "| " + " | ".join("---:" if c in numeric else "---" for c in COLUMNS) + " |",
    ]
    lines += [
        "| " + " | ".join(cell(_varying(r, common) if c == "overrides" else _fmt(c, r[c])) for c in COLUMNS) + " |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# writing


def write_report(sweep_dir: Path, rows: list[dict]) -> dict[str, Path]:
    """report.csv, report.md, loss_curves.png and heatmap.png under <sweep_dir>/report/."""
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out / "report.csv",
        "md": out / "report.md",
        "loss_curves": out / "loss_curves.png",
        "heatmap": out / "heatmap.png",
    }

    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r[c] is None else r[c]) for c in COLUMNS})

    paths["md"].write_text(
        f"# Sweep report: {sweep_dir}\n\n"
        f"Runs sorted by best eval loss (losses in {LOSS_UNIT}; tokens/s is the median over logged steps, "
        "peak memory the maximum over steps and workers).\n\n"
        + _markdown(rows)
        + "\n![loss curves](loss_curves.png)\n\n![best eval loss](heatmap.png)\n",
        encoding="utf-8",
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        _plot_loss_curves(plt, sweep_dir, rows, paths["loss_curves"])
        _plot_heatmap(plt, sweep_dir, rows, paths["heatmap"])
    finally:
        plt.close("all")
    return paths


def _labels(rows: list[dict]) -> dict[str, str]:
    """Legend label per run: r/alpha, plus the overrides that differ between runs where r/alpha
    alone repeat."""
    common = _common_overrides(rows)
    base = {r["run"]: _label(r) for r in rows}
    counts: dict[str, int] = {}
    for v in base.values():
        counts[v] = counts.get(v, 0) + 1
    return {
        r["run"]: base[r["run"]] + (f", {_varying(r, common) or r['run']}" if counts[base[r["run"]]] > 1 else "")
        for r in rows
    }


def _plot_loss_curves(plt: ModuleType, sweep_dir: Path, rows: list[dict], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(11, max(6.0, 0.24 * len(rows) + 2.0)), layout="constrained")
    labels = _labels(rows)
    if len(rows) <= 20:
        cmap = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
        colors = [cmap(i) for i in range(len(rows))]
    else:
        colors = [plt.get_cmap("turbo")(x) for x in np.linspace(0.05, 0.95, len(rows))]
    drawn = 0
    has_eval = False
    for i, row in enumerate(rows):
        train, evals = read_metrics(sweep_dir / row["run"])
        if not train and not evals:
            continue
        color = colors[i]
        failed = row["status"].startswith("failed")
        label = labels[row["run"]] + (" [failed]" if failed else " [running]" if row["status"] == "running" else "")
        if train:
            ax.plot(
                [t["step"] for t in train],
                [t["loss"] for t in train],
                color=color,
                lw=1.6,
                ls="--" if failed else "-",
                label=label,
            )
        if evals:
            has_eval = True
            ax.plot(
                [e["step"] for e in evals],
                [e["eval_loss"] for e in evals],
                ls="none",
                marker="o",
                ms=7,
                mfc=color,
                mec="black",
                mew=0.8,
                label=None if train else label,
            )
        drawn += 1
    if drawn == 0:
        ax.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    ax.set_title(f"Loss per run, sweep {_sweep_name(sweep_dir)}\nlines: train loss, circles: eval loss", fontsize=12)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"loss ({LOSS_UNIT})")
    ax.grid(True, alpha=0.3)
    if drawn:
        handles, texts = ax.get_legend_handles_labels()
        if has_eval:
            from matplotlib.lines import Line2D

            handles += [
                Line2D([], [], ls="-", color="grey"),
                Line2D([], [], ls="none", marker="o", mfc="grey", mec="black", ms=7),
            ]
            texts += ["train loss", "eval loss"]
        ax.legend(handles, texts, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, title="run", frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_heatmap(plt: ModuleType, sweep_dir: Path, rows: list[dict], path: Path) -> None:
    """Best eval loss over rank x alpha (best over other overrides when several runs share a cell);
    a bar chart when only one of the two varies."""
    scored = [r for r in rows if r["best_eval_loss"] is not None and not r["status"].startswith("failed")]
    ranks = sorted({r["r"] for r in rows if r["r"] is not None}, key=_sort_key)
    alphas = sorted({r["alpha"] for r in rows if r["alpha"] is not None}, key=_sort_key)
    cell: dict[tuple, float] = {}
    shared = False
    for r in scored:
        k = (r["r"], r["alpha"])
        shared |= k in cell
        cell[k] = min(cell.get(k, math.inf), r["best_eval_loss"])
    title = f"Best eval loss per run ({LOSS_UNIT}, lower is better)\nsweep {_sweep_name(sweep_dir)}"
    if shared:
        title += " (best over the other overrides in each cell)"

    if not scored:
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        ax.text(
            0.5,
            0.5,
            "no finished run logged an eval loss",
            ha="center",
            va="center",
            fontsize=13,
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        ax.set_title(title, fontsize=12)
    elif len(ranks) >= 2 and len(alphas) >= 2:
        grid = np.full((len(ranks), len(alphas)), np.nan)
        for (r, a), v in cell.items():
            grid[ranks.index(r), alphas.index(a)] = v
        fig, ax = plt.subplots(figsize=(1.6 * len(alphas) + 3.5, 1.0 * len(ranks) + 2.5), layout="constrained")
        cmap = plt.get_cmap("viridis_r").with_extremes(bad="white")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", origin="lower")
        lo, hi = np.nanmin(grid), np.nanmax(grid)
        state = {(r["r"], r["alpha"]): r["status"].split(":")[0] for r in rows}
        for i, rk in enumerate(ranks):
            for j, al in enumerate(alphas):
                v = grid[i, j]
                if np.isnan(v):
                    text = {"failed": "failed", "running": "running"}.get(state.get((rk, al)), "")
                    ax.text(j, i, text, ha="center", va="center", color="grey", fontsize=9, style="italic")
                else:
                    # viridis_r: low losses are bright yellow, high ones dark purple.
                    dark = hi > lo and (v - lo) / (hi - lo) > 0.55
                    ax.text(
                        j,
                        i,
                        f"{v:.4f}",
                        ha="center",
                        va="center",
                        fontsize=11,
                        color="white" if dark else "black",
                        fontweight="bold" if v == lo else "normal",
                    )
        ax.set_xticks(range(len(alphas)), [_fmt("alpha", a) for a in alphas])
        ax.set_yticks(range(len(ranks)), [_fmt("r", r) for r in ranks])
        ax.set_xticks(np.arange(-0.5, len(alphas)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(ranks)), minor=True)
        ax.grid(which="minor", color="lightgrey", lw=1)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel("LoRA alpha (adapter.alpha)")
        ax.set_ylabel("LoRA rank r (adapter.r)")
        ax.set_title(title, fontsize=11)
        fig.colorbar(im, ax=ax, label=f"best eval loss ({LOSS_UNIT})")
    else:
        if len(alphas) >= 2:
            name, values, keyf = "LoRA alpha (adapter.alpha)", alphas, lambda r: r["alpha"]
        elif len(ranks) >= 2:
            name, values, keyf = "LoRA rank r (adapter.r)", ranks, lambda r: r["r"]
        else:
            name, values, keyf = "run", [r["run"] for r in scored], lambda r: r["run"]
        best: dict = {}
        for r in scored:
            best[keyf(r)] = min(best.get(keyf(r), math.inf), r["best_eval_loss"])
        values = [v for v in values if v in best]
        heights = [best[v] for v in values]
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(values) + 3), 5), layout="constrained")
        colors = ["#f2c94c" if h == min(heights) else "#8fa9bf" for h in heights]  # the best one in gold
        bars = ax.bar([_fmt("r", v) for v in values], heights, color=colors, edgecolor="black")
        ax.bar_label(bars, labels=[f"{h:.4f}" + (" (best)" if h == min(heights) else "") for h in heights], padding=3)
        lo, hi = min(heights), max(heights)
        pad = max((hi - lo) * 0.5, abs(hi) * 0.02, 1e-3)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)  # zoomed in: differences between runs are small
        ax.set_xlabel(name)
        ax.set_ylabel(f"best eval loss ({LOSS_UNIT})")
        fixed = [f"r={_fmt('r', ranks[0])}"] if len(ranks) == 1 else []
        fixed += [f"alpha={_fmt('alpha', alphas[0])}"] if len(alphas) == 1 else []
        ax.set_title(title + (f"\n{', '.join(fixed)}" if fixed else ""), fontsize=11)
        ax.grid(True, axis="y", alpha=0.3)
        if name == "run":
            ax.tick_params(axis="x", labelrotation=20)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sweep_name(sweep_dir: Path) -> str:
    """multirun/<date>/<time> is named by its last two parts."""
    parts = sweep_dir.resolve().parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(sweep_dir)


def _sort_key(v: Any):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
