#!/usr/bin/env python3
"""Time a package's step model in onnxruntime as `pe-clip bench step` times it in tract: the
same test frame, the recurrent states fed back, 3 warm-up steps, then the median and minimum of
--steps steps at each thread count. With --dynamic-int8, also onnxruntime's own dynamic int8
quantization of the (f32) model (per channel, MatMul only). Outside CI: it needs
`pip install onnxruntime numpy` (and `onnx` for --dynamic-int8).

usage: scripts/ort_step_bench.py PACKAGE_DIR [--steps 10] [--threads 1,2] [--dynamic-int8]
"""
import os
import platform
import statistics
import sys
import tempfile
import time


def flag(argv, name, default):
    return argv[argv.index(name) + 1] if name in argv else default


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                keep = ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
                return ",".join(f for f in keep if f in have)
    except OSError:
        pass
    return "?"


def time_model(path, threads, steps):
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    frame_shape = inputs[0].shape
    n = int(np.prod(frame_shape))
    frame = np.array([(i * 37 + i // 7) % 251 for i in range(n)], dtype=np.uint8).reshape(frame_shape)
    states = {i.name: np.zeros(i.shape, dtype=np.float32) for i in inputs[1:]}
    outs = [o.name for o in sess.get_outputs()]
    state_outs = {name: name.replace("state_in", "state_out") for name in states}

    def step():
        feed = {inputs[0].name: frame, **states}
        got = dict(zip(outs, sess.run(outs, feed)))
        for k, v in state_outs.items():
            states[k] = got[v]

    for _ in range(3):
        step()
    ms = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms), min(ms)


def main(argv):
    if not argv or argv[0].startswith("--"):
        print(__doc__, file=sys.stderr)
        return 2
    import onnxruntime as ort

    pkg = argv[0]
    steps = int(flag(argv, "--steps", "10"))
    threads = [int(t) for t in flag(argv, "--threads", "1,2").split(",")]
    model = os.path.join(pkg, "model.onnx")
    print(f"machine: {cpu_model()}, {platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"flags {cpu_flags()}; onnxruntime {ort.__version__}")
    models = [("as packaged", model)]
    tmp = None
    if "--dynamic-int8" in argv:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = tempfile.mkdtemp()
        q = os.path.join(tmp, "dynamic-int8.onnx")
        quantize_dynamic(model, q, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])
        models.append(("onnxruntime dynamic int8", q))
    for name, path in models:
        for t in threads:
            med, low = time_model(path, t, steps)
            print(f"{pkg} ({name}): {t} thread(s): median {med:.2f} ms, min {low:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
