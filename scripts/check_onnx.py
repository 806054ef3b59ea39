#!/usr/bin/env python3
"""Check a pe-clip model package with third-party ONNX tooling (run outside CI).

1. `onnx.checker.check_model(full_check=True)` on model.onnx (structure, opset, shape inference).
2. onnxruntime runs the same frames with the same carried state as tract (through
   `pe-clip features`), and the per-frame features must agree within --tol.
3. Per-frame step latency in onnxruntime at 1 and 2 threads, for comparison with
   `pe-clip bench step --package`.

    python3 -m venv /tmp/ortenv && /tmp/ortenv/bin/pip install onnx onnxruntime numpy pillow
    /tmp/ortenv/bin/python scripts/check_onnx.py PACKAGE_DIR [--pe-clip target/release/pe-clip]

Exit status 0 when both checks pass, 1 otherwise.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image


def frames_for(size, count, seed):
    """Smooth synthetic frames (random low-frequency images plus noise), uint8 [S, S, 3]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
        img = np.array(Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.BILINEAR))
        img = np.clip(img.astype(np.float32) + rng.normal(0, 12, img.shape), 0, 255)
        out.append(img.astype(np.uint8))
    return out


def ort_session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_ort(sess, manifest, frames):
    state = {s["input"]: np.zeros((s["rows"], s["width"]), np.float32) for s in manifest["state"]}
    outputs = ["feature"] + [s["output"] for s in manifest["state"]]
    feats = []
    for f in frames:
        res = sess.run(outputs, {"frame": f[None], **state})
        feats.append(res[0][0])
        for s, v in zip(manifest["state"], res[1:]):
            state[s["input"]] = v
    return np.stack(feats)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("--pe-clip", default="target/release/pe-clip")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=None,
                    help="largest |tract - onnxruntime| feature difference (default 1e-4 for f32, "
                         "2e-2 of the feature range for int8, where the two runtimes may round a "
                         "requantized value differently)")
    ap.add_argument("--timing-steps", type=int, default=20)
    args = ap.parse_args()

    manifest = json.load(open(os.path.join(args.package, "manifest.json")))
    path = os.path.join(args.package, manifest["model"])
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    print(f"onnx.checker (full): ok; opset {model.opset_import[0].version}, "
          f"{len(model.graph.node)} nodes")

    size = manifest["preprocess"]["image_size"]
    frames = frames_for(size, args.frames, args.seed)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        clip = os.path.join(tmp, "clip")
        os.makedirs(clip)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(os.path.join(clip, f"{i:05d}.png"))
        out = subprocess.run([args.pe_clip, "features", "--package", args.package, clip],
                             check=True, capture_output=True, text=True).stdout
        tract = np.array(json.loads(out.strip().splitlines()[0])["features"], np.float32)

    sess = ort_session(path, 1)
    ref = run_ort(sess, manifest, frames)
    gap = float(np.abs(ref - tract).max())
    span = float(np.abs(ref).max())
    tol = args.tol
    if tol is None:
        tol = 1e-4 if manifest["precision"] == "f32" else 2e-2 * span
    cos = float(np.mean(np.sum(ref * tract, 1) /
                        (np.linalg.norm(ref, axis=1) * np.linalg.norm(tract, axis=1))))
    verdict = "ok" if gap <= tol else "FAIL"
    ok &= gap <= tol
    print(f"onnxruntime vs tract over {len(frames)} frames ({manifest['precision']}): "
          f"max |diff| {gap:.3e} (features up to {span:.3g}), mean cosine {cos:.6f}, "
          f"tolerance {tol:.3e}: {verdict}")

    for threads in (1, 2):
        sess = ort_session(path, threads)
        state = {s["input"]: np.zeros((s["rows"], s["width"]), np.float32)
                 for s in manifest["state"]}
        feed = {"frame": frames[0][None], **state}
        for _ in range(3):
            sess.run(["feature"], feed)
        ms = []
        for _ in range(args.timing_steps):
            t = time.perf_counter()
            sess.run(["feature"], feed)
            ms.append((time.perf_counter() - t) * 1e3)
        ms.sort()
        print(f"onnxruntime {ort.__version__} {threads} thread(s): median "
              f"{statistics.median(ms):.2f} ms, min {ms[0]:.2f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
