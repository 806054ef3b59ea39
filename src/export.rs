//! `pe-clip export`: a trained run to a model package (fold, ONNX step graph, optional int8 with
//! calibration, manifest).

use pe_clip_calibrate::graph::Graph;
use pe_clip_models::export::{build_step_graph, BuildOptions, FoldedModel};
use pe_clip_models::peclip::PeClip;
use pe_clip_models::PixelNorm;

use crate::error::{Error, Result};

/// Fold `model` for frames normalised with `pixel_norm`.
pub fn fold(model: &PeClip, pixel_norm: PixelNorm) -> Result<FoldedModel> {
    FoldedModel::from_model(model, pixel_norm).map_err(|e| Error::engine("folding the model", e))
}

/// The f32 step graph of a folded model.
pub fn f32_graph(folded: &FoldedModel) -> Graph {
    build_step_graph(folded, &BuildOptions::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::StepModel;
    use candle_core::{Device, Tensor};
    use pe_clip_models::clip::random::write_random_model;
    use pe_clip_models::clip::{Arch, ClipConfig, ClipModel};
    use pe_clip_models::peclip::{
        trainable_specs, PeClipConfig, ScaleAt, StreamState, Streamer, TemporalCell, Trainables,
    };
    use pe_clip_models::preprocess::to_chw;
    use pe_clip_models::rng::SeededRng;
    use pe_clip_models::tokenizer::ClipTokenizer;
    use pe_clip_models::ClassSet;

    fn model(cfg: PeClipConfig, seed: u64) -> PeClip {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), &ClipConfig::preset(Arch::Tiny), seed).unwrap();
        let clip = ClipModel::load(dir.path(), &Device::Cpu).unwrap();
        let specs = trainable_specs(&cfg, &clip.config);
        let t = Trainables::init(specs, seed, &Device::Cpu)
            .unwrap()
            .into_inference();
        t.perturb(seed + 1, 0.05, 0.5).unwrap();
        let tok = ClipTokenizer::from_hf_dir(dir.path()).unwrap();
        PeClip::new(cfg, clip, t, ClassSet::default(), &tok).unwrap()
    }

    fn frames(n: usize, s: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut rng = SeededRng::new(seed);
        (0..n)
            .map(|_| {
                (0..s * s * 3)
                    .map(|_| (rng.next_u64() & 0xff) as u8)
                    .collect()
            })
            .collect()
    }

    /// Largest |a - b| over the per-frame features of `frames` streamed through candle and
    /// through the exported f32 step model in tract.
    fn max_feature_gap(m: &PeClip, norm: PixelNorm, frames: &[Vec<u8>]) -> f32 {
        let folded = fold(m, norm).unwrap();
        let g = f32_graph(&folded);
        let bytes = crate::onnx::to_bytes(&g, &[]);
        let mut step = StepModel::from_onnx(&bytes, "test").unwrap();
        let s = step.image_size();
        let streamer = Streamer::new(m).unwrap();
        let mut cs = StreamState::new(m);
        let mut ts = step.zero_state();
        let mut worst = 0f32;
        for f in frames {
            let img = image::RgbImage::from_raw(s as u32, s as u32, f.clone()).unwrap();
            let px = Tensor::from_vec(to_chw(&img, norm), (3, s, s), &Device::Cpu).unwrap();
            let (want, next) = streamer.step(&px, cs).unwrap();
            cs = next;
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = step.step(f, &mut ts).unwrap();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                worst = worst.max((a - b).abs());
            }
        }
        worst
    }

    #[test]
    fn folded_f32_step_model_matches_candle_streaming() {
        let base = PeClipConfig::default();
        let variants = [
            ("reference", base.clone(), PixelNorm::None),
            ("clip-norm", base.clone(), PixelNorm::Clip),
            (
                "lstm-input-scale",
                PeClipConfig {
                    temporal_cell: TemporalCell::Lstm,
                    scale_at: ScaleAt::Input,
                    ..base.clone()
                },
                PixelNorm::None,
            ),
            (
                "rnn-gru-output-scale",
                PeClipConfig {
                    temporal_cell: TemporalCell::Rnn,
                    scale_at: ScaleAt::GruOutput,
                    ..base.clone()
                },
                PixelNorm::None,
            ),
            (
                "plain-tda-no-prompts",
                PeClipConfig {
                    temporal_cell: TemporalCell::None,
                    prompts: pe_clip_models::peclip::PromptConfig {
                        enabled: false,
                        ..Default::default()
                    },
                    ..base.clone()
                },
                PixelNorm::None,
            ),
            (
                "no-adapters",
                PeClipConfig {
                    adapters: pe_clip_models::peclip::AdapterSwitches {
                        vision_shared: false,
                        temporal: false,
                        text_shared: false,
                        text: false,
                    },
                    ..base.clone()
                },
                PixelNorm::None,
            ),
        ];
        for (i, (name, cfg, norm)) in variants.into_iter().enumerate() {
            let m = model(cfg, 10 + i as u64);
            let s = m.clip.config.vision_config.image_size;
            let gap = max_feature_gap(&m, norm, &frames(5, s, 3));
            assert!(gap < 1e-4, "{name}: features differ by {gap}");
        }
    }
}
