//! Running a program for a request: its own process group, output streamed to the host
//! line by line (or captured), stdin fed from the host's stream or from the agent, and
//! cancellation by the host.

use crate::job::{Inbound, Job};
use crate::reaper;
use imgvm_protocol::{
    ErrorKind, Event, GuestMessage, OperationError, RequestId, WindowSize, CHUNK_LEN, MAX_LINE_LEN, STDERR_TAIL_LINES,
    STREAM_WINDOW,
};
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Grace between SIGTERM and SIGKILL when a command is cancelled.
const KILL_GRACE: Duration = Duration::from_secs(3);

/// How long output may still arrive after a program and what it left were killed.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

pub enum Input {
    Null,
    /// The request's data stream.
    Host,
    /// Bytes the agent itself supplies (an sfdisk script, a file's content).
    Bytes(Vec<u8>),
}

/// A program with its arguments and extra environment.
pub struct Program {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
}

impl Program {
    pub fn new<S: AsRef<str>>(argv: &[S]) -> Self {
        Program {
            argv: argv.iter().map(|a| a.as_ref().to_owned()).collect(),
            env: Vec::new(),
            cwd: None,
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// How the program is named in errors: the first words of its command line.
    fn display(&self) -> String {
        let mut words: Vec<&str> = self.argv.iter().take(6).map(String::as_str).collect();
        if self.argv.len() > words.len() {
            words.push("…");
        }
        let line = words.join(" ");
        match line.char_indices().nth(120) {
            Some((cut, _)) => format!("{}…", &line[..cut]),
            None => line,
        }
    }
}

/// Runs `program` to its end. Its stdout goes to the host as events, or with `capture` is
/// returned instead. A failure carries the exit status and the tail of stderr.
pub fn run(job: &Job, program: &Program, input: Input, capture: bool) -> Result<Vec<u8>, OperationError> {
    let host_input = matches!(input, Input::Host);
    let stdin = match input {
        Input::Null => Stdio::null(),
        _ => Stdio::piped(),
    };
    let mut child = spawn(job, program, stdin)?;
    let pid = child.id() as i32;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let captured = Arc::new(Mutex::new(Vec::new()));
    let out = child.stdout.take().map(|s| {
        let sink = if capture {
            Sink::Capture(captured.clone())
        } else {
            Sink::Host(Event::Stdout)
        };
        forward_lines(s, job.id, job.writer.clone(), sink, None)
    });
    let err = child.stderr.take().map(|s| {
        forward_lines(
            s,
            job.id,
            job.writer.clone(),
            Sink::Host(Event::Stderr),
            Some(tail.clone()),
        )
    });
    let mut stdin = child.stdin.take();
    if let Input::Bytes(bytes) = input {
        if let Some(mut pipe) = stdin.take() {
            std::thread::spawn(move || pipe.write_all(&bytes));
        }
    }
    let tx = job.tx.clone();
    let root = job.root.clone();
    std::thread::spawn(move || {
        let status = reaper::wait(pid);
        // A step is over when its program is: whatever it left running (a daemon a
        // maintainer script started, `cmd &` in a run step) would hold its output pipes,
        // the image's mounts and the build for ever.
        kill_leftovers(pid, &root);
        // Output threads end when the pipes close; wait for them so all output precedes
        // Done, but not for a writer that escaped both the group and the image.
        let deadline = std::time::Instant::now() + DRAIN_LIMIT;
        for handle in [out, err].into_iter().flatten() {
            while !handle.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = tx.send(Inbound::Exited(status));
    });
    let mut cancelled = false;
    let status = loop {
        // The request's input is not for a program the agent runs on its own: it is kept
        // for the request's command, which reads what was kept first.
        let next = match host_input {
            true => job.recv(),
            false => job.rx.recv(),
        };
        match next {
            Ok(message @ (Inbound::Data(_) | Inbound::End | Inbound::Resize(_))) if !host_input => job.keep(message),
            Ok(Inbound::Data(chunk)) => {
                let len = chunk.len() as u64;
                // A command that stopped reading is not an error of the stream: drop input.
                if let Some(pipe) = stdin.as_mut() {
                    if pipe.write_all(&chunk).is_err() {
                        stdin = None;
                    }
                }
                let _ = job.writer.send(&GuestMessage::Credit { id: job.id, bytes: len });
            }
            Ok(Inbound::End) => stdin = None::<ChildStdin>,
            Ok(Inbound::Credit(_) | Inbound::Resize(_)) => {}
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
    let mut error = job.error(ErrorKind::CommandFailed, String::new());
    error.exit_code = Some(code);
    if cancelled {
        error.kind = ErrorKind::Cancelled;
        error.message = "cancelled by the host".into();
        return Err(error);
    }
    if code == 0 {
        return Ok(std::mem::take(&mut *captured.lock().unwrap()));
    }
    let how = if code > 128 {
        format!("killed by signal {}", code - 128)
    } else {
        format!("exited with status {code}")
    };
    error.message = format!("`{}` {how}", program.display());
    error.stderr_tail = tail.lock().unwrap().iter().cloned().collect();
    Err(error)
}

/// The build's date, once the host has set it ([`imgvm_protocol::SourceDateEpoch`]).
static SOURCE_DATE_EPOCH: Mutex<Option<i64>> = Mutex::new(None);

/// From now on every program started gets `SOURCE_DATE_EPOCH=epoch`, and `TZ=UTC` so
/// that tools that write local times (FAT's timestamps) write the same ones everywhere.
pub fn set_source_date_epoch(epoch: i64) {
    *SOURCE_DATE_EPOCH.lock().unwrap() = Some(epoch);
}

/// The build's date, if the host has set it.
pub fn source_date_epoch() -> Option<i64> {
    *SOURCE_DATE_EPOCH.lock().unwrap()
}

/// The one way the agent starts a program: in its own process group (so that
/// cancellation reaches everything it started), with stdout and stderr piped.
pub fn spawn(job: &Job, program: &Program, stdin: Stdio) -> Result<std::process::Child, OperationError> {
    let mut cmd = builder(job, program)?;
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    start(job, program, &mut cmd)
}

/// `program` as a command, with the build's date in its environment.
fn builder(job: &Job, program: &Program) -> Result<std::process::Command, OperationError> {
    let Some((name, args)) = program.argv.split_first() else {
        return Err(job.error(ErrorKind::InvalidRequest, "empty command".into()));
    };
    let mut cmd = std::process::Command::new(name);
    cmd.args(args)
        .envs(
            source_date_epoch()
                .into_iter()
                .flat_map(|epoch| [("SOURCE_DATE_EPOCH", epoch.to_string()), ("TZ", "UTC".to_owned())]),
        )
        .envs(program.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &program.cwd {
        cmd.current_dir(cwd);
    }
    Ok(cmd)
}

fn start(job: &Job, program: &Program, cmd: &mut std::process::Command) -> Result<std::process::Child, OperationError> {
    cmd.spawn().map_err(|e| {
        let mut error = job.io_error(&e);
        error.message = format!("cannot start {}: {e}", program.argv[0]);
        error
    })
}

/// Runs `program` to its end on a new pseudo-terminal of `size`, the controlling terminal
/// of its own session: what it writes goes to the host as raw `Data` within the host's
/// credit window, the host's `Data` is typed on it, `Resize` changes its size. Its exit
/// status is reported as [`run`]'s is.
pub fn run_terminal(job: &Job, program: &Program, size: WindowSize) -> Result<(), OperationError> {
    let io = |e: io::Error| job.io_error(&e);
    let (master, slave) = open_terminal(size).map_err(io)?;
    let mut cmd = builder(job, program)?;
    cmd.stdin(slave.try_clone().map_err(io)?)
        .stdout(slave.try_clone().map_err(io)?)
        .stderr(slave);
    // SAFETY: setsid(2) and ioctl(2) are async-signal-safe; the new session's
    // controlling terminal is the pseudo-terminal on stdin.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = start(job, program, &mut cmd)?;
    // Only the child holds the terminal's other end now: its output ends when it does.
    drop(cmd);
    let pid = child.id() as i32;
    let window = Arc::new((Mutex::new(0u64), std::sync::Condvar::new()));
    let output = {
        let (mut master, window, writer, id) = (
            std::fs::File::from(master.try_clone().map_err(io)?),
            window.clone(),
            job.writer.clone(),
            job.id,
        );
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK_LEN];
            let mut sent = 0u64;
            // EIO once the last process holding the terminal has gone.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                let (credited, more) = &*window;
                let mut credited = credited.lock().unwrap();
                while sent + n as u64 > *credited + STREAM_WINDOW {
                    credited = more.wait(credited).unwrap();
                }
                drop(credited);
                sent += n as u64;
                if writer
                    .send(&GuestMessage::Data {
                        id,
                        chunk: buf[..n].to_vec(),
                    })
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let tx = job.tx.clone();
    let root = job.root.clone();
    std::thread::spawn(move || {
        let status = reaper::wait(pid);
        kill_leftovers(pid, &root);
        let deadline = std::time::Instant::now() + DRAIN_LIMIT;
        while !output.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = tx.send(Inbound::Exited(status));
    });
    // Typing waits while the program does not read; meanwhile this loop must go on taking
    // the host's credit, or a program blocked writing its output would never read.
    let (keys, typed) = std::sync::mpsc::channel::<Vec<u8>>();
    {
        let (mut input, writer, id) = (
            std::fs::File::from(master.try_clone().map_err(io)?),
            job.writer.clone(),
            job.id,
        );
        std::thread::spawn(move || {
            for chunk in typed {
                let _ = input.write_all(&chunk);
                let _ = writer.send(&GuestMessage::Credit {
                    id,
                    bytes: chunk.len() as u64,
                });
            }
        });
    }
    let mut cancelled = false;
    let status = loop {
        match job.recv() {
            Ok(Inbound::Data(chunk)) => {
                let _ = keys.send(chunk);
            }
            Ok(Inbound::Credit(bytes)) => {
                let (credited, more) = &*window;
                *credited.lock().unwrap() += bytes;
                more.notify_all();
            }
            Ok(Inbound::Resize(size)) => {
                let _ = set_size(&master, size);
            }
            // A terminal's input ends when its user types the end-of-file character.
            Ok(Inbound::End) => {}
            Ok(Inbound::Cancel) | Err(_) if !cancelled => {
                cancelled = true;
                kill_group(pid);
            }
            Ok(Inbound::Cancel) | Err(_) => {}
            Ok(Inbound::Exited(status)) => break status,
        }
    };
    let code = reaper::exit_code(status);
    let mut error = job.error(ErrorKind::CommandFailed, String::new());
    error.exit_code = Some(code);
    match (cancelled, code) {
        (true, _) => {
            error.kind = ErrorKind::Cancelled;
            error.message = "cancelled by the host".into();
            Err(error)
        }
        (false, 0) => Ok(()),
        (false, _) => {
            error.message = format!("`{}` exited with status {code}", program.display());
            Err(error)
        }
    }
}

/// A new pseudo-terminal of `size`: its master, and its slave end to give the program.
fn open_terminal(size: WindowSize) -> io::Result<(OwnedFd, OwnedFd)> {
    let check = |r: libc::c_int| if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) };
    // SAFETY: plain calls on a descriptor this function owns; ptsname_r writes at most
    // `name.len()` bytes.
    unsafe {
        let master = OwnedFd::from_raw_fd(check(libc::posix_openpt(
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?);
        check(libc::grantpt(master.as_raw_fd()))?;
        check(libc::unlockpt(master.as_raw_fd()))?;
        let mut name = [0 as libc::c_char; 64];
        let r = libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        let slave = OwnedFd::from_raw_fd(check(libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?);
        set_size(&master, size)?;
        Ok((master, slave))
    }
}

fn set_size(terminal: &impl AsRawFd, size: WindowSize) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ as _, &size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Kills what a finished program left behind: the rest of its process group and, for a
/// program in the image (`root` other than `/`), every process whose root directory is
/// the image, wherever it moved itself (a daemon's `setsid`).
fn kill_leftovers(pid: i32, root: &str) {
    // SAFETY: kill(2) with a negative pid signals a process group; ESRCH when empty.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    if root != "/" {
        kill_rooted_in(root);
    }
}

/// Kills every process whose root directory is `root` or below it, and waits (a second
/// at most) until they are gone, so that what they held can be unmounted.
pub fn kill_rooted_in(root: &str) {
    for _ in 0..20 {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut killed = false;
        for entry in entries.flatten() {
            let Some(other) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let in_image = std::fs::read_link(entry.path().join("root"))
                .is_ok_and(|r| r.starts_with(root) && r.as_os_str() != "/");
            if in_image {
                // SAFETY: kill(2) on a pid; ESRCH when it has gone.
                unsafe { libc::kill(other, libc::SIGKILL) };
                killed = true;
            }
        }
        if !killed {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to the whole process group, SIGKILL after a grace period.
pub fn kill_group(pid: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group.
    unsafe { libc::kill(-pid, libc::SIGTERM) };
    std::thread::spawn(move || {
        std::thread::sleep(KILL_GRACE);
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    });
}

enum Sink {
    Host(fn(Vec<u8>) -> Event),
    Capture(Arc<Mutex<Vec<u8>>>),
}

fn forward_lines(
    pipe: impl Read + Send + 'static,
    id: RequestId,
    writer: crate::connection::Writer,
    sink: Sink,
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
            match &sink {
                Sink::Host(event) => {
                    if writer.send(&GuestMessage::Event { id, event: event(line) }).is_err() {
                        break;
                    }
                }
                Sink::Capture(buf) => {
                    let mut buf = buf.lock().unwrap();
                    buf.extend_from_slice(&line);
                    buf.push(b'\n');
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// What a program wrote to its terminal, as the host would receive it.
    #[derive(Clone, Default)]
    struct Wire(Arc<Mutex<Vec<u8>>>);

    impl Write for Wire {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_requests_input_waits_for_its_command_past_the_agents_own_programs() {
        let dir = tempfile::tempdir().unwrap();
        crate::job::with_test_job(dir.path(), |job| {
            // The host streams the input from the start...
            job.tx.send(Inbound::Data(b"typed\n".to_vec())).unwrap();
            job.tx.send(Inbound::End).unwrap();
            // ...while the agent first runs a program of its own (a mount of a view).
            run(job, &Program::new(&["true"]), Input::Null, false).unwrap();
            let out = run(job, &Program::new(&["cat"]), Input::Host, true).unwrap();
            assert_eq!(out, b"typed\n");
        });
    }

    #[test]
    fn a_program_on_a_terminal_has_it_as_controlling_terminal_of_the_size_asked_for() {
        let wire = Wire::default();
        let writer = crate::connection::Writer::new(wire.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let job = Job {
            id: 3,
            name: "test".into(),
            root: "/".into(),
            tx,
            rx,
            writer: &writer,
            kept: Default::default(),
        };
        // `tty` names stdin's terminal; `stty size` asks its size; `</dev/tty` only opens
        // for a process with a controlling terminal.
        let program = Program::new(&["sh", "-c", "tty; stty size; : </dev/tty && echo controlling"]);
        run_terminal(&job, &program, WindowSize { rows: 24, cols: 81 }).unwrap();
        let mut decoder = imgvm_protocol::FrameDecoder::new();
        decoder.push(&wire.0.lock().unwrap());
        let mut output = Vec::new();
        while let Some(message) = decoder.decode_next::<GuestMessage>().unwrap() {
            match message {
                GuestMessage::Data { id: 3, chunk } => output.extend(chunk),
                other => panic!("unexpected {other:?}"),
            }
        }
        let output = String::from_utf8(output).unwrap();
        // A terminal turns each newline into CR LF.
        let lines: Vec<&str> = output.split("\r\n").collect();
        assert!(lines[0].starts_with("/dev/pts/"), "{output:?}");
        assert_eq!(lines[1..], ["24 81", "controlling", ""], "{output:?}");

        let failing = Program::new(&["sh", "-c", "exit 7"]);
        let error = run_terminal(&job, &failing, WindowSize { rows: 24, cols: 80 }).unwrap_err();
        assert_eq!(error.exit_code, Some(7), "{error:?}");
    }

    #[test]
    fn a_program_that_leaves_a_background_process_still_ends() {
        let dir = tempfile::tempdir().unwrap();
        crate::job::with_test_job(dir.path(), |job| {
            let started = Instant::now();
            // The background sleep keeps stdout open: without the leftovers killed, the
            // step would wait for it for as long as it runs.
            let program = Program::new(&["sh", "-c", "sleep 600 & echo started"]);
            let out = run(job, &program, Input::Null, true).unwrap();
            assert_eq!(out, b"started\n");
            // Killed at once, not waited for until the drain limit.
            assert!(started.elapsed() < DRAIN_LIMIT / 2, "{:?}", started.elapsed());
        });
    }

    #[test]
    fn a_program_whose_leftover_escaped_its_group_ends_within_the_drain_limit() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        crate::job::with_test_job(dir.path(), |job| {
            let started = Instant::now();
            let script = format!(
                "setsid sh -c 'echo $$ > {}; exec sleep 600' & sleep 0.2",
                pid_file.display()
            );
            run(job, &Program::new(&["sh", "-c", &script]), Input::Null, false).unwrap();
            assert!(
                started.elapsed() < DRAIN_LIMIT + Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
        });
        if let Ok(pid) = std::fs::read_to_string(&pid_file) {
            unsafe { libc::kill(pid.trim().parse().unwrap(), libc::SIGKILL) };
        }
    }
}
