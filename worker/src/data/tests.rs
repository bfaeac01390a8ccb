//! End-to-end tests of the data module on tiny corpora made in temporary directories.

use super::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

const A_TXT: &str = "The quick brown fox jumps over the lazy dog.\nThe dog sleeps.\n";
const B_MD: &str = "# Title\n\nSome *markdown* text, with ünïcödé and emoji 🦀.\n";
const C_PY: &str = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n";
const JSONL: &str = "{\"text\": \"first json document\", \"id\": 1}\n\n{\"text\": \"second one\\nwith two lines\"}\n{\"text\": \"\"}\n{\"text\": \"third\"}";

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A corpus directory; returns it and the documents `prepare` should find, in order.
fn corpus(root: &Path) -> (PathBuf, Vec<&'static str>) {
    let dir = root.join("corpus");
    write(&dir.join("a.txt"), A_TXT.as_bytes());
    write(&dir.join("b.md"), B_MD.as_bytes());
    write(&dir.join("bad.txt"), b"valid start \xff\xfe then garbage");
    write(&dir.join("d.jsonl"), JSONL.as_bytes());
    write(&dir.join("sub/c.py"), C_PY.as_bytes());
    write(&dir.join("__pycache__/x.py"), b"cached = 1\n");
    write(&dir.join("tests/t.py"), b"assert True\n");
    let docs = vec![A_TXT, B_MD, "first json document", "second one\nwith two lines", "third", C_PY];
    (dir, docs)
}

fn opts(vocab_size: usize) -> PrepareOptions {
    PrepareOptions { vocab_size, ..PrepareOptions::default() }
}

fn prepare_quietly(inputs: &[PathBuf], out: &Path, opts: &PrepareOptions) -> Result<DatasetInfo, DataError> {
    prepare(inputs, out, opts, &mut |_| {})
}

#[test]
fn prepare_then_open_round_trips_every_document() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, docs) = corpus(tmp.path());
    let out = tmp.path().join("ds");
    let mut phases = Vec::new();
    let info = prepare(std::slice::from_ref(&dir), &out, &opts(300), &mut |p| phases.push(p)).unwrap();

    assert_eq!(info.n_documents, docs.len() as u64);
    assert_eq!(info.skipped.len(), 1, "{:?}", info.skipped);
    assert!(info.skipped[0].path.ends_with("bad.txt") && info.skipped[0].reason.contains("UTF-8"));
    assert_eq!(info.sources.len(), 4);
    assert!(!info.budget_reached);
    assert!(info.vocab_size <= 300 && info.vocab_size > 256);
    assert!(phases.iter().any(|p| p.phase == PreparePhase::Training));
    assert_eq!(phases.last().unwrap().phase, PreparePhase::Done);
    assert_eq!(phases.last().unwrap().tokens, info.n_tokens);
    // Only the finished directory is left beside the corpus: no partial directories.
    let mut names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["corpus", "ds"]);

    let ds = Dataset::open_verified(&out).unwrap();
    assert_eq!(ds.info(), &info);
    let bytes = std::fs::read(out.join(TOKENS_FILE)).unwrap();
    assert_eq!(bytes.len() as u64, info.n_tokens * 4);
    assert_eq!(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)), info.tokens_sha256);

    let tokenizer = ds.load_tokenizer().unwrap();
    assert_eq!(tokenizer.token_to_id(EOS_TOKEN), Some(info.eos_id));
    let mut ends: Vec<u64> = info.doc_starts[1..].iter().map(|s| s - 1).collect();
    ends.push(info.n_tokens);
    for (i, want) in docs.iter().enumerate() {
        let ids = ds.tokens(info.doc_starts[i]..ends[i]);
        assert!(!ids.contains(&info.eos_id));
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), *want, "document {i}");
        if i + 1 < docs.len() {
            assert_eq!(ds.tokens(ends[i]..ends[i] + 1), [info.eos_id], "EOS after document {i}");
        }
    }
    let whole = ds.tokens(0..info.n_tokens);
    assert_eq!(tokenizer.decode(&whole, false).unwrap(), docs.join(EOS_TOKEN));

    // encode_file gives the ids prepare wrote for the same text.
    let a = encode_file(&ds.tokenizer_path(), &dir.join("a.txt")).unwrap();
    assert_eq!(a, ds.tokens(0..ends[0]));
}

#[test]
fn windows_cut_the_stream_at_stride_seq_len() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = corpus(tmp.path());
    let out = tmp.path().join("ds");
    prepare_quietly(&[dir], &out, &opts(300)).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let n = ds.len();
    let all = ds.tokens(0..n);
    let seq_len = 8;
    assert_eq!(ds.num_windows(seq_len), (n - 1) / 8);
    for w in 0..ds.num_windows(seq_len) {
        let s = (w * 8) as usize;
        assert_eq!(ds.window(w, seq_len), all[s..s + 9]);
    }
    assert_eq!(ds.num_windows(n as usize - 1), 1);
    assert_eq!(ds.num_windows(n as usize), 0);
    assert_eq!(ds.num_windows(0), 0);
    let err = ds.sample_order(n as usize, 1).unwrap_err().to_string();
    assert!(err.contains(&format!("{n} tokens")) && err.contains("seq_len"), "{err}");
    let mut order = ds.sample_order(seq_len, 1).unwrap();
    assert!(order.window_for(0) < ds.num_windows(seq_len));
}

#[test]
fn preparing_is_deterministic_and_a_given_tokenizer_is_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = corpus(tmp.path());
    let (one, two, three) = (tmp.path().join("one"), tmp.path().join("two"), tmp.path().join("three"));
    let info1 = prepare_quietly(std::slice::from_ref(&dir), &one, &opts(320)).unwrap();
    prepare_quietly(std::slice::from_ref(&dir), &two, &opts(320)).unwrap();
    for f in [TOKENIZER_FILE, TOKENS_FILE, INDEX_FILE] {
        assert_eq!(std::fs::read(one.join(f)).unwrap(), std::fs::read(two.join(f)).unwrap(), "{f}");
    }
    let given = PrepareOptions { tokenizer: Some(one.join(TOKENIZER_FILE)), vocab_size: 1, ..opts(0) };
    let info3 = prepare_quietly(&[dir], &three, &given).unwrap();
    assert_eq!(info3.tokens_sha256, info1.tokens_sha256);
    assert_eq!(info3.tokenizer_sha256, info1.tokenizer_sha256);
    assert!(info3.tokenizer_from.is_some() && info1.tokenizer_from.is_none());
}

#[test]
fn damaged_datasets_are_refused_with_the_path_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = corpus(tmp.path());
    let out = tmp.path().join("ds");
    prepare_quietly(&[dir], &out, &opts(300)).unwrap();
    let tokens = out.join(TOKENS_FILE);
    let check = |err: DataError, path: &Path, what: &str| {
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("swarm data prepare --input PATH --out DIR"), "{msg}");
        assert!(msg.contains(what), "{msg}");
    };

    // Same size, one bit flipped: only the verified open notices.
    let mut bytes = std::fs::read(&tokens).unwrap();
    bytes[5] ^= 0x01;
    std::fs::write(&tokens, &bytes).unwrap();
    Dataset::open(&out).unwrap();
    check(Dataset::open_verified(&out).unwrap_err(), &tokens, "checksum mismatch");

    bytes.truncate(bytes.len() - 4);
    std::fs::write(&tokens, &bytes).unwrap();
    check(Dataset::open(&out).unwrap_err(), &tokens, "size mismatch");

    std::fs::remove_file(&tokens).unwrap();
    check(Dataset::open(&out).unwrap_err(), &tokens, "cannot open");

    let index = out.join(INDEX_FILE);
    std::fs::write(&index, b"{\"format_version\": 1}").unwrap();
    check(Dataset::open(&out).unwrap_err(), &index, "bad index");

    let missing = tmp.path().join("nowhere");
    check(Dataset::open(&missing).unwrap_err(), &missing, "no such directory");
}

#[test]
fn a_bad_jsonl_line_names_file_line_and_field_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("data.jsonl");
    let out = tmp.path().join("ds");
    let cases: [(&str, &str); 4] = [
        ("{\"text\": \"ok\"}\n{not json}\n", ":2: not valid JSON"),
        ("{\"text\": \"ok\"}\n\n{\"body\": \"x\"}\n", ":3: no field \"text\" (fields: body)"),
        ("{\"text\": 5}\n", ":1: field \"text\" is a number"),
        ("[1, 2]\n", ":1: an array, not a JSON object"),
    ];
    for (content, want) in cases {
        write(&file, content.as_bytes());
        let msg = prepare_quietly(std::slice::from_ref(&file), &out, &opts(300)).unwrap_err().to_string();
        assert!(msg.contains(&format!("{}{want}", file.display())), "{msg}");
        assert!(msg.contains("--text-field"), "{msg}");
        assert!(!out.exists());
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "only data.jsonl remains");

    // Another field name is honoured.
    write(&file, b"{\"body\": \"hello there\"}\n");
    let body = PrepareOptions { text_field: "body".to_owned(), ..opts(300) };
    assert_eq!(prepare_quietly(&[file], &out, &body).unwrap().n_documents, 1);
}

#[test]
fn bad_requests_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = corpus(tmp.path());
    let out = tmp.path().join("ds");
    let msg = prepare_quietly(std::slice::from_ref(&dir), &out, &opts(100)).unwrap_err().to_string();
    assert!(msg.contains("at least 257") && msg.contains("got 100"), "{msg}");

    write(&out.join("keep.txt"), b"mine");
    let msg = prepare_quietly(std::slice::from_ref(&dir), &out, &opts(300)).unwrap_err().to_string();
    assert!(msg.contains("already exists") && msg.contains(&out.display().to_string()), "{msg}");
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");

    // An empty output directory is fine: the rename replaces it.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    prepare_quietly(std::slice::from_ref(&dir), &empty, &opts(300)).unwrap();
    Dataset::open_verified(&empty).unwrap();

    let only_binary = tmp.path().join("bin.txt");
    write(&only_binary, b"\xff\xff\xff");
    let msg = prepare_quietly(&[only_binary], &tmp.path().join("x"), &opts(300)).unwrap_err().to_string();
    assert!(msg.contains("no text found") && msg.contains("1 file(s) skipped"), "{msg}");
}

#[test]
fn the_byte_budget_cuts_input_at_a_line() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("big.txt");
    let line = "line of text number ten\n";
    write(&file, line.repeat(100).as_bytes());
    let budget = PrepareOptions { max_bytes: 10 * line.len() as u64 + 5, ..opts(300) };
    let out = tmp.path().join("ds");
    let info = prepare_quietly(std::slice::from_ref(&file), &out, &budget).unwrap();
    assert!(info.budget_reached);
    assert_eq!(info.sources[0].bytes_used, 10 * line.len() as u64);
    let ds = Dataset::open(&out).unwrap();
    let text = ds.load_tokenizer().unwrap().decode(&ds.tokens(0..ds.len()), false).unwrap();
    assert_eq!(text, line.repeat(10));

    let jsonl = tmp.path().join("big.jsonl");
    write(&jsonl, "{\"text\": \"abc\"}\n".repeat(10).as_bytes());
    let budget = PrepareOptions { max_bytes: 40, ..opts(300) };
    let info = prepare_quietly(&[jsonl], &tmp.path().join("ds2"), &budget).unwrap();
    assert_eq!((info.n_documents, info.budget_reached), (2, true));
}

/// The one test that uses the machine's Python: skipped, with the reason printed, without it.
#[test]
fn prepares_the_python_stdlib_in_seconds() {
    let stdlib = match corpus::find_python_stdlib() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("skipping prepares_the_python_stdlib_in_seconds: {e}");
            return;
        }
    };
    let files = corpus::collect_files(&stdlib, 2_000_000).unwrap();
    assert!(files.len() > 5 && files.windows(2).all(|w| w[0] != w[1]));
    assert!(
        !files.iter().any(|f| { f.components().any(|c| c.as_os_str() == "test" || c.as_os_str() == "__pycache__") })
    );

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("stdlib");
    let started = Instant::now();
    let opts = PrepareOptions { vocab_size: 1024, max_bytes: 2_000_000, ..PrepareOptions::default() };
    let info = prepare_quietly(&[stdlib], &out, &opts).unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "python stdlib: {} files, {} tokens, vocab {}, {secs:.2} s",
        info.sources.len(),
        info.n_tokens,
        info.vocab_size
    );
    assert!(secs < 60.0, "took {secs:.1} s");
    assert_eq!(info.vocab_size, 1024);
    let bytes_used: u64 = info.sources.iter().map(|s| s.bytes_used).sum();
    assert!(bytes_used <= 2_000_000 && bytes_used > 1_000_000, "{bytes_used}");
    assert!(info.n_tokens < bytes_used / 2, "BPE should compress code: {} tokens", info.n_tokens);

    let ds = Dataset::open_verified(&out).unwrap();
    let tokenizer = ds.load_tokenizer().unwrap();
    let end = info.doc_starts[1] - 1;
    let source = info.sources.iter().find(|s| s.documents > 0).unwrap();
    let first = std::fs::read_to_string(&source.path).unwrap();
    assert_eq!(tokenizer.decode(&ds.tokens(0..end), false).unwrap(), first.trim_start_matches('\u{feff}'));
    let mut order = ds.sample_order(256, 0).unwrap();
    let rows = batch_rows(&mut order, 3, 8, 0, 8);
    assert!(rows.iter().all(|&w| ds.window(w, 256).len() == 257));
}
