//! `pe-clip features`: run a model package on clips and print the per-frame features and the
//! clip's class logits (for checks against other runtimes and for inspection).

use std::path::PathBuf;

/// Arguments of `pe-clip features`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model package (from `pe-clip export`).
    #[arg(long, value_name = "PACKAGE_DIR")]
    package: PathBuf,
    /// Clips: frame folders or .y4m files; the package's window of frames is sampled from each
    /// as at test time.
    #[arg(required = true, value_name = "CLIP")]
    clips: Vec<PathBuf>,
    /// Threads for tract's matmuls.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    use crate::frames::clip_features;
    use crate::frames::clips::{load_clip, LabelledClip};
    use crate::frames::roi::RoiPolicy;
    use crate::package::Package;

    crate::engine::set_threads(args.threads);
    let pkg = Package::open(&args.package)?;
    let mut model = pkg.step_model()?;
    let m = &pkg.manifest;
    let names = pkg.class_names();
    let spec = pkg.preprocess_spec();
    let mut failed = 0usize;
    for clip in &args.clips {
        let result = (|| -> anyhow::Result<serde_json::Value> {
            let clip = LabelledClip {
                path: clip.clone(),
                label: None,
            };
            let frames = load_clip(&spec, &clip, m.temporal.window, RoiPolicy::Full)?
                .map_err(anyhow::Error::msg)?
                .frames;
            let features = clip_features(&mut model, &frames)?;
            let logits = m
                .head
                .logits_of_features(features.iter().map(Vec::as_slice));
            let best = pe_clip_models::prediction::argmax(&logits);
            Ok(serde_json::json!({
                "clip": clip.path.display().to_string(),
                "frames": frames.len(),
                "features": features,
                "logits": logits,
                "label": names[best],
            }))
        })();
        match result {
            Ok(v) => println!("{v}"),
            Err(e) => {
                failed += 1;
                eprintln!("error: {}: {e:#}", clip.display());
            }
        }
    }
    Ok(match failed {
        0 => super::EXIT_OK,
        n if n == args.clips.len() => super::EXIT_FAILURE,
        _ => super::EXIT_PARTIAL,
    })
}
