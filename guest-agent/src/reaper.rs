//! PID 1 inherits every orphan, so one thread reaps all children and hands each exit
//! status to whoever waits for that pid. `std::process::Child::wait` is never used: it
//! would race with this thread.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, OnceLock};

#[derive(Default)]
struct Table {
    /// Statuses of children that exited before anyone asked.
    exited: HashMap<i32, i32>,
}

static TABLE: OnceLock<(Mutex<Table>, Condvar)> = OnceLock::new();

fn table() -> &'static (Mutex<Table>, Condvar) {
    TABLE.get_or_init(Default::default)
}

/// Only PID 1 starts the reaper; a non-PID-1 agent (used in development) waits directly.
pub fn start() {
    table();
    std::thread::spawn(|| loop {
        let mut status = 0;
        // SAFETY: waitpid writes into a valid int.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            // ECHILD: no children right now.
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        let (lock, cond) = table();
        lock.lock().unwrap().exited.insert(pid, status);
        cond.notify_all();
    });
}

fn started() -> bool {
    TABLE.get().is_some()
}

/// Waits for `pid` and returns its raw wait status.
pub fn wait(pid: i32) -> i32 {
    if !started() {
        let mut status = 0;
        // SAFETY: waitpid writes into a valid int.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return status;
    }
    let (lock, cond) = table();
    let mut table = lock.lock().unwrap();
    loop {
        if let Some(status) = table.exited.remove(&pid) {
            return status;
        }
        table = cond.wait(table).unwrap();
    }
}

/// Exit code in shell convention: the status, or 128 + signal.
pub fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}
