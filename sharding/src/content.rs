//! What a job reads that lives on the submitter's machine: the dataset and, for fine-tuning,
//! the starting model. Each is a [`Bundle`], a flat directory listed file by file with its
//! SHA-256, so that workers fetch it over the network, verify every file on arrival, and keep
//! it in their own state directory under the bundle's content hash.

use serde::{Deserialize, Serialize};

/// Files one bundle may list (a sharded 70B model has about 30; a dataset 3).
pub const MAX_BUNDLE_FILES: usize = 4096;
/// The longest file name in a bundle.
pub const MAX_NAME_BYTES: usize = 200;

/// One file of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContentFile {
    /// A plain file name: no directory, not hidden (see [`valid_file_name`]).
    pub name: String,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
    pub bytes: u64,
}

/// A directory of files, named by their content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Sorted by name, each name once.
    pub files: Vec<ContentFile>,
}

/// What a job's workers fetch before they train, and from where.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    /// The prepared dataset (`tokens.bin`, `index.json`, `tokenizer.json`).
    pub dataset: Bundle,
    /// The Hugging Face model directory to start from (`model.hf_dir`), if any.
    pub model: Option<Bundle>,
    /// host:port of data planes that serve these bundles: the submitter's, then the job's
    /// other workers (which serve what they already hold).
    pub sources: Vec<String>,
}

/// A name safe to join onto a directory on any host: 1 to [`MAX_NAME_BYTES`] bytes of ASCII
/// letters, digits, `-`, `_` and `.`, not starting with `.` (so never `..`, never hidden).
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// 64 lowercase hex digits.
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Bundle {
    /// Checks what came over the wire before anything is sized or named by it.
    pub fn validate(&self, what: &str) -> Result<(), String> {
        if self.files.is_empty() {
            return Err(format!("{what}: the bundle lists no files"));
        }
        if self.files.len() > MAX_BUNDLE_FILES {
            return Err(format!(
                "{what}: {} files, more than the {MAX_BUNDLE_FILES} a bundle may list",
                self.files.len()
            ));
        }
        for (i, f) in self.files.iter().enumerate() {
            if !valid_file_name(&f.name) {
                return Err(format!("{what}: {:?} is not a plain file name", f.name));
            }
            if !valid_sha256(&f.sha256) {
                return Err(format!("{what}: {}: {:?} is not a sha256", f.name, f.sha256));
            }
            if i > 0 && self.files[i - 1].name >= f.name {
                return Err(format!("{what}: files are not sorted by name, each once ({})", f.name));
            }
        }
        Ok(())
    }

    /// Total bytes of the bundle's files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).fold(0u64, u64::saturating_add)
    }

    /// The file named `name`.
    pub fn file(&self, name: &str) -> Option<&ContentFile> {
        self.files.iter().find(|f| f.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> ContentFile {
        ContentFile { name: name.into(), sha256: "ab".repeat(32), bytes: 1 }
    }

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "/etc", "é", &"x".repeat(201)] {
            assert!(!valid_file_name(bad), "{bad:?}");
        }
        for good in ["tokens.bin", "model-00001-of-00030.safetensors", "config.json"] {
            assert!(valid_file_name(good), "{good:?}");
        }
    }

    #[test]
    fn bundles_are_checked_before_use() {
        let ok = Bundle { files: vec![file("a.json"), file("b.bin")] };
        ok.validate("data").unwrap();
        let unsorted = Bundle { files: vec![file("b.bin"), file("a.json")] };
        assert!(unsorted.validate("data").unwrap_err().contains("sorted"));
        let twice = Bundle { files: vec![file("a.json"), file("a.json")] };
        assert!(twice.validate("data").is_err());
        let mut bad_sha = ok.clone();
        bad_sha.files[0].sha256 = "AB".repeat(32);
        assert!(bad_sha.validate("data").unwrap_err().contains("not a sha256"));
        let mut escape = ok.clone();
        escape.files[0].name = "../x".into();
        assert!(escape.validate("data").unwrap_err().contains("plain file name"));
        assert!(Bundle::default().validate("data").is_err());
    }
}
