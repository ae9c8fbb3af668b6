"""Where the data directories shipped with the package live: conf/ (Hydra configs) and slurm/
(the sbatch template, the dev cluster script).

An installed wheel carries them inside the package (orchestrator/conf, orchestrator/slurm); a
checkout, and an editable install of one, keeps them at the top of the repository."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def packaged(name: str) -> Path:
    """<package>/<name> when the package carries it (a wheel), else <repository root>/<name>."""
    inside = PACKAGE / name
    return inside if inside.exists() else PACKAGE.parent / name
