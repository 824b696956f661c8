//! The operations themselves. Each runs on its own thread and receives the host's
//! messages for its request through an [`Inbound`] channel.

use crate::connection::Writer;
use crate::reaper;
use imgvm_protocol::{
    Command, ErrorKind, Event, GuestMessage, Operation, OperationError, Outcome, RequestId, Transfer, CHUNK_LEN,
    MAX_LINE_LEN, STDERR_TAIL_LINES, STREAM_WINDOW,
};
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What reaches a running operation: the host's stream messages, and for commands the
/// exit of the child (sent by its waiter thread).
pub enum Inbound {
    Data(Vec<u8>),
    End,
    Credit(u64),
    Cancel,
    Exited(i32),
}

/// Grace between SIGTERM and SIGKILL when a command is cancelled.
const KILL_GRACE: Duration = Duration::from_secs(3);

pub fn execute(
    id: RequestId,
    operation: Operation,
    tx: Sender<Inbound>,
    rx: Receiver<Inbound>,
    writer: &Writer,
) -> Result<Outcome, OperationError> {
    let name = describe(&operation);
    let fail = |kind, e: io::Error| OperationError {
        operation: name.clone(),
        kind,
        message: e.to_string(),
        errno: e.raw_os_error(),
        exit_code: None,
        stderr_tail: Vec::new(),
    };
    match operation {
        Operation::Run(command) => run(id, &name, command, tx, rx, writer),
        Operation::Upload {
            path,
            format: Transfer::File,
            mode,
        } => upload_file(id, &path, mode, &rx, writer)
            .map(|bytes| Outcome::Transferred { bytes })
            .map_err(|e| fail(kind_of(&e), e)),
        Operation::Upload {
            path,
            format: Transfer::Tar,
            ..
        } => {
            std::fs::create_dir_all(&path).map_err(|e| fail(ErrorKind::Io, e))?;
            let argv = ["tar", "-x", "-p", "--numeric-owner", "-f", "-", "-C", &path];
            let command = Command {
                argv: argv.map(String::from).to_vec(),
                stdin: true,
                ..Default::default()
            };
            run(id, &name, command, tx, rx, writer).map(|_| Outcome::Transferred { bytes: 0 })
        }
        Operation::Download {
            path,
            format: Transfer::File,
        } => {
            let mut file = std::fs::File::open(&path).map_err(|e| fail(ErrorKind::Io, e))?;
            let total = file.seek(SeekFrom::End(0)).and_then(|n| file.rewind().map(|_| n));
            let total = total.map_err(|e| fail(ErrorKind::Io, e))?;
            writer
                .send(&progress(id, 0, Some(total)))
                .map_err(|e| fail(ErrorKind::Io, e))?;
            send_stream(id, file, &rx, writer)
                .map(|bytes| Outcome::Transferred { bytes })
                .map_err(|e| fail(kind_of(&e), e))
        }
        Operation::Download {
            path,
            format: Transfer::Tar,
        } => download_tar(id, &name, &path, &rx, writer),
        Operation::ListBlockDevices => crate::blockdev::list()
            .map(Outcome::BlockDevices)
            .map_err(|e| fail(ErrorKind::Io, e)),
    }
}

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

fn describe(operation: &Operation) -> String {
    match operation {
        Operation::Run(c) => format!("run {}", c.argv.join(" ")),
        Operation::Upload { path, .. } => format!("upload to {path}"),
        Operation::Download { path, .. } => format!("download of {path}"),
        Operation::ListBlockDevices => "list block devices".to_owned(),
    }
}

fn cancelled() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "cancelled by the host")
}

fn kind_of(e: &io::Error) -> ErrorKind {
    if e.kind() == io::ErrorKind::Interrupted {
        ErrorKind::Cancelled
    } else {
        ErrorKind::Io
    }
}

fn progress(id: RequestId, done: u64, total: Option<u64>) -> GuestMessage {
    GuestMessage::Event {
        id,
        event: Event::Progress { done, total },
    }
}

/// Runs a command in its own process group, streaming its output as lines and feeding it
/// the host's data as stdin.
fn run(
    id: RequestId,
    name: &str,
    command: Command,
    tx: Sender<Inbound>,
    rx: Receiver<Inbound>,
    writer: &Writer,
) -> Result<Outcome, OperationError> {
    let mut error = OperationError {
        operation: name.to_owned(),
        kind: ErrorKind::Io,
        message: String::new(),
        errno: None,
        exit_code: None,
        stderr_tail: Vec::new(),
    };
    let Some((program, args)) = command.argv.split_first() else {
        error.kind = ErrorKind::InvalidRequest;
        error.message = "empty command".into();
        return Err(error);
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        .stdin(if command.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = &command.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            error.message = format!("cannot start {program}: {e}");
            error.errno = e.raw_os_error();
            return Err(error);
        }
    };
    let pid = child.id() as i32;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let out = child
        .stdout
        .take()
        .map(|s| forward_lines(s, id, writer.clone(), Event::Stdout, None));
    let err = child
        .stderr
        .take()
        .map(|s| forward_lines(s, id, writer.clone(), Event::Stderr, Some(tail.clone())));
    let mut stdin = child.stdin.take();
    std::thread::spawn(move || {
        let status = reaper::wait(pid);
        // Output threads end when the pipes close; join them so all output precedes Done.
        for handle in [out, err].into_iter().flatten() {
            let _ = handle.join();
        }
        let _ = tx.send(Inbound::Exited(status));
    });
    let mut cancelled = false;
    let status = loop {
        match rx.recv() {
            Ok(Inbound::Data(chunk)) => {
                let len = chunk.len() as u64;
                // A command that stopped reading is not an error of the stream: drop input.
                if let Some(pipe) = stdin.as_mut() {
                    if pipe.write_all(&chunk).is_err() {
                        stdin = None;
                    }
                }
                let _ = writer.send(&GuestMessage::Credit { id, bytes: len });
            }
            Ok(Inbound::End) => stdin = None::<ChildStdin>,
            Ok(Inbound::Credit(_)) => {}
            Ok(Inbound::Cancel) | Err(_) if !cancelled => {
                cancelled = true;
                stdin = None;
                kill_group(pid);
            }
            Ok(Inbound::Cancel) | Err(_) => {}
            Ok(Inbound::Exited(status)) => break status,
        }
    };
    let code = reaper::exit_code(status);
    if cancelled {
        error.kind = ErrorKind::Cancelled;
        error.message = "cancelled by the host".into();
        error.exit_code = Some(code);
        return Err(error);
    }
    if code == 0 {
        return Ok(Outcome::Exited { code });
    }
    error.kind = ErrorKind::CommandFailed;
    error.exit_code = Some(code);
    error.message = if code > 128 {
        format!("killed by signal {}", code - 128)
    } else {
        format!("exited with status {code}")
    };
    error.stderr_tail = tail.lock().unwrap().iter().cloned().collect();
    Err(error)
}

/// SIGTERM to the whole process group, SIGKILL after a grace period.
fn kill_group(pid: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group.
    unsafe { libc::kill(-pid, libc::SIGTERM) };
    std::thread::spawn(move || {
        std::thread::sleep(KILL_GRACE);
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    });
}

fn forward_lines(
    pipe: impl Read + Send + 'static,
    id: RequestId,
    writer: Writer,
    event: fn(Vec<u8>) -> Event,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::with_capacity(MAX_LINE_LEN, pipe);
        while let Ok(Some(line)) = read_line(&mut reader) {
            if let Some(tail) = &tail {
                let mut tail = tail.lock().unwrap();
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(String::from_utf8_lossy(&line).into_owned());
            }
            if writer.send(&GuestMessage::Event { id, event: event(line) }).is_err() {
                break;
            }
        }
    })
}

/// One line without its newline, at most [`MAX_LINE_LEN`] bytes; `None` at end of input.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        let room = MAX_LINE_LEN - line.len();
        let window = &buf[..buf.len().min(room)];
        if let Some(nl) = window.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&window[..nl]);
            reader.consume(nl + 1);
            return Ok(Some(line));
        }
        let n = window.len();
        line.extend_from_slice(window);
        reader.consume(n);
        if line.len() == MAX_LINE_LEN {
            return Ok(Some(line));
        }
    }
}

fn upload_file(id: RequestId, path: &str, mode: u32, rx: &Receiver<Inbound>, writer: &Writer) -> io::Result<u64> {
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
            Ok(Inbound::Credit(_) | Inbound::Exited(_)) => {}
        }
    }
}

/// Sends `source` as the request's output stream, never more than [`STREAM_WINDOW`]
/// bytes ahead of the host's credit.
fn send_stream(id: RequestId, mut source: impl Read, rx: &Receiver<Inbound>, writer: &Writer) -> io::Result<u64> {
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

fn download_tar(
    id: RequestId,
    name: &str,
    path: &str,
    rx: &Receiver<Inbound>,
    writer: &Writer,
) -> Result<Outcome, OperationError> {
    let mut error = OperationError {
        operation: name.to_owned(),
        kind: ErrorKind::Io,
        message: String::new(),
        errno: None,
        exit_code: None,
        stderr_tail: Vec::new(),
    };
    let mut child = std::process::Command::new("tar")
        .args(["-c", "--numeric-owner", "-f", "-", "-C", path, "."])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| {
            error.message = format!("cannot start tar: {e}");
            error.clone()
        })?;
    let pid = child.id() as i32;
    let stderr = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            text
        })
    });
    let sent = send_stream(id, child.stdout.take().expect("stdout is piped"), rx, writer);
    if sent.is_err() {
        kill_group(pid);
    }
    let code = reaper::exit_code(reaper::wait(pid));
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    match sent {
        Ok(bytes) if code == 0 => Ok(Outcome::Transferred { bytes }),
        Ok(_) => {
            error.kind = ErrorKind::CommandFailed;
            error.exit_code = Some(code);
            error.message = format!("tar exited with status {code}");
            error.stderr_tail = stderr
                .lines()
                .rev()
                .take(STDERR_TAIL_LINES)
                .map(String::from)
                .collect::<Vec<_>>();
            error.stderr_tail.reverse();
            Err(error)
        }
        Err(e) => {
            error.kind = kind_of(&e);
            error.message = e.to_string();
            Err(error)
        }
    }
}
