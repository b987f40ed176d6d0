"""streamadapt worker: consume, validate, serve and adapt a model on a Kafka purchase stream."""
import os

# One BLAS thread, set before NumPy loads. Serving multiplies a batch by a few small matrices; with a
# thread per core, OpenBLAS's idle threads spun on the core the broker and the trainer need (process CPU
# per event went from 110 to 170 us). An operator's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
