//! # pe-clip
//!
//! Driver facial-expression recognition with PE-CLIP. This crate holds the command-line tool
//! (one module per subcommand); the model contract and the candle models live in
//! `pe-clip-models`.
// Unsafe code only in the SIMD kernels of `engine::linear_i8`, which allow it for themselves.
#![deny(unsafe_code)]

pub mod calibration;
pub mod cli;
pub mod engine;
pub mod error;
#[cfg(feature = "train")]
pub mod export;
pub mod frames;
pub mod onnx;
pub mod package;
pub mod runtime;

/// The module graph of docs/architecture.md, checked against the source: each layer may use only
/// the layers listed for it.
#[cfg(test)]
mod architecture {
    const ALLOWED: [(&str, &[&str]); 8] = [
        ("error", &[]),
        ("package", &["error"]),
        ("onnx", &["error"]),
        ("engine", &["error", "package", "onnx"]),
        ("frames", &["error", "package", "engine"]),
        ("runtime", &["error", "package", "engine", "frames"]),
        (
            "calibration",
            &["error", "package", "engine", "frames", "onnx"],
        ),
        (
            "export",
            &[
                "error",
                "package",
                "engine",
                "frames",
                "onnx",
                "calibration",
            ],
        ),
    ];

    fn sources(path: &std::path::Path, out: &mut Vec<(std::path::PathBuf, String)>) {
        if path.is_dir() {
            for e in std::fs::read_dir(path).unwrap() {
                sources(&e.unwrap().path(), out);
            }
        } else if path.is_file() && path.extension().is_some_and(|e| e == "rs") {
            out.push((path.to_path_buf(), std::fs::read_to_string(path).unwrap()));
        }
    }

    #[test]
    fn modules_only_use_the_layers_below_them() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for (module, allowed) in ALLOWED {
            let mut files = Vec::new();
            sources(&src.join(module), &mut files);
            sources(&src.join(format!("{module}.rs")), &mut files);
            assert!(!files.is_empty(), "no source for module {module}");
            for (path, text) in files {
                for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                    for (k, _) in line.match_indices("crate::") {
                        let used: String = line[k + 7..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        assert!(
                            used == module || allowed.contains(&used.as_str()),
                            "{}: {module} uses crate::{used}: `{}`",
                            path.display(),
                            line.trim()
                        );
                    }
                }
            }
        }
    }
}
