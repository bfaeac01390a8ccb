//! Training data: from raw text to a deterministic stream of token windows.
//!
//! - [`corpus`] finds text already on the machine (the Python standard library) and lists the
//!   files of a directory in a fixed order.
//! - [`prepare`] reads text and JSONL, trains a byte-level BPE tokenizer (or loads a given one),
//!   tokenizes every document and writes a dataset directory: `tokenizer.json`, `tokens.bin`
//!   (little-endian `u32` ids, documents joined by the end-of-text id) and `index.json`
//!   ([`DatasetInfo`]). The directory is written under a temporary name and renamed into place,
//!   so it is either complete or absent.
//! - [`Dataset`] opens such a directory read-only with `tokens.bin` memory-mapped and cuts it into
//!   windows of `seq_len + 1` tokens.
//! - [`SampleOrder`] is the one global order of windows for a run: global sample `g` is window
//!   `perm_e[g % n]` of epoch `e = g / n`, so any resume or resharding that continues the global
//!   sample counter sees each window exactly once per epoch. [`batch_rows`] gives the rows of one
//!   global batch that a worker owns.
//!
//! Invariant: nothing here downloads anything, and the order of samples depends only on the
//! dataset, the seed and code in this module (its PRNG is written here, not taken from a crate).

pub mod corpus;
mod dataset;
mod error;
mod index;
mod order;
mod prepare;
mod read;
mod tokenizer;

#[cfg(test)]
mod tests;

pub use dataset::Dataset;
pub use error::DataError;
pub use index::{DatasetInfo, FORMAT_VERSION, INDEX_FILE, SkippedFile, SourceFile, TOKENIZER_FILE, TOKENS_FILE};
pub use order::{MAX_WINDOWS, SampleOrder, batch_rows, sample_rows};
pub use prepare::{DEFAULT_MAX_BYTES, DEFAULT_VOCAB_SIZE, PrepareOptions, PreparePhase, PrepareProgress, prepare};
pub use tokenizer::{
    EOS_CANDIDATES, EOS_TOKEN, MAX_ENCODE_FILE_BYTES, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, encode_file, load_tokenizer,
};
