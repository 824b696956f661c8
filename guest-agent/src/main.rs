//! `imgvm-agent`: PID 1 of the helper VM.
//!
//! It prepares a minimal system (pseudo filesystems, kernel modules), connects to the host
//! over vsock and serves the host's requests until the host says goodbye or disconnects,
//! then syncs and powers the VM off. It never decides anything on its own: every action
//! comes from a host request.

mod command;
mod connection;
mod image;
mod init;
mod job;
mod ops;
mod proxy;
mod reaper;

use std::process::ExitCode;

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    if pid1 {
        if let Err(e) = init::prepare_system() {
            log(&format!("system setup failed: {e}"));
            init::power_off();
        }
    }
    if pid1 {
        if let Err(e) = proxy::start(connection::port() + 1) {
            log(&format!("no package proxy: {e}"));
        }
    }
    let result = connection::serve();
    if let Err(e) = &result {
        log(e);
    }
    if pid1 {
        init::power_off();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Writes to the console, which the host captures: the only channel that works before
/// vsock is up.
pub fn log(message: &str) {
    eprintln!("imgvm-agent: {message}");
}
