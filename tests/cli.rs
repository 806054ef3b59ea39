//! End-to-end tests through the `pe-clip` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pe-clip"))
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tests/fixtures/hf-clip-tiny")
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `pe-clip synth --out OUT --size 32 ARGS...`, which must succeed.
fn synth_small(out: &Path, args: &[&str]) {
    let mut all = vec!["synth", "--out", s(out), "--size", "32"];
    all.extend_from_slice(args);
    let o = run(&all);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn help_lists_the_subcommands() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for sub in [
        "zero-shot",
        "init-random",
        "info",
        "import-reference",
        "predict",
    ] {
        assert!(out.contains(sub), "{out}");
    }
    assert!(out.contains("Exit codes"));
    assert_eq!(run(&["no-such-command"]).status.code(), Some(2));
}

/// The shipped demo package (`models/demo`, made by `scripts/make-demo-package.sh`) verifies its
/// checksums, is int8, and recognises fresh synthetic clips of identities it never saw far above
/// chance (1 in 7).
#[test]
fn shipped_demo_package_verifies_and_recognises_synthetic_clips() {
    let pkg = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pkg.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["precision"], "int8");
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let o = run(&[
        "synth",
        "--out",
        s(&data),
        "--size",
        "64",
        "--train",
        "1",
        "--test",
        "14",
        "--seed",
        "99",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let classes = pe_clip_models::ClassSet::default();
    let test =
        pe_clip_models::dataset::load(&data, pe_clip_models::dataset::Split::Test, 1, &classes)
            .unwrap();
    let mut args = vec!["features".to_string(), "--package".into(), s(&pkg).into()];
    args.extend(test.samples.iter().map(|x| s(&x.clip).to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let names = classes.names();
    let correct = String::from_utf8_lossy(&o.stdout)
        .lines()
        .zip(&test.samples)
        .filter(|(line, sample)| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["label"] == names[sample.label]
        })
        .count();
    assert!(correct >= 10, "{correct} of 14 held-out clips recognised");
}

/// `pe-clip synth` writes a dataset the DFEW reader accepts, deterministically for a seed.
#[test]
fn synth_writes_a_readable_deterministic_dataset() {
    let d = tempfile::tempdir().unwrap();
    let write = |name: &str| {
        let out = d.path().join(name);
        synth_small(
            &out,
            &[
                "--train",
                "7",
                "--test",
                "7",
                "--min-frames",
                "3",
                "--max-frames",
                "4",
                "--seed",
                "5",
            ],
        );
        out
    };
    let (a, b) = (write("a"), write("b"));
    let classes = pe_clip_models::ClassSet::default();
    let test = pe_clip_models::dataset::load(&a, pe_clip_models::dataset::Split::Test, 1, &classes)
        .unwrap();
    assert_eq!(test.samples.len(), 7);
    let frame =
        |root: &Path| std::fs::read(root.join("Clip/clip_224x224/00009/00002.jpg")).unwrap();
    assert_eq!(frame(&a), frame(&b));
    let o = run(&[
        "synth",
        "--out",
        s(&d.path().join("c")),
        "--min-frames",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1));
}

#[cfg(feature = "train")]
mod train {
    use super::*;

    /// A copy of the fixture model that a test may damage.
    fn model_copy() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(fixture().join("model")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
        dir
    }

    #[test]
    fn zero_shot_json_matches_the_transformers_fixture() {
        let f = fixture();
        let (a, b) = (f.join("clips/a"), f.join("clips/b"));
        let o = run(&[
            "zero-shot",
            "--json",
            "--clip",
            s(&f.join("model")),
            s(&a),
            s(&b),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(f.join("expected.json")).unwrap())
                .unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for (line, (name, path)) in lines.iter().zip([("a", &a), ("b", &b)]) {
            assert_eq!(line["clip"], s(path));
            let got: Vec<f32> = serde_json::from_value(line["logits"].clone()).unwrap();
            let want: Vec<f32> =
                serde_json::from_value(expected["logits"][format!("{name}.clip")].clone()).unwrap();
            let d = got
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 1e-4, "clip {name}: logits differ by {d}");
            let probs: Vec<f32> = serde_json::from_value(line["probs"].clone()).unwrap();
            assert_eq!(probs.len(), 7);
            let best = (0..7)
                .max_by(|&i, &j| probs[i].total_cmp(&probs[j]))
                .unwrap();
            let names = [
                "happiness",
                "sadness",
                "neutral",
                "anger",
                "surprise",
                "disgust",
                "fear",
            ];
            assert_eq!(line["label"], names[best]);
        }
    }

    #[test]
    fn zero_shot_table_on_a_y4m_clip() {
        let f = fixture();
        let dir = tempfile::tempdir().unwrap();
        let frames: Vec<image::RgbImage> = (0..12)
            .map(|i| {
                image::open(f.join(format!("clips/b/frame_{:03}.png", i % 10)))
                    .unwrap()
                    .into_rgb8()
            })
            .collect();
        let y4m = dir.path().join("clip.y4m");
        pe_clip_models::video::write_y4m_444(&y4m, &frames, 25).unwrap();
        let o = run(&["zero-shot", "--clip", s(&f.join("model")), s(&y4m)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.lines().next().unwrap().starts_with("clip"));
        assert!(out.contains("clip.y4m"), "{out}");
    }

    fn assert_fails_naming(args: &[&str], needles: &[&str]) {
        let o = run(args);
        assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(&o));
        let err = stderr(&o);
        for n in needles {
            assert!(err.contains(n), "{n:?} not in {err:?}");
        }
        assert!(!err.contains("panicked"), "{err}");
    }

    fn info_total(args: &[&str]) -> u64 {
        let mut all = vec!["info", "--json"];
        all.extend_from_slice(args);
        let o = run(&all);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["trainable_total"].as_u64().unwrap()
    }

    #[test]
    fn info_reports_the_reference_counts() {
        assert_eq!(info_total(&["--arch", "vit-b16"]), 9_399_564);
        assert_eq!(info_total(&["--reduction", "16"]), 6_340_620);
        let ta_only = [
            "--no-prompts",
            "--no-vision-shared",
            "--no-temporal",
            "--no-text-shared",
        ];
        assert_eq!(info_total(&ta_only), 793_344);
        assert_eq!(info_total(&["--temporal-cell", "rnn"]), 8_952_588);
        let o = run(&["info"]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("9,399,564") && out.contains("5.91 %"), "{out}");
        let o = run(&["info", "--prompt-depth", "40"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("prompt depth 40"), "{}", stderr(&o));
    }

    fn peclip_fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tests/fixtures/peclip-reference")
    }

    /// The authors' checkpoint imported and run on the PNG frame folders reproduces the logits
    /// their PyTorch code produced (1e-4).
    #[test]
    fn import_reference_then_predict_matches_the_authors_logits() {
        let f = peclip_fixture();
        let run_dir = tempfile::tempdir().unwrap();
        let out = run_dir.path().join("run");
        let o = run(&[
            "import-reference",
            s(&f.join("weights.safetensors")),
            "-o",
            s(&out),
            "--vision-heads",
            "4",
            "--text-heads",
            "4",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("60396 trainable values"));
        let clips: Vec<PathBuf> = (0..3).map(|i| f.join(format!("clips/video{i}"))).collect();
        let mut args = vec!["predict", "--checkpoint", s(&out), "--json"];
        args.extend(clips.iter().map(|c| s(c)));
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(f.join("expected.json")).unwrap())
                .unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        for (i, line) in lines.iter().enumerate() {
            let got: Vec<f32> = serde_json::from_value(line["logits"].clone()).unwrap();
            let want: Vec<f32> = serde_json::from_value(expected["logits"][i].clone()).unwrap();
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 1e-4, "video {i}: logits differ by {d}");
        }
        // Without the head counts the 32-wide text tower cannot be split: a clear error.
        let o = run(&[
            "import-reference",
            s(&f.join("weights.safetensors")),
            "-o",
            s(&run_dir.path().join("bad")),
        ]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("--text-heads") || stderr(&o).contains("head count"));
    }

    #[test]
    fn predict_on_a_missing_or_broken_run_is_a_clean_error() {
        let clip = peclip_fixture().join("clips/video0");
        assert_fails_naming(
            &["predict", "--checkpoint", "/no/such/run", s(&clip)],
            &["/no/such/run", "not found"],
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("peclip.json"), r#"{"format_version": 99}"#).unwrap();
        assert_fails_naming(
            &["predict", "--checkpoint", s(dir.path()), s(&clip)],
            &["peclip.json"],
        );
    }

    #[test]
    fn missing_model_directory_is_a_clean_error() {
        let clip = fixture().join("clips/a");
        assert_fails_naming(
            &["zero-shot", "--clip", "/no/such/model", s(&clip)],
            &["/no/such/model", "not found"],
        );
    }

    #[test]
    fn truncated_or_foreign_weights_are_clean_errors() {
        let clip = fixture().join("clips/a");
        let m = model_copy();
        let w = m.path().join("model.safetensors");
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
        assert_fails_naming(
            &["zero-shot", "--clip", s(m.path()), s(&clip)],
            &["model.safetensors", "truncated"],
        );
        std::fs::write(&w, b"PK\x03\x04 this is a zip, not safetensors").unwrap();
        assert_fails_naming(
            &["zero-shot", "--clip", s(m.path()), s(&clip)],
            &["model.safetensors", "not a valid safetensors file"],
        );
    }

    #[test]
    fn config_that_disagrees_with_tensors_names_key_and_shapes() {
        let clip = fixture().join("clips/a");
        let m = model_copy();
        let cfg_path = m.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["vision_config"]["intermediate_size"] = 96.into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        assert_fails_naming(
            &["zero-shot", "--clip", s(m.path()), s(&clip)],
            &[
                "vision_model.encoder.layers.0.mlp.fc1.weight",
                "[128, 64]",
                "[96, 64]",
            ],
        );
    }

    #[test]
    fn missing_tensor_is_named() {
        let clip = fixture().join("clips/a");
        let m = model_copy();
        let cfg_path = m.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["text_config"]["num_hidden_layers"] = 4.into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        assert_fails_naming(
            &["zero-shot", "--clip", s(m.path()), s(&clip)],
            &["missing tensor", "text_model.encoder.layers.3."],
        );
    }

    #[test]
    fn folder_without_readable_frames_fails_and_names_it() {
        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join("000.jpg"), b"not a jpeg").unwrap();
        std::fs::write(bad.path().join("001.png"), b"").unwrap();
        let model = fixture().join("model");
        assert_fails_naming(
            &["zero-shot", "--clip", s(&model), s(bad.path())],
            &[s(bad.path()), "no readable frame", "000.jpg", "001.png"],
        );
        // With a good clip beside it, the good one is still reported (exit 3).
        let good = fixture().join("clips/a");
        let o = run(&[
            "zero-shot",
            "--json",
            "--clip",
            s(&model),
            s(bad.path()),
            s(&good),
        ]);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    }

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

    /// `pretrain` writes an HF CLIP directory that `train --arch DIR` adapts PE-CLIP on, and
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
    }

    /// Two epochs straight equal one epoch, a stop, and `--resume` for the second: same history,
    /// same trainable tensors. The run's best model then evaluates and predicts.
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
            serde_json::from_str(&std::fs::read_to_string(p.join("train/state.json")).unwrap())
                .unwrap()
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
        // Older epoch files are cleaned up; curves are drawn; the best model is usable.
        assert!(!a.join("train/last-e1.safetensors").exists());
        let curves = std::fs::read_to_string(a.join("train/curves.svg")).unwrap();
        assert_eq!(curves.matches("<polyline").count(), 3);
        let o = run(&["eval", "--checkpoint", s(&a), "--data", s(&data), "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
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
}

#[cfg(not(feature = "train"))]
#[test]
fn zero_shot_without_train_says_so() {
    let f = fixture();
    let o = run(&[
        "zero-shot",
        "--clip",
        s(&f.join("model")),
        s(&f.join("clips/a")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("built without `train`"));
}

/// `pe-clip run` with no source and no camera is the demo: the built-in package on a generated
/// stream; two runs print the same events and timeline, and the plot is written.
#[test]
fn run_without_a_source_is_the_deterministic_demo() {
    let dir = tempfile::tempdir().unwrap();
    let demo = |name: &str| {
        let plot = dir.path().join(name);
        let o = bin()
            .args(["run", "--frames", "400", "--plot", s(&plot)])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let svg = std::fs::read_to_string(&plot).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("neutral"));
        (String::from_utf8_lossy(&o.stdout).into_owned(), stderr(&o))
    };
    let (a, err) = demo("a.svg");
    let (b, _) = demo("b.svg");
    assert_eq!(a.replace("a.svg", "b.svg"), b);
    assert!(a.contains("pe-clip demo") && a.contains("timeline") && a.contains("truth"));
    assert!(a.contains("[partial window]"), "{a}");
    assert!(err.contains("400 frames") && err.contains("p95"), "{err}");
}

/// Events on a .y4m file: one JSON object per line with the documented fields; exact windows
/// every hop after the partial ones.
#[test]
fn run_on_a_y4m_file_writes_json_line_events() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.y4m");
    let frames: Vec<image::RgbImage> = (0..40u8)
        .map(|i| image::RgbImage::from_fn(80, 60, |x, y| image::Rgb([x as u8, y as u8, i * 6])))
        .collect();
    pe_clip_models::video::write_y4m_444(&clip, &frames, 25).unwrap();
    let events = dir.path().join("events.jsonl");
    let o = run(&[
        "run",
        "--source",
        s(&clip),
        "--stride",
        "1",
        "--hop",
        "8",
        "--roi",
        "centre",
        "--events",
        s(&events),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for e in &lines {
        for key in [
            "frame",
            "t_ms",
            "logits",
            "probs",
            "label",
            "confidence",
            "partial",
            "latency_ms",
        ] {
            assert!(e.get(key).is_some(), "{key} missing in {e}");
        }
        assert_eq!(e["probs"].as_array().unwrap().len(), 7);
    }
    let full: Vec<u64> = lines
        .iter()
        .filter(|e| e["partial"] == false)
        .map(|e| e["frame"].as_u64().unwrap())
        .collect();
    assert_eq!(full, [15, 23, 31, 39]);
    assert_eq!(lines[0]["t_ms"], 120.0); // frame 3 at 25 fps, partial after 4 frames
}

/// Faults: a missing or damaged package and a bad source are clean errors naming the path.
#[test]
fn run_faults_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["run", "--package", "/no/such/package", "--source", "synth"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/no/such/package"), "{}", stderr(&o));
    let pkg = dir.path().join("pkg");
    std::fs::create_dir(&pkg).unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    for f in ["manifest.json", "model.onnx"] {
        std::fs::copy(demo.join(f), pkg.join(f)).unwrap();
    }
    // A manifest that does not describe its model (here: another input size).
    let manifest = std::fs::read_to_string(pkg.join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    m["preprocess"]["image_size"] = 32.into();
    std::fs::write(pkg.join("manifest.json"), m.to_string()).unwrap();
    let o = run(&["run", "--package", s(&pkg), "--source", "synth"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("model.onnx")
            && err.contains("does not match the manifest: input 64 px, manifest 32 px"),
        "{err}"
    );
    std::fs::write(pkg.join("manifest.json"), manifest).unwrap();
    let mut model = std::fs::read(pkg.join("model.onnx")).unwrap();
    let mid = model.len() / 2;
    model[mid] ^= 0x40;
    std::fs::write(pkg.join("model.onnx"), model).unwrap();
    let o = run(&["run", "--package", s(&pkg), "--source", "synth"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("checksum mismatch"), "{}", stderr(&o));
    let o = run(&["run", "--source", "/no/such/clip.y4m"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/no/such/clip.y4m"), "{}", stderr(&o));
    let o = run(&[
        "run",
        "--source",
        "synth",
        "--plot",
        s(&dir.path().join("x.png")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(".svg"), "{}", stderr(&o));
    let o = run(&["run", "--source", "synth", "--gpio", "/dev/no-gpiochip:3"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/dev/no-gpiochip:3"), "{}", stderr(&o));
}

/// Ctrl-C (SIGINT) flushes the events and statistics and exits 0.
#[test]
fn sigint_flushes_and_exits_zero() {
    use std::io::{BufRead, BufReader};
    let mut child = bin()
        .args([
            "run",
            "--source",
            "synth",
            "--realtime",
            "--frames",
            "100000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let e: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert!(e.get("label").is_some());
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted:"), "{}", stderr(&o));
}

/// A serial link that is not there is retried in the background and never stops the loop.
#[test]
fn a_missing_link_port_is_not_fatal() {
    let o = run(&[
        "run",
        "--source",
        "synth",
        "--frames",
        "200",
        "--link",
        "/dev/ttyNOPE",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("/dev/ttyNOPE") && err.contains("0 connections"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).lines().count() > 3);
}

/// `pe-clip calibrate` on a copy of the demo package: ranges from near-infrared clips of one
/// person, rollback, a driver profile from one neutral clip that `pe-clip run --driver` applies,
/// and clean errors for bad input (the package untouched).
#[test]
fn calibrate_ranges_and_a_driver_profile_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    std::fs::create_dir(&pkg).unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    for f in ["manifest.json", "model.onnx"] {
        std::fs::copy(demo.join(f), pkg.join(f)).unwrap();
    }
    let original = std::fs::read(pkg.join("model.onnx")).unwrap();
    let person = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "synth",
            "--person",
            "--out",
            s(out),
            "--size",
            "64",
            "--min-frames",
            "16",
            "--max-frames",
            "16",
            "--clips-per-class",
            "1",
        ];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let ir = dir.path().join("ir");
    person(&ir, &["--ir", "--seed", "5"]);
    let o = run(&[
        "calibrate",
        "--package",
        s(&pkg),
        "--clips",
        s(&ir),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["recalibration"]["layers"], 48);
    assert_eq!(r["recalibration"]["frames"], 7 * 16);
    assert_ne!(std::fs::read(pkg.join("model.onnx")).unwrap(), original);
    let o = run(&["calibrate", "--package", s(&pkg), "--rollback"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(pkg.join("model.onnx")).unwrap(), original);

    let driver = dir.path().join("driver");
    person(
        &driver,
        &["--shift", "droopy", "--classes", "neutral", "--seed", "6"],
    );
    let o = run(&[
        "calibrate",
        "--package",
        s(&pkg),
        "--driver",
        "dana",
        "--clips",
        s(&driver),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("driver dana: neutral-offset"), "{out}");
    assert!(pkg.join("drivers/dana.json").is_file());
    let clip = driver.join("neutral/neutral-01.y4m");
    let events = |profile: Option<&str>| {
        let ev = dir.path().join("events.jsonl");
        let mut args = vec![
            "run",
            "--package",
            s(&pkg),
            "--source",
            s(&clip),
            "--stride",
            "1",
            "--smooth",
            "none",
            "--partial-every",
            "0",
            "--events",
            s(&ev),
        ];
        if let Some(d) = profile {
            args.extend_from_slice(&["--driver", d]);
        }
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = std::fs::read_to_string(&ev).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let neutral = last["probs"][2].as_f64().unwrap();
        (last["label"].as_str().unwrap().to_string(), neutral)
    };
    // The profile (half the measured offset from one clip) moves the driver's neutral clip
    // towards neutral.
    let (label, plain) = events(None);
    assert_ne!(label, "neutral");
    let (_, with) = events(Some("dana"));
    assert!(
        with > 100.0 * plain,
        "neutral probability {plain} -> {with}"
    );
    // The whole offset (no shrinkage) makes it neutral.
    let o = run(&[
        "calibrate",
        "--package",
        s(&pkg),
        "--driver",
        "dana",
        "--clips",
        s(&driver),
        "--shrinkage",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(events(Some("dana")).0, "neutral");
    // Bad input: unknown profile, the built-in package, too few clips; nothing changes.
    let manifest = std::fs::read(pkg.join("manifest.json")).unwrap();
    let o = run(&[
        "run",
        "--package",
        s(&pkg),
        "--driver",
        "nobody",
        "--source",
        "synth",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("drivers/nobody.json"), "{}", stderr(&o));
    let o = run(&["run", "--driver", "dana", "--source", "synth"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("built-in demo package"),
        "{}",
        stderr(&o)
    );
    let o = run(&["calibrate", "--package", s(&pkg), "--clips", s(&driver)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("at least 3"), "{}", stderr(&o));
    assert_eq!(std::fs::read(pkg.join("model.onnx")).unwrap(), original);
    assert_eq!(std::fs::read(pkg.join("manifest.json")).unwrap(), manifest);
}
