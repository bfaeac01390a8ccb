//! Reading inputs into documents under a byte budget: a text file is one document, a JSONL
//! line is one document (its `text_field`). Files that are not UTF-8 are skipped and listed.

use super::DataError;
use super::corpus::{collect_files, is_jsonl};
use super::index::{SkippedFile, SourceFile};
use super::prepare::{PreparePhase, PrepareProgress};
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Documents read from the inputs, and where they came from.
#[derive(Debug, Default)]
pub(crate) struct Corpus {
    pub docs: Vec<String>,
    pub sources: Vec<SourceFile>,
    pub skipped: Vec<SkippedFile>,
    pub bytes_used: u64,
    pub budget_reached: bool,
}

/// Reads `inputs` (files, or directories listed with [`collect_files`]) in order until
/// `max_bytes` are used. A file the budget ends inside is read up to its last whole line.
pub(crate) fn read_inputs(
    inputs: &[PathBuf],
    max_bytes: u64,
    text_field: &str,
    progress: &mut dyn FnMut(PrepareProgress),
) -> Result<Corpus, DataError> {
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for input in inputs {
        for file in collect_files(input, max_bytes)? {
            if seen.insert(file.clone()) {
                files.push(file);
            }
        }
    }
    let mut corpus = Corpus::default();
    let report = |c: &Corpus, done: usize, progress: &mut dyn FnMut(PrepareProgress)| {
        progress(PrepareProgress {
            phase: PreparePhase::Reading,
            files_done: done,
            files_total: files.len(),
            bytes: c.bytes_used,
            documents: c.docs.len() as u64,
            tokens: 0,
        });
    };
    report(&corpus, 0, progress);
    for (i, path) in files.iter().enumerate() {
        let remaining = max_bytes - corpus.bytes_used;
        if remaining == 0 {
            corpus.budget_reached = true;
            break;
        }
        let size = std::fs::metadata(path).map_err(DataError::io("reading", path))?.len();
        let docs_before = corpus.docs.len();
        let read = if is_jsonl(path) {
            read_jsonl(path, size, remaining, text_field, &mut corpus.docs)?
        } else {
            read_text(path, size, remaining, &mut corpus.docs)?
        };
        let name = path.display().to_string();
        match read {
            FileRead::Used { bytes, cut_short } => {
                corpus.bytes_used += bytes;
                let documents = (corpus.docs.len() - docs_before) as u64;
                corpus.sources.push(SourceFile { path: name, bytes: size, bytes_used: bytes, documents });
                corpus.budget_reached |= cut_short;
            }
            FileRead::Skipped { reason } => {
                tracing::warn!(file = %name, %reason, "skipped");
                corpus.skipped.push(SkippedFile { path: name, reason });
            }
        }
        report(&corpus, i + 1, progress);
        if corpus.budget_reached {
            break;
        }
    }
    Ok(corpus)
}

enum FileRead {
    /// `bytes` of the file were used; `cut_short`: the budget ended inside it.
    Used {
        bytes: u64,
        cut_short: bool,
    },
    Skipped {
        reason: String,
    },
}

fn read_text(path: &Path, size: u64, remaining: u64, docs: &mut Vec<String>) -> Result<FileRead, DataError> {
    let mut buf = Vec::with_capacity(size.min(remaining) as usize);
    File::open(path)
        .map_err(DataError::io("opening", path))?
        .take(remaining)
        .read_to_end(&mut buf)
        .map_err(DataError::io("reading", path))?;
    let cut_short = (buf.len() as u64) < size;
    if cut_short && let Some(nl) = buf.iter().rposition(|&b| b == b'\n') {
        buf.truncate(nl + 1);
    }
    let bytes = buf.len() as u64;
    let mut text = match String::from_utf8(buf) {
        Ok(text) => text,
        // The budget may end inside a character of a file with no newline: keep what is whole.
        Err(e) if cut_short && e.utf8_error().error_len().is_none() => {
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            bytes.truncate(valid);
            String::from_utf8(bytes).unwrap_or_default()
        }
        Err(e) => {
            return Ok(FileRead::Skipped {
                reason: format!("not UTF-8 text (invalid bytes at offset {})", e.utf8_error().valid_up_to()),
            });
        }
    };
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    if !text.is_empty() {
        docs.push(text);
    }
    Ok(FileRead::Used { bytes, cut_short })
}

fn read_jsonl(
    path: &Path,
    size: u64,
    remaining: u64,
    field: &str,
    docs: &mut Vec<String>,
) -> Result<FileRead, DataError> {
    let file = File::open(path).map_err(DataError::io("opening", path))?;
    let mut reader = BufReader::new(file.take(remaining));
    let mut line = Vec::new();
    let mut line_no = 0u64;
    let mut used = 0u64;
    let bad = |line: u64, problem: String| DataError::Jsonl {
        path: path.to_path_buf(),
        line,
        field: field.to_owned(),
        problem,
    };
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(DataError::io("reading", path))? as u64;
        if n == 0 {
            break;
        }
        line_no += 1;
        if !line.ends_with(b"\n") && used + n < size {
            break; // the budget ends inside this line: leave it out
        }
        used += n;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| bad(line_no, format!("not valid JSON ({e})")))?;
        let serde_json::Value::Object(mut object) = value else {
            return Err(bad(line_no, format!("{}, not a JSON object", kind(&value))));
        };
        match object.remove(field) {
            Some(serde_json::Value::String(s)) => {
                if !s.is_empty() {
                    docs.push(s);
                }
            }
            Some(other) => {
                return Err(bad(line_no, format!("field \"{field}\" is {}, not a string", kind(&other))));
            }
            None => {
                let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
                keys.truncate(8);
                return Err(bad(line_no, format!("no field \"{field}\" (fields: {})", keys.join(", "))));
            }
        }
    }
    Ok(FileRead::Used { bytes: used, cut_short: used < size })
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
