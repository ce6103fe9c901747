//! The README's table of bad inputs names, for each row, the tests that prove it: every name
//! must exist as a test function somewhere in the repository (a renamed or deleted test makes
//! its row a claim without proof, and this test fails naming it).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() && name != "target" && !name.starts_with('.') {
            rust_files(&p, out);
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// True if `pattern` (a test name, `*` matching any run of characters) names a function in
/// `sources`.
fn defined(pattern: &str, sources: &[String]) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    sources.iter().any(|src| {
        src.match_indices("fn ").any(|(i, _)| {
            let rest = &src[i + 3..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            let mut at = 0;
            parts.iter().enumerate().all(|(k, p)| {
                let found = if k == 0 {
                    name.starts_with(p).then_some(0)
                } else {
                    name[at..].find(p).map(|j| at + j)
                };
                match found {
                    Some(j) => {
                        at = j + p.len();
                        true
                    }
                    None => false,
                }
            }) && (parts.len() > 1 || name == pattern)
                && (parts.last().is_none_or(|l| l.is_empty() || name.ends_with(l)))
        })
    })
}

#[test]
fn every_test_the_bad_input_table_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let table = readme.split("## Bad inputs and their errors").nth(1).expect("the bad-input section");
    let mut files = Vec::new();
    for d in ["crates", "qemu", "fuzz"] {
        rust_files(&root.join(d), &mut files);
    }
    let sources: Vec<String> = files.iter().filter_map(|f| std::fs::read_to_string(f).ok()).collect();
    let (mut checked, mut missing) = (0, Vec::new());
    for row in
        table.lines().take_while(|l| l.starts_with('|') || l.trim().is_empty()).filter(|l| l.starts_with('|'))
    {
        let cells: Vec<&str> = row.split('|').collect();
        let Some(tests) = cells.get(3) else { continue };
        for name in tests.split('`').skip(1).step_by(2).filter(|n| n.contains("::")) {
            let last = name.rsplit("::").next().unwrap_or(name);
            checked += 1;
            if !defined(last, &sources) {
                missing.push(name.to_string());
            }
        }
    }
    assert!(checked >= 50, "only {checked} test names found: is the table still there?");
    assert!(missing.is_empty(), "README bad-input rows name tests that do not exist: {missing:?}");
}
