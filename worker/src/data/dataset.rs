//! A prepared dataset, opened read-only with its token ids memory-mapped.

use super::DataError;
use super::index::{DatasetInfo, TOKENIZER_FILE, TOKENS_FILE};
use super::order::SampleOrder;
use super::tokenizer::load_tokenizer;
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A dataset directory written by [`super::prepare`].
///
/// Windows are copied out of the map (`u32::from_le_bytes`) rather than borrowed as `&[u32]`:
/// that takes no `unsafe` cast, reads the same on any host byte order, and costs a few
/// microseconds per row next to a training step of milliseconds or more.
#[derive(Debug)]
pub struct Dataset {
    dir: PathBuf,
    info: DatasetInfo,
    tokens: Mmap,
}

impl Dataset {
    /// Opens `dir`, checking the index and the size of `tokens.bin` (not its checksum: see
    /// [`Dataset::open_verified`]).
    pub fn open(dir: &Path) -> Result<Dataset, DataError> {
        if !dir.is_dir() {
            return Err(DataError::dataset(dir, "no such directory"));
        }
        let info = DatasetInfo::read(dir)?;
        let tokenizer = dir.join(TOKENIZER_FILE);
        if !tokenizer.is_file() {
            return Err(DataError::dataset(&tokenizer, "missing"));
        }
        let path = dir.join(TOKENS_FILE);
        let file = File::open(&path).map_err(|e| DataError::dataset(&path, format!("cannot open: {e}")))?;
        let len = file.metadata().map_err(|e| DataError::dataset(&path, format!("cannot read: {e}")))?.len();
        info.check_tokens_len(&path, len)?;
        let tokens = map_read_only(&file).map_err(|e| DataError::dataset(&path, format!("cannot memory-map: {e}")))?;
        info.check_tokens_len(&path, tokens.len() as u64)?;
        Ok(Dataset { dir: dir.to_path_buf(), info, tokens })
    }

    /// [`Dataset::open`], then checks the SHA-256 of `tokens.bin` and `tokenizer.json` against
    /// the index and that every id is below `vocab_size`. Reads the whole dataset once.
    pub fn open_verified(dir: &Path) -> Result<Dataset, DataError> {
        let dataset = Dataset::open(dir)?;
        let path = dir.join(TOKENS_FILE);
        let got = hex::encode(Sha256::digest(&dataset.tokens[..]));
        if got != dataset.info.tokens_sha256 {
            return Err(DataError::dataset(
                &path,
                format!("checksum mismatch: sha256 is {got}, the index says {}", dataset.info.tokens_sha256),
            ));
        }
        let tokenizer = dir.join(TOKENIZER_FILE);
        let bytes =
            std::fs::read(&tokenizer).map_err(|e| DataError::dataset(&tokenizer, format!("cannot read: {e}")))?;
        let got = hex::encode(Sha256::digest(&bytes));
        if got != dataset.info.tokenizer_sha256 {
            return Err(DataError::dataset(
                &tokenizer,
                format!("checksum mismatch: sha256 is {got}, the index says {}", dataset.info.tokenizer_sha256),
            ));
        }
        let vocab = dataset.info.vocab_size;
        if let Some(pos) =
            dataset.tokens.chunks_exact(4).position(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >= vocab)
        {
            return Err(DataError::dataset(&path, format!("token {pos} is not below vocab_size {vocab}")));
        }
        Ok(dataset)
    }

    /// The contents of `index.json`.
    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tokenizer the ids were made with.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(TOKENIZER_FILE)
    }

    /// Loads the tokenizer at [`Dataset::tokenizer_path`].
    pub fn load_tokenizer(&self) -> Result<tokenizers::Tokenizer, DataError> {
        load_tokenizer(&self.tokenizer_path())
    }

    /// Token ids in the dataset.
    pub fn len(&self) -> u64 {
        self.info.n_tokens
    }

    /// Whether the dataset holds no tokens (`prepare` never writes one).
    pub fn is_empty(&self) -> bool {
        self.info.n_tokens == 0
    }

    /// Windows of `seq_len + 1` tokens at stride `seq_len` over the whole token stream (0 when
    /// `seq_len` is 0). Consecutive windows share one token: the last target of one is the first
    /// input of the next, so every token is a target exactly once.
    pub fn num_windows(&self, seq_len: usize) -> u64 {
        if seq_len == 0 { 0 } else { self.info.n_tokens.saturating_sub(1) / seq_len as u64 }
    }

    /// Window `idx`: tokens `idx*seq_len .. idx*seq_len + seq_len + 1`; inputs are `[..seq_len]`,
    /// targets `[1..]`.
    ///
    /// # Panics
    /// If `idx >= self.num_windows(seq_len)`.
    pub fn window(&self, idx: u64, seq_len: usize) -> Vec<u32> {
        let n = self.num_windows(seq_len);
        assert!(idx < n, "window {idx} out of range: {n} windows of {seq_len}+1 tokens");
        let start = idx * seq_len as u64;
        self.tokens(start..start + seq_len as u64 + 1)
    }

    /// Token ids `range` of the stream.
    ///
    /// # Panics
    /// If `range` reaches past [`Dataset::len`].
    pub fn tokens(&self, range: Range<u64>) -> Vec<u32> {
        assert!(
            range.start <= range.end && range.end <= self.info.n_tokens,
            "tokens {range:?} out of 0..{}",
            self.info.n_tokens
        );
        let bytes = &self.tokens[range.start as usize * 4..range.end as usize * 4];
        bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    /// The sample order of this dataset's windows of `seq_len + 1` tokens for `seed`; an error
    /// with the numbers when the dataset is shorter than one window.
    pub fn sample_order(&self, seq_len: usize, seed: u64) -> Result<SampleOrder, DataError> {
        match self.num_windows(seq_len) {
            0 => Err(DataError::TooShort { path: self.dir.clone(), n_tokens: self.info.n_tokens, seq_len }),
            n => SampleOrder::new(n, seed),
        }
    }
}

/// Maps `file` read-only.
#[allow(unsafe_code)]
fn map_read_only(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is undefined behaviour only if the file changes while mapped. `file` is
    // opened read-only and nothing in Swarm ever writes `tokens.bin` after creating it: `prepare`
    // writes it once inside a temporary directory that is then atomically renamed into place,
    // and a new dataset is a new directory. The size was checked against the index just before.
    unsafe { Mmap::map(file) }
}
