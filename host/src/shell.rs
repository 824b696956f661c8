//! `imgvm shell IMAGE [-- CMD]` and `imgvm build --debug-shell`: a root shell, or one
//! command, in an image's tree, in a helper VM of the image's architecture. The image's
//! filesystems are mounted as its manifest lays them out, and the command runs chrooted
//! in a view of them, read-only unless asked (the disk itself is attached read-only
//! then too). On a terminal, the command gets one: raw bytes both ways and the window's
//! size; otherwise its output comes in lines and stdin is streamed to it.

use crate::archive::Fetcher;
use crate::helper::{Helper, HelperOptions};
use crate::recipe::{Partition, TableKind};
use crate::session::Session;
use anyhow::{bail, Context, Result};
use imgvm_protocol::{Access, Command, Mount, Unmount};
use std::io::IsTerminal;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

pub struct ShellRequest {
    pub image: PathBuf,
    /// How the image's disk is laid out: its manifest's.
    pub table: TableKind,
    pub partitions: Vec<Partition>,
    pub helper: HelperOptions,
    pub writable: bool,
    /// The command; empty for a login shell.
    pub argv: Vec<String>,
}

/// The exit status for the process: the command's own; `None` when cancelled.
pub async fn shell(request: ShellRequest, cancel: CancellationToken) -> Result<Option<i32>> {
    let ShellRequest {
        image,
        table,
        partitions,
        helper: mut options,
        writable,
        argv,
    } = request;
    let image = std::fs::canonicalize(&image).with_context(|| format!("cannot open {}", image.display()))?;
    options.disks = vec![image];
    options.read_only = !writable;
    let fetcher = Fetcher::default();
    let mut helper = tokio::select! {
        helper = Helper::boot(&options, &fetcher) => helper?,
        _ = cancel.cancelled() => return Ok(None),
    };
    let worked = async {
        mount(&helper.session, table, &partitions, &cancel).await?;
        let access = match writable {
            true => Access::ReadWrite,
            false => Access::ReadOnly,
        };
        let code = open(&helper.session, Some(access), argv, &cancel).await?;
        helper
            .session
            .image(Unmount { trim: false }, None, |_| {}, &cancel)
            .await??;
        Ok::<_, anyhow::Error>(code)
    }
    .await;
    let result = match worked {
        Ok(code) => Ok(code),
        Err(e) => Err(helper.explain(e).await),
    };
    helper.shutdown().await?;
    result
}

/// Mounts the image's filesystems (its disk is the helper's first) at the image's root.
pub async fn mount(
    session: &Session,
    table: TableKind,
    partitions: &[Partition],
    cancel: &CancellationToken,
) -> Result<()> {
    let filesystems = crate::plan::image_filesystems(table, partitions, "/dev/vda");
    if !filesystems.iter().any(|(_, mount, _)| mount == "/") {
        bail!("its manifest names no root filesystem");
    }
    for (device, path, _) in filesystems {
        session.image(Mount { device, path }, None, |_| {}, cancel).await??;
    }
    Ok(())
}

/// Runs `argv` (a login shell when empty) in the image the helper has mounted (in the
/// helper itself when `image` is `None`), on a terminal when this process is on one.
/// `None` when it was cancelled.
pub async fn open(
    session: &Session,
    image: Option<Access>,
    argv: Vec<String>,
    cancel: &CancellationToken,
) -> Result<Option<i32>> {
    let argv = match argv.is_empty() {
        true => [
            "/bin/sh",
            "-c",
            "[ -x /bin/bash ] && exec /bin/bash -l; exec /bin/sh -l",
        ]
        .map(str::to_owned)
        .to_vec(),
        false => argv,
    };
    let on_terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let size = crate::terminal::size().filter(|_| on_terminal);
    let mut env = vec![("HOME".to_owned(), "/root".to_owned())];
    if size.is_some() {
        let term = std::env::var("TERM").unwrap_or_else(|_| "vt220".into());
        env.push(("TERM".into(), term));
    }
    let command = Command {
        argv,
        env,
        image,
        terminal: size,
        ..Command::default()
    };
    let reply = match size {
        Some(_) => {
            let _raw = crate::terminal::RawTerminal::enter();
            let (resized, sizes) = tokio::sync::mpsc::channel(4);
            let mut window_changes = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
            let watcher = tokio::spawn(async move {
                while window_changes.recv().await.is_some() {
                    if let Some(size) = crate::terminal::size() {
                        if resized.send(size).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut screen = tokio::io::stdout();
            let reply = session
                .terminal(command, crate::terminal::keyboard(), sizes, &mut screen, cancel)
                .await;
            watcher.abort();
            reply?
        }
        None => {
            // Input typed on a terminal is not the command's when its output is not on one.
            let stdin: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>> =
                (!std::io::stdin().is_terminal()).then(|| Box::new(tokio::io::stdin()) as _);
            session.run(command, stdin, crate::run::print, cancel).await?
        }
    };
    crate::run::exit_code(reply)
}
