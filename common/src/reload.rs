//! SIGHUP: read the auth file and the TLS files again now.
//!
//! Both are polled once a second anyway ([`crate::auth::RELOAD_POLL`]), so a change
//! takes effect without a signal; SIGHUP is for operators and tools that expect it
//! (certificate renewers' deploy hooks, `systemctl reload`), and its default action
//! would otherwise end the process. The reload threads wait on [`wait`] instead of
//! sleeping, so a SIGHUP wakes every one of them and each reads its files at once; the
//! TLS files are loaded again even when their contents look unchanged.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use signal_hook::consts::SIGHUP;
use signal_hook::iterator::Signals;

use crate::error::{Error, Result};

/// The number of SIGHUPs received, and the condition the reload threads wait on.
static SIGNALS: Mutex<u64> = Mutex::new(0);
static SIGNALLED: Condvar = Condvar::new();

/// Waits up to `poll` or until the next SIGHUP, whichever comes first; true when a
/// SIGHUP ended the wait.
pub fn wait(poll: Duration) -> bool {
    let guard = SIGNALS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let seen = *guard;
    let (guard, _) = SIGNALLED
        .wait_timeout_while(guard, poll, |count| *count == seen)
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *guard != seen
}

/// Starts the thread that turns each SIGHUP into a wake-up of every [`wait`].
pub fn reload_on_sighup() -> Result<()> {
    let mut signals = Signals::new([SIGHUP])
        .map_err(|error| Error::internal(format!("cannot handle SIGHUP: {error}")))?;
    std::thread::Builder::new()
        .name("sighup".to_string())
        .spawn(move || {
            for _ in signals.forever() {
                tracing::info!("SIGHUP: reading the auth and TLS files again");
                let mut count = SIGNALS
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                *count += 1;
                SIGNALLED.notify_all();
            }
        })
        .map_err(|error| Error::internal(format!("cannot start the SIGHUP thread: {error}")))?;
    Ok(())
}
