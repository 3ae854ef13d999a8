// The cache node's request parsers, compiled straight from the node's sources so that
// the fuzz targets need neither the node's runtime nor its S3 client. Each file only
// refers to the modules declared here. Included at a target's crate root.

#[path = "../../src/digests.rs"]
#[allow(dead_code)]
mod digests;
#[path = "../../common/src/error.rs"]
#[allow(dead_code)]
mod error;
#[path = "../../src/http_path.rs"]
#[allow(dead_code)]
mod http_path;
#[path = "../../src/resource_name.rs"]
#[allow(dead_code)]
mod resource_name;
