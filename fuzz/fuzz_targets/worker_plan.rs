// The worker's input-tree planner, compiled straight from the worker's sources so that
// the fuzz target needs neither the worker's runtime nor its gRPC client. Each file
// only refers to the modules declared here. Included at a target's crate root.

#[path = "../../exec/src/digests.rs"]
#[allow(dead_code)]
mod digests;
#[path = "../../common/src/error.rs"]
#[allow(dead_code)]
mod error;
#[path = "../../exec/src/worker/paths.rs"]
#[allow(dead_code)]
mod paths;
#[path = "../../exec/src/worker/plan.rs"]
#[allow(dead_code)]
mod plan;
