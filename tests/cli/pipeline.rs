//! The host pipeline through the binary: init-random, export (f32 and int8, damage refused),
//! eval, pretrain, train with resume, summarize, bench train and the ViT-B/16 shapes.

use super::*;

#[test]
fn init_random_tiny_round_trips_through_zero_shot() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("tiny");
    let o = run(&["init-random", "--arch", "tiny", "--seed", "3", s(&m)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = std::fs::read(m.join("model.safetensors")).unwrap();
    let o = run(&["init-random", "--arch", "tiny", "--seed", "3", s(&m)]);
    assert!(o.status.success());
    assert_eq!(first, std::fs::read(m.join("model.safetensors")).unwrap());
    let clip = fixture().join("clips/a");
    let o = run(&["zero-shot", "--json", "--clip", s(&m), s(&clip)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["probs"].as_array().unwrap().len(), 7);
}

/// `export --int8` calibrates and checks on a dataset and writes a package that `features`
/// runs; int8 without calibration clips and a damaged package are clear errors.
#[test]
fn export_int8_package_runs_and_damage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r) = (dir.path().join("clip"), dir.path().join("run"));
    let o = run(&["init-random", "--arch", "tiny", "--run", s(&r), s(&m)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let data = dir.path().join("data");
    synth_small(&data, &["--train", "7", "--test", "7"]);
    let pkg = dir.path().join("pkg");
    let o = run(&["export", "--int8", s(&r), "-o", s(&pkg)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--calib"), "{}", stderr(&o));
    assert!(!pkg.exists());
    let o = run(&[
        "export",
        "--int8",
        s(&r),
        "-o",
        s(&pkg),
        "--calib",
        s(&data),
        "--check",
        s(&data),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["precision"], "int8");
    assert_eq!(v["quantization"]["calibration"]["clips"], 7);
    assert_eq!(v["quantization"]["fidelity"]["clips"], 7);
    let clip = data.join("Clip/clip_224x224/00001");
    let o = run(&["features", "--package", s(&pkg), s(&clip)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(f["logits"].as_array().unwrap().len(), 7);
    assert_eq!(f["features"].as_array().unwrap().len(), 16);
    // A truncated model file: refused, naming it.
    let onnx = pkg.join("model.onnx");
    let bytes = std::fs::read(&onnx).unwrap();
    std::fs::write(&onnx, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(&["features", "--package", s(&pkg), s(&clip)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("model.onnx"), "{}", stderr(&o));
}

#[test]
fn init_random_run_directory_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r) = (dir.path().join("clip"), dir.path().join("run"));
    let o = run(&["init-random", "--arch", "tiny", "--run", s(&r), s(&m)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let clip = peclip_fixture().join("clips/video1");
    let o = run(&["predict", "--checkpoint", s(&r), "--json", s(&clip)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["logits"].as_array().unwrap().len(), 7);
}

/// `eval` on a synthetic test split: JSON metrics in 0..1, a confusion matrix covering every
/// clip, and an SVG confusion matrix.
#[test]
fn eval_reports_metrics_and_writes_the_confusion_image() {
    let d = tempfile::tempdir().unwrap();
    let (data, clip, r) = (
        d.path().join("data"),
        d.path().join("clip"),
        d.path().join("run"),
    );
    synth_small(
        &data,
        &[
            "--train",
            "7",
            "--test",
            "14",
            "--min-frames",
            "4",
            "--max-frames",
            "5",
        ],
    );
    let o = run(&["init-random", "--arch", "tiny", "--run", s(&r), s(&clip)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let svg = d.path().join("cm.svg");
    let o = run(&[
        "eval",
        "--checkpoint",
        s(&r),
        "--data",
        s(&data),
        "--split",
        "test",
        "--json",
        "--plot",
        s(&svg),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["uar", "war"] {
        let x = v[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&x), "{k} {x}");
    }
    assert_eq!(v["per_class_recall"].as_array().unwrap().len(), 7);
    let total: u64 = v["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()))
        .sum();
    assert_eq!(total, 14);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.contains("<svg") && svg.contains("happiness") && svg.contains("UAR"));
}

/// `pretrain` writes an HF CLIP directory that `train --arch DIR` adapts PE-CLIP on (blocks
/// recomputed in backward), and
/// `summarize` averages `eval --json` reports.
#[test]
fn pretrain_then_train_on_it_then_summarize() {
    let d = tempfile::tempdir().unwrap();
    let (data, clip, r) = (
        d.path().join("data"),
        d.path().join("clip"),
        d.path().join("run"),
    );
    synth_small(
        &data,
        &[
            "--train",
            "7",
            "--test",
            "7",
            "--min-frames",
            "4",
            "--max-frames",
            "5",
        ],
    );
    let o = run(&[
        "-q",
        "pretrain",
        "--out",
        s(&clip),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--render-size",
        "32",
        "--warmup-steps",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(clip.join("pretrain.json")).unwrap())
            .unwrap();
    assert_eq!(history["report"]["history"].as_array().unwrap().len(), 2);
    let o = run(&[
        "-q",
        "train",
        "--data",
        s(&data),
        "--out",
        s(&r),
        "--arch",
        s(&clip),
        "--epochs",
        "1",
        "--batch-size",
        "7",
        "--recompute",
        "blocks",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        "eval",
        "--checkpoint",
        s(&r),
        "--data",
        s(&data),
        "--split",
        "test",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (d.path().join("a.json"), d.path().join("b.json"));
    std::fs::write(&a, &o.stdout).unwrap();
    // A second report with known figures: the mean is their midpoint, the sample standard
    // deviation |a - b| / sqrt 2.
    let mut other: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let uar = other["uar"].as_f64().unwrap();
    let other_uar = if uar > 0.5 { uar - 0.2 } else { uar + 0.2 };
    other["uar"] = other_uar.into();
    std::fs::write(&b, other.to_string()).unwrap();
    let o = run(&["summarize", "--json", s(&a), s(&b)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mean = v["uar_mean"].as_f64().unwrap();
    assert!((mean - (uar + other_uar) / 2.0).abs() < 1e-12, "{v}");
    let std = v["uar_std"].as_f64().unwrap();
    assert!((std - 0.2 / 2f64.sqrt()).abs() < 1e-9, "{v}");
    assert_eq!(v["war_std"].as_f64(), Some(0.0));
    // A file that is not an eval report is named.
    let o = run(&["summarize", s(&clip.join("config.json"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("config.json"), "{}", stderr(&o));
}

#[test]
fn bench_train_reports_throughput_and_memory() {
    let o = run(&["bench", "train", "--arch", "tiny", "--steps", "1", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["steps_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 1_000_000);
    // Accumulation: micro-batches reported; a batch not divisible by them refused by name.
    let o = run(&[
        "bench",
        "train",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--accumulate",
        "2",
        "--recompute",
        "blocks",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["clips_per_step"].as_u64(), v["micro_batches"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(
        (v["recompute"].as_str(), v["device"].as_str()),
        (Some("blocks"), Some("cpu"))
    );
    let o = run(&[
        "bench",
        "train",
        "--steps",
        "1",
        "--batch-size",
        "3",
        "--accumulate",
        "2",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("--accumulate 2"),
        "{}",
        stderr(&o)
    );
}

/// `bench loader` times the training data path per thread count on a DFEW-layout dataset and
/// names the clip rate a GPU needs; a batch larger than the dataset is refused by name.
#[test]
fn bench_loader_reports_clips_per_second() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    synth_small(
        &data,
        &[
            "--train",
            "4",
            "--test",
            "1",
            "--min-frames",
            "16",
            "--max-frames",
            "20",
        ],
    );
    let o = run(&[
        "bench",
        "loader",
        "--data",
        s(&data),
        "--threads",
        "1,2",
        "--batch-size",
        "2",
        "--batches",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (r, threads) in rows.iter().zip([1, 2]) {
        assert_eq!(r["threads"], threads);
        assert_eq!(r["clips"], 4);
        assert!(r["clips_per_second"].as_f64().unwrap() > 0.0);
    }
    assert!(
        v["gpu_clips_per_second"]["recompute_none"]
            .as_f64()
            .unwrap()
            > 1.0
    );
    let o = run(&["bench", "loader", "--data", s(&data), "--batch-size", "9"]);
    assert!(
        !o.status.success() && stderr(&o).contains("fewer than one batch of 9"),
        "{}",
        stderr(&o)
    );
}

/// Two epochs straight equal one epoch, a stop, and `--resume` for the second: same history,
/// same trainable tensors. Data-parallel on two CPU workers (shares of 4 and 3 clips, gradients
/// summed in host memory, a loader pool of its own) trains the same within f32 rounding (the
/// trainables within 1e-5, measured 3.3e-6; the epoch losses within 1e-5). The
/// run's best model then evaluates and predicts.
#[test]
fn train_resume_matches_an_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    synth_small(
        &data,
        &[
            "--train",
            "14",
            "--test",
            "7",
            "--min-frames",
            "4",
            "--max-frames",
            "6",
            "--seed",
            "2",
        ],
    );
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "-q",
            "train",
            "--data",
            s(&data),
            "--out",
            s(out),
            "--arch",
            "tiny",
            "--epochs",
            "2",
            "--batch-size",
            "7",
            "--warmup-epochs",
            "1",
            "--seed",
            "3",
        ];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    train(&a, &[]);
    train(&b, &["--stop-after", "1"]);
    let state = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("train/state.json")).unwrap()).unwrap()
    };
    assert_eq!(state(&b)["epochs_done"], 1);
    train(&b, &["--resume"]);
    let (sa, sb) = (state(&a), state(&b));
    assert_eq!(sa["epochs_done"], 2);
    for k in ["train_loss", "test_uar", "test_war", "lr_adapters"] {
        for e in 0..2 {
            assert_eq!(sa["history"][e][k], sb["history"][e][k], "epoch {e} {k}");
        }
    }
    let load = |p: &Path| {
        candle_core::safetensors::load(
            p.join("train/last-e2.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (ta, tb) = (load(&a), load(&b));
    assert_eq!(ta.len(), tb.len());
    for (k, t) in &ta {
        let d = pe_clip_models::clip::layers::max_abs_diff(t, &tb[k]).unwrap();
        assert_eq!(d, 0.0, "{k} differs by {d}");
    }
    let c = d.path().join("c");
    train(&c, &["--device", "cpu,cpu", "--loader-threads", "2"]);
    let sc = state(&c);
    for e in 0..2 {
        let (la, lc) = (
            sa["history"][e]["train_loss"].as_f64().unwrap(),
            sc["history"][e]["train_loss"].as_f64().unwrap(),
        );
        assert!((la - lc).abs() < 1e-5, "epoch {e}: loss {la} vs {lc}");
    }
    let tc = load(&c);
    assert_eq!(ta.len(), tc.len());
    for (k, t) in &ta {
        let d = pe_clip_models::clip::layers::max_abs_diff(t, &tc[k]).unwrap();
        assert!(d <= 1e-5, "two workers: {k} differs by {d}");
    }
    // Older epoch files are cleaned up; curves are drawn; the best model is usable.
    assert!(!a.join("train/last-e1.safetensors").exists());
    let curves = std::fs::read_to_string(a.join("train/curves.svg")).unwrap();
    assert_eq!(curves.matches("<polyline").count(), 3);
    let o = run(&["eval", "--checkpoint", s(&a), "--data", s(&data), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f32_eval: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = run(&[
        "eval",
        "--checkpoint",
        s(&a),
        "--data",
        s(&data),
        "--json",
        "--precision",
        "bf16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bf16_eval: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(bf16_eval["samples"], f32_eval["samples"]);
    assert!(bf16_eval["samples"].as_u64().unwrap() > 0);
    assert_eq!(bf16_eval["failed"], 0);
    // f16 training records its precision and loss scale; resuming in another precision is
    // refused.
    let e = d.path().join("e");
    train(&e, &["--precision", "f16", "--stop-after", "1"]);
    let se = state(&e);
    assert_eq!(se["config"]["precision"], "f16");
    assert!(se["loss_scaler"]["scale"].as_f64().unwrap() >= 1.0);
    assert!(se["history"][0]["train_loss"].as_f64().unwrap().is_finite());
    let o = run(&[
        "-q",
        "train",
        "--data",
        s(&data),
        "--out",
        s(&e),
        "--arch",
        "tiny",
        "--epochs",
        "2",
        "--batch-size",
        "7",
        "--warmup-epochs",
        "1",
        "--seed",
        "3",
        "--resume",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("differ from the run being resumed"),
        "{}",
        stderr(&o)
    );
}

#[test]
#[ignore = "full size: writes a 600 MB ViT-B/16 directory and runs PE-CLIP on 16 frames (~1-2 min); run with --ignored"]
fn vit_b16_peclip_random_weights_load_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r) = (dir.path().join("vitb16"), dir.path().join("run"));
    let o = run(&["init-random", "--arch", "vit-b16", "--run", s(&r), s(&m)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let clip = fixture().join("clips/b");
    let o = run(&["predict", "--checkpoint", s(&r), "--json", s(&clip)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let logits: Vec<f32> = serde_json::from_value(v["logits"].clone()).unwrap();
    assert_eq!(logits.len(), 7);
    assert!(logits.iter().all(|l| l.is_finite()));
}

#[test]
#[ignore = "full size: writes a 600 MB ViT-B/16 directory and runs 16 frames (~1 min in a debug build); run with --ignored"]
fn vit_b16_random_weights_load_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("vitb16");
    let o = run(&["init-random", "--arch", "vit-b16", s(&m)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let clip = fixture().join("clips/b");
    let o = run(&["zero-shot", "--json", "--clip", s(&m), s(&clip)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let logits: Vec<f32> = serde_json::from_value(v["logits"].clone()).unwrap();
    assert_eq!(logits.len(), 7);
    assert!(logits.iter().all(|l| l.is_finite()));
}
