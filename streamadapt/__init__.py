"""streamadapt: keep a deep model fresh on a live Kafka event stream.

Embedding it in a program of your own takes the same settings object as the command line:

    import streamadapt

    settings = streamadapt.load_settings({"STREAMADAPT_SOURCE_CHECKPOINT": "models/source"})
    streamadapt.run(settings)  # serves (and, by role, fine-tunes) until SIGTERM, or until `stop` is set

`run(settings, stop=threading.Event(), handle_signals=False)` leaves the signals to your program. Your own
network plugs in at pretraining (`streamadapt.model.builder`); docs/extending.md shows both.
"""
import os
from importlib.metadata import PackageNotFoundError, version

# One BLAS thread, set before NumPy loads. Serving multiplies a batch by a few small matrices; with a
# thread per core, OpenBLAS's idle threads spin on the cores the broker and the trainer need. An
# operator's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from streamadapt.settings import Settings, SettingsError, load_settings  # noqa: E402

try:
    __version__ = version("streamadapt")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["Settings", "SettingsError", "__version__", "load_settings", "run"]


def __getattr__(name: str):
    if name == "run":  # imported on first use: it brings every client library with it
        from streamadapt.service import run

        return run
    raise AttributeError(f"module 'streamadapt' has no attribute {name!r}")
