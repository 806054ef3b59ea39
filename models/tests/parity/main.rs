//! Golden parity of `pe-clip-models` against third-party code, in one test binary:
//! - `hf_clip`: HF `transformers` CLIP, its tokenizer and Pillow's resize;
//! - `peclip_reference`: the PE-CLIP authors' own PyTorch model.

mod hf_clip;
#[cfg(feature = "train")]
mod peclip_reference;
