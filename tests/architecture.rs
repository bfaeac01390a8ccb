//! ARCHITECTURE.md cannot drift from the crate graph, and files stay small enough to read.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn workspace_members() -> Vec<String> {
    let toml = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let line = toml.lines().find(|l| l.trim_start().starts_with("members")).expect("workspace members");
    line.split('"').skip(1).step_by(2).map(str::to_string).collect()
}

#[test]
fn every_crate_has_a_section_in_architecture_md() {
    let arch = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let members = workspace_members();
    assert!(members.len() >= 5, "{members:?}");
    for m in members {
        assert!(arch.contains(&format!("### `{m}/`")), "ARCHITECTURE.md has no `### `{m}/`` section");
        assert!(root().join(&m).join("Cargo.toml").is_file(), "{m} listed but missing");
        let lib = std::fs::read_to_string(root().join(&m).join("src/lib.rs")).unwrap();
        assert!(lib.to_lowercase().contains("invariant"), "{m}/src/lib.rs does not state its architecture invariant");
    }
    assert!(arch.contains("### root package `swarm`"));
}

fn deps_of(krate: &str) -> String {
    let toml = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).unwrap();
    let start = toml.find("[dependencies]").map_or(0, |i| i);
    let end = toml[start..].find("\n[dev-dependencies]").map_or(toml.len(), |i| start + i);
    toml[start..end].to_string()
}

#[test]
fn the_crate_graph_points_the_right_way() {
    let sharding = deps_of("sharding");
    for banned in ["swarm-proto", "tokio", "tonic", "candle", "swarm-kernels", "redb"] {
        assert!(!sharding.contains(banned), "sharding must stay pure but depends on {banned}");
    }
    let kernels = deps_of("kernels");
    for banned in ["swarm-", "tokio", "tonic"] {
        assert!(!kernels.contains(banned), "kernels depends on {banned}");
    }
    assert!(!deps_of("coordinator").contains("swarm-kernels"), "the coordinator never touches a tensor");
    assert!(!deps_of("coordinator").contains("candle"), "the coordinator never touches a tensor");
    assert!(!deps_of("coordinator").contains("swarm-worker"));
    assert!(!deps_of("worker").contains("swarm-coordinator"));
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if !p.ends_with("target") && !p.file_name().unwrap().to_string_lossy().starts_with('.') {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn source_files_stay_under_1000_lines() {
    let mut files = Vec::new();
    for d in workspace_members().iter().map(String::as_str).chain(["src", "tests"]) {
        rust_files(&root().join(d), &mut files);
    }
    assert!(files.len() > 20);
    for f in files {
        let n = std::fs::read_to_string(&f).unwrap().lines().count();
        assert!(n < 1000, "{} has {n} lines: split it by responsibility", f.display());
    }
}
