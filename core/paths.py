"""Default locations and names shared by the library, the CLI and the UI (no heavy imports)."""

from __future__ import annotations

from pathlib import Path

#: The repository checkout (the package is installed in editable mode from it).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The shipped Triton model repository.
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
#: The shipped model's name.
DEFAULT_MODEL = "pneumonia"
#: Decoded-image cache of the training and evaluation tools.
DEFAULT_CACHE = REPO_ROOT / ".cache"


def relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it or beside it (``../shared/...``), so that
    committed reports never carry a machine's absolute paths; other paths are returned as given."""
    import os

    p = Path(path).resolve()
    rel = os.path.relpath(p, REPO_ROOT)
    return rel if not rel.startswith(os.pardir + os.sep + os.pardir) else str(path)
