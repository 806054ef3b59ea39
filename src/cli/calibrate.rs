//! `pe-clip calibrate`: on-device calibration of a model package with a few local clips.

use std::path::PathBuf;

use crate::calibration::{self, DriverOptions, RangeOptions};
use crate::frames::roi::RoiPolicy;

/// Arguments of `pe-clip calibrate`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Modes:
  --clips DIR                    re-estimate the int8 activation ranges from local clips (this
                                 camera, lighting, near-infrared); the old package is kept for
                                 --rollback
  --driver NAME --clips DIR      fit driver NAME's profile from their labelled clips (at least one
                                 neutral); apply it with `pe-clip run --driver NAME`
  --rollback                     put the version before the last calibration back
  --reference DATA               measure the population's neutral reference (what driver profiles
                                 are measured from) on labelled clips of many people

Clips are .y4m files or frame folders. A clip's class is the folder it is in (DIR/neutral/...)
or the start of its name (neutral-1.y4m); ranges need no classes.")]
pub struct Args {
    /// The model package to calibrate (a directory; copy the demo package first:
    /// cp -r models/demo my-package).
    #[arg(long, value_name = "DIR")]
    package: PathBuf,
    /// Local clips.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["rollback", "reference"])]
    clips: Option<PathBuf>,
    /// Fit a driver profile of this name (letters, digits, '-', '_') instead of ranges.
    #[arg(long, value_name = "NAME", requires = "clips")]
    driver: Option<String>,
    /// Restore the package's previous version (the current one becomes the previous).
    #[arg(long, conflicts_with_all = ["driver", "reference", "clips"])]
    rollback: bool,
    /// Labelled clips of many people (a folder of class folders, or a dataset pe-clip reads:
    /// its training split) to measure the neutral reference on.
    #[arg(long, value_name = "DATA")]
    reference: Option<PathBuf>,
    /// Neutral clips the reference uses at most.
    #[arg(long, value_name = "N", default_value_t = 500)]
    reference_clips: usize,
    /// Range observer: minmax, mse or percentile:P (default: the one the package was exported
    /// with).
    #[arg(long, value_name = "KIND")]
    observer: Option<String>,
    /// Observe the layers' inputs through the int8 model (as fast as running it), with f32
    /// activations (what export did; slower), or auto: int8, then f32 if the old ranges clip.
    #[arg(long, value_name = "HOW", default_value = "auto")]
    observe: String,
    /// Held-out clips: compare the old and the new ranges on them (against the package's int8
    /// weights with f32 activations).
    #[arg(long, value_name = "DIR", requires = "clips")]
    check: Option<PathBuf>,
    /// With --check: compare with this f32 package of the same model instead.
    #[arg(long, value_name = "DIR", requires = "check")]
    check_f32: Option<PathBuf>,
    /// Face region of the clips, as for `pe-clip run` (full, centre, auto, x,y,w,h).
    #[arg(long, value_name = "ROI", default_value = "full")]
    roi: String,
    #[command(flatten)]
    fit: FitArgs,
    /// Threads for tract's matmuls.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// How a driver profile is fitted (shared with `pe-clip bench driver`).
#[derive(Debug, clap::Args)]
pub(super) struct FitArgs {
    /// Driver profile: prior strength of the neutral offset, in clips.
    #[arg(long, value_name = "K", default_value_t = 1.0)]
    pub shrinkage: f32,
    /// Driver profile: L2 penalty of the class bias (fitted only with clips of two classes or
    /// more).
    #[arg(long, value_name = "L", default_value_t = 0.05)]
    pub bias_l2: f32,
    /// Driver profile: never fit a class bias.
    #[arg(long)]
    pub no_bias: bool,
}

impl FitArgs {
    /// The bias penalty, `None` with --no-bias.
    pub fn bias(&self) -> Option<f32> {
        (!self.no_bias).then_some(self.bias_l2)
    }
}

fn print(json: bool, value: &impl serde::Serialize, human: impl FnOnce()) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("reports serialise")
        );
    } else {
        human();
    }
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    crate::engine::set_threads(args.threads);
    let roi: RoiPolicy = args.roi.parse()?;
    let dir = &args.package;
    if args.rollback {
        let r = crate::package::rollback(dir)?;
        print(args.json, &r, || {
            println!(
                "{}: previous version restored (model {}); the replaced one is now previous/",
                r.package.display(),
                &r.restored_model_sha256[..12]
            )
        });
        return Ok(super::EXIT_OK);
    }
    if let Some(data) = &args.reference {
        let r = calibration::set_reference(dir, data, args.reference_clips, roi)?;
        print(args.json, &r, || {
            println!(
                "{}: neutral reference from {} clips ({} frames) of {}, |feature| {:.3}",
                r.package.display(),
                r.clips,
                r.frames,
                data.display(),
                r.feature_norm
            )
        });
        return Ok(super::EXIT_OK);
    }
    let Some(clips) = &args.clips else {
        anyhow::bail!("give --clips DIR (ranges or, with --driver, a profile), --rollback or --reference DATA");
    };
    if let Some(name) = &args.driver {
        let r = calibration::fit_driver(
            dir,
            clips,
            &DriverOptions {
                name: name.clone(),
                roi,
                shrinkage: args.fit.shrinkage,
                bias_l2: args.fit.bias(),
            },
        )?;
        print(args.json, &r, || print_driver(&r));
        return Ok(super::EXIT_OK);
    }
    let observer = args
        .observer
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: pe_clip_calibrate::Error| anyhow::anyhow!("--observer: {e}"))?;
    let r = calibration::recalibrate(
        dir,
        clips,
        &RangeOptions {
            observer,
            roi,
            check: args.check.clone(),
            check_f32: args.check_f32.clone(),
            observe: args.observe.parse()?,
        },
    )?;
    print(args.json, &r, || print_ranges(&r));
    Ok(super::EXIT_OK)
}

fn print_driver(r: &calibration::DriverReport) {
    let per: Vec<String> = r
        .fit
        .clips
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    println!(
        "driver {}: {} from {} ({} frames); |offset| {:.3} against |neutral reference| \
         {:.3}; fitting clips right {:.0} % -> {:.0} %; written to {} ({:.1} s)",
        r.name,
        r.method,
        per.join(", "),
        r.fit.frames,
        r.offset_norm,
        r.reference_norm,
        100.0 * r.fit.fit_accuracy_before,
        100.0 * r.fit.fit_accuracy_after,
        r.profile.display(),
        r.seconds
    );
    for s in &r.skipped {
        println!("skipped {s}");
    }
}

fn print_ranges(r: &calibration::RangeReport) {
    let c = &r.recalibration;
    println!(
        "{}: {} int8 layers re-calibrated ({} observer, observed through {}) from {} clips \
         ({} frames); new/old input range: median {:.2}, {:.2} to {:.2}; {:.1} s (observing \
         {:.1} s); previous version kept for --rollback",
        r.package.display(),
        c.layers,
        c.observer,
        c.passes.join(" then "),
        c.clips,
        c.frames,
        c.threshold_ratio_median,
        c.threshold_ratio_min,
        c.threshold_ratio_max,
        r.seconds.total,
        r.seconds.observe
    );
    if let Some(k) = &c.check {
        println!(
            "check on {} held-out clips, against {}: top-1 agreement {:.1} % -> {:.1} %, \
             logit cosine mean {:.5} -> {:.5}, min {:.5} -> {:.5}",
            k.before.clips,
            k.reference,
            100.0 * k.before.top1_agreement,
            100.0 * k.after.top1_agreement,
            k.before.logit_cosine_mean,
            k.after.logit_cosine_mean,
            k.before.logit_cosine_min,
            k.after.logit_cosine_min
        );
        if k.after.top1_agreement < k.before.top1_agreement
            || k.after.logit_cosine_mean < k.before.logit_cosine_mean - 1e-3
        {
            println!(
                "note: the new ranges agree less with the reference on these clips than the \
                 old ones; `pe-clip calibrate --package {} --rollback` restores the old",
                r.package.display()
            );
        }
    }
    for s in &r.skipped {
        println!("skipped {s}");
    }
}
