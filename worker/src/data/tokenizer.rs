//! Training, loading and running the tokenizer.
//!
//! A trained tokenizer is GPT-2 style byte-level BPE: no normalizer, the `ByteLevel`
//! pre-tokenizer (GPT-2 split regex, no prefix space) and decoder, all 256 bytes in the base
//! alphabet (so any UTF-8 text round-trips), and [`EOS_TOKEN`] as its one special token.

use super::DataError;
use std::collections::HashSet;
use std::path::Path;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder, TokenizerImpl};

/// The special token placed between documents by a tokenizer trained here.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// End-of-text tokens looked for, in order, in a tokenizer given to `prepare`.
pub const EOS_CANDIDATES: &[&str] = &[EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>"];
/// The smallest vocabulary trained: the 256 byte tokens and [`EOS_TOKEN`].
pub const MIN_VOCAB_SIZE: usize = 257;
/// Largest vocabulary trained (ids are stored as `u32`; beyond this no model wants it).
pub const MAX_VOCAB_SIZE: usize = 1 << 24;
/// Long documents are cut into pieces of about this many bytes before training and encoding,
/// at places where that cannot change the result (see [`split_for_encoding`]).
pub(crate) const CHUNK_BYTES: usize = 64 << 10;
/// Largest file [`encode_file`] reads.
pub const MAX_ENCODE_FILE_BYTES: u64 = 1 << 30;

/// Loads a Hugging Face `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, DataError> {
    Tokenizer::from_file(path)
        .map_err(|e| DataError::Tokenizer { path: path.to_path_buf(), message: format!("cannot load it: {e}") })
}

/// Tokenizes a UTF-8 text file with the tokenizer at `tokenizer_json` (no special tokens added).
pub fn encode_file(tokenizer_json: &Path, text_file: &Path) -> Result<Vec<u32>, DataError> {
    let tokenizer = load_tokenizer(tokenizer_json)?;
    let len = std::fs::metadata(text_file).map_err(DataError::io("reading", text_file))?.len();
    if len > MAX_ENCODE_FILE_BYTES {
        return Err(DataError::TooLarge { path: text_file.to_path_buf(), bytes: len, max: MAX_ENCODE_FILE_BYTES });
    }
    let bytes = std::fs::read(text_file).map_err(DataError::io("reading", text_file))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| DataError::NotUtf8 { path: text_file.to_path_buf(), offset: e.utf8_error().valid_up_to() })?;
    let mut docs = encode_docs(&tokenizer, tokenizer_json, &[text.as_str()])?;
    Ok(docs.pop().unwrap_or_default())
}

/// Checks that a vocabulary of `vocab_size` can be trained.
pub(crate) fn check_vocab_size(vocab_size: usize) -> Result<(), DataError> {
    if (MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&vocab_size) {
        Ok(())
    } else {
        Err(DataError::BadVocabSize { got: vocab_size, min: MIN_VOCAB_SIZE, max: MAX_VOCAB_SIZE, eos: EOS_TOKEN })
    }
}

/// Trains byte-level BPE with at most `vocab_size` entries (including [`EOS_TOKEN`]) on `docs`;
/// fewer when the text has fewer distinct pairs to merge.
pub(crate) fn train(docs: &[String], vocab_size: usize) -> Result<Tokenizer, DataError> {
    check_vocab_size(vocab_size)?;
    let fail = |e: tokenizers::Error| DataError::Train { vocab_size, message: e.to_string() };
    let byte_level = ByteLevel::new(false, true, true);
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();
    let mut tokenizer: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level))
        .build()
        .map_err(fail)?;
    let pieces = docs.iter().flat_map(|d| split_for_encoding(d, CHUNK_BYTES));
    tokenizer.train(&mut trainer, pieces).map_err(fail)?;
    Ok(tokenizer.into())
}

/// The id of the first of [`EOS_CANDIDATES`] that `tokenizer` knows.
pub(crate) fn eos_id(tokenizer: &Tokenizer, path: &Path) -> Result<u32, DataError> {
    EOS_CANDIDATES
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .ok_or_else(|| DataError::NoEosToken { path: path.to_path_buf(), tried: EOS_CANDIDATES.join(", ") })
}

/// One more than the largest id `tokenizer` can produce.
pub(crate) fn vocab_rows(tokenizer: &Tokenizer) -> u32 {
    tokenizer.get_vocab(true).values().max().map_or(0, |m| m + 1)
}

/// Whether cutting text at [`split_for_encoding`]'s places leaves its encoding unchanged: true
/// for byte-level BPE with the GPT-2 regex, no prefix space and no normalizer (like ours).
/// Other tokenizers (a SentencePiece-style prefix, a normalizer that strips) get whole documents.
fn splits_are_exact(tokenizer: &Tokenizer) -> bool {
    tokenizer.get_normalizer().is_none()
        && matches!(tokenizer.get_pre_tokenizer(), Some(PreTokenizerWrapper::ByteLevel(b)) if !b.add_prefix_space && b.use_regex)
}

/// Cuts `text` into pieces of at least `target` bytes (the last may be shorter), only just after
/// a `\n` that has no whitespace on either side. The GPT-2 split regex always makes such a `\n`
/// a pre-token of its own, so encoding the pieces one by one gives the same ids as encoding
/// the whole text.
pub(crate) fn split_for_encoding(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    let mut start = 0;
    while text.len() - start > target {
        let cut = (start + target.max(1)..bytes.len()).find(|&i| {
            bytes[i] == b'\n'
                && i > 0
                && !text[..i].chars().next_back().is_some_and(char::is_whitespace)
                && text[i + 1..].chars().next().is_some_and(|c| !c.is_whitespace())
        });
        let Some(i) = cut else { break };
        pieces.push(&text[start..=i]);
        start = i + 1;
    }
    if start < text.len() || pieces.is_empty() {
        pieces.push(&text[start..]);
    }
    pieces
}

/// Encodes each document (no special tokens added), in parallel inside the tokenizers crate.
/// `path` names the tokenizer in errors.
pub(crate) fn encode_docs(tokenizer: &Tokenizer, path: &Path, docs: &[&str]) -> Result<Vec<Vec<u32>>, DataError> {
    let exact = splits_are_exact(tokenizer);
    let mut owners = Vec::new();
    let mut pieces = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        let split = if exact { split_for_encoding(doc, CHUNK_BYTES) } else { vec![*doc] };
        owners.extend(std::iter::repeat_n(d, split.len()));
        pieces.extend(split);
    }
    let encodings = tokenizer
        .encode_batch_fast(pieces, false)
        .map_err(|e| DataError::Tokenizer { path: path.to_path_buf(), message: format!("encoding failed: {e}") })?;
    let mut out = vec![Vec::new(); docs.len()];
    for (d, enc) in owners.into_iter().zip(encodings) {
        out[d].extend_from_slice(enc.get_ids());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str =
        "def f(x):\n    return x + 1\n\n\nclass A:\n\tpass\nprint('héllo wörld')  \nend\r\nline\n \nx\n";

    #[test]
    fn split_points_keep_whole_text() {
        for target in [0, 1, 3, 10, 1000] {
            let pieces = split_for_encoding(SAMPLE, target);
            assert_eq!(pieces.concat(), SAMPLE, "target {target}");
            for p in &pieces[..pieces.len() - 1] {
                assert!(p.ends_with('\n') && p.len() >= target, "{p:?}");
            }
        }
        assert_eq!(split_for_encoding("", 4), vec![""]);
    }

    #[test]
    fn encoding_in_pieces_equals_encoding_whole() {
        let docs: Vec<String> = (0..20).map(|i| SAMPLE.repeat(i % 4 + 1)).collect();
        let tokenizer = train(&docs, 400).unwrap();
        assert!(splits_are_exact(&tokenizer));
        let text = SAMPLE.repeat(8);
        let whole = tokenizer.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
        let mut pieced = Vec::new();
        for p in split_for_encoding(&text, 7) {
            pieced.extend_from_slice(tokenizer.encode_fast(p, false).unwrap().get_ids());
        }
        assert_eq!(whole, pieced);
        assert_eq!(tokenizer.decode(&whole, false).unwrap(), text);
    }

    #[test]
    fn vocab_size_below_the_byte_alphabet_is_refused() {
        let err = train(&["abc".to_owned()], 100).unwrap_err().to_string();
        assert!(err.contains("at least 257") && err.contains("100"), "{err}");
    }
}
