//! Turning SIGTERM and SIGINT into a graceful stop.
//!
//! The first signal asks the runtime to stop: listeners close, in-flight requests get
//! a grace period, the engine writes its checkpoints, and the process exits 0. A
//! second signal means the operator does not want to wait: the process exits at once
//! (nothing acknowledged is lost; the next start replays the log past the last
//! checkpoint).

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// Sets `stop` to true on the first SIGTERM or SIGINT; exits on the second.
pub fn stop_on_signal(stop: watch::Sender<bool>) -> Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])
        .map_err(|error| Error::internal(format!("cannot handle signals: {error}")))?;
    std::thread::Builder::new()
        .name("signals".to_string())
        .spawn(move || {
            for signal in signals.forever() {
                if stop.send_replace(true) {
                    tracing::warn!("second signal ({signal}): exiting without waiting");
                    std::process::exit(1);
                }
                tracing::info!("signal {signal}: finishing in-flight requests, then stopping");
            }
        })
        .map_err(|error| Error::internal(format!("cannot start the signal thread: {error}")))?;
    Ok(())
}
