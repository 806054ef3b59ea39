//! Golden parity against third-party code: a tiny random HF `transformers` CLIPModel, its
//! tokenizer and Pillow's bilinear resize (`fixtures/make_hf_clip_fixture.py` made the files).
//! Tolerances are those stored in `expected.json`: features and logits 1e-4 absolute, token ids
//! and resized pixels exact.

use std::path::{Path, PathBuf};

use image::RgbImage;
use pe_clip_models::preprocess::resize_bilinear;
use pe_clip_models::tokenizer::ClipTokenizer;
use pe_clip_models::video::load_sampled_clip;
use safetensors::SafeTensors;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-clip-tiny")
}

struct Expected {
    bytes: Vec<u8>,
    json: serde_json::Value,
}

impl Expected {
    fn load() -> Self {
        let dir = fixture();
        Self {
            bytes: std::fs::read(dir.join("expected.safetensors")).unwrap(),
            json: serde_json::from_str(
                &std::fs::read_to_string(dir.join("expected.json")).unwrap(),
            )
            .unwrap(),
        }
    }

    fn tensor(&self, key: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("fixture lacks {key}"));
        (t.shape().to_vec(), t.data().to_vec())
    }

    fn image(&self, key: &str) -> Vec<RgbImage> {
        let (s, b) = self.tensor(key);
        let (h, w) = (s[s.len() - 3], s[s.len() - 2]);
        b.chunks_exact(h * w * 3)
            .map(|c| RgbImage::from_raw(w as u32, h as u32, c.to_vec()).unwrap())
            .collect()
    }
}

#[test]
fn token_ids_match_hf_tokenizer() {
    let e = Expected::load();
    let texts: Vec<String> = serde_json::from_value(e.json["texts"].clone()).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(e.json["token_ids"].clone()).unwrap();
    let from_dir = ClipTokenizer::from_hf_dir(&fixture().join("model")).unwrap();
    let embedded = ClipTokenizer::embedded().unwrap();
    for (text, want) in texts.iter().zip(&want) {
        assert_eq!(&from_dir.tokenize(text).0, want, "{text:?} (hf dir)");
        assert_eq!(&embedded.tokenize(text).0, want, "{text:?} (embedded)");
    }
}

#[test]
fn resize_matches_pillow_bilinear() {
    let e = Expected::load();
    let src = e.image("resize.src").remove(0);
    for (w, h) in [(32, 32), (224, 224), (17, 45), (50, 20)] {
        let want = e.image(&format!("resize.{w}x{h}")).remove(0);
        let got = resize_bilinear(&src, w, h);
        assert_eq!(got, want, "{w}x{h}");
    }
}

#[test]
fn clip_folders_are_sampled_and_resized_as_the_reference() {
    let e = Expected::load();
    for name in ["a", "b"] {
        let clip = load_sampled_clip(&fixture().join("clips").join(name), 16).unwrap();
        let want = e.image(&format!("clip_{name}.resized_u8"));
        let got: Vec<RgbImage> = clip
            .frames
            .iter()
            .map(|f| resize_bilinear(f, 32, 32))
            .collect();
        assert_eq!(got.len(), 16);
        assert!(got == want, "clip {name}: sampled + resized frames differ");
    }
}

#[cfg(feature = "train")]
mod model {
    use super::*;
    use candle_core::Device;
    use pe_clip_models::clip::ClipModel;
    use pe_clip_models::zero_shot::ZeroShot;
    use pe_clip_models::{ClassSet, PixelNorm, PreprocessSpec};
    use std::collections::HashMap;

    const FEATURE_TOL: f32 = 1e-4;
    const LOGIT_TOL: f32 = 1e-4;

    impl Expected {
        fn f32s(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
            let (s, b) = self.tensor(key);
            let v = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (s, v)
        }
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn text_features_match_transformers() {
        let e = Expected::load();
        let model = ClipModel::load(&fixture().join("model"), &Device::Cpu).unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(e.json["token_ids"].clone()).unwrap();
        let got = model.text_features(&ids).unwrap();
        let (shape, want) = e.f32s("text_embeds");
        assert_eq!(got.dims(), shape.as_slice());
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < FEATURE_TOL, "text features differ by {d}");
    }

    #[test]
    fn image_features_and_zero_shot_logits_match_transformers() {
        let e = Expected::load();
        let dir = fixture().join("model");
        let mut checked = HashMap::new();
        for norm in [PixelNorm::Clip, PixelNorm::None] {
            let spec = PreprocessSpec {
                image_size: 32,
                pixel_norm: norm,
            };
            let zs = ZeroShot::new(&dir, ClassSet::default(), spec, 16, &Device::Cpu).unwrap();
            for name in ["a", "b"] {
                let path = fixture().join("clips").join(name);
                let clip = load_sampled_clip(&path, 16).unwrap();
                let feats = zs.model.image_features(&zs.pixels(&clip).unwrap()).unwrap();
                let (shape, want) = e.f32s(&format!("clip_{name}.{norm}.image_embeds"));
                assert_eq!(feats.dims(), shape.as_slice());
                let got = feats.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let d = max_abs_diff(&got, &want);
                assert!(
                    d < FEATURE_TOL,
                    "clip {name} {norm}: image features differ by {d}"
                );

                let result = zs.classify(&path).unwrap();
                let (_, want) = e.f32s(&format!("clip_{name}.{norm}.logits"));
                let d = max_abs_diff(&result.logits, &want);
                assert!(d < LOGIT_TOL, "clip {name} {norm}: logits differ by {d}");
                let sum: f32 = result.probs.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5);
                checked.insert(format!("{name}.{norm}"), d);
            }
        }
        assert_eq!(checked.len(), 4);
    }

    /// Checkpoints stored in f16 or bf16 load as f32 and give the same features up to the
    /// precision of the stored weights.
    #[test]
    fn half_precision_checkpoints_load() {
        use candle_core::DType;
        let src = fixture().join("model");
        let want = ClipModel::load(&src, &Device::Cpu).unwrap();
        let ids = vec![
            pe_clip_models::tokenizer::ClipTokenizer::embedded()
                .unwrap()
                .tokenize("Cheek Raiser, Lip Corner Puller.")
                .0,
        ];
        let want = want.text_features(&ids).unwrap();
        for (dtype, tol) in [(DType::F16, 2e-2), (DType::BF16, 1e-1)] {
            let dir = tempfile::tempdir().unwrap();
            for f in ["config.json", "vocab.json", "merges.txt"] {
                std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
            }
            let tensors =
                candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
                    .unwrap();
            let half: HashMap<String, candle_core::Tensor> = tensors
                .into_iter()
                .map(|(k, t)| (k, t.to_dtype(dtype).unwrap()))
                .collect();
            candle_core::safetensors::save(&half, dir.path().join("model.safetensors")).unwrap();
            let got = ClipModel::load(dir.path(), &Device::Cpu)
                .unwrap()
                .text_features(&ids)
                .unwrap();
            let a = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let d = max_abs_diff(&a, &b);
            assert!(d > 0.0 && d < tol, "{dtype:?}: features differ by {d}");
        }
    }
}
