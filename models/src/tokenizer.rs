//! The CLIP byte-level BPE tokenizer (lower-case, start/end tokens, context 77).
//!
//! It reads the tokenizer files of an HF model directory (`vocab.json` + `merges.txt`, or
//! `tokenizer.json`) or uses the BPE merges embedded in this crate, and gives the same ids as the
//! HF tokenizer: text is NFC-normalised, runs of white space become one space, it is lower-cased,
//! split with CLIP's pattern, byte-encoded and merged by rank.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// CLIP's text context length.
pub const CONTEXT_LENGTH: usize = 77;
/// The start-of-text token.
pub const SOT_TOKEN: &str = "<|startoftext|>";
/// The end-of-text token (also HF's pad and unknown token).
pub const EOT_TOKEN: &str = "<|endoftext|>";

/// BPE merges in rank order: pairs of symbols.
pub type Merges = Vec<(String, String)>;

const EMBEDDED_BPE_GZ: &[u8] = include_bytes!("../data/bpe_simple_vocab_16e6.txt.gz");
/// Number of merges CLIP uses from the BPE file (49152 - 256 - 2).
const CLIP_MERGES: usize = 48_894;
const PATTERN: &str =
    r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer.
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), u32>,
    byte_encoder: [char; 256],
    pattern: Regex,
    sot: u32,
    eot: u32,
    pad: u32,
    origin: String,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("origin", &self.origin)
            .field("vocab", &self.encoder.len())
            .field("merges", &self.ranks.len())
            .finish()
    }
}

/// GPT-2/CLIP's reversible map from bytes to printable characters.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map[b as usize] = char::from_u32(c).expect("code points below 0x200 are valid");
    }
    map
}

/// The byte characters in CLIP's vocabulary order (printable ones first, then the rest).
fn byte_vocab_order(map: &[char; 256]) -> Vec<char> {
    let mut printable: Vec<usize> = (usize::from(b'!')..=usize::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut order: Vec<char> = printable.iter().map(|&b| map[b]).collect();
    order.extend((0..256).filter(|b| !printable.contains(b)).map(|b| map[b]));
    order
}

/// The CLIP vocabulary and merges built from OpenAI's BPE file, exactly as CLIP and HF build them.
fn vocab_from_bpe_text(text: &str) -> Result<(Vec<String>, Merges)> {
    let mut lines = text.split('\n');
    lines.next(); // "#version: 0.2" header
    let merges: Merges = lines
        .take(CLIP_MERGES)
        .map(|l| {
            let mut it = l.split(' ');
            match (it.next(), it.next()) {
                (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                _ => Err(Error::Tokenizer {
                    origin: "embedded bpe".into(),
                    reason: format!("bad merge line {l:?}"),
                }),
            }
        })
        .collect::<Result<_>>()?;
    let bytes = byte_vocab_order(&bytes_to_unicode());
    let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    vocab.extend(bytes.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push(SOT_TOKEN.to_string());
    vocab.push(EOT_TOKEN.to_string());
    Ok((vocab, merges))
}

/// The embedded CLIP vocabulary (49,408 tokens) and merges, as HF `vocab.json` order and
/// `merges.txt` pairs.
pub fn embedded_vocab() -> Result<(Vec<String>, Merges)> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(EMBEDDED_BPE_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::Tokenizer {
            origin: "embedded bpe".into(),
            reason: e.to_string(),
        })?;
    vocab_from_bpe_text(&text)
}

impl ClipTokenizer {
    /// The tokenizer from the BPE merges embedded in this crate (OpenAI's CLIP vocabulary);
    /// padding uses the HF convention (the end-of-text id).
    pub fn embedded() -> Result<Self> {
        let (vocab, merges) = embedded_vocab()?;
        let encoder = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Self::build(encoder, merges, None, "embedded".into())
    }

    /// Load from an HF model directory: `vocab.json` + `merges.txt` (preferred) or
    /// `tokenizer.json`; the pad token comes from `special_tokens_map.json` or
    /// `tokenizer_config.json` when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let (encoder, merges) = if vocab_path.is_file() && merges_path.is_file() {
            let encoder: HashMap<String, u32> = read_json(&vocab_path)?;
            let text =
                std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
            let merges = text
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .map(|l| parse_merge_str(l, &merges_path))
                .collect::<Result<Vec<_>>>()?;
            (encoder, merges)
        } else {
            let path = dir.join("tokenizer.json");
            if !path.is_file() {
                return Err(Error::invalid(
                    dir,
                    "no tokenizer files (expected vocab.json and merges.txt, or tokenizer.json)",
                ));
            }
            let v: serde_json::Value = read_json(&path)?;
            let model = &v["model"];
            let encoder: HashMap<String, u32> = serde_json::from_value(model["vocab"].clone())
                .map_err(|e| Error::Json {
                    path: path.clone(),
                    err: e,
                })?;
            let merges = model["merges"]
                .as_array()
                .ok_or_else(|| Error::invalid(&path, "model.merges is not a list"))?
                .iter()
                .map(|m| match m {
                    serde_json::Value::String(s) => parse_merge_str(s, &path),
                    serde_json::Value::Array(a) if a.len() == 2 => {
                        match (a[0].as_str(), a[1].as_str()) {
                            (Some(x), Some(y)) => Ok((x.to_string(), y.to_string())),
                            _ => Err(Error::invalid(&path, format!("bad merge {m}"))),
                        }
                    }
                    _ => Err(Error::invalid(&path, format!("bad merge {m}"))),
                })
                .collect::<Result<Vec<_>>>()?;
            (encoder, merges)
        };
        let pad = pad_token_of(dir)?;
        Self::build(encoder, merges, pad, dir.display().to_string())
    }

    /// Load from `dir` if it has tokenizer files, else fall back to the embedded vocabulary.
    pub fn from_hf_dir_or_embedded(dir: &Path) -> Result<Self> {
        let has_files = (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file())
            || dir.join("tokenizer.json").is_file();
        if has_files {
            Self::from_hf_dir(dir)
        } else {
            log::warn!(
                "{}: no tokenizer files, using the embedded CLIP vocabulary",
                dir.display()
            );
            Self::embedded()
        }
    }

    fn build(
        encoder: HashMap<String, u32>,
        merges: Merges,
        pad: Option<String>,
        origin: String,
    ) -> Result<Self> {
        let fail = |reason: String| Error::Tokenizer {
            origin: origin.clone(),
            reason,
        };
        let sot = *encoder
            .get(SOT_TOKEN)
            .ok_or_else(|| fail(format!("vocabulary lacks {SOT_TOKEN}")))?;
        let eot = *encoder
            .get(EOT_TOKEN)
            .ok_or_else(|| fail(format!("vocabulary lacks {EOT_TOKEN}")))?;
        let pad = match pad {
            Some(p) => *encoder
                .get(&p)
                .ok_or_else(|| fail(format!("pad token {p:?} is not in the vocabulary")))?,
            None => eot,
        };
        let byte_encoder = bytes_to_unicode();
        for c in byte_encoder {
            if !encoder.contains_key(&format!("{c}</w>")) && !encoder.contains_key(&c.to_string()) {
                return Err(fail(format!("vocabulary lacks byte token {c:?}")));
            }
        }
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| (m, i as u32))
            .collect();
        Ok(Self {
            encoder,
            ranks,
            byte_encoder,
            pattern: Regex::new(PATTERN).expect("static pattern"),
            sot,
            eot,
            pad,
            origin,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Start-of-text id (49406 in CLIP).
    pub fn sot_id(&self) -> u32 {
        self.sot
    }

    /// End-of-text id (49407 in CLIP).
    pub fn eot_id(&self) -> u32 {
        self.eot
    }

    /// The id used to pad to [`CONTEXT_LENGTH`].
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// Where the vocabulary came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Token ids of `text` without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let clean: String = text.nfc().collect();
        let clean = clean.split_whitespace().collect::<Vec<_>>().join(" ");
        let clean = clean.to_lowercase();
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&clean) {
            let piece = m.as_str();
            if piece == SOT_TOKEN {
                ids.push(self.sot);
            } else if piece == EOT_TOKEN {
                ids.push(self.eot);
            } else {
                let encoded: String = piece
                    .bytes()
                    .map(|b| self.byte_encoder[b as usize])
                    .collect();
                ids.extend(self.bpe(&encoded));
            }
        }
        ids
    }

    /// `[SOT] + ids + [EOT]`, truncated to [`CONTEXT_LENGTH`] (the last token stays EOT) and padded
    /// with [`pad_id`](Self::pad_id); also returns the index of the EOT token.
    pub fn tokenize(&self, text: &str) -> (Vec<u32>, usize) {
        self.tokenize_padded(text, CONTEXT_LENGTH, self.pad)
    }

    /// Like [`tokenize`](Self::tokenize) with an explicit context length and pad id (OpenAI's
    /// `clip.tokenize` pads with 0).
    pub fn tokenize_padded(&self, text: &str, context: usize, pad: u32) -> (Vec<u32>, usize) {
        let context = context.max(2);
        let mut ids = Vec::with_capacity(context);
        ids.push(self.sot);
        ids.extend(self.encode(text).into_iter().take(context - 2));
        let eot_index = ids.len();
        ids.push(self.eot);
        ids.resize(context, pad);
        (ids, eot_index)
    }

    fn bpe(&self, token: &str) -> Vec<u32> {
        if let Some(hit) = self.cache.lock().ok().and_then(|c| c.get(token).cloned()) {
            return hit;
        }
        let chars: Vec<char> = token.chars().collect();
        let mut word: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, w[0].clone(), w[1].clone()))
                })
                .min_by_key(|(r, _, _)| *r);
            let Some((_, first, second)) = best else {
                break;
            };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut word[i]));
                    i += 1;
                }
            }
            word = merged;
        }
        let ids: Vec<u32> = word
            .iter()
            .map(|w| self.encoder.get(w).copied().unwrap_or(self.eot))
            .collect();
        if let Ok(mut c) = self.cache.lock() {
            c.insert(token.to_string(), ids.clone());
        }
        ids
    }
}

fn parse_merge_str(line: &str, path: &Path) -> Result<(String, String)> {
    let mut it = line.split(' ');
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
            Ok((a.to_string(), b.to_string()))
        }
        _ => Err(Error::invalid(path, format!("bad merge line {line:?}"))),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        err: e,
    })
}

/// The pad token named by an HF directory, if any.
fn pad_token_of(dir: &Path) -> Result<Option<String>> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let v: serde_json::Value = read_json(&path)?;
        match &v["pad_token"] {
            serde_json::Value::String(s) => return Ok(Some(s.clone())),
            serde_json::Value::Object(o) => {
                if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                    return Ok(Some(s.to_string()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Write HF tokenizer files (`vocab.json`, `merges.txt`, `special_tokens_map.json`,
/// `tokenizer_config.json`) for the embedded vocabulary into `dir`.
pub fn write_hf_tokenizer_files(dir: &Path) -> Result<()> {
    let (vocab, merges) = embedded_vocab()?;
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::Value::from(i)))
        .collect();
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(a);
        merges_txt.push(' ');
        merges_txt.push_str(b);
        merges_txt.push('\n');
    }
    let special = serde_json::json!({
        "bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN
    });
    let config = serde_json::json!({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH,
        "bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN
    });
    let files = [
        ("vocab.json", serde_json::to_string(&map).expect("json")),
        ("merges.txt", merges_txt),
        (
            "special_tokens_map.json",
            serde_json::to_string_pretty(&special).expect("json"),
        ),
        (
            "tokenizer_config.json",
            serde_json::to_string_pretty(&config).expect("json"),
        ),
    ];
    for (name, text) in files {
        crate::io::write_atomic(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_vocab_has_clip_size() {
        let t = ClipTokenizer::embedded().unwrap();
        assert_eq!(t.vocab_size(), 49_408);
        assert_eq!((t.sot_id(), t.eot_id()), (49_406, 49_407));
    }

    /// Ids from OpenAI's `clip.tokenize` (recorded in the shared PE-CLIP fixture, prompt 0):
    /// "X X Cheek Raiser, Lip Corner Puller.".
    #[test]
    fn matches_openai_ids_for_a_prompt() {
        let t = ClipTokenizer::embedded().unwrap();
        let (ids, eot) = t.tokenize("X X Cheek Raiser, Lip Corner Puller.");
        assert_eq!(
            &ids[..12],
            &[49406, 343, 343, 21227, 33555, 267, 8546, 5253, 755, 7722, 269, 49407]
        );
        assert_eq!(eot, 11);
        assert_eq!(ids.len(), CONTEXT_LENGTH);
        assert!(ids[12..].iter().all(|&i| i == t.pad_id()));
    }

    #[test]
    fn long_text_is_truncated_keeping_eot() {
        let t = ClipTokenizer::embedded().unwrap();
        let text = "word ".repeat(200);
        let (ids, eot) = t.tokenize(&text);
        assert_eq!(ids.len(), CONTEXT_LENGTH);
        assert_eq!(eot, CONTEXT_LENGTH - 1);
        assert_eq!(ids[CONTEXT_LENGTH - 1], t.eot_id());
    }

    #[test]
    fn whitespace_and_case_are_normalised() {
        let t = ClipTokenizer::embedded().unwrap();
        assert_eq!(t.encode("  Hello\t\nWORLD  "), t.encode("hello world"));
    }
}
