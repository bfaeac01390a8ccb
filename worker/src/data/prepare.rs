//! `prepare`: inputs in, a complete dataset directory out (or nothing at all).

use super::DataError;
use super::index::{DatasetInfo, FORMAT_VERSION, INDEX_FILE, TOKENIZER_FILE, TOKENS_FILE};
use super::read::read_inputs;
use super::tokenizer::{self, encode_docs, eos_id, vocab_rows};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Vocabulary trained when none is asked for: small enough for a CPU model, big enough to compress.
pub const DEFAULT_VOCAB_SIZE: usize = 8192;
/// Input read when no budget is given. All text is held in memory while the tokenizer trains.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Text encoded per call into the tokenizers crate (which spreads it over threads).
const BATCH_BYTES: usize = 4 << 20;

/// How to prepare a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareOptions {
    /// Vocabulary size to train, the end-of-text token included. Ignored with `tokenizer`.
    pub vocab_size: usize,
    /// An existing Hugging Face `tokenizer.json` to use instead of training one.
    pub tokenizer: Option<PathBuf>,
    /// Most input bytes read; the input is cut at a line boundary past it.
    pub max_bytes: u64,
    /// The JSONL field holding each document's text.
    pub text_field: String,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            vocab_size: DEFAULT_VOCAB_SIZE,
            tokenizer: None,
            max_bytes: DEFAULT_MAX_BYTES,
            text_field: "text".to_owned(),
        }
    }
}

/// What `prepare` is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreparePhase {
    /// Reading input files.
    Reading,
    /// Training the tokenizer (one report at the start; it gives no progress of its own).
    Training,
    /// Tokenizing documents and writing `tokens.bin`.
    Encoding,
    /// Writing the index and renaming the directory into place.
    Writing,
    /// Finished; the dataset directory exists.
    Done,
}

/// A progress report from `prepare`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrepareProgress {
    /// The current phase.
    pub phase: PreparePhase,
    /// Input files read so far.
    pub files_done: usize,
    /// Input files found.
    pub files_total: usize,
    /// Input bytes read (Reading) or tokenized (Encoding and after).
    pub bytes: u64,
    /// Documents read (Reading) or tokenized (Encoding and after).
    pub documents: u64,
    /// Token ids written.
    pub tokens: u64,
}

/// Reads `inputs` (text and JSONL files, or directories of them), trains a byte-level BPE
/// tokenizer (or loads `opts.tokenizer`), tokenizes every document and writes `out_dir` with
/// `tokenizer.json`, `tokens.bin` and `index.json`. The directory is built under a temporary
/// name beside it and renamed into place, so it is complete or absent. `out_dir` must not
/// exist, or be an empty directory.
///
/// Documents are joined by the end-of-text id (none after the last). A document that itself
/// contains the literal end-of-text token (`<|endoftext|>`) gets that id there too: the
/// tokenizers crate always matches special tokens.
pub fn prepare(
    inputs: &[PathBuf],
    out_dir: &Path,
    opts: &PrepareOptions,
    progress: &mut dyn FnMut(PrepareProgress),
) -> Result<DatasetInfo, DataError> {
    let started = Instant::now();
    check_output(out_dir)?;
    if opts.tokenizer.is_none() {
        tokenizer::check_vocab_size(opts.vocab_size)?;
    }
    let corpus = read_inputs(inputs, opts.max_bytes, &opts.text_field, progress)?;
    let files_total = corpus.sources.len() + corpus.skipped.len();
    let mut report = PrepareProgress {
        phase: PreparePhase::Training,
        files_done: files_total,
        files_total,
        bytes: corpus.bytes_used,
        documents: corpus.docs.len() as u64,
        tokens: 0,
    };
    if corpus.docs.is_empty() {
        let names: Vec<_> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::NoText {
            inputs: names.join(", "),
            skipped: corpus.skipped.len(),
            max_bytes: opts.max_bytes,
        });
    }
    tracing::info!(files = files_total, documents = corpus.docs.len(), bytes = corpus.bytes_used, "read inputs");

    let (tokenizer, tokenizer_json, tokenizer_from) = match &opts.tokenizer {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(DataError::io("reading", path))?;
            let tokenizer = Tokenizer::from_bytes(&bytes)
                .map_err(|e| DataError::Tokenizer { path: path.clone(), message: format!("cannot load it: {e}") })?;
            (tokenizer, bytes, Some(path.display().to_string()))
        }
        None => {
            progress(report);
            let tokenizer = tokenizer::train(&corpus.docs, opts.vocab_size)?;
            let json = tokenizer.to_string(false).map_err(|e| DataError::Train {
                vocab_size: opts.vocab_size,
                message: format!("cannot serialize it: {e}"),
            })?;
            tracing::info!(
                vocab = tokenizer.get_vocab_size(true),
                secs = started.elapsed().as_secs_f32(),
                "trained tokenizer"
            );
            (tokenizer, json.into_bytes(), None)
        }
    };
    let tokenizer_path = opts.tokenizer.clone().unwrap_or_else(|| out_dir.join(TOKENIZER_FILE));
    let eos_id = eos_id(&tokenizer, &tokenizer_path)?;
    let vocab_size = vocab_rows(&tokenizer);

    let staging = Staging::new(out_dir)?;
    write_synced(&staging.tmp.join(TOKENIZER_FILE), &tokenizer_json)?;

    // Tokenize in batches, dropping each batch of text once written.
    report.phase = PreparePhase::Encoding;
    report.bytes = 0;
    report.documents = 0;
    progress(report);
    let tokens_path = staging.tmp.join(TOKENS_FILE);
    let file = File::create(&tokens_path).map_err(DataError::io("creating", &tokens_path))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut doc_starts = Vec::with_capacity(corpus.docs.len());
    let mut n_tokens = 0u64;
    let mut bytes = Vec::new();
    let mut docs = corpus.docs.into_iter().peekable();
    while docs.peek().is_some() {
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        while batch_bytes < BATCH_BYTES
            && let Some(doc) = docs.next()
        {
            batch_bytes += doc.len();
            batch.push(doc);
        }
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        for ids in encode_docs(&tokenizer, &tokenizer_path, &refs)? {
            if ids.is_empty() {
                continue; // a given tokenizer may encode whitespace to nothing
            }
            bytes.clear();
            if !doc_starts.is_empty() {
                bytes.extend_from_slice(&eos_id.to_le_bytes());
                n_tokens += 1;
            }
            doc_starts.push(n_tokens);
            n_tokens += ids.len() as u64;
            bytes.extend(ids.iter().flat_map(|id| id.to_le_bytes()));
            hasher.update(&bytes);
            out.write_all(&bytes).map_err(DataError::io("writing", &tokens_path))?;
        }
        report.bytes += batch_bytes as u64;
        report.documents += batch.len() as u64;
        report.tokens = n_tokens;
        progress(report);
    }
    let file = out.into_inner().map_err(|e| DataError::io("writing", &tokens_path)(e.into_error()))?;
    file.sync_all().map_err(DataError::io("syncing", &tokens_path))?;
    drop(file);

    report.phase = PreparePhase::Writing;
    progress(report);
    let info = DatasetInfo {
        format_version: FORMAT_VERSION,
        vocab_size,
        eos_id,
        n_tokens,
        n_documents: doc_starts.len() as u64,
        tokens_sha256: hex::encode(hasher.finalize()),
        tokenizer_sha256: hex::encode(Sha256::digest(&tokenizer_json)),
        tokenizer_from,
        max_bytes: opts.max_bytes,
        budget_reached: corpus.budget_reached,
        sources: corpus.sources,
        skipped: corpus.skipped,
        doc_starts,
    };
    let index = serde_json::to_vec(&info)
        .map_err(|e| DataError::dataset(out_dir, format!("cannot serialize the index: {e}")))?;
    write_synced(&staging.tmp.join(INDEX_FILE), &index)?;
    staging.commit()?;
    tracing::info!(
        dir = %out_dir.display(), tokens = n_tokens, documents = info.n_documents, skipped = info.skipped.len(),
        secs = started.elapsed().as_secs_f32(), "prepared dataset"
    );
    report.phase = PreparePhase::Done;
    progress(report);
    Ok(info)
}

/// `out` must not exist, or be an empty directory (which the rename replaces).
fn check_output(out: &Path) -> Result<(), DataError> {
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataError::io("checking", out)(e)),
        Ok(meta) if meta.is_dir() => {
            let mut entries = std::fs::read_dir(out).map_err(DataError::io("listing", out))?;
            if entries.next().is_none() { Ok(()) } else { Err(DataError::OutputExists { path: out.to_path_buf() }) }
        }
        Ok(_) => Err(DataError::OutputExists { path: out.to_path_buf() }),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let mut file = File::create(path).map_err(DataError::io("creating", path))?;
    file.write_all(bytes).map_err(DataError::io("writing", path))?;
    file.sync_all().map_err(DataError::io("syncing", path))
}

/// A temporary directory beside the output, removed on drop unless renamed into place.
struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl Staging {
    fn new(out: &Path) -> Result<Staging, DataError> {
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let Some(name) = out.file_name() else {
            let e = std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the output path has no final name; pass a directory name to --out",
            );
            return Err(DataError::io("creating", out)(e));
        };
        std::fs::create_dir_all(&parent).map_err(DataError::io("creating", &parent))?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let tmp = parent.join(format!(".{}.partial-{}-{nanos}", name.to_string_lossy(), std::process::id()));
        std::fs::create_dir(&tmp).map_err(DataError::io("creating", &tmp))?;
        Ok(Staging { tmp, out: out.to_path_buf(), committed: false })
    }

    /// Renames the directory into place (atomically replacing an empty directory there) and
    /// syncs the parent so the rename survives a crash.
    fn commit(mut self) -> Result<(), DataError> {
        std::fs::rename(&self.tmp, &self.out).map_err(|e| match e.kind() {
            std::io::ErrorKind::DirectoryNotEmpty
            | std::io::ErrorKind::AlreadyExists
            | std::io::ErrorKind::NotADirectory => DataError::OutputExists { path: self.out.clone() },
            _ => DataError::io("renaming into place", &self.out)(e),
        })?;
        self.committed = true;
        if let Some(parent) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent).and_then(|d| d.sync_all()).map_err(DataError::io("syncing", parent))?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = std::fs::remove_dir_all(&self.tmp)
        {
            tracing::warn!(dir = %self.tmp.display(), error = %e, "could not remove a partial dataset directory");
        }
    }
}
