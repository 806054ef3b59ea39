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

/// The authors' PyTorch checkpoint and the logits it produced (`models/tests/fixtures`).
#[cfg(feature = "train")]
fn peclip_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tests/fixtures/peclip-reference")
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
mod host;
#[cfg(feature = "train")]
mod pipeline;

mod device;

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
