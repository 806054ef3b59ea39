//! Memory-mapped safetensors weights with checked shapes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};

use crate::error::{Error, Result};

/// A safetensors file mapped into memory. Tensors are materialised on request, one copy from
/// the mapping into the tensor's storage.
pub struct Weights {
    path: PathBuf,
    source: Source,
    device: Device,
}

enum Source {
    /// A mapped safetensors file.
    Mapped {
        mmap: memmap2::Mmap,
        header_len: usize,
        infos: HashMap<String, TensorInfo>,
    },
    /// Tensors already in memory (e.g. the variables of a model being trained): `get` hands out
    /// the tensors themselves, so a model built from them shares their storage and gradients.
    Memory(HashMap<String, Tensor>),
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("path", &self.path)
            .field("tensors", &self.keys().count())
            .finish()
    }
}

impl Weights {
    /// Map `path` and validate its header (a truncated or foreign file is an error).
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and the mapping lives as long as `Weights`;
        // pe-clip never writes to weight files in place (writes go through temp file + rename),
        // so the mapped bytes do not change under us unless another program truncates the file.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                reason: describe_error(&e, &mmap),
            })?;
        let infos = metadata_infos(&metadata);
        Ok(Self {
            path: path.to_path_buf(),
            source: Source::Mapped {
                mmap,
                header_len,
                infos,
            },
            device: device.clone(),
        })
    }

    /// Weights held in memory; `label` names them in errors (e.g. `<pretraining variables>`).
    /// Every tensor must be f32 on `device`.
    pub fn from_tensors(label: &str, tensors: HashMap<String, Tensor>, device: &Device) -> Self {
        Self {
            path: PathBuf::from(label),
            source: Source::Memory(tensors),
            device: device.clone(),
        }
    }

    /// The file these weights come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.shape_of(key).is_some()
    }

    /// All tensor names.
    pub fn keys(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.source {
            Source::Mapped { infos, .. } => Box::new(infos.keys().map(String::as_str)),
            Source::Memory(t) => Box::new(t.keys().map(String::as_str)),
        }
    }

    /// The stored shape of `key`.
    pub fn shape_of(&self, key: &str) -> Option<&[usize]> {
        match &self.source {
            Source::Mapped { infos, .. } => infos.get(key).map(|i| i.shape.as_slice()),
            Source::Memory(t) => t.get(key).map(|t| t.dims()),
        }
    }

    /// Load `key` (stored as f32, f16 or bf16) as f32, checking that its shape is `expected`.
    pub fn get(&self, key: &str, expected: &[usize]) -> Result<Tensor> {
        let shape = self.shape_of(key).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            key: key.to_string(),
        })?;
        if shape != expected {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                key: key.to_string(),
                expected: expected.to_vec(),
                found: shape.to_vec(),
            });
        }
        let (mmap, header_len, info) = match &self.source {
            Source::Memory(t) => return Ok(t[key].clone()),
            Source::Mapped {
                mmap,
                header_len,
                infos,
            } => (mmap, *header_len, &infos[key]),
        };
        let start = 8 + header_len;
        let bytes = &mmap[start + info.data_offsets.0..start + info.data_offsets.1];
        // One copy from the mapping into the tensor's own buffer, whatever the stored dtype and
        // alignment.
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::UnsupportedDtype {
                    path: self.path.clone(),
                    key: key.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(Tensor::from_vec(data, info.shape.as_slice(), &self.device)?)
    }
}

fn metadata_infos(metadata: &Metadata) -> HashMap<String, TensorInfo> {
    metadata
        .tensors()
        .into_iter()
        .map(|(k, info)| (k, info.clone()))
        .collect()
}

fn describe_error(e: &safetensors::SafeTensorError, bytes: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file too short ({} bytes)", bytes.len()),
        E::MetadataIncompleteBuffer => format!(
            "the header describes more (or less) data than the file's {} bytes: truncated or corrupt",
            bytes.len()
        ),
        E::InvalidHeaderLength | E::HeaderTooLarge => {
            "the header length is impossible: truncated, or not safetensors".to_string()
        }
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) => {
            "the header is not safetensors JSON".to_string()
        }
        other => other.to_string(),
    }
}

/// A view of [`Weights`] under a key prefix, e.g. `vision_model.encoder.layers.3`.
#[derive(Clone)]
pub struct Vb<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> Vb<'a> {
    /// The root view.
    pub fn root(weights: &'a Weights) -> Vb<'a> {
        Vb {
            weights,
            prefix: String::new(),
        }
    }

    /// The full key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A view one level deeper.
    pub fn pp(&self, name: impl std::fmt::Display) -> Vb<'a> {
        Vb {
            weights: self.weights,
            prefix: self.key(&name.to_string()),
        }
    }

    /// Load `name` with the expected shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(&self.key(name), shape)
    }
}
