//! Text that is already on the machine, found at run time: nothing is downloaded or committed.
//!
//! The Python standard library is the built-in corpus: a few tens of megabytes of real code and
//! prose that almost every Linux machine has.

use super::DataError;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long `python3` may take to print its standard library path.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(10);
/// Directory levels below a root that [`collect_files`] descends.
pub const MAX_DEPTH: usize = 64;
/// File name extensions [`collect_files`] picks up in directories (`jsonl`/`ndjson`: one JSON
/// object per line; the rest: one document per file). Plain `.json` is left out on purpose: in a
/// directory it is almost always configuration, not text; pass such a file by name if it is JSONL.
pub const TEXT_EXTENSIONS: &[&str] = &["py", "txt", "md", "rst", "jsonl", "ndjson"];

/// Finds the Python standard library directory: asks `python3` first, then looks for
/// `/usr/lib/python3.*/` and `/usr/local/lib/python3.*/` holding an `os.py`.
pub fn find_python_stdlib() -> Result<PathBuf, DataError> {
    let mut tried = Vec::new();
    match ask_python() {
        Ok(dir) if dir.join("os.py").is_file() => return Ok(dir),
        Ok(dir) => tried.push(format!("python3 printed {}, which has no os.py", dir.display())),
        Err(why) => tried.push(format!("python3 ({why})")),
    }
    for base in ["/usr/lib", "/usr/local/lib"] {
        match newest_stdlib_in(Path::new(base)) {
            Some(dir) => return Ok(dir),
            None => tried.push(format!("{base}/python3.*/os.py (none)")),
        }
    }
    Err(DataError::NoPythonStdlib { tried: tried.join("; ") })
}

fn ask_python() -> Result<PathBuf, String> {
    let mut child = Command::new("python3")
        .args(["-c", "import sysconfig;print(sysconfig.get_paths()[\"stdlib\"])"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("could not run: {e}"))?;
    let deadline = Instant::now() + PYTHON_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("gave no answer within {} s", PYTHON_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(format!("could not wait for it: {e}")),
        }
    }
    let out = child.wait_with_output().map_err(|e| format!("could not read its output: {e}"))?;
    if !out.status.success() {
        return Err(format!("exited with {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.trim();
    if line.is_empty() {
        return Err("printed nothing".to_owned());
    }
    Ok(PathBuf::from(line))
}

/// The `python3.N` directory under `base` with the highest N that holds an `os.py`.
fn newest_stdlib_in(base: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(base).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let minor: u32 = name.strip_prefix("python3.")?.parse().ok()?;
            let dir = e.path();
            dir.join("os.py").is_file().then_some((minor, dir))
        })
        .max_by_key(|(minor, _)| *minor)
        .map(|(_, dir)| dir)
}

/// Whether a directory below a root is left out: tests, installed packages, caches, hidden ones.
fn skip_dir(name: &str) -> bool {
    name.starts_with('.')
        || matches!(
            name,
            "test" | "tests" | "testing" | "__pycache__" | "site-packages" | "dist-packages" | "node_modules"
        )
        || name.ends_with("_test")
        || name.ends_with("_tests")
}

/// Whether `path` is JSONL by its extension.
pub(crate) fn is_jsonl(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("jsonl" | "ndjson"))
}

fn has_text_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| TEXT_EXTENSIONS.contains(&e))
}

/// Lists the text files under `root` (or `root` itself if it is a file, whatever its extension)
/// in a fixed order: depth first, entries of each directory sorted by name. Skips hidden
/// entries, test directories, `site-packages` and `__pycache__`, and directories deeper than
/// [`MAX_DEPTH`]. Stops once the listed files add up to `max_bytes` or more (the last file may
/// cross the budget; [`super::prepare`] reads only up to it).
pub fn collect_files(root: &Path, max_bytes: u64) -> Result<Vec<PathBuf>, DataError> {
    let meta = std::fs::metadata(root).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::InputMissing { path: root.to_path_buf() },
        _ => DataError::io("reading", root)(e),
    })?;
    if meta.is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut total = 0u64;
    walk(root, 0, max_bytes, &mut total, &mut files)?;
    Ok(files)
}

/// Returns `false` once the budget is spent, to stop the walk.
fn walk(
    dir: &Path,
    depth: usize,
    max_bytes: u64,
    total: &mut u64,
    files: &mut Vec<PathBuf>,
) -> Result<bool, DataError> {
    if depth > MAX_DEPTH {
        tracing::warn!(dir = %dir.display(), "deeper than {MAX_DEPTH} levels, not read");
        return Ok(true);
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(DataError::io("listing", dir))?
        .collect::<Result<_, _>>()
        .map_err(DataError::io("listing", dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        let file_type = entry.file_type().map_err(DataError::io("reading", &path))?;
        if file_type.is_dir() {
            // Symbolic links to directories are not followed: no cycles, no escaping the root.
            if !skip_dir(&name) && !walk(&path, depth + 1, max_bytes, total, files)? {
                return Ok(false);
            }
            continue;
        }
        if name.starts_with('.') || !has_text_extension(&path) {
            continue;
        }
        // Follows a symbolic link to a file; a dangling link is skipped.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        files.push(path);
        *total += meta.len();
        if *total >= max_bytes {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, bytes: usize) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "x".repeat(bytes)).unwrap();
    }

    #[test]
    fn collects_sorted_text_files_and_skips_tests_and_caches() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for f in ["b.py", "a.txt", "z/c.md", "z/d.rst", "e.jsonl", "f.json", "g.so", ".hidden.py"] {
            touch(&r.join(f), 10);
        }
        for f in [
            "test/t.py",
            "pkg/tests/t.py",
            "idlelib/idle_test/t.py",
            "__pycache__/x.py",
            "site-packages/s.py",
            ".git/h.txt",
        ] {
            touch(&r.join(f), 10);
        }
        touch(&r.join("pkg/mod.py"), 10);
        let got: Vec<_> =
            collect_files(r, u64::MAX).unwrap().into_iter().map(|p| p.strip_prefix(r).unwrap().to_path_buf()).collect();
        let want: Vec<PathBuf> =
            ["a.txt", "b.py", "e.jsonl", "pkg/mod.py", "z/c.md", "z/d.rst"].iter().map(PathBuf::from).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn stops_at_the_byte_budget_and_accepts_a_single_file() {
        let root = tempfile::tempdir().unwrap();
        for f in ["a.txt", "b.txt", "c.txt"] {
            touch(&root.path().join(f), 100);
        }
        assert_eq!(collect_files(root.path(), 150).unwrap().len(), 2);
        assert_eq!(collect_files(root.path(), 100).unwrap().len(), 1);
        let odd = root.path().join("notes.weird");
        touch(&odd, 5);
        assert_eq!(collect_files(&odd, 1).unwrap(), vec![odd]);
        let missing = collect_files(&root.path().join("nope"), 1).unwrap_err().to_string();
        assert!(missing.contains("nope") && missing.contains("--input"), "{missing}");
    }
}
