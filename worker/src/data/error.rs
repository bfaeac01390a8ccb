//! The failure domain of datasets: every message names the value or path at fault and says
//! what to do about it.

use std::path::PathBuf;

/// What to run when a dataset directory is missing or damaged.
pub(crate) const PREPARE_HINT: &str = "run `swarm data prepare --input PATH --out DIR` to (re)create it";

/// Errors from finding, preparing, opening and ordering datasets.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("reading", "creating", ...).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// No Python standard library to use as a built-in corpus.
    #[error("no Python standard library found (tried: {tried}); install python3, or pass --input PATH")]
    NoPythonStdlib {
        /// Each place looked at, with what was found there.
        tried: String,
    },

    /// An input path does not exist.
    #[error("input {path} does not exist; pass an existing file or directory to --input")]
    InputMissing {
        /// The missing path.
        path: PathBuf,
    },

    /// The inputs held no usable text.
    #[error(
        "no text found in {inputs} ({skipped} file(s) skipped as not UTF-8); pass text (.txt, .md, \
         .rst, .py) or JSONL (.jsonl) files or directories to --input, or raise --max-bytes (now {max_bytes})"
    )]
    NoText {
        /// The inputs, comma-separated.
        inputs: String,
        /// How many files were skipped as undecodable.
        skipped: usize,
        /// The byte budget in force.
        max_bytes: u64,
    },

    /// A JSONL line that is not a JSON object with a string field `field`.
    #[error(
        "{path}:{line}: {problem}; each line must be a JSON object with a string field \"{field}\" \
         (choose the field with --text-field)"
    )]
    Jsonl {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The field holding the text.
        field: String,
        /// What is wrong with the line.
        problem: String,
    },

    /// The requested vocabulary cannot hold the byte alphabet and the end-of-text token.
    #[error(
        "vocab_size must be at least {min} (256 byte tokens + {eos}) and at most {max}, got {got}; pass another --vocab-size"
    )]
    BadVocabSize {
        /// The requested size.
        got: usize,
        /// The smallest size accepted.
        min: usize,
        /// The largest size accepted.
        max: usize,
        /// The end-of-text token.
        eos: &'static str,
    },

    /// A tokenizer could not be loaded, saved or used.
    #[error("tokenizer {path}: {message}; pass a Hugging Face tokenizer.json, or leave --tokenizer out to train one")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// Training the BPE tokenizer failed.
    #[error("training the BPE tokenizer (vocab_size {vocab_size}) failed: {message}")]
    Train {
        /// The requested vocabulary size.
        vocab_size: usize,
        /// The tokenizers crate's message.
        message: String,
    },

    /// A given tokenizer has no token to separate documents with.
    #[error(
        "tokenizer {path} has none of the end-of-text tokens {tried}; use a tokenizer with one of them, or leave --tokenizer out to train one"
    )]
    NoEosToken {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokens looked for.
        tried: String,
    },

    /// A text file to encode is not UTF-8.
    #[error("{path} is not UTF-8 text (invalid bytes at offset {offset}); convert it to UTF-8 first")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid sequence.
        offset: usize,
    },

    /// A file over a size limit.
    #[error("{path} is {bytes} bytes, over the limit of {max}; pass a smaller file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The limit.
        max: u64,
    },

    /// The output directory of `prepare` already exists.
    #[error("output {path} already exists and is not empty; remove it or choose another --out")]
    OutputExists {
        /// The output directory.
        path: PathBuf,
    },

    /// A dataset directory is missing, incomplete or damaged.
    #[error("dataset {path}: {problem}; {hint}", hint = PREPARE_HINT)]
    Dataset {
        /// The dataset directory or the file in it at fault.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },

    /// A sample order over zero windows.
    #[error(
        "the dataset is shorter than one window of seq_len+1 tokens, so there is nothing to sample; \
         use a shorter seq_len or prepare more text"
    )]
    NoWindows,

    /// A dataset too short for one window of the requested length.
    #[error(
        "dataset {path} has {n_tokens} tokens, shorter than one window of seq_len+1 = {} tokens; \
         use a shorter seq_len or prepare more text",
        *seq_len as u64 + 1
    )]
    TooShort {
        /// The dataset directory.
        path: PathBuf,
        /// Tokens in it.
        n_tokens: u64,
        /// The requested sequence length.
        seq_len: usize,
    },

    /// More windows than the in-memory permutation holds.
    #[error(
        "{num_windows} windows exceed the limit of {max} for one sample order; use a longer seq_len or a smaller dataset"
    )]
    TooManyWindows {
        /// Windows requested.
        num_windows: u64,
        /// The limit.
        max: u64,
    },
}

impl DataError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
        let path = path.into();
        move |source| DataError::Io { action, path, source }
    }

    pub(crate) fn dataset(path: impl Into<PathBuf>, problem: impl Into<String>) -> DataError {
        DataError::Dataset { path: path.into(), problem: problem.into() }
    }
}
