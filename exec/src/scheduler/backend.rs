//! Where the scheduler's state lives: in this process ([`Scheduler`], the single-node
//! default) or in Redis, shared with other schedulers ([`RedisScheduler`], `--redis`).
//!
//! The gRPC services and the HTTP listener go through [`Backend`], which offers the
//! same operations over both; the in-memory calls never wait, the Redis ones do.

use std::sync::Arc;

use cairn_proto::reapi::{Digest, ExecuteRequest};
use cairn_proto::worker::worker_message::Message as FromWorker;
use cairn_proto::worker::{Register, WorkerInfo};

use super::redis_state::RedisScheduler;
use super::state::snapshot::Snapshot;
use super::state::{Progress, Scheduler, Watch, WorkerOutbox};
use crate::error::Result;

/// The scheduler's state, wherever it lives.
#[derive(Clone)]
pub enum Backend {
    /// In this process.
    Memory(Arc<Scheduler>),
    /// In Redis.
    Redis(Arc<RedisScheduler>),
}

impl From<Arc<Scheduler>> for Backend {
    fn from(scheduler: Arc<Scheduler>) -> Self {
        Backend::Memory(scheduler)
    }
}

impl From<Arc<RedisScheduler>> for Backend {
    fn from(scheduler: Arc<RedisScheduler>) -> Self {
        Backend::Redis(scheduler)
    }
}

impl Backend {
    /// See [`Scheduler::execute`].
    pub async fn execute(&self, request: ExecuteRequest) -> Result<Watch> {
        match self {
            Backend::Memory(state) => state.execute(request).await,
            Backend::Redis(state) => state.execute(request).await,
        }
    }

    /// See [`Scheduler::watch`].
    pub async fn watch(&self, name: &str) -> Result<Watch> {
        match self {
            Backend::Memory(state) => state.watch(name),
            Backend::Redis(state) => state.watch(name).await,
        }
    }

    /// See [`Scheduler::list`].
    pub async fn list(&self) -> Result<Vec<(String, Digest, Progress)>> {
        match self {
            Backend::Memory(state) => Ok(state.list()),
            Backend::Redis(state) => state.list().await,
        }
    }

    /// See [`Scheduler::cancel`].
    pub async fn cancel(&self, name: &str) -> Result<()> {
        match self {
            Backend::Memory(state) => state.cancel(name),
            Backend::Redis(state) => state.cancel(name).await,
        }
    }

    /// See [`Scheduler::delete`].
    pub async fn delete(&self, name: &str) -> Result<()> {
        match self {
            Backend::Memory(state) => state.delete(name),
            Backend::Redis(state) => state.delete(name).await,
        }
    }

    /// See [`Scheduler::register`].
    pub async fn register(&self, register: Register) -> Result<(u64, WorkerOutbox)> {
        match self {
            Backend::Memory(state) => state.register(register),
            Backend::Redis(state) => state.register(register).await,
        }
    }

    /// See [`Scheduler::worker_message`].
    pub async fn worker_message(&self, worker_id: &str, session: u64, message: FromWorker) {
        match self {
            Backend::Memory(state) => state.worker_message(worker_id, session, message),
            Backend::Redis(state) => state.worker_message(worker_id, session, message).await,
        }
    }

    /// See [`Scheduler::worker_gone`].
    pub async fn worker_gone(&self, worker_id: &str, session: u64, cause: &str) {
        match self {
            Backend::Memory(state) => state.worker_gone(worker_id, session, cause),
            Backend::Redis(state) => state.worker_gone(worker_id, session, cause).await,
        }
    }

    /// See [`Scheduler::drain`].
    pub async fn drain(&self, worker_id: &str) -> Result<()> {
        match self {
            Backend::Memory(state) => state.drain(worker_id),
            Backend::Redis(state) => state.drain(worker_id).await,
        }
    }

    /// See [`Scheduler::list_workers`]; with Redis, the workers of every scheduler.
    pub async fn list_workers(&self) -> Result<Vec<WorkerInfo>> {
        match self {
            Backend::Memory(state) => Ok(state.list_workers()),
            Backend::Redis(state) => state.list_workers().await,
        }
    }

    /// See [`Scheduler::tick`].
    pub async fn tick(&self) {
        match self {
            Backend::Memory(state) => state.tick(),
            Backend::Redis(state) => state.tick().await,
        }
    }

    /// See [`Scheduler::snapshot`].
    pub fn snapshot(&self) -> Snapshot {
        match self {
            Backend::Memory(state) => state.snapshot(),
            Backend::Redis(state) => state.snapshot(),
        }
    }

    /// Why the scheduler cannot work right now (Redis unreachable), if it cannot.
    pub fn health(&self) -> std::result::Result<(), String> {
        match self {
            Backend::Memory(_) => Ok(()),
            Backend::Redis(state) => state.health(),
        }
    }
}
