//! The host side through the binary: zero-shot, import, predict, info, init-random, export,
//! eval, pretrain, train (with resume) and the ViT-B/16 shapes.

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
        serde_json::from_str(&std::fs::read_to_string(f.join("expected.json")).unwrap()).unwrap();
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
        serde_json::from_str(&std::fs::read_to_string(f.join("expected.json")).unwrap()).unwrap();
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
