"""Integrations of pyops with other libraries. Each submodule imports its library lazily, so
`import pyops` never imports them: `pyops.integrations.transformers` needs transformers only when
one of its functions is called."""


def prefer_installed_kernels() -> None:
    """In a source checkout the repository's ``kernels/`` folder (shipped as pyops.kernels)
    shadows the ``kernels`` distribution transformers imports whenever the checkout's root is on
    sys.path (``python -m`` from the root, pytest): import the installed one first, without that
    root. Nothing to do for an installed pyops."""
    import importlib
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not ((root / "pyproject.toml").is_file() and (root / "kernels").is_dir()):
        return
    mod = sys.modules.get("kernels")
    if mod is not None and not str(getattr(mod, "__file__", "") or "").startswith(str(root / "kernels")):
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != root]
    sys.modules.pop("kernels", None)
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
