//! Rust types and tonic services for the protocols cairn speaks, generated at build
//! time from the unmodified upstream `.proto` files beside this crate, plus cairn's own
//! scheduler–worker protocol (`cairn/worker/v1`).
//!
//! The module tree mirrors the protobuf packages, because the generated code refers to
//! its neighbours by relative paths (`super::super::...`). Blob fields are
//! `bytes::Bytes`, so a chunk read from disk or off the wire is handed on without a
//! copy. Servers are generated without tonic's transport: the cache node mounts them
//! on its own listener. The `client` feature adds tonic's transport so clients can
//! `connect` a `Channel`.

#![allow(clippy::all, missing_docs, rustdoc::all)]

pub mod build {
    pub mod bazel {
        pub mod semver {
            tonic::include_proto!("build.bazel.semver");
        }
        pub mod remote {
            pub mod asset {
                pub mod v1 {
                    tonic::include_proto!("build.bazel.remote.asset.v1");
                }
            }
            pub mod execution {
                pub mod v2 {
                    tonic::include_proto!("build.bazel.remote.execution.v2");
                }
            }
        }
    }
}

pub mod cairn {
    pub mod worker {
        pub mod v1 {
            tonic::include_proto!("cairn.worker.v1");
        }
    }
}

pub mod google {
    pub mod api {
        tonic::include_proto!("google.api");
    }
    pub mod bytestream {
        tonic::include_proto!("google.bytestream");
    }
    pub mod longrunning {
        tonic::include_proto!("google.longrunning");
    }
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// The Remote Asset API (Fetch and Push), served beside REAPI by the cache node.
pub use build::bazel::remote::asset::v1 as asset;
/// REAPI v2, the package every service of the cache node is defined in.
pub use build::bazel::remote::execution::v2 as reapi;
pub use cairn::worker::v1 as worker;
pub use google::bytestream;
pub use google::longrunning;
pub use google::rpc;
