"""Three direct jobs of one shape on one warm VGG16 (random weights, bfloat16) in one process.

The first job traces the compiled calls (worker.inference.compiled_calls); the next ones reuse
them, as a warm worker does. Prints each job's wall and CPU seconds and the traces so far:

    PYTHONPATH=$PWD python bench/bench_warm_jobs.py rows      # or tiles / auto
    COMPILED_CALLS=false PYTHONPATH=$PWD python bench/bench_warm_jobs.py rows   # eager, to compare
"""

from __future__ import annotations

import sys
import time


def main(scheme: str = "rows", size: int = 1024, jobs: int = 3) -> None:
    import keras
    import numpy as np

    from worker.inference.compiled_calls import trace_count
    from worker.inference.compute_precision import apply_precision
    from worker.inference.direct import direct_inference
    from worker.inference.fcn import to_fully_convolutional
    from worker.inference.preprocess import get_preprocess

    keras.utils.set_random_seed(0)
    fcn = to_fully_convolutional(apply_precision(keras.applications.VGG16(weights=None), "bfloat16"))
    preprocess = get_preprocess("caffe")
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    for job in range(1, jobs + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        direct_inference(fcn, image, preprocess, scheme=scheme)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{scheme} job {job}: wall {wall:.2f} s, cpu {cpu:.2f} s, traces so far {trace_count()}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
