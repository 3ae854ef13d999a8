//! Helpers of the tests that start `cairn-scheduler` and `cairn-worker` processes:
//! process handles killed on drop, ready files, and reading operations.

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use cairn_proto::longrunning::Operation;
use cairn_proto::reapi::{ExecuteOperationMetadata, ExecuteResponse};
use prost::Message;

/// A process we started; killed on drop.
pub struct Proc {
    pub child: Option<Child>,
}

impl Proc {
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then the exit status (within 60 s).
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within 60 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (at most 60 s) for `process` to write `path`, and returns its text.
pub fn wait_for_file(path: &Path, process: &mut Proc) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        if let Some(child) = process.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("process exited before it was ready: {status}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} not written within 60 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn response_of(operation: &Operation) -> ExecuteResponse {
    match &operation.result {
        Some(cairn_proto::longrunning::operation::Result::Response(any)) => {
            ExecuteResponse::decode(any.value.as_slice()).expect("ExecuteResponse")
        }
        other => panic!("operation has no response: {other:?}"),
    }
}

/// The ExecutionStage of an operation, from its metadata.
pub fn stage_of(operation: &Operation) -> i32 {
    let metadata = operation.metadata.as_ref().expect("metadata");
    ExecuteOperationMetadata::decode(metadata.value.as_slice())
        .expect("metadata")
        .stage
}
