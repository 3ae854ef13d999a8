//! `cairn-worker`: runs actions the scheduler hands it.
//!
//! A worker keeps one session with the scheduler (the worker protocol of
//! `proto/cairn/worker/v1`): it registers its platform properties and how many tasks
//! it runs at once, sends keepalives, and for each task fetches the inputs from the
//! cache node, runs the command, uploads the outputs and reports the ExecuteResponse.
//! If the session breaks, running tasks keep running and the worker registers again,
//! with the next scheduler of its list when it has several, reporting them there.
//!
//! Draining (SIGTERM, or the scheduler's DrainWorker API) means: take nothing new,
//! finish what runs, report it, exit. A precondition script, if configured, must
//! succeed before the worker registers and before each task; when it fails the worker
//! drains its session and registers again once the script succeeds.
//!
//! Like the scheduler it is a tokio program that never starts glommio or the storage
//! engine. The modules: [`config`], [`paths`] (keeping actions inside their
//! directory), [`file_cache`], [`inputs`] (fetching and materializing input trees),
//! [`plan`] (checking them in between), [`outputs`], [`runner`] (one task) and
//! [`session`] (the connection to the scheduler).

pub mod config;
pub mod file_cache;
pub mod inputs;
pub mod outputs;
pub mod paths;
pub mod plan;
pub mod runner;
pub mod session;
