//! `pe-clip summarize`: the mean and spread of UAR/WAR over several `pe-clip eval --json`
//! reports, e.g. the five DFEW folds (the paper's Table 3 reports the 5-fold mean).

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `pe-clip summarize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Reports written by `pe-clip eval --json` (one per fold).
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    /// Print a JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let mut rows = Vec::new();
    for path in &args.reports {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not JSON from `pe-clip eval --json`", path.display()))?;
        let get = |k: &str| {
            v[k].as_f64()
                .filter(|x| (0.0..=1.0).contains(x))
                .with_context(|| format!("{}: no `{k}` between 0 and 1", path.display()))
        };
        rows.push((path.display().to_string(), get("uar")?, get("war")?));
    }
    let uar: Vec<f64> = rows.iter().map(|r| r.1).collect();
    let war: Vec<f64> = rows.iter().map(|r| r.2).collect();
    let ((um, us), (wm, ws)) = (mean_std(&uar), mean_std(&war));
    if args.json {
        let v = serde_json::json!({
            "reports": rows.iter().map(|r| serde_json::json!({"file": r.0, "uar": r.1, "war": r.2})).collect::<Vec<_>>(),
            "uar_mean": um, "uar_std": us, "war_mean": wm, "war_std": ws,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(4).max(4);
        println!("{:<w$}  {:>7}  {:>7}", "report", "UAR %", "WAR %");
        for (f, u, a) in &rows {
            println!("{f:<w$}  {:>7.2}  {:>7.2}", 100.0 * u, 100.0 * a);
        }
        println!(
            "{:<w$}  {:>7.2}  {:>7.2}   (± {:.2} / {:.2}, sample std over {} reports)",
            "mean",
            100.0 * um,
            100.0 * wm,
            100.0 * us,
            100.0 * ws,
            rows.len()
        );
    }
    Ok(super::EXIT_OK)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mean_and_sample_std() {
        let (m, s) = super::mean_std(&[0.5, 0.7]);
        assert!((m - 0.6).abs() < 1e-12);
        assert!((s - 0.141_421_356).abs() < 1e-6);
        assert_eq!(super::mean_std(&[0.4]), (0.4, 0.0));
    }
}
