//! A PE-CLIP run directory: pe-clip's own trainables, independent of the backbone file.
//!
//! ```text
//! run-dir/
//!   peclip.json              versioned: PE-CLIP config, backbone reference and sizes, classes,
//!                            preprocessing
//!   trainables.safetensors   adapters and prompts, named as in the reference checkpoints
//!   backbone.safetensors     (optional) the frozen backbone, when the run carries its own
//! ```
//! Every file is written atomically; `peclip.json` is written last.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::config::PeClipConfig;
use super::model::PeClip;
use super::params::{trainable_specs, Trainables};
use crate::classes::ClassSet;
use crate::clip::openai::HeadOverrides;
use crate::clip::{ClipConfig, ClipModel, Weights};
use crate::error::{Error, Result};
use crate::preprocess::PreprocessSpec;
use crate::tokenizer::ClipTokenizer;

/// The run configuration file.
pub const RUN_CONFIG_FILE: &str = "peclip.json";
/// The trainables file.
pub const TRAINABLES_FILE: &str = "trainables.safetensors";
/// A backbone stored inside the run directory.
pub const BACKBONE_FILE: &str = "backbone.safetensors";
/// Format version of `peclip.json`.
pub const RUN_FORMAT_VERSION: u32 = 1;

/// Where the frozen backbone is and how to read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneRef {
    /// An HF CLIP directory or an OpenAI-layout safetensors file; relative paths are relative to
    /// the run directory.
    pub path: PathBuf,
    /// Head counts (OpenAI-layout files do not record them).
    pub vision_heads: usize,
    pub text_heads: usize,
}

/// `peclip.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub format_version: u32,
    pub peclip: PeClipConfig,
    pub backbone: BackboneRef,
    /// The backbone's sizes, checked when it is loaded.
    pub clip: ClipConfig,
    pub classes: ClassSet,
    pub preprocess: PreprocessSpec,
    /// The tool and version that wrote the run.
    pub created_by: String,
}

impl RunConfig {
    /// Read and check `dir/peclip.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(RUN_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json = |err| Error::Json {
            path: path.clone(),
            err,
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(json)?;
        // The version first, so that a run from another pe-clip says so plainly.
        let version = value
            .get("format_version")
            .and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(RUN_FORMAT_VERSION)) {
            return Err(Error::invalid(
                &path,
                format!(
                    "format_version {} is not supported (expected {RUN_FORMAT_VERSION})",
                    version.map_or("missing".to_string(), |v| v.to_string())
                ),
            ));
        }
        let cfg: RunConfig = serde_json::from_value(value).map_err(json)?;
        cfg.classes.validate(&path.display().to_string())?;
        cfg.peclip
            .validate(&cfg.clip)
            .map_err(|e| Error::invalid(&path, e.to_string()))?;
        Ok(cfg)
    }

    /// The backbone path, resolved against the run directory.
    pub fn backbone_path(&self, dir: &Path) -> PathBuf {
        if self.backbone.path.is_absolute() {
            self.backbone.path.clone()
        } else {
            dir.join(&self.backbone.path)
        }
    }
}

/// The `created_by` string of this build.
pub fn created_by() -> String {
    format!("pe-clip-models {}", env!("CARGO_PKG_VERSION"))
}

/// Write `trainables` and then `config` into `dir` (created if needed), each atomically.
pub fn save_run(dir: &Path, config: &RunConfig, trainables: &Trainables) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    trainables.save(&dir.join(TRAINABLES_FILE))?;
    let json = serde_json::to_string_pretty(config).expect("run config serialises");
    crate::io::write_atomic(&dir.join(RUN_CONFIG_FILE), json.as_bytes())
}

/// The frozen backbone a run refers to, checked against the sizes it recorded, and the tokenizer
/// that goes with it.
pub fn load_backbone(
    cfg: &RunConfig,
    dir: &Path,
    device: &Device,
) -> Result<(ClipModel, ClipTokenizer)> {
    let backbone = cfg.backbone_path(dir);
    let heads = HeadOverrides {
        vision: Some(cfg.backbone.vision_heads),
        text: Some(cfg.backbone.text_heads),
    };
    let clip = ClipModel::load_any(&backbone, heads, device)?;
    if clip.config.vision_config != cfg.clip.vision_config
        || clip.config.text_config != cfg.clip.text_config
        || clip.config.projection_dim != cfg.clip.projection_dim
    {
        return Err(Error::invalid(
            &backbone,
            format!(
                "this backbone's sizes differ from those recorded in {}",
                dir.join(RUN_CONFIG_FILE).display()
            ),
        ));
    }
    let tokenizer = if backbone.is_dir() {
        ClipTokenizer::from_hf_dir_or_embedded(&backbone)?
    } else {
        ClipTokenizer::embedded()?
    };
    Ok((clip, tokenizer))
}

/// Load a run directory into a model for inference (no gradients are recorded).
pub fn load_run(dir: &Path, device: &Device) -> Result<(PeClip, RunConfig)> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "run directory not found"),
        ));
    }
    let cfg = RunConfig::read(dir)?;
    let (clip, tokenizer) = load_backbone(&cfg, dir, device)?;
    let specs = trainable_specs(&cfg.peclip, &clip.config);
    let weights = Weights::open(&dir.join(TRAINABLES_FILE), device)?;
    let trainables = Trainables::from_weights(specs, &weights, str::to_string)?.into_inference();
    let model = PeClip::new(
        cfg.peclip.clone(),
        clip,
        trainables,
        cfg.classes.clone(),
        &tokenizer,
    )?;
    Ok((model, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peclip::model::tests::{tiny_model, videos};
    use crate::peclip::GruMode;

    /// Save a model's trainables with a backbone in the run directory, load it back: identical
    /// logits. A newer format version and a missing tensor are clear errors.
    #[test]
    fn run_directory_round_trip() {
        let m = tiny_model(PeClipConfig::default(), 4);
        let dir = tempfile::tempdir().unwrap();
        let backbone = dir.path().join("clip");
        crate::clip::random::write_random_model(
            &backbone,
            &crate::clip::ClipConfig::preset(crate::clip::Arch::Tiny),
            4,
        )
        .unwrap();
        let cfg = RunConfig {
            format_version: RUN_FORMAT_VERSION,
            peclip: m.config.clone(),
            backbone: BackboneRef {
                path: "clip".into(),
                vision_heads: 4,
                text_heads: 4,
            },
            clip: m.clip.config.clone(),
            classes: m.classes.clone(),
            preprocess: PreprocessSpec {
                image_size: 32,
                pixel_norm: crate::PixelNorm::None,
            },
            created_by: created_by(),
        };
        save_run(dir.path(), &cfg, &m.trainables).unwrap();
        let (back, read) = load_run(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(read, cfg);
        let v = videos(1, 3, 9);
        let loaded = back.forward(&v, GruMode::PerVideo).unwrap();
        let d =
            crate::clip::layers::max_abs_diff(&m.forward(&v, GruMode::PerVideo).unwrap(), &loaded)
                .unwrap();
        assert!(d < 1e-5, "logits differ by {d}");
        // A loaded run is for inference: no autograd graph is recorded.
        assert!(!loaded.track_op());
        let json = dir.path().join(RUN_CONFIG_FILE);
        let text = std::fs::read_to_string(&json).unwrap();
        std::fs::write(
            &json,
            text.replace("\"format_version\": 1", "\"format_version\": 2"),
        )
        .unwrap();
        let err = load_run(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("format_version 2 is not supported"), "{err}");
        std::fs::write(&json, &text).unwrap();
        let mut smaller = m.trainables.clone();
        smaller.specs.pop();
        let t = Trainables::from_weights(
            smaller.specs.clone(),
            &Weights::open(&dir.path().join(TRAINABLES_FILE), &Device::Cpu).unwrap(),
            str::to_string,
        )
        .unwrap();
        t.save(&dir.path().join(TRAINABLES_FILE)).unwrap();
        let err = load_run(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("missing tensor") && err.contains("compound_prompt_projections.7.bias"),
            "{err}"
        );
    }
}
