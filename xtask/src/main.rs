//! Developer tasks that are not part of the product.
//!
//! `cargo run -p xtask -- descriptors [--check]` derives `crates/api/descriptors/envoy.bin` from the
//! descriptor set that the pinned `envoy-types` crate ships (it is not a public API of that crate,
//! so we keep our own stripped copy and check it against the crate whenever the pin moves).

use prost::Message;
use prost_reflect::prost_types::FileDescriptorSet;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("descriptors") => descriptors(args.iter().any(|a| a == "--check")),
        _ => {
            eprintln!("usage: cargo run -p xtask -- descriptors [--check]");
            exit(2);
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Finds the envoy-types source directory cargo resolved for this workspace.
fn envoy_types_dir() -> PathBuf {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1"])
        .current_dir(workspace_root())
        .output()
        .expect("run cargo metadata");
    let text = String::from_utf8(out.stdout).expect("utf-8 metadata");
    let needle = "envoy-types-0.7.7";
    let at = text
        .find(&format!("{needle}/Cargo.toml"))
        .or_else(|| text.find(&format!("{needle}\\\\Cargo.toml")))
        .expect("envoy-types 0.7.7 in cargo metadata (was the pin moved? update xtask too)");
    let start = text[..at].rfind('"').unwrap() + 1;
    PathBuf::from(&text[start..at + needle.len()])
}

/// The full set carries source comments we never read; dropping them keeps the binary small.
pub fn stripped(full: &[u8]) -> Vec<u8> {
    let mut set = FileDescriptorSet::decode(full).expect("decode envoy-types descriptor set");
    for file in &mut set.file {
        file.source_code_info = None;
    }
    set.file.sort_by(|a, b| a.name.cmp(&b.name));
    set.encode_to_vec()
}

fn descriptors(check: bool) {
    let src = envoy_types_dir().join("src/generated/types.bin");
    let full = std::fs::read(&src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
    let derived = stripped(&full);
    let dst = workspace_root().join("crates/api/descriptors/envoy.bin");
    if check {
        let committed = std::fs::read(&dst).unwrap_or_default();
        if committed != derived {
            eprintln!(
                "{} is stale: run `cargo run -p xtask -- descriptors`",
                dst.display()
            );
            exit(1);
        }
        println!("{} is current ({} bytes)", dst.display(), derived.len());
    } else {
        std::fs::write(&dst, &derived).unwrap();
        println!("wrote {} ({} bytes)", dst.display(), derived.len());
    }
}
