//! `imgvm run`: boot the helper VM, copy files in, run one command with its output
//! streamed, copy files out, and exit with the command's status.

use crate::archive::Fetcher;
use crate::helper::{Helper, HelperOptions};
use anyhow::{bail, Context, Result};
use imgvm_protocol::{Command, ErrorKind, Event};
use std::io::Write;
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// `HOST:GUEST` (copy in) or `GUEST:HOST` (copy out).
#[derive(Debug, Clone)]
pub struct CopySpec {
    pub from: String,
    pub to: String,
}

impl std::str::FromStr for CopySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some((from, to)) if !from.is_empty() && !to.is_empty() => Ok(CopySpec {
                from: from.into(),
                to: to.into(),
            }),
            _ => Err(format!("`{s}` is not of the form SOURCE:DESTINATION")),
        }
    }
}

pub struct RunRequest {
    pub helper: HelperOptions,
    pub copy_in: Vec<CopySpec>,
    pub copy_out: Vec<CopySpec>,
    pub stdin: bool,
    pub argv: Vec<String>,
}

/// The exit status for the process: the command's own, 130 when cancelled.
pub async fn run(request: RunRequest, cancel: CancellationToken) -> Result<i32> {
    let fetcher = Fetcher::default();
    let mut helper = tokio::select! {
        helper = Helper::boot(&request.helper, &fetcher) => helper?,
        _ = cancel.cancelled() => bail!("cancelled while starting the helper VM"),
    };
    let result = match work(&helper, &request, &cancel).await {
        Ok(code) => Ok(code),
        Err(e) => Err(helper.explain(e).await),
    };
    helper.shutdown().await?;
    result
}

async fn work(helper: &Helper, request: &RunRequest, cancel: &CancellationToken) -> Result<i32> {
    let session = &helper.session;
    for copy in &request.copy_in {
        crate::transfer::copy_in(session, Path::new(&copy.from), &copy.to, cancel)
            .await
            .with_context(|| format!("--copy-in {}:{}", copy.from, copy.to))?;
    }
    let command = Command {
        argv: request.argv.clone(),
        ..Default::default()
    };
    let stdin: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>> =
        request.stdin.then(|| Box::new(tokio::io::stdin()) as _);
    let reply = session.run(command, stdin, print, cancel).await?;
    let code = match exit_code(reply)? {
        Some(code) => code,
        None => return Ok(130),
    };
    for copy in &request.copy_out {
        crate::transfer::copy_out(session, &copy.from, Path::new(&copy.to), None, cancel)
            .await
            .with_context(|| format!("--copy-out {}:{}", copy.from, copy.to))?;
    }
    Ok(code)
}

/// Writes a line of a command's output where the user sees it: written as it comes,
/// unchanged. A slow reader (`| less`) blocks this write, off the runtime's other tasks
/// (`block_in_place`), and the session's bounded routes carry that back to the guest.
pub fn print(event: Event) {
    tokio::task::block_in_place(|| match event {
        Event::Stdout(line) => {
            let mut out = std::io::stdout().lock();
            let _ = out
                .write_all(&line)
                .and_then(|_| out.write_all(b"\n"))
                .and_then(|_| out.flush());
        }
        Event::Stderr(line) => {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&line).and_then(|_| err.write_all(b"\n"));
        }
    })
}

/// A command's exit status from its reply; `None` when it was cancelled.
pub fn exit_code(reply: crate::session::Reply) -> Result<Option<i32>> {
    match reply {
        Ok(_) => Ok(Some(0)),
        Err(e) if e.kind == ErrorKind::Cancelled => {
            tracing::warn!("command cancelled");
            Ok(None)
        }
        Err(e) if e.kind == ErrorKind::CommandFailed => Ok(Some(e.exit_code.unwrap_or(1))),
        Err(e) => bail!("{e}"),
    }
}
