//! The device side through the binary: the demo, run on files and faults, Ctrl-C, the link and
//! calibrate.

use super::*;

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

/// `bench step --int8-forms`: the int8 package timed once per form in one run, each timing
/// naming its form, with each later form's step time against the first's; an unknown form is
/// refused by name.
#[test]
fn bench_step_times_each_int8_form_side_by_side() {
    let o = bin()
        .args([
            "bench",
            "step",
            "--package",
            "demo",
            "--int8-forms",
            "native,fused",
        ])
        .args(["--steps", "2", "--threads", "1", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let forms: Vec<&str> = v["timings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["int8_form"].as_str().unwrap())
        .collect();
    assert_eq!(forms, ["native", "fused"], "{v}");
    let r = &v["ratios"][0];
    assert_eq!(
        (r["int8_form"].as_str(), r["over_int8_form"].as_str()),
        (Some("fused"), Some("native")),
        "{v}"
    );
    assert!(r["step_time_ratio"].as_f64().unwrap() > 0.0, "{v}");
    let o = bin()
        .args(["bench", "step", "--package", "demo", "--int8-forms", "fast"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("\"fast\""), "{}", stderr(&o));
}

/// `info --package demo --cost`: the demo's int8 and f32 products counted, and the kernels of
/// this CPU's plan carry every one of those multiply-accumulates, in each int8 form (the fused
/// one a few more).
#[test]
fn info_cost_counts_the_demo_step_and_its_kernels() {
    for form in ["native", "f32", "fused"] {
        let o = bin()
            .args(["info", "--package", "demo", "--cost", "--json"])
            .env("PE_CLIP_INT8_MATMUL", form)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["precision"], "int8");
        let macs = |list: &serde_json::Value, pick: &dyn Fn(&serde_json::Value) -> bool| -> u64 {
            list.as_array()
                .unwrap()
                .iter()
                .filter(|x| pick(x))
                .map(|x| x["macs"].as_u64().unwrap())
                .sum()
        };
        let cost = &v["cost"];
        let int8 = macs(&cost["classes"], &|c| c["class"] == "matmul i8");
        let all = macs(&cost["classes"], &|c| c["class"] != "other");
        assert!(int8 > 1_000_000 && all > int8, "{cost}");
        let kernels = macs(&cost["kernels"], &|_| true);
        if form == "fused" {
            // The fused operator computes every row of its input; tract's own plan drops the
            // rows nothing reads (the last block's queries past the class row: 1.2 %).
            assert!(kernels >= all && kernels <= all + all / 20, "{cost}");
        } else {
            assert_eq!(kernels, all, "{cost}");
        }
        assert!(v["machine"].as_str().unwrap().contains("tract ISA"), "{v}");
    }
}

/// Without the `gpu` feature `--device gpu` is refused, naming the fix; `auto` (the default)
/// runs on the CPU and prints what `--device cpu` prints.
#[cfg(not(feature = "gpu"))]
#[test]
fn device_gpu_is_refused_without_the_feature_and_auto_runs_on_the_cpu() {
    let demo = |device: &str| {
        bin()
            .args(["demo", "--frames", "120", "--device", device])
            .current_dir(tempfile::tempdir().unwrap().path())
            .output()
            .unwrap()
    };
    let gpu = demo("gpu");
    assert_eq!(gpu.status.code(), Some(1));
    assert!(stderr(&gpu).contains("--features gpu"), "{}", stderr(&gpu));
    let (auto, cpu) = (demo("auto"), demo("cpu"));
    assert!(
        auto.status.success() && cpu.status.success(),
        "{}",
        stderr(&auto)
    );
    assert_eq!(auto.stdout, cpu.stdout);
    let bad = demo("tpu");
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

/// `pe-clip run --source synth --events OUT` with `args`; each event as JSON.
fn synth_events(out: &std::path::Path, args: &[&str]) -> Vec<serde_json::Value> {
    synth_events_with(out, args, &[])
}

/// [`synth_events`] with environment variables set.
fn synth_events_with(
    out: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Vec<serde_json::Value> {
    let o = bin()
        .args(["run", "--source", "synth", "--events", s(out)])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The demo's int8 layers as pe-clip's fused operator (`PE_CLIP_INT8_MATMUL=fused`, the default
/// on x86 without VNNI) give the very logits of tract's own int8 operators, on one thread and
/// on two (the operator splits its rows over tract's threads).
#[test]
fn the_fused_int8_layers_give_the_native_events() {
    let dir = tempfile::tempdir().unwrap();
    let events = |form: &str, threads: &str| {
        let out = dir.path().join(format!("{form}{threads}.jsonl"));
        synth_events_with(
            &out,
            &["--frames", "200", "--threads", threads, "--smooth", "none"],
            &[("PE_CLIP_INT8_MATMUL", form)],
        )
        .into_iter()
        .map(|v| (v["frame"].clone(), v["logits"].clone()))
        .collect::<Vec<_>>()
    };
    let native = events("native", "1");
    assert!(native.len() > 5, "{}", native.len());
    assert_eq!(native, events("fused", "1"));
    assert_eq!(native, events("fused", "2"));
}

/// Exact windows with four chains stepped on three threads give the very events of one thread.
#[test]
fn chains_on_several_threads_give_the_same_events() {
    let dir = tempfile::tempdir().unwrap();
    let events = |threads: &str| {
        let out = dir.path().join(format!("{threads}.jsonl"));
        synth_events(
            &out,
            &["--frames", "160", "--hop", "4", "--chain-threads", threads],
        )
        .into_iter()
        .map(|v| {
            (
                v["frame"].clone(),
                v["logits"].clone(),
                v["partial"].clone(),
            )
        })
        .collect::<Vec<_>>()
    };
    let one = events("1");
    assert!(one.len() > 10, "{}", one.len());
    assert_eq!(one, events("3"));
}

/// The block pipeline (two stages on two threads) gives the one-thread run's events: the same
/// windows and frames, logits equal to rounding, in exact and continuous mode; a geometry of
/// several chains is refused with the way out.
#[test]
fn the_block_pipeline_gives_the_same_events() {
    let dir = tempfile::tempdir().unwrap();
    let events = |extra: &[&str], name: &str| {
        let out = dir.path().join(format!("{name}.jsonl"));
        synth_events(&out, &[&["--frames", "120"][..], extra].concat())
            .into_iter()
            .map(|v| {
                let logits: Vec<f64> = v["logits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                ((v["frame"].clone(), v["partial"].clone()), logits)
            })
            .collect::<Vec<_>>()
    };
    for mode in [&[][..], &["--continuous"][..]] {
        let one = events(mode, "one");
        let piped = events(&[mode, &["--block-pipeline"][..]].concat(), "piped");
        assert!(one.len() > 5, "{}", one.len());
        assert_eq!(one.len(), piped.len());
        for ((a, la), (b, lb)) in one.iter().zip(&piped) {
            assert_eq!(a, b);
            for (x, y) in la.iter().zip(lb) {
                assert!((x - y).abs() < 1e-3, "{mode:?}: {la:?} vs {lb:?}");
            }
        }
    }
    let o = bin()
        .args(["run", "--source", "synth", "--frames", "8", "--hop", "4"])
        .arg("--block-pipeline")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--chain-threads"), "{}", stderr(&o));
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
