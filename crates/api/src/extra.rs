//! Extension types found in real Istio sidecar configuration that Envoy's API does not define,
//! plus pilotfish's own wrapper for configuration it keeps opaque.
//!
//! Each type exists twice on purpose: as a prost struct (what the data plane reads) and as a
//! descriptor (what the JSON/YAML reader needs). The descriptors are built here from the same
//! field numbers instead of running protoc, so building pilotfish needs no protobuf compiler; a
//! unit test in the crate root checks the two agree.

use prost_reflect::prost_types::{
    field_descriptor_proto::{Label, Type},
    DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
    FileDescriptorProto,
};

/// Type URL of [`OpaqueAny`](file_descriptors): an `Any` whose schema pilotfish does not know,
/// kept as its JSON so it can be reported and written back unchanged.
pub const OPAQUE_ANY_TYPE: &str = "type.googleapis.com/pilotfish.config.v1.OpaqueAny";

/// `udpa.type.v1.TypedStruct` and `xds.type.v3.TypedStruct` (identical wire shape).
pub mod typed_struct {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypedStruct {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<envoy_types::pb::google::protobuf::Struct>,
    }
}

pub mod istio {
    /// `istio.envoy.config.filter.http.alpn.v2alpha1`: Istio's filter that sets the upstream ALPN
    /// (`istio-http/1.1`, ...) from the downstream protocol.
    pub mod alpn {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct FilterConfig {
            #[prost(message, repeated, tag = "1")]
            pub alpn_override: Vec<AlpnOverride>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct AlpnOverride {
            #[prost(enumeration = "Protocol", tag = "1")]
            pub upstream_protocol: i32,
            #[prost(string, repeated, tag = "2")]
            pub alpn_override: Vec<String>,
        }
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
        #[repr(i32)]
        pub enum Protocol {
            Http10 = 0,
            Http11 = 1,
            Http2 = 2,
        }
    }

    /// `envoy.tcp.metadataexchange.config`: Istio's TCP peer metadata exchange.
    pub mod metadata_exchange {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct MetadataExchange {
            #[prost(string, tag = "1")]
            pub protocol: String,
            #[prost(bool, tag = "2")]
            pub enable_discovery: bool,
        }

        impl prost::Name for MetadataExchange {
            const NAME: &'static str = "MetadataExchange";
            const PACKAGE: &'static str = "envoy.tcp.metadataexchange.config";
        }
    }
}

fn field(
    name: &str,
    number: i32,
    ty: Type,
    label: Label,
    type_name: Option<&str>,
) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(label as i32),
        r#type: Some(ty as i32),
        type_name: type_name.map(Into::into),
        json_name: Some(json_name(name)),
        ..Default::default()
    }
}

fn json_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn message(name: &str, fields: Vec<FieldDescriptorProto>) -> DescriptorProto {
    DescriptorProto {
        name: Some(name.into()),
        field: fields,
        ..Default::default()
    }
}

fn file(
    name: &str,
    package: &str,
    deps: &[&str],
    messages: Vec<DescriptorProto>,
) -> FileDescriptorProto {
    FileDescriptorProto {
        name: Some(name.into()),
        package: Some(package.into()),
        dependency: deps.iter().map(|d| d.to_string()).collect(),
        message_type: messages,
        syntax: Some("proto3".into()),
        ..Default::default()
    }
}

fn typed_struct_message() -> DescriptorProto {
    message(
        "TypedStruct",
        vec![
            field("type_url", 1, Type::String, Label::Optional, None),
            field(
                "value",
                2,
                Type::Message,
                Label::Optional,
                Some(".google.protobuf.Struct"),
            ),
        ],
    )
}

pub(crate) fn file_descriptors() -> Vec<FileDescriptorProto> {
    let s = "google/protobuf/struct.proto";
    let mut alpn_override = message(
        "AlpnOverride",
        vec![
            field(
                "upstream_protocol",
                1,
                Type::Enum,
                Label::Optional,
                Some(".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.Protocol"),
            ),
            field("alpn_override", 2, Type::String, Label::Repeated, None),
        ],
    );
    alpn_override.name = Some("AlpnOverride".into());
    let mut alpn = message(
        "FilterConfig",
        vec![field(
            "alpn_override",
            1,
            Type::Message,
            Label::Repeated,
            Some(".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.AlpnOverride"),
        )],
    );
    alpn.nested_type.push(alpn_override);
    alpn.enum_type.push(EnumDescriptorProto {
        name: Some("Protocol".into()),
        value: ["HTTP10", "HTTP11", "HTTP2"]
            .iter()
            .zip(0..)
            .map(|(n, i)| EnumValueDescriptorProto {
                name: Some(n.to_string()),
                number: Some(i),
                options: None,
            })
            .collect(),
        ..Default::default()
    });
    vec![
        file(
            "udpa/type/v1/typed_struct.proto",
            "udpa.type.v1",
            &[s],
            vec![typed_struct_message()],
        ),
        file(
            "xds/type/v3/typed_struct.proto",
            "xds.type.v3",
            &[s],
            vec![typed_struct_message()],
        ),
        file(
            "istio/envoy/config/filter/http/alpn/v2alpha1/config.proto",
            "istio.envoy.config.filter.http.alpn.v2alpha1",
            &[],
            vec![alpn],
        ),
        file(
            "envoy/tcp/metadataexchange/config/metadata_exchange.proto",
            "envoy.tcp.metadataexchange.config",
            &[],
            vec![message(
                "MetadataExchange",
                vec![
                    field("protocol", 1, Type::String, Label::Optional, None),
                    field("enable_discovery", 2, Type::Bool, Label::Optional, None),
                ],
            )],
        ),
        file(
            "pilotfish/config/v1/opaque_any.proto",
            "pilotfish.config.v1",
            &[s],
            vec![message(
                "OpaqueAny",
                vec![
                    field("type_url", 1, Type::String, Label::Optional, None),
                    field(
                        "json",
                        2,
                        Type::Message,
                        Label::Optional,
                        Some(".google.protobuf.Value"),
                    ),
                ],
            )],
        ),
    ]
}
