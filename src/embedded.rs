//! The scheduler and worker a single node starts for itself, so that one `cairn`
//! process (as far as its operator can tell) serves remote execution too.
//!
//! Rather than running them in-process, the node starts the real `cairn-scheduler` and
//! one `cairn-worker` as child processes: they are tokio programs with their own
//! signal handling, draining and crash behaviour, and keeping them out of the node's
//! glommio process means a command that goes wrong can take down the worker, never the
//! cache. The binaries are found next to the node's own executable.
//!
//! Both listen or connect on loopback only. The scheduler binds an ephemeral port and
//! writes it to `<data_dir>/scheduler.addr`, and its HTTP listener (metrics and
//! status, which the node's status page shows) likewise to `<data_dir>/scheduler.http`;
//! the worker registers with it, offering as
//! many concurrent tasks as the node has cores, works in `<data_dir>/worker` and writes
//! `<data_dir>/worker.ready` once registered. Both use the node's gRPC listener as
//! their cache, or behind TLS a loopback listener of their own
//! (`runtime/internal.rs`). The node waits for both ready files before it starts serving, so an
//! Execute that arrives as soon as the port accepts connections finds a worker.
//!
//! With `--auth` or TLS, both present a bearer token made for this process (see
//! [`crate::auth`]), written to `<data_dir>/embedded.token` for them to read; under
//! `--auth` it holds every permission, so the results the worker writes are the
//! node's own, and clients that may only execute cannot forge them. The scheduler
//! then also serves only that token (its own auth file), which the node's forwarder
//! and status sampler present too: its loopback port must not be a way around the
//! node's credentials checks.
//!
//! Each child gets a parent-death signal (SIGTERM), so a node killed outright does not
//! leave them behind; the signal follows the thread that started the child, which is
//! why the node starts them from its main thread, the one that lives until it exits. A clean stop terminates the worker first (it finishes the
//! actions it has, uploading their outputs to the still-running node), then the
//! scheduler; a child that outlives the grace period is killed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::auth::Permission;
use crate::config::ExecutionConfig;
use crate::error::{Error, Result};

/// How long the node waits for a child's ready file.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often ready files and exits are polled.
const POLL: Duration = Duration::from_millis(20);

/// The running scheduler and worker.
pub struct Embedded {
    /// Children in the order they are stopped: the worker, then the scheduler.
    children: Vec<(&'static str, Child)>,
    scheduler: SocketAddr,
    scheduler_http: SocketAddr,
    grace: Duration,
}

impl Embedded {
    /// Starts the scheduler and the worker for a node they reach at `cache` (its gRPC
    /// listener, or behind TLS its loopback one), with its data in `data_dir`, and
    /// waits until both are ready.
    pub fn start(
        cache: SocketAddr,
        data_dir: &Path,
        settings: &ExecutionConfig,
        cores: usize,
        grace: Duration,
        token: Option<&str>,
    ) -> Result<Embedded> {
        if cache.port() == 0 {
            return Err(Error::invalid_argument(
                "execution needs a fixed gRPC port (its scheduler and worker connect to it); \
                 give --listen a port or run with --no-execution",
            ));
        }
        let cache = format!("http://{}", loopback(cache));
        let scheduler_ready = data_dir.join("scheduler.addr");
        let scheduler_http_ready = data_dir.join("scheduler.http");
        let worker_ready = data_dir.join("worker.ready");
        for stale in [&scheduler_ready, &scheduler_http_ready, &worker_ready] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(Error::internal(format!(
                        "cannot remove the stale {}: {error}",
                        stale.display()
                    )))
                }
            }
        }
        let mut embedded = Embedded {
            children: Vec::with_capacity(2),
            scheduler: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            scheduler_http: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            grace,
        };
        let token_file = match token {
            Some(token) => Some(write_token(data_dir, token)?),
            None => None,
        };
        let mut scheduler = Command::new(sibling("cairn-scheduler")?);
        scheduler
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--cache")
            .arg(&cache)
            .arg("--ready-file")
            .arg(&scheduler_ready)
            .arg("--http-listen")
            .arg("127.0.0.1:0")
            .arg("--http-ready-file")
            .arg(&scheduler_http_ready)
            .env(crate::logging::ENV, crate::logging::chosen().name());
        if let (Some(token_file), Some(token)) = (&token_file, token) {
            scheduler
                .arg("--token-file")
                .arg(token_file)
                .arg("--auth")
                .arg(write_scheduler_auth(data_dir, token)?);
        }
        let mut child = spawn("cairn-scheduler", scheduler)?;
        let address = wait_for(&scheduler_ready, "cairn-scheduler", &mut child);
        // The worker goes first in the list so it is stopped first; the scheduler is
        // pushed now so a failure below still stops it.
        embedded.children.push(("cairn-scheduler", child));
        embedded.scheduler = address?.trim().parse().map_err(|error| {
            Error::internal(format!(
                "cairn-scheduler wrote an unreadable address to {}: {error}",
                scheduler_ready.display()
            ))
        })?;
        // Written before scheduler.addr, so it is there now.
        embedded.scheduler_http = std::fs::read_to_string(&scheduler_http_ready)
            .map_err(|error| error.to_string())
            .and_then(|text| {
                text.trim()
                    .parse::<SocketAddr>()
                    .map_err(|error| error.to_string())
            })
            .map_err(|error| {
                Error::internal(format!(
                    "cairn-scheduler wrote no readable address to {}: {error}",
                    scheduler_http_ready.display()
                ))
            })?;
        let max_inflight = settings
            .max_inflight_tasks
            .unwrap_or_else(|| u32::try_from(cores).unwrap_or(u32::MAX));
        let mut worker = Command::new(sibling("cairn-worker")?);
        worker
            .arg("--scheduler")
            .arg(format!("http://{}", embedded.scheduler))
            .arg("--cache")
            .arg(&cache)
            .arg("--work-dir")
            .arg(data_dir.join("worker"))
            .arg("--max-inflight-tasks")
            .arg(max_inflight.to_string())
            .arg("--ready-file")
            .arg(&worker_ready)
            .env(crate::logging::ENV, crate::logging::chosen().name());
        if let Some(token_file) = &token_file {
            worker.arg("--token-file").arg(token_file);
        }
        let mut child = spawn("cairn-worker", worker)?;
        let ready = wait_for(&worker_ready, "cairn-worker", &mut child);
        embedded.children.insert(0, ("cairn-worker", child));
        ready?;
        tracing::info!(
            "execution: cairn-scheduler on {}, one cairn-worker running up to {max_inflight} tasks",
            embedded.scheduler
        );
        Ok(embedded)
    }

    /// The URL the node forwards Execution and Operations to.
    pub fn scheduler_url(&self) -> String {
        format!("http://{}", self.scheduler)
    }

    /// The scheduler's HTTP listener (metrics and status), on loopback.
    pub fn scheduler_http(&self) -> SocketAddr {
        self.scheduler_http
    }

    /// Stops the worker, then the scheduler: SIGTERM, and SIGKILL after the grace
    /// period. Stopping twice does nothing the second time.
    pub fn stop(&mut self) {
        for (name, mut child) in self.children.drain(..) {
            // SAFETY: signalling a child process of ours that has not been reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + self.grace;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => break,
                    Ok(Some(status)) => {
                        tracing::warn!("{name} exited with {status}");
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                    Ok(None) | Err(_) => {
                        tracing::warn!("{name} did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The address a local client uses for a listener bound to `listen`: a wildcard
/// address becomes the loopback address of its family.
fn loopback(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Writes the scheduler's auth file: one principal, the node's token, with every
/// permission. The node's forwarder, its status sampler and the worker present that
/// token, and nobody else is served: without it, any local user who found the
/// scheduler's loopback port could run commands past the node's own `--auth` or
/// mutual TLS.
fn write_scheduler_auth(data_dir: &Path, token: &str) -> Result<PathBuf> {
    use sha2::Digest as _;
    let hex = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    let permissions: Vec<String> = Permission::ALL
        .iter()
        .map(|permission| format!("\"{}\"", permission.name()))
        .collect();
    let text = format!(
        "{{ principals: [ {{ name: \"node\", token_sha256: \"{hex}\", permissions: [{}] }} ] }}\n",
        permissions.join(", ")
    );
    write_private(&data_dir.join("scheduler-auth.json5"), text.as_bytes())
}

/// Writes the token the scheduler and worker present to the node (see `--auth`) to
/// `<data_dir>/embedded.token`, readable by this user only, and returns its path.
fn write_token(data_dir: &Path, token: &str) -> Result<PathBuf> {
    write_private(&data_dir.join("embedded.token"), token.as_bytes())
}

/// Writes `contents` to a new file at `path` readable by this user only.
fn write_private(path: &Path, contents: &[u8]) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A file left by an earlier run may have other permissions; it is recreated.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(Error::internal(format!(
                "cannot replace {}: {error}",
                path.display()
            )))
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| Error::internal(format!("cannot write {}: {error}", path.display())))?;
    file.write_all(contents)
        .map_err(|error| Error::internal(format!("cannot write {}: {error}", path.display())))?;
    Ok(path.to_path_buf())
}

/// The path of the binary `name` in the directory of the running executable.
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|error| Error::internal(format!("cannot locate the cairn binary: {error}")))?;
    let path = exe
        .parent()
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::invalid_argument(format!(
            "execution needs {} next to cairn; install it there or run with --no-execution",
            path.display()
        )))
    }
}

/// Starts `command` with a parent-death signal and no stdin; its logs share the node's
/// stderr.
fn spawn(name: &str, mut command: Command) -> Result<Child> {
    // SAFETY: getpid is async-signal-safe and called before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The node may have died between fork and prctl: then nobody would ever
            // send the signal.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    command
        .stdin(Stdio::null())
        .spawn()
        .map_err(|error| Error::internal(format!("cannot start {name}: {error}")))
}

/// Waits until `child` has written `path` and returns its contents.
fn wait_for(path: &Path, name: &str, child: &mut Child) -> Result<String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return Ok(text);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::internal(format!(
                "{name} exited before it was ready: {status}"
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::internal(format!(
                "{name} was not ready within {} s",
                READY_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(POLL);
    }
}
