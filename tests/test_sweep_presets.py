"""`sweep=<name>` presets (conf/sweep/): the sweeper params they set, the alpha = 2 * r coupling
through the `mul` resolver, the override pre-check, and a real Optuna sweep (a real grid sweep
driven by a preset: test_sweep.py)."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from conftest import cli

from orchestrator.config import CONF_DIR, check_group_overrides, compose

BASIC = {
    "rank_alpha_2r": {"adapter.r": "4,8,16,32"},
    "rank_alpha_grid": {"adapter.r": "4,8,16,32", "adapter.alpha": "8,16,32,64"},
    "lr_rank": {"trainer.lr": "1e-4,3e-4,1e-3,3e-3", "adapter.r": "8,16,32"},
}
OPTUNA = {"optuna_rank_alpha": {"adapter.r": "choice(4, 8, 16, 32)", "adapter.alpha": "choice(8, 16, 32, 64)"}}
COUPLED = {"rank_alpha_2r", "lr_rank"}  # alpha = 2 * r


def _has_optuna() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ImportError:
        return False


needs_optuna = pytest.mark.skipif(not _has_optuna(), reason="hydra-optuna-sweeper is not installed")


def hydra_compose(*overrides: str):
    """The composed config with its `hydra` node, as a multirun's sweeper sees it."""
    from hydra import compose as hc
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hc(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_every_preset_is_tested_and_documented():
    presets = {p.stem: p.read_text() for p in (CONF_DIR / "sweep").glob("*.yaml")}
    assert set(presets) == set(BASIC) | set(OPTUNA)
    for name, text in presets.items():
        assert text.startswith("# @package _global_\n# "), f"{name}: needs the _global_ package and a comment"
        assert f"sweep={name}" in text, f"{name}: its comment should show how to use it"


@pytest.mark.parametrize("name", sorted(BASIC))
def test_preset_sets_the_sweeper_params(name):
    from omegaconf import OmegaConf

    cfg = hydra_compose("experiment=demo", f"sweep={name}")
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == BASIC[name]
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    assert "sweep" not in cfg  # the group's content is global: no `sweep` key in the run config
    # One combination of the grid, as a run of the multirun composes it: a typed, valid config.
    r = 8
    run = compose(["experiment=demo", f"sweep={name}", f"adapter.r={r}", "output_dir=/tmp/x"])
    assert run.adapter.r == r
    if name in COUPLED:
        assert run.adapter.alpha == 2 * r and isinstance(run.adapter.alpha, (int, float))
    else:
        assert run.adapter.alpha == 32  # the experiment's


@needs_optuna
def test_optuna_preset_sets_the_optuna_sweeper():
    from omegaconf import OmegaConf

    cfg = hydra_compose("experiment=demo", "sweep=optuna_rank_alpha")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert OmegaConf.to_container(sweeper.params) == OPTUNA["optuna_rank_alpha"]
    assert sweeper.direction == "minimize" and sweeper.n_jobs == 1
    assert "sweep" not in cfg


def test_mul_resolver_gives_numbers():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "r": 8,
            "s": "8",
            "x": 0.5,
            "a": "${mul:${r},2}",
            "b": "${mul:${s},2}",
            "c": "${mul:${r},${x}}",
            "bad": "${mul:${r},two}",
        }
    )
    assert cfg.a == 16 and type(cfg.a) is int
    assert cfg.b == 16 and type(cfg.b) is int  # a string from the command line is still a number
    assert cfg.c == 4.0
    with pytest.raises(Exception, match="expected numbers"):
        _ = cfg.bad


def test_override_check_accepts_presets_and_lists_them_for_an_unknown_one(monkeypatch):
    import sys

    compose_module = sys.modules["orchestrator.config.compose"]  # the package exports a function of that name

    usable, problems = check_group_overrides(["sweep=rank_alpha_2r", "adapter.r=4,8"])
    assert usable == ["sweep=rank_alpha_2r", "adapter.r=4,8"] and problems == []
    usable, problems = check_group_overrides(["sweep=nope"])
    assert usable == []
    assert problems == ["sweep=nope: no such option; valid: lr_rank, optuna_rank_alpha, rank_alpha_2r, rank_alpha_grid"]
    # A preset whose sweeper plugin is missing says what to install instead of Hydra's
    # "Could not find 'hydra/sweeper/optuna'".
    monkeypatch.setitem(
        compose_module.SWEEPER_PLUGINS, "optuna", ("hydra_plugins.no_such_sweeper", "hydra-optuna-sweeper==1.3.0")
    )
    _, problems = check_group_overrides(["sweep=optuna_rank_alpha"])
    assert problems == [
        "sweep=optuna_rank_alpha: needs the optuna sweeper plugin, not installed; pip install hydra-optuna-sweeper==1.3.0"
    ]


def test_cli_rejects_an_unknown_preset(tmp_path):
    r = cli("train", "experiment=demo", "sweep=nope", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 2
    assert "sweep=nope: no such option; valid: lr_rank, optuna_rank_alpha, rank_alpha_2r, rank_alpha_grid" in r.stderr


@pytest.mark.slow
@needs_optuna
def test_real_optuna_sweep(tmp_path, demo_root):
    """Needs the train task (cli.TrainCommand.task) to return the run's final eval loss, Optuna's objective."""
    from orchestrator import report

    sweep = tmp_path / "sweep"
    r = cli(
        "train",
        "-m",
        "experiment=demo",
        "sweep=optuna_rank_alpha",
        "hydra.sweeper.n_trials=1",  # one trial proves the objective: the run returns its eval loss
        "trainer.max_steps=2",
        "trainer.save_every=0",
        "tracking=none",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    runs = [p for p in sweep.iterdir() if p.is_dir() and (p / "adapter" / "COMMITTED").is_file()]
    assert len(runs) == 1
    finals = {}
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        _, evals = report.read_metrics(run)
        finals[(cfg["adapter"]["r"], cfg["adapter"]["alpha"])] = evals[-1]["eval_loss"]
    best = min(finals, key=finals.get)
    assert results["best_value"] == pytest.approx(finals[best])
    assert (results["best_params"]["adapter.r"], results["best_params"]["adapter.alpha"]) == best
