//! The Envoy v3 API as pilotfish sees it: the generated Envoy protobuf types (re-exported from the
//! pinned `envoy-types` crate, the same structs an xDS client decodes), the descriptor pool that
//! lets configuration in JSON or YAML be read into them, and the handful of extension types real
//! Istio sidecars carry that the Envoy API does not define.

mod extra;

pub use envoy_types::pb;
pub use extra::{istio, typed_struct, OPAQUE_ANY_TYPE};
pub use prost_reflect;

use prost_reflect::DescriptorPool;
use std::sync::Mutex;

/// `envoy-types` 0.7.7's descriptor set without source comments (see `xtask descriptors`).
const ENVOY_DESCRIPTORS: &[u8] = include_bytes!("../descriptors/envoy.bin");

/// The pool every configuration is read with: Envoy's API plus [`extra`]'s types. Built on first
/// use and kept until [`release_descriptor_pool`]; a clone shares the same pool.
pub fn descriptor_pool() -> DescriptorPool {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(|| {
            let mut pool = DescriptorPool::decode(ENVOY_DESCRIPTORS)
                .expect("embedded Envoy descriptors decode");
            for file in extra::file_descriptors() {
                pool.add_file_descriptor_proto(file)
                    .expect("pilotfish's own descriptors are consistent with Envoy's");
            }
            pool
        })
        .clone()
}

/// Lets the pool go once nothing else holds it. The decoded pool is several megabytes, more than
/// the rest of a sidecar's configuration: a proxy that has loaded its configuration needs it only
/// again for the rare admin request or configuration update, which build it anew.
pub fn release_descriptor_pool() {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).take();
}

static POOL: Mutex<Option<DescriptorPool>> = Mutex::new(None);

/// The message name inside a `type.googleapis.com/...` URL (anything up to the last `/`).
pub fn type_url_message_name(type_url: &str) -> &str {
    type_url.rsplit_once('/').map_or(type_url, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_knows_envoy_and_istio_types() {
        let pool = descriptor_pool();
        for name in [
            "envoy.admin.v3.ConfigDump",
            "envoy.config.bootstrap.v3.Bootstrap",
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "udpa.type.v1.TypedStruct",
            "xds.type.v3.TypedStruct",
            "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
            "envoy.tcp.metadataexchange.config.MetadataExchange",
            "pilotfish.config.v1.OpaqueAny",
        ] {
            assert!(pool.get_message_by_name(name).is_some(), "{name} missing");
        }
    }

    #[test]
    fn alpn_filter_config_round_trips_through_its_descriptor() {
        use prost::Message;
        let cfg = istio::alpn::FilterConfig {
            alpn_override: vec![istio::alpn::AlpnOverride {
                upstream_protocol: istio::alpn::Protocol::Http11 as i32,
                alpn_override: vec!["istio-http/1.1".into(), "istio".into()],
            }],
        };
        let desc = descriptor_pool()
            .get_message_by_name("istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig")
            .unwrap();
        let dynamic =
            prost_reflect::DynamicMessage::decode(desc, cfg.encode_to_vec().as_slice()).unwrap();
        let back: istio::alpn::FilterConfig = dynamic.transcode_to().unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn type_url_names() {
        assert_eq!(
            type_url_message_name("type.googleapis.com/envoy.config.listener.v3.Listener"),
            "envoy.config.listener.v3.Listener"
        );
        assert_eq!(type_url_message_name("foo.Bar"), "foo.Bar");
    }
}
