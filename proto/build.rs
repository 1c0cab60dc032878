//! Compiles `switchboard/v1/*.proto` with protox (pure Rust), so a build needs no
//! system `protoc`. Client protocol types also derive serde so that the JSON
//! subprotocol is generated from the same messages as the protobuf one.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "switchboard/v1/common.proto",
    "switchboard/v1/client.proto",
    "switchboard/v1/gateway.proto",
    "switchboard/v1/presence.proto",
    "switchboard/v1/routing.proto",
    "switchboard/v1/storage.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled for one checkout may run for another.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let fds = protox::compile(PROTOS, [&root])?;
    tonic_prost_build::configure()
        .message_attribute(
            ".switchboard.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .enum_attribute(
            ".switchboard.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"snake_case\")]",
        )
        .compile_fds(fds)?;
    flatten_oneofs()
}

/// Oneofs appear in JSON as one key named after the case, next to `id`:
/// `{"id": "1", "send": {...}}`. prost applies a field attribute to the oneof's
/// variants too (where `flatten` is not allowed), so it is added to the three oneof
/// fields of the frame types here instead.
fn flatten_oneofs() -> Result<(), Box<dyn std::error::Error>> {
    const FIELDS: &[&str] = &[
        "pub request: ::core::option::Option<client_frame::Request>,",
        "pub event: ::core::option::Option<server_frame::Event>,",
        "pub result: ::core::option::Option<ack::Result>,",
    ];
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("switchboard.v1.rs");
    let mut code = std::fs::read_to_string(&out)?;
    for field in FIELDS {
        if code.matches(field).count() != 1 {
            return Err(format!("expected exactly one generated field `{field}`").into());
        }
        code = code.replace(field, &format!("#[serde(flatten)]\n    {field}"));
    }
    std::fs::write(&out, code)?;
    Ok(())
}
