//! Developer tasks that are not part of the product.
//!
//! `cargo run -p xtask -- descriptors [--check]` derives `crates/api/descriptors/envoy.bin` from the
//! descriptor set that the pinned `envoy-types` crate ships (it is not a public API of that crate,
//! so we keep our own stripped copy and check it against the crate whenever the pin moves).

use prost::Message;
use prost_reflect::prost_types::FileDescriptorSet;
use prost_reflect::{DescriptorPool, DynamicMessage, Value};
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
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
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
/// Decoded reflectively so that option extensions (`validate.rules`, which pilotfish checks
/// configuration against) survive: prost's own `FieldOptions` would drop them as unknown fields.
pub fn stripped(full: &[u8]) -> Vec<u8> {
    let desc = DescriptorPool::global()
        .get_message_by_name("google.protobuf.FileDescriptorSet")
        .expect("descriptor.proto in the global pool");
    let mut set = DynamicMessage::decode(desc, full).expect("decode envoy-types descriptor set");
    let Some(Value::List(files)) = set.get_field_by_name_mut("file") else {
        panic!("FileDescriptorSet.file")
    };
    for file in files.iter_mut() {
        if let Value::Message(f) = file {
            f.clear_field_by_name("source_code_info");
        }
    }
    files.sort_by_key(|f| {
        f.as_message()
            .and_then(|m| m.get_field_by_name("name"))
            .and_then(|n| n.as_str().map(str::to_string))
    });
    // Sanity: the result is still a valid set for prost.
    let bytes = set.encode_to_vec();
    FileDescriptorSet::decode(bytes.as_slice()).expect("stripped set decodes");
    bytes
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
