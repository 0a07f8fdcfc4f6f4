"""Benchmark the inference engine against the naive seed recipes and the machine's matmul rate.

    python -m bench.bench_engine [--quick] [--sizes TILED DIRECT LARGE] [--skip-seed-direct]
                                 [--tile-sweep] [--json out.json] [--mem-cap-gb N]
                                 [--precisions float32 bfloat16] [--job]

``--precisions`` runs every engine case once per compute precision (the seed recipes stay
float32, as the seed ran) and measures the matrix-product rate in each precision, so that
the table shows fp32 and bf16 side by side, same run, same image. ``--job`` adds the direct
case end to end through ``worker.engine.run_inference`` (decode a PNG, infer, write
heatmap.npz, summary.json and overlays).

Every case runs in a FRESH child process (``python -m bench.bench_engine --child ...``) so
that its peak RSS is its own. The parent (which never imports TensorFlow) polls the child's
RSS with psutil and kills it above ``--mem-cap-gb``: the case is then reported as
"out of memory (> N GB)" instead of taking the machine down. The child also raises its own
``oom_score_adj`` so the kernel would pick it first.

Timing: only the inference call is timed. Model construction (VGG16 with random weights,
``weights=None``: ImageNet weights are not needed for timing) and FCN conversion are not
counted, and a small warm-up call runs first so one-time graph tracing is excluded.

FLOPs are counted analytically (one multiply-add = 2 FLOPs):
  conv:  2 * H_out * W_out * k_h * k_w * C_in * C_out
  dense: 2 * in_features * units
VGG16 at 224x224 is 15.47e9 multiply-adds (13 convs + 3 dense), i.e. 2 * 15.47e9 FLOPs per
window in tiled mode. Direct mode counts the *useful* FLOPs of one whole-image FCN pass
(trunk convs at the image size + the converted head); the ``tiles`` scheme additionally
recomputes tile halos, reported as "halo overhead" (executed / useful FLOPs), while the
``rows`` scheme (line-buffer streaming, the default where the trunk allows) executes only
the useful FLOPs. The ``stream`` case puts the engine's whole-image pass, rows and tiles
side by side on a size where all three fit (default 2048x2048).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

GB = 1024**3
WINDOW = 224
STRIDE = 112


# ----------------------------------------------------------------------------------------
# Child side: one case, TensorFlow imported here only.
# ----------------------------------------------------------------------------------------


def _rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) so the timed phase is measured alone."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def chain_macs(model, input_shape) -> float:
    """Multiply-adds of a chain (Sequential-like) Keras model for a given input shape.

    Walks ``model.layers`` in order, propagating shapes with ``compute_output_shape``;
    counts Conv2D and Dense (the layers that carry >99.9% of VGG16's work).
    """
    import keras

    shape = tuple(input_shape)
    macs = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        out = tuple(layer.compute_output_shape(shape))
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            macs += float(out[0] * out[1] * out[2]) * kh * kw * shape[-1] * out[-1]
        elif isinstance(layer, keras.layers.Dense):
            macs += float(out[0]) * shape[-1] * layer.units
        shape = out
    return macs


def _build_vgg16(precision: str = "float32"):
    import keras

    from worker.inference.compute_precision import apply_precision

    keras.utils.set_random_seed(0)
    return apply_precision(keras.applications.VGG16(weights=None), precision)


def _image(size: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


_CPU_SECONDS = {}


def _timed(fn):
    """Run fn once; returns (value, wall seconds). CPU seconds (all threads) go to _CPU_SECONDS."""
    _reset_peak_rss()
    cpu = time.process_time()
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    _CPU_SECONDS["last"] = time.process_time() - cpu
    return value, seconds


def _case_matmul(spec) -> dict:
    import keras
    import numpy as np

    n, repeats = spec["n"], spec["repeats"]
    dtype = spec.get("precision", "float32")
    rng = np.random.default_rng(0)
    a = keras.ops.cast(keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32)), dtype)
    b = keras.ops.cast(keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32)), dtype)
    keras.ops.convert_to_numpy(keras.ops.matmul(a, b))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(keras.ops.matmul(a, b))  # forces completion
        times.append(time.perf_counter() - start)
    best = min(times)
    _CPU_SECONDS["last"] = None
    flops = 2.0 * n**3
    return {
        "seconds": best,
        "all_seconds": times,
        "flops": flops,
        "gflops_per_s": flops / best / 1e9,
        "units": None,
        "note": f"{n}x{n} @ {n}x{n} {dtype}, best of {repeats}",
    }


def _case_seed_tiled(spec) -> dict:
    import numpy as np

    from bench.seed_recipes import seed_sliding_window

    model = _build_vgg16()
    image = _image(spec["size"])
    model.predict(np.zeros((1, WINDOW, WINDOW, 3), np.float32), verbose=0)  # warm-up
    rss_before = _rss_now()
    (heatmap, count), seconds = _timed(lambda: seed_sliding_window(model, image, WINDOW, STRIDE, 1000))
    macs = chain_macs(model, (1, WINDOW, WINDOW, 3))
    return {
        "seconds": seconds,
        "units": count,
        "unit_name": "windows",
        "flops": 2.0 * macs * count,
        "rss_before": rss_before,
        "output_mb": heatmap.nbytes / 2**20,
        "note": f"edges skipped; {heatmap.nbytes / GB:.1f} GB HxWx1000 output",
    }


def _case_engine_tiled(spec) -> dict:
    from worker.inference.preprocess import get_preprocess
    from worker.inference.tiled import tiled_inference

    model = _build_vgg16(spec.get("precision", "float32"))
    image = _image(spec["size"])
    pre = get_preprocess("caffe")
    batch = spec["batch"]
    for size in (WINDOW, WINDOW + STRIDE):  # warm-up: two batch shapes, so Keras relaxes the batch dimension
        tiled_inference(model, _image(size, 1), pre, window=(WINDOW, WINDOW), stride=STRIDE, batch_size=batch)
    rss_before = _rss_now()
    grid, seconds = _timed(
        lambda: tiled_inference(model, image, pre, window=(WINDOW, WINDOW), stride=STRIDE, batch_size=batch)
    )
    count = grid.scores.shape[0] * grid.scores.shape[1]
    macs = chain_macs(model, (1, WINDOW, WINDOW, 3))
    return {
        "seconds": seconds,
        "units": count,
        "unit_name": "windows",
        "flops": 2.0 * macs * count,
        "rss_before": rss_before,
        "macs_per_window": macs,
        "note": f"batch {batch}, edges covered",
    }


def _fcn_flops(fcn, height: int, width: int) -> float:
    """Useful FLOPs of one whole-image FCN pass (trunk at H x W + head on its feature map)."""
    cells_y, cells_x = fcn.trunk_cells(height, width)
    features = int(fcn.trunk.output.shape[-1])
    return 2.0 * (
        chain_macs(fcn.trunk, (1, height, width, fcn.channels)) + chain_macs(fcn.head, (1, cells_y, cells_x, features))
    )


def _engine_executed_flops(fcn, height: int, width: int, tile_cells: int) -> tuple[float, int, int]:
    """FLOPs the engine actually runs (trunk per tile, halos included, + head), tiles, max side."""
    from worker.inference.direct import plan_axis

    cells_y, cells_x = fcn.trunk_cells(height, width)
    spans_y = plan_axis(height, fcn.stride[0], fcn.halo[0], cells_y, tile_cells)
    spans_x = plan_axis(width, fcn.stride[1], fcn.halo[1], cells_x, tile_cells)
    macs = 0.0
    side = 0
    for sy in spans_y:
        for sx in spans_x:
            h, w = sy.pixel_stop - sy.pixel_start, sx.pixel_stop - sx.pixel_start
            side = max(side, h, w)
            macs += chain_macs(fcn.trunk, (1, h, w, fcn.channels))
    features = int(fcn.trunk.output.shape[-1])
    macs += chain_macs(fcn.head, (1, cells_y, cells_x, features))
    return 2.0 * macs, len(spans_y) * len(spans_x), side


def _case_seed_direct(spec) -> dict:
    import numpy as np

    from bench.seed_recipes import seed_whole_image_direct
    from worker.inference.fcn import to_fully_convolutional

    fcn = to_fully_convolutional(_build_vgg16())
    image = _image(spec["size"])
    fcn.model.predict(np.zeros((1, 256, 256, 3), np.float32), verbose=0)  # warm-up
    rss_before = _rss_now()
    scores, seconds = _timed(lambda: seed_whole_image_direct(fcn.model, image))
    return {
        "seconds": seconds,
        "units": int(scores.shape[0] * scores.shape[1]),
        "unit_name": "cells",
        "flops": _fcn_flops(fcn, spec["size"], spec["size"]),
        "rss_before": rss_before,
        "note": "whole image in one pass",
    }


def _case_engine_direct(spec) -> dict:
    """``direct_inference`` in one scheme: ``rows`` (streamed, no halo), ``tiles`` (halos) or
    ``whole`` (one whole-image pass through the engine, the reference rate)."""
    from worker.inference.direct import direct_inference, tile_cells_for_budget
    from worker.inference.fcn import to_fully_convolutional
    from worker.inference.preprocess import get_preprocess

    fcn = to_fully_convolutional(_build_vgg16(spec.get("precision", "float32")))
    size = spec["size"]
    image = _image(size)
    pre = get_preprocess("caffe")
    budget = spec["budget"]
    scheme = spec.get("scheme", "tiles")
    band_rows = spec.get("band_rows")
    if scheme == "rows":
        tile_cells = None
    elif scheme == "whole":
        tile_cells, scheme = 10**9, "tiles"
    else:
        tile_cells = spec.get("tile_cells") or tile_cells_for_budget(fcn, budget)

    def run(img):
        return direct_inference(
            fcn, img, pre, memory_budget_mb=budget, tile_cells=tile_cells, scheme=scheme, band_rows=band_rows
        )

    run(_image(256, 1))  # warm-up
    if spec.get("warm_same_size"):  # XLA compiles once per tile shape: a warm worker has seen this size
        run(image)
    rss_before = _rss_now()
    grid, seconds = _timed(lambda: run(image))
    useful = _fcn_flops(fcn, size, size)
    result = {
        "seconds": seconds,
        "units": int(grid.scores.shape[0] * grid.scores.shape[1]),
        "unit_name": "cells",
        "flops": useful,
        "rss_before": rss_before,
        "budget_mb": budget,
        "scheme": grid.scheme,
    }
    if grid.scheme == "rows":
        note = f"budget {budget:g} MB, {grid.tiles_read} reads of >= 256 rows, no halo"
        return result | {"executed_flops": useful, "note": note}
    executed, tiles, side = _engine_executed_flops(fcn, size, size, tile_cells)
    return result | {
        "executed_flops": executed,
        "tiles": tiles,
        "tile_cells": tile_cells,
        "tile_side_px": side,
        "note": f"budget {budget:g} MB, tile_cells {tile_cells}, {tiles} tiles <= {side} px, "
        f"halo overhead {executed / useful:.2f}x",
    }


def _save_random_vgg16(folder, precision: str):
    """VGG16 with random weights as a user model (.keras + sidecar) the registry can load."""
    import json as json_module

    model = _build_vgg16()
    model.save(os.path.join(folder, "vgg16_random.keras"))
    sidecar = {"classes": [f"class_{i}" for i in range(1000)], "preprocess": "caffe", "input_size": [224, 224]}
    with open(os.path.join(folder, "vgg16_random.json"), "w") as handle:
        json_module.dump(sidecar, handle)
    return os.path.join(folder, "vgg16_random.keras")


def _case_engine_job(spec) -> dict:
    """One direct job end to end: PNG on disk -> decode -> infer -> heatmap/summary/overlays."""
    from PIL import Image

    from shared.jobspec import JobParams
    from worker.engine import run_inference
    from worker.inference.model_registry import ModelRegistry

    precision, size = spec.get("precision", "float32"), spec["size"]
    with tempfile.TemporaryDirectory(prefix="bench_job_") as tmp:
        model_path = _save_random_vgg16(tmp, precision)
        registry = ModelRegistry([tmp])
        params = JobParams(
            model=model_path, mode="direct", top_k=3, precision=precision, memory_budget_mb=spec["budget"]
        )
        for side, name in ((256, "warm.png"), (size, "image.png")):
            Image.fromarray(_image(side)).save(os.path.join(tmp, name))
        run_inference(os.path.join(tmp, "warm.png"), params, registry, os.path.join(tmp, "warm"), max_pixels=10**9)
        if spec.get("warm_same_size"):  # a worker serving this image size again: compiled programs reused
            run_inference(os.path.join(tmp, "image.png"), params, registry, os.path.join(tmp, "w2"), max_pixels=10**9)
        rss_before = _rss_now()
        image_path, out = os.path.join(tmp, "image.png"), os.path.join(tmp, "out")
        summary, seconds = _timed(lambda: run_inference(image_path, params, registry, out, max_pixels=10**9))
        fcn = registry.load(model_path, precision).fcn
    return {
        "seconds": seconds,
        "units": summary["grid"]["rows"] * summary["grid"]["cols"],
        "unit_name": "cells",
        "flops": _fcn_flops(fcn, size, size),
        "rss_before": rss_before,
        "timings": summary["timings"],
        "device": summary["device"],
        "note": "end to end: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["timings"].items()),
    }


_CASES = {
    "matmul": _case_matmul,
    "seed_tiled": _case_seed_tiled,
    "engine_tiled": _case_engine_tiled,
    "seed_direct": _case_seed_direct,
    "engine_direct": _case_engine_direct,
    "engine_job": _case_engine_job,
}


def _child_main(spec_json: str, out_path: str) -> None:
    import resource

    try:  # be the first victim of the kernel's OOM killer, never a neighbour
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
    except OSError:
        pass
    spec = json.loads(spec_json)
    result = _CASES[spec["kind"]](spec)
    result["cpu_s"] = _CPU_SECONDS.get("last")
    result["peak_rss_inference"] = _vm_hwm()  # VmHWM since the reset before the timed call
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # whole process
    with open(out_path, "w") as handle:
        json.dump(result, handle)


# ----------------------------------------------------------------------------------------
# Parent side: spawn, watch memory, tabulate. No TensorFlow import here.
# ----------------------------------------------------------------------------------------


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_case(spec: dict, cap_bytes: int, timeout_s: float) -> dict:
    """Run one case in a fresh child process under an RSS cap; returns its result dict."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        out_path = os.path.join(tmp, "result.json")
        log_path = os.path.join(tmp, "child.log")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "bench.bench_engine", "--child", json.dumps(spec), out_path]
        start = time.perf_counter()
        with open(log_path, "w") as log:
            child = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            proc = psutil.Process(child.pid)
            peak = 0
            status = "ok"
            while child.poll() is None:
                rss = _tree_rss(proc)
                peak = max(peak, rss)
                if rss > cap_bytes:
                    status = "oom"
                elif time.perf_counter() - start > timeout_s:
                    status = "timeout"
                if status != "ok":
                    child.kill()  # only the child we started, by its id
                    child.wait()
                    break
                time.sleep(0.05)
        result = dict(spec)
        result["wall_s"] = time.perf_counter() - start
        result["load_avg_after"] = os.getloadavg()[0]
        result["parent_peak_rss"] = peak
        if status == "oom":
            result.update(
                status="oom",
                cap_gb=cap_bytes / GB,
                note=f"out of memory (> {cap_bytes / GB:.1f} GB): killed by the guard",
            )
        elif status == "timeout":
            result.update(status="timeout", note=f"killed after {timeout_s:.0f} s")
        elif child.returncode != 0 or not os.path.exists(out_path):
            with open(log_path) as log:
                tail = log.read()[-3000:]
            result.update(status="error", note=f"child exited with {child.returncode}", log_tail=tail)
        else:
            with open(out_path) as handle:
                result.update(json.load(handle))
            result["status"] = "ok"
        return result


def seed_direct_estimate_bytes(size: int) -> float:
    """Rough lower bound of the seed whole-image pass: float64 + float32 input, two block1 maps."""
    return size * size * (3 * 8 + 3 * 4 + 2 * 64 * 4)


def machine_info() -> dict:
    import psutil

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": model,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gb": psutil.virtual_memory().total / GB,
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }
    # versions without importing TensorFlow in the parent
    from importlib import metadata

    for dist in ("tensorflow", "tensorflow-cpu", "keras", "jax", "jaxlib"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["keras_backend"] = os.environ.get("KERAS_BACKEND", "tensorflow")
    return info


def _fmt(value, spec="{:.2f}", empty="-"):
    return empty if value is None else spec.format(value)


def _peak(result) -> int | None:
    values = [result.get("peak_rss_inference"), result.get("parent_peak_rss")]
    values = [v for v in values if v]
    return max(values) if values else None


def table(results: list[dict], matmul_rates: dict[str, float]) -> str:
    """Markdown table; each engine row's "% of matmul" is against the matmul rate of its own precision."""
    head = (
        "| case | implementation | image | seconds | CPU s | windows/cells | peak RSS GB (model GB) "
        "| GFLOP/s | % of matmul | speedup vs seed, wall (CPU) | notes |"
    )
    lines = [head, "|" + "---|" * 11]
    seeds, seeds_cpu = {}, {}
    for r in results:
        if r["impl"] == "seed" and r.get("status") == "ok":
            seeds[r["case"]] = r["seconds"]
            seeds_cpu[r["case"]] = r.get("cpu_s")
    for r in results:
        if r["kind"] == "matmul":
            continue
        ok = r.get("status") == "ok"
        rate = r["flops"] / r["seconds"] / 1e9 if ok and r.get("flops") else None
        matmul_rate = matmul_rates.get(r.get("precision", "float32"))
        seed_s = seeds.get(r["case"])
        speedup = seed_s / r["seconds"] if ok and seed_s and r["impl"] != "seed" else None
        seed_cpu = seeds_cpu.get(r["case"])
        cpu_speedup = seed_cpu / r["cpu_s"] if speedup and seed_cpu and r.get("cpu_s") else None
        peak = _peak(r) if ok or r.get("status") == "oom" else None
        peak_cell = _fmt(peak / GB if peak else None)
        if r.get("status") == "oom" and peak and r.get("cap_gb"):
            peak_cell = f"> {r['cap_gb']:.1f}"
        if ok and r.get("rss_before"):
            peak_cell += f" ({r['rss_before'] / GB:.2f})"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["case"],
                    r["label"],
                    f"{r['size']}x{r['size']}",
                    _fmt(r.get("seconds")) if ok else r.get("status", "?"),
                    _fmt(r.get("cpu_s"), "{:.1f}") if ok else "-",
                    f"{r['units']} {r.get('unit_name', '')}".strip() if ok and r.get("units") is not None else "-",
                    peak_cell,
                    _fmt(rate, "{:.1f}"),
                    _fmt(100 * rate / matmul_rate if rate and matmul_rate else None, "{:.0f}%"),
                    _fmt(speedup, "{:.2f}x") + (f" ({cpu_speedup:.2f}x)" if cpu_speedup else ""),
                    r.get("note", ""),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def build_plan(args) -> list[dict]:
    tiled, direct, large = args.sizes
    plan = [
        {
            "case": "matmul",
            "impl": "reference",
            "label": f"matmul {precision}",
            "kind": "matmul",
            "n": 2048 if args.quick else 4096,
            "repeats": 3 if args.quick else 5,
            "size": 0,
            "precision": precision,
        }
        for precision in args.precisions
    ]
    matmuls = list(plan)
    plan.append(
        {
            "case": "tiled",
            "impl": "seed",
            "label": "seed sliding window (1 predict/window)",
            "kind": "seed_tiled",
            "size": tiled,
        }
    )
    batches = [8, 16, 32] if args.tile_sweep else [args.batch]
    for b in batches:
        plan.append(
            {
                "case": "tiled",
                "impl": "engine",
                "label": f"engine tiled_inference B={b}",
                "kind": "engine_tiled",
                "size": tiled,
                "batch": b,
            }
        )
    if not args.skip_seed_direct:
        plan.append(
            {
                "case": "direct",
                "impl": "seed",
                "label": "seed whole-image FCN predict",
                "kind": "seed_direct",
                "size": direct,
            }
        )
    # On JAX (the GPU path) direct mode runs uniform tiles; streaming is the CPU scheme.
    schemes = ("tiles",) if os.environ.get("KERAS_BACKEND") == "jax" else ("rows", "tiles")
    for scheme in schemes:
        plan.append(
            {
                "case": "direct",
                "impl": "engine",
                "label": f"engine direct {scheme} {args.budget:g} MB",
                "kind": "engine_direct",
                "size": direct,
                "budget": args.budget,
                "scheme": scheme,
                "warm_same_size": args.warm_same_size,
            }
        )
    if not args.skip_seed_direct:
        plan.append(
            {
                "case": "large",
                "impl": "seed",
                "label": "seed whole-image FCN predict",
                "kind": "seed_direct",
                "size": large,
            }
        )
    plan.append(
        {
            "case": "large",
            "impl": "engine",
            "label": f"engine direct {schemes[0]} {args.budget:g} MB",
            "kind": "engine_direct",
            "size": large,
            "budget": args.budget,
            "scheme": schemes[0],
        }
    )
    # Streaming against one whole-image pass on a size where both fit (and the halo tiles).
    stream_size = args.stream_size or (1024 if args.quick else 2048)
    for scheme in ("whole", "rows", "tiles"):
        plan.append(
            {
                "case": "stream",
                "impl": "engine",
                "label": f"engine direct {scheme}",
                "kind": "engine_direct",
                "size": stream_size,
                "budget": args.budget,
                "scheme": scheme,
                "warm_same_size": args.warm_same_size,
            }
        )
    for rows in args.band_sweep or []:
        plan.append(
            {
                "case": "bands",
                "impl": "engine",
                "label": f"engine direct rows, {rows}-row bands",
                "kind": "engine_direct",
                "size": args.sweep_size or 4096,
                "budget": args.budget,
                "scheme": "rows",
                "band_rows": rows,
            }
        )
    if args.tile_sweep:
        size = args.sweep_size or (2048 if args.quick else 4096)
        for cells in args.sweep_cells or ([8, 16, 28, 40, 64] if args.quick else [12, 20, 28, 40, 56, 72]):
            plan.append(
                {
                    "case": "sweep",
                    "impl": "engine",
                    "label": f"engine direct tile_cells={cells}",
                    "kind": "engine_direct",
                    "size": size,
                    "budget": args.budget,
                    "tile_cells": cells,
                    "scheme": "tiles",
                }
            )
    if args.job:
        plan.append(
            {
                "case": "direct",
                "impl": "engine",
                "label": f"engine job end to end {args.budget:g} MB",
                "kind": "engine_job",
                "size": direct,
                "budget": args.budget,
                "warm_same_size": args.warm_same_size,
            }
        )
    plan = _per_precision(plan, args.precisions)
    # the matmul references again at the end: the best of both is used (less noise on a busy box)
    plan.extend(dict(spec) for spec in matmuls)
    return plan


def _per_precision(plan: list[dict], precisions: list[str]) -> list[dict]:
    """Every engine case once per precision, next to each other (the seed and matmul cases as they are)."""
    out = []
    for spec in plan:
        if spec["impl"] != "engine":
            out.append(spec)
            continue
        for precision in precisions:
            out.append(dict(spec, precision=precision, label=f"{spec['label']} {precision}"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (512 tiled, 1024 direct, 2048 large)")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=3,
        metavar=("TILED", "DIRECT", "LARGE"),
        help="image sides for the tiled, direct and large cases (default 1024 4096 8192)",
    )
    parser.add_argument("--skip-seed-direct", action="store_true", help="skip the seed whole-image runs")
    parser.add_argument("--tile-sweep", action="store_true", help="also sweep tiled batch sizes and direct tile sizes")
    parser.add_argument("--sweep-size", type=int, help="image side of the direct tile and band sweeps")
    parser.add_argument("--sweep-cells", type=int, nargs="+", help="tile_cells values of the sweep")
    parser.add_argument(
        "--band-sweep", type=int, nargs="+", help="rows scheme band heights to time (case 'bands', --sweep-size side)"
    )
    parser.add_argument(
        "--stream-size", type=int, help="image side of the stream case (whole pass vs rows vs tiles; default 2048)"
    )
    parser.add_argument(
        "--batch", type=int, default=32, help="tiled batch size when not sweeping (the service's default)"
    )
    parser.add_argument("--budget", type=float, default=1024, help="direct memory_budget_mb")
    parser.add_argument(
        "--mem-cap-gb", type=float, help="kill a case above this RSS (default: min(20, available - 2 GB))"
    )
    parser.add_argument("--case-timeout", type=float, default=3600, help="seconds per case")
    parser.add_argument("--only", nargs="+", help="run only these cases (matmul tiled direct large stream sweep bands)")
    parser.add_argument("--json", help="write all results to this JSON file")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16", "float16"],
        help="compute precisions of the engine cases and the matmul reference (default float32)",
    )
    parser.add_argument("--job", action="store_true", help="also run the direct case end to end (run_inference)")
    parser.add_argument(
        "--warm-same-size",
        action="store_true",
        help="direct cases: run the same image size once before timing (traced/compiled functions reused)",
    )
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child_main(*args.child)
        return 0

    import psutil

    if args.sizes is None:
        args.sizes = [512, 1024, 2048] if args.quick else [1024, 4096, 8192]
    available = psutil.virtual_memory().available
    cap = args.mem_cap_gb * GB if args.mem_cap_gb else min(20 * GB, available - 2 * GB)
    info = machine_info()
    info["mem_cap_gb"] = cap / GB
    print(f"# machine: {info}", flush=True)
    if info["load_avg_at_start"][0] > 0.5:
        print(
            f"# WARNING: load average {info['load_avg_at_start'][0]:.2f} on {info['cores_logical']} cores: "
            "other processes compete for the CPU, wall-clock figures will be inflated and noisy "
            "(compare CPU seconds, or rerun on a quiet machine)",
            flush=True,
        )

    plan = build_plan(args)
    if args.only:
        plan = [p for p in plan if p["case"] in args.only or p["kind"] == "matmul"]
    results = []
    matmul_rates: dict[str, float] = {}
    for spec in plan:
        if spec["kind"] == "seed_direct" and seed_direct_estimate_bytes(spec["size"]) > cap:
            need = seed_direct_estimate_bytes(spec["size"]) / GB
            result = dict(
                spec,
                status="oom",
                note=f"out of memory (> {cap / GB:.0f} GB): needs >= {need:.0f} GB by estimate, not run",
            )
            print(f"- {spec['case']} / {spec['label']}: {result['note']}", flush=True)
            results.append(result)
            continue
        print(f"- {spec['case']} / {spec['label']} / {spec['size']} ...", end=" ", flush=True)
        result = run_case(spec, cap, args.case_timeout)
        results.append(result)
        if result["status"] == "ok":
            if spec["kind"] == "matmul":
                precision = spec["precision"]
                matmul_rates[precision] = max(matmul_rates.get(precision, 0.0), result["gflops_per_s"])
                print(f"{result['gflops_per_s']:.1f} GFLOP/s ({result['note']})", flush=True)
            else:
                peak = _peak(result)
                print(f"{result['seconds']:.2f} s, peak RSS {peak / GB:.2f} GB  [{result.get('note', '')}]", flush=True)
        else:
            print(f"{result['status']}: {result.get('note', '')}", flush=True)
            if result.get("log_tail"):
                print(result["log_tail"], file=sys.stderr)

    print()
    print(
        f"Machine: {info['cpu']}, {info['cores_logical']} logical cores, {info['ram_gb']:.0f} GB RAM, "
        f"TensorFlow {info.get('tensorflow') or info.get('tensorflow-cpu', '?')}, Keras {info.get('keras', '?')} "
        f"(backend {info['keras_backend']}), load average at start {info['load_avg_at_start'][0]:.2f}"
    )
    rates = ", ".join(f"{p} {_fmt(r, '{:.1f}')}" for p, r in matmul_rates.items())
    print(
        f"Reference matmul rates: {rates} GFLOP/s (best of start and end); "
        f"memory cap {cap / GB:.1f} GB; load average at end {os.getloadavg()[0]:.2f}"
    )
    print()
    print(table(results, matmul_rates))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "matmul_gflops_per_s": matmul_rates, "results": results}, handle, indent=2)
        print(f"\nJSON written to {args.json}")
    return 0 if all(r.get("status") in ("ok", "oom") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
