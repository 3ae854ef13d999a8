// The node's auth-file and credential-header parsers, compiled straight from the node's
// sources so that the fuzz targets need neither the node's runtime nor its S3 client.
// Each file only refers to the modules declared here. Included at a target's crate root.

#[path = "../../common/src/error.rs"]
#[allow(dead_code)]
mod error;
#[path = "../../common/src/auth/file.rs"]
#[allow(dead_code)]
mod auth_file;
#[path = "../../common/src/auth/credentials.rs"]
#[allow(dead_code)]
mod credentials;
