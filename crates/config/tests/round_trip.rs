//! dump -> load -> dump -> load gives the same resources, for every corpus file.

use pilotfish_config::output::{config_dump_json, to_json};
use pilotfish_config::{load_file, load_str, ResourceSet};
use serde_json::Value;
use std::path::Path;

fn corpus() -> Option<Vec<std::path::PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus");
    if !dir.is_dir() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "../shared/corpus is missing, and CI=true requires it"
        );
        eprintln!("SKIP round trip: ../shared/corpus is not beside this checkout");
        return None;
    }
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    Some(files)
}

/// Resources compared by what they are, not by where in which document they sat, nor by the
/// bytes inside their Anys (protobuf encodings of maps are not canonical): each resource as
/// name, origin and its JSON.
fn canonical(set: &ResourceSet) -> Vec<(String, String, Value)> {
    use pilotfish_config::resources::Resource;
    fn each<T: prost::Message + prost::Name>(
        kind: &str,
        rs: &[Resource<T>],
        out: &mut Vec<(String, String, Value)>,
    ) {
        for r in rs {
            out.push((
                format!("{kind} {}", r.name),
                format!("{:?} {:?}", r.origin, r.last_updated),
                to_json(&r.value),
            ));
        }
    }
    let mut out = vec![("bootstrap".into(), String::new(), to_json(&set.bootstrap))];
    each("listener", &set.listeners, &mut out);
    each("cluster", &set.clusters, &mut out);
    each("route_config", &set.route_configs, &mut out);
    each("endpoints", &set.endpoints, &mut out);
    each("secret", &set.secrets, &mut out);
    out
}

#[test]
fn config_dump_round_trips_for_every_corpus_file() {
    let Some(files) = corpus() else { return };
    for file in files {
        let first = load_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let dump1 = config_dump_json(&first.resources, true);
        let second = load_str("dump1.json", &dump1, None)
            .unwrap_or_else(|e| panic!("reloading the dump of {}: {e}", file.display()));
        let dump2 = config_dump_json(&second.resources, true);
        let third = load_str("dump2.json", &dump2, None).unwrap();
        let (a, b, c) = (
            canonical(&first.resources),
            canonical(&second.resources),
            canonical(&third.resources),
        );
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!(
                x == y,
                "{}: {} changed after one round trip",
                file.display(),
                x.0
            );
        }
        assert!(
            b == c,
            "{}: resources changed after two round trips",
            file.display()
        );
        assert_eq!(dump1, dump2, "{}: the dump is not stable", file.display());
        assert!(!first.resources.listeners.is_empty() && !first.resources.clusters.is_empty());
    }
}

#[test]
fn whole_doubles_print_as_envoy_prints_them() {
    let Some(files) = corpus() else { return };
    let cfg = load_file(&files[0]).unwrap();
    let dump = config_dump_json(&cfg.resources, true);
    // The seed's node metadata has ENVOY_STATUS_PORT: 15021 (a Struct number, so a double).
    if std::fs::read_to_string(&files[0])
        .unwrap()
        .contains("ENVOY_STATUS_PORT: 15021")
    {
        assert!(
            dump.contains("\"ENVOY_STATUS_PORT\": 15021,"),
            "15021 must not print as 15021.0"
        );
    }
    assert!(!dump.contains(".0,\n") || !dump.contains("\"ENVOY_STATUS_PORT\": 15021.0"));
}
