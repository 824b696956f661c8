//! The one way imgvm starts a program (qemu, vhost-device-vsock, tar, qemu-img, gpgv):
//! in its own process group, killed when imgvm goes.
//!
//! Its own group, because a Ctrl-C on the terminal signals the whole foreground group:
//! qemu would die before imgvm could cancel the build in order (and report a lost
//! connection instead of a cancel). Killed with imgvm, because nothing else would stop
//! it after a SIGKILL: `PR_SET_PDEATHSIG` makes the kernel send SIGKILL to the child when
//! the thread that started it ends; imgvm starts children from the runtime's worker
//! threads (or threads that wait for them), which live as long as imgvm does.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;

/// A tokio command for `program`, confined as the module says, killed when dropped.
pub fn command(program: impl AsRef<OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.kill_on_drop(true);
    confine(cmd.as_std_mut());
    cmd
}

/// A std command for `program`, for the short synchronous runs of a blocking thread.
pub fn std_command(program: impl AsRef<OsStr>) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    confine(&mut cmd);
    cmd
}

fn confine(cmd: &mut std::process::Command) {
    // SAFETY: getpid is async-signal-safe and called before the fork.
    let parent = unsafe { libc::getpid() };
    cmd.process_group(0);
    // SAFETY: only async-signal-safe calls (prctl, getppid, kill) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // imgvm died between the fork and the prctl: the signal was never armed.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pid `sh` reports and the pid of its process group.
    fn spawned_group() -> (i32, i32) {
        let out = std_command("sh")
            .args(["-c", "echo $$; ps -o pgid= -p $$"])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut numbers = text.split_whitespace().map(|n| n.parse::<i32>().unwrap());
        (numbers.next().unwrap(), numbers.next().unwrap())
    }

    #[test]
    fn children_lead_their_own_process_group() {
        let (pid, group) = spawned_group();
        assert_eq!(pid, group);
        assert_ne!(group, unsafe { libc::getpgrp() });
    }

    #[test]
    fn children_die_with_the_thread_that_started_them() {
        // A thread stands in for imgvm: when it ends, its child must not live on.
        let pid = std::thread::spawn(|| {
            let child = std_command("sleep").arg("60").spawn().unwrap();
            let pid = child.id() as i32;
            std::mem::forget(child);
            pid
        })
        .join()
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            // Reap it if it is our zombie; then it is gone.
            let mut status = 0;
            let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if reaped == pid {
                assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sleep {pid} outlived its parent thread"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
