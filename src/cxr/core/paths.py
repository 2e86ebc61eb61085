"""Default locations and names shared by the library, the CLI and the UI (no heavy imports).

**Where the shipped model is found** (one rule, used by every command's ``--model-repository`` default):

1. ``$CXR_MODEL_REPOSITORY``, when set;
2. in a checkout (an editable install), its ``model_repository/``;
3. installed from a wheel, the copy the wheel carries (``site-packages/cxr/model_repository``).

When none holds the model, the error says so in one line and names ``--model-repository``.

**Where cxr keeps its own state** (one place, never the working directory or the package):

- ``$CXR_HOME`` when set: state in it, the cache in ``$CXR_HOME/cache``;
- else the user's state folder, ``$XDG_STATE_HOME/cxr`` (``~/.local/state/cxr``), and cache folder,
  ``$XDG_CACHE_HOME/cxr`` (``~/.cache/cxr``).

State: the DICOM listener's spool (``listen-spool/``), the spools the listener was started on (``spools.txt``), and
the reports of commands run without ``--out`` (``reports/<command>``). Cache: decoded images, downloaded tools.
Committed reports (``docs/``, ``bench/``) are written by naming their folder with ``--out``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The installed ``cxr`` package (``src/cxr`` in a checkout).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: The environment variable that names the model repository, before any default.
REPOSITORY_ENV = "CXR_MODEL_REPOSITORY"


def _checkout(package_root: Path) -> Path | None:
    """The checkout that holds ``package_root`` as ``src/cxr``, or None when the package was installed."""
    root = package_root.parent.parent
    return root if package_root.parent.name == "src" and (root / "pyproject.toml").is_file() else None


#: The repository checkout, or None when cxr runs from an installed wheel.
CHECKOUT = _checkout(PACKAGE_ROOT)
#: What committed reports name their paths relative to (:func:`relative`) and where a locked split's relative
#: roots are read from: the checkout, or the working directory of an installed wheel. No default writes here.
REPO_ROOT = CHECKOUT if CHECKOUT is not None else Path.cwd()


def shipped_repository() -> Path:
    """The shipped Triton model repository, by the rule of this module's docstring."""
    if os.environ.get(REPOSITORY_ENV):
        return Path(os.environ[REPOSITORY_ENV])
    if CHECKOUT is not None:
        return CHECKOUT / "model_repository"
    return PACKAGE_ROOT / "model_repository"


#: The shipped Triton model repository.
DEFAULT_REPOSITORY = shipped_repository()
#: The shipped model's name.
DEFAULT_MODEL = "pneumonia"

#: The environment variable that names cxr's own folder (state, cache and reports), before the user's defaults.
HOME_ENV = "CXR_HOME"


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home() / fallback  # (the spec ignores relative values)


def state_dir() -> Path:
    """cxr's state folder: ``$CXR_HOME``, else ``$XDG_STATE_HOME/cxr`` (``~/.local/state/cxr``)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().absolute()
    return _xdg("XDG_STATE_HOME", ".local/state") / "cxr"


def cache_dir() -> Path:
    """cxr's cache folder: ``$CXR_HOME/cache``, else ``$XDG_CACHE_HOME/cxr`` (``~/.cache/cxr``)."""
    if os.environ.get(HOME_ENV):
        return state_dir() / "cache"
    return _xdg("XDG_CACHE_HOME", ".cache") / "cxr"


#: cxr's state folder (see the module's docstring).
STATE_DIR = state_dir()
#: Decoded-image cache of the training and evaluation tools, and downloaded tools (perf_analyzer).
DEFAULT_CACHE = cache_dir()
#: Where a command run without ``--out`` writes its report: ``REPORTS_DIR/<command>``.
REPORTS_DIR = STATE_DIR / "reports"
#: The DICOM listener's spool when ``cxr listen`` is given no ``--spool``.
DEFAULT_SPOOL = STATE_DIR / "listen-spool"
#: The spools ``cxr listen`` was started on, one absolute path a line: a listener started on an empty spool says
#: which of them still hold unfinished work.
KNOWN_SPOOLS = STATE_DIR / "spools.txt"
#: The listener's spool before the state folder existed (``<checkout or working directory>/out/listen-spool``).
EARLIER_SPOOL = Path("out") / "listen-spool"

#: The one line that says where the shipped model is looked for (appended to "no model folder" errors).
WHERE_MODELS_ARE = (f"models are looked for in ${REPOSITORY_ENV}, then the checkout's model_repository/, then the "
                    "installed package's model_repository/; pass --model-repository DIR")


def relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it or beside it (``../shared/...``), so that
    committed reports never carry a machine's absolute paths; a path under the user's home (the state and cache
    folders) as ``~/...``; other paths are returned as given."""
    p = Path(path).resolve()
    rel = os.path.relpath(p, REPO_ROOT)
    if not rel.startswith(os.pardir + os.sep + os.pardir):
        return rel
    home = Path.home().resolve()
    if p.is_relative_to(home):
        return str(Path("~") / p.relative_to(home))
    return str(path)
