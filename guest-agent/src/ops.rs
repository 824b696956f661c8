//! The operations: each runs on its own thread and receives the host's messages for its
//! request through its [`Job`].

use crate::command::{self, Input, Program};
use crate::image::view::View;
use crate::job::{cancelled, Inbound, Job};
use crate::reaper;
use imgvm_protocol::{
    Access, Command, ErrorKind, GuestMessage, Operation, OperationError, Outcome, RequestId, Transfer, CHUNK_LEN,
    STDERR_TAIL_LINES, STREAM_WINDOW,
};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;
use std::sync::mpsc::Receiver;

pub fn execute(job: &Job, operation: Operation) -> Result<Outcome, OperationError> {
    let fail = |e: io::Error| job.io_error(&e);
    match operation {
        Operation::Run(c) => run(job, c).map(|()| Outcome::Exited { code: 0 }),
        Operation::Upload {
            path,
            format: Transfer::File,
            mode,
        } => upload_file(job, &path, mode)
            .map(|bytes| Outcome::Transferred { bytes })
            .map_err(fail),
        Operation::Upload {
            path,
            format: Transfer::Tar,
            ..
        } => {
            std::fs::create_dir_all(&path).map_err(fail)?;
            let tar = Program::new(&["tar", "-x", "-p", "--numeric-owner", "-f", "-", "-C", &path]);
            command::run(job, &tar, Input::Host, false).map(|_| Outcome::Transferred { bytes: 0 })
        }
        Operation::Download {
            path,
            format: Transfer::File,
        } => {
            let file = std::fs::File::open(&path).map_err(fail)?;
            send_stream(job.id, file, &job.rx, job.writer)
                .map(|bytes| Outcome::Transferred { bytes })
                .map_err(fail)
        }
        Operation::Download {
            path,
            format: Transfer::Tar,
        } => download_tar(job, &path),
        Operation::Image(op) => crate::image::execute(job, op).map(Outcome::Image),
    }
}

/// A command of the host's, in the helper or in a view of the image, on a terminal or
/// with its output in lines.
fn run(job: &Job, c: Command) -> Result<(), OperationError> {
    let view = match c.image {
        Some(access) => Some(View::mount(job, COMMAND_VIEW, access == Access::ReadWrite)?),
        None => None,
    };
    let program = match &view {
        Some(view) => Program {
            cwd: None,
            env: c.env,
            ..view.chroot(&c.argv)
        },
        None => Program {
            argv: c.argv,
            env: c.env,
            cwd: c.cwd,
        },
    };
    let ran = match c.terminal {
        Some(size) => command::run_terminal(job, &program, size),
        None => {
            let input = if c.stdin { Input::Host } else { Input::Null };
            command::run(job, &program, input, false).map(drop)
        }
    };
    let unmounted = view.map_or(Ok(()), |view| {
        // What the command left running in the view (`setsid daemon &`) would keep it busy.
        command::kill_rooted_in(&view.root);
        view.unmount()
    });
    ran.and(unmounted)
}

/// Where the image is seen by a command the host runs in it.
const COMMAND_VIEW: &str = "/run/imgvm-command";

pub fn invalid(operation: &Operation, message: String) -> OperationError {
    OperationError {
        operation: describe(operation),
        kind: ErrorKind::InvalidRequest,
        message,
        errno: None,
        exit_code: None,
        stderr_tail: Vec::new(),
    }
}

pub fn describe(operation: &Operation) -> String {
    match operation {
        Operation::Run(c) => format!("run {}", c.argv.join(" ")),
        Operation::Upload { path, .. } => format!("upload to {path}"),
        Operation::Download { path, .. } => format!("download of {path}"),
        Operation::Image(op) => op.describe(),
    }
}

fn upload_file(job: &Job, path: &str, mode: u32) -> io::Result<u64> {
    let (id, rx, writer) = (job.id, &job.rx, job.writer);
    let is_device = std::fs::metadata(path)
        .map(|m| !m.is_file() && !m.is_dir())
        .unwrap_or(false);
    // Block devices are written in place; regular files are replaced.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(!is_device)
        .truncate(!is_device)
        .mode(mode)
        .open(path)?;
    let mut total = 0;
    loop {
        match rx.recv() {
            Ok(Inbound::Data(chunk)) => {
                file.write_all(&chunk)?;
                total += chunk.len() as u64;
                writer.send(&GuestMessage::Credit {
                    id,
                    bytes: chunk.len() as u64,
                })?;
            }
            Ok(Inbound::End) => {
                file.sync_data()?;
                return Ok(total);
            }
            Ok(Inbound::Cancel) | Err(_) => {
                if !is_device {
                    let _ = std::fs::remove_file(path);
                }
                return Err(cancelled());
            }
            Ok(Inbound::Credit(_) | Inbound::Resize(_) | Inbound::Exited(_)) => {}
        }
    }
}

/// Sends `source` as the request's output stream, never more than [`STREAM_WINDOW`]
/// bytes ahead of the host's credit.
fn send_stream(
    id: RequestId,
    mut source: impl Read,
    rx: &Receiver<Inbound>,
    writer: &crate::connection::Writer,
) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK_LEN];
    let (mut sent, mut credited) = (0u64, 0u64);
    loop {
        // Take credit and cancellation as they come; block only when the window is full.
        loop {
            let message = if sent - credited + CHUNK_LEN as u64 > STREAM_WINDOW {
                rx.recv().map_err(|_| cancelled())?
            } else {
                match rx.try_recv() {
                    Ok(message) => message,
                    Err(_) => break,
                }
            };
            match message {
                Inbound::Credit(bytes) => credited += bytes,
                Inbound::Cancel => return Err(cancelled()),
                _ => {}
            }
        }
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.send(&GuestMessage::Data {
            id,
            chunk: buf[..n].to_vec(),
        })?;
        sent += n as u64;
    }
    writer.send(&GuestMessage::EndOfData { id })?;
    Ok(sent)
}

fn download_tar(job: &Job, path: &str) -> Result<Outcome, OperationError> {
    let mut argv = vec!["tar".to_owned(), "-c".into(), "--numeric-owner".into()];
    // In a build, the same tree gives the same archive: names in order, no time after
    // the build's date.
    if let Some(epoch) = command::source_date_epoch() {
        argv.extend([
            "--sort=name".into(),
            format!("--mtime=@{epoch}"),
            "--clamp-mtime".into(),
        ]);
    }
    argv.extend(["-f", "-", "-C", path, "."].map(String::from));
    let tar = Program::new(&argv);
    let mut child = command::spawn(job, &tar, Stdio::null())?;
    let pid = child.id() as i32;
    let stderr = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            text
        })
    });
    let sent = send_stream(
        job.id,
        child.stdout.take().expect("stdout is piped"),
        &job.rx,
        job.writer,
    );
    if sent.is_err() {
        command::kill_group(pid);
    }
    let code = reaper::exit_code(reaper::wait(pid));
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    match sent {
        Ok(bytes) if code == 0 => Ok(Outcome::Transferred { bytes }),
        Ok(_) => {
            let mut error = job.error(ErrorKind::CommandFailed, format!("tar exited with status {code}"));
            error.exit_code = Some(code);
            let lines: Vec<&str> = stderr.lines().collect();
            let from = lines.len().saturating_sub(STDERR_TAIL_LINES);
            error.stderr_tail = lines[from..].iter().map(|l| l.to_string()).collect();
            Err(error)
        }
        Err(e) => Err(job.io_error(&e)),
    }
}
