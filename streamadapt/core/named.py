"""Code named on the command line as MODULE:NAME (a feature plug-in, a model builder)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any


def import_named(reference: str, flag: str, form: str, error: type[ValueError]) -> Any:
    """The attribute NAME of module MODULE in `reference` ("MODULE:NAME"), None when the module has none;
    MODULE is imported with the working directory on the path. `error`, in one line naming `flag` and the
    `form` it takes, when `reference` is malformed or MODULE cannot be imported."""
    module_name, _, name = reference.partition(":")
    if not module_name or not name:
        raise error(f"{flag} takes {form}, not {reference!r}")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as cause:
        raise error(f"{flag} {reference}: cannot import {module_name} ({cause})") from cause
    return getattr(module, name, None)
