//! `index.json`: what a dataset directory holds, and the checks that it is whole.

use super::DataError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Version of the dataset directory layout; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// The index inside a dataset directory.
pub const INDEX_FILE: &str = "index.json";
/// The token ids inside a dataset directory: little-endian `u32`, documents joined by the EOS id.
pub const TOKENS_FILE: &str = "tokens.bin";
/// The Hugging Face tokenizer inside a dataset directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Largest `index.json` read (it holds one offset per document).
pub(crate) const MAX_INDEX_BYTES: u64 = 1 << 30;

/// The contents of `index.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInfo {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Embedding rows a model needs: one more than the largest id the tokenizer can produce.
    pub vocab_size: u32,
    /// The end-of-text id placed between documents.
    pub eos_id: u32,
    /// Token ids in `tokens.bin`.
    pub n_tokens: u64,
    /// Documents (text files, JSONL lines) in `tokens.bin`.
    pub n_documents: u64,
    /// Lowercase hex SHA-256 of `tokens.bin`.
    pub tokens_sha256: String,
    /// Lowercase hex SHA-256 of `tokenizer.json`.
    pub tokenizer_sha256: String,
    /// The tokenizer file given to `prepare`, or `None` when it was trained from this text.
    pub tokenizer_from: Option<String>,
    /// The input byte budget `prepare` ran with.
    pub max_bytes: u64,
    /// Whether the budget cut the input short (some text was left out).
    pub budget_reached: bool,
    /// Files read, in order.
    pub sources: Vec<SourceFile>,
    /// Files left out because they are not UTF-8 text; `skipped.len()` is the count.
    pub skipped: Vec<SkippedFile>,
    /// Offset in `tokens.bin` of each document's first token; strictly increasing, starting at 0.
    pub doc_starts: Vec<u64>,
}

/// One input file that contributed documents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    /// The path as given or found.
    pub path: String,
    /// Its size on disk.
    pub bytes: u64,
    /// The bytes of it that were read (less than `bytes` when the budget ran out inside it).
    pub bytes_used: u64,
    /// Non-empty documents taken from it.
    pub documents: u64,
}

/// One input file left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkippedFile {
    /// The path as given or found.
    pub path: String,
    /// Why it was left out.
    pub reason: String,
}

impl DatasetInfo {
    /// Reads and checks `dir/index.json` (not `tokens.bin`; see [`DatasetInfo::check_tokens_len`]).
    pub(crate) fn read(dir: &Path) -> Result<DatasetInfo, DataError> {
        let path = dir.join(INDEX_FILE);
        let meta =
            std::fs::metadata(&path).map_err(|e| DataError::dataset(&path, format!("cannot read the index: {e}")))?;
        if meta.len() > MAX_INDEX_BYTES {
            return Err(DataError::dataset(
                &path,
                format!("index is {} bytes, over the {MAX_INDEX_BYTES}-byte limit", meta.len()),
            ));
        }
        let bytes =
            std::fs::read(&path).map_err(|e| DataError::dataset(&path, format!("cannot read the index: {e}")))?;
        let info: DatasetInfo =
            serde_json::from_slice(&bytes).map_err(|e| DataError::dataset(&path, format!("bad index: {e}")))?;
        info.validate().map_err(|problem| DataError::dataset(&path, format!("bad index: {problem}")))?;
        Ok(info)
    }

    /// Facts that must hold between the fields.
    fn validate(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!("format_version is {}, this build reads {FORMAT_VERSION}", self.format_version));
        }
        if self.eos_id >= self.vocab_size {
            return Err(format!("eos_id {} is not below vocab_size {}", self.eos_id, self.vocab_size));
        }
        if self.doc_starts.len() as u64 != self.n_documents {
            return Err(format!("{} document offsets for n_documents {}", self.doc_starts.len(), self.n_documents));
        }
        if self.doc_starts.first().is_some_and(|&s| s != 0) {
            return Err("the first document does not start at token 0".to_owned());
        }
        if self.doc_starts.windows(2).any(|w| w[0] >= w[1]) {
            return Err("document offsets are not strictly increasing".to_owned());
        }
        if self.doc_starts.last().is_some_and(|&s| s >= self.n_tokens) {
            return Err(format!("a document starts at or after n_tokens {}", self.n_tokens));
        }
        for (name, hash) in [("tokens_sha256", &self.tokens_sha256), ("tokenizer_sha256", &self.tokenizer_sha256)] {
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{name} is not 64 hex digits: {hash:?}"));
            }
        }
        Ok(())
    }

    /// Checks that `tokens.bin` (at `path`, `len` bytes) has the size the index says.
    pub(crate) fn check_tokens_len(&self, path: &Path, len: u64) -> Result<(), DataError> {
        let want = self.n_tokens.checked_mul(4);
        if want != Some(len) {
            return Err(DataError::dataset(
                path,
                format!(
                    "size mismatch: {len} bytes, but the index says {} tokens ({} bytes)",
                    self.n_tokens,
                    self.n_tokens.saturating_mul(4)
                ),
            ));
        }
        Ok(())
    }
}
