//! Compiles the upstream `.proto` files with protox, a protobuf compiler written in
//! Rust, so building needs nothing but cargo: no system `protoc`. The well-known types
//! (`google/protobuf/*`) come from protox's built-in copies and map to `prost-types`.
//! `cairn/` holds the one protocol of cairn's own, between scheduler and workers.

use std::path::Path;

const PROTOS: &[&str] = &[
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "build/bazel/remote/asset/v1/remote_asset.proto",
    "google/bytestream/bytestream.proto",
    "google/longrunning/operations.proto",
    "google/rpc/status.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
    "cairn/worker/v1/worker.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for tree in ["build", "cairn", "google"] {
        println!("cargo:rerun-if-changed={}", root.join(tree).display());
    }
    let descriptors = protox::compile(PROTOS, [root])?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
