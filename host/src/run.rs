//! `imgvm run`: boot the helper VM, copy files in, run one command with its output
//! streamed, copy files out, and exit with the command's status.

use crate::archive::Fetcher;
use crate::helper::{Helper, HelperOptions};
use anyhow::{bail, Context, Result};
use imgvm_protocol::{Command, ErrorKind, Event, Transfer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
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
    let helper = tokio::select! {
        helper = Helper::boot(&request.helper, &fetcher) => helper?,
        _ = cancel.cancelled() => bail!("cancelled while starting the helper VM"),
    };
    let result = work(&helper, &request, &cancel).await;
    helper.shutdown().await?;
    result
}

async fn work(helper: &Helper, request: &RunRequest, cancel: &CancellationToken) -> Result<i32> {
    let session = &helper.session;
    for copy in &request.copy_in {
        copy_in(helper, copy, cancel).await?;
    }
    let command = Command {
        argv: request.argv.clone(),
        ..Default::default()
    };
    let stdin: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>> =
        request.stdin.then(|| Box::new(tokio::io::stdin()) as _);
    let mut stdout = std::io::stdout().lock();
    let reply = session
        .run(
            command,
            stdin,
            |event| match event {
                Event::Stdout(line) => {
                    let _ = stdout
                        .write_all(&line)
                        .and_then(|_| stdout.write_all(b"\n"))
                        .and_then(|_| stdout.flush());
                }
                Event::Stderr(line) => {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(&line).and_then(|_| err.write_all(b"\n"));
                }
                Event::Progress { .. } => {}
            },
            cancel,
        )
        .await?;
    drop(stdout);
    let code = match reply {
        Ok(_) => 0,
        Err(e) if e.kind == ErrorKind::Cancelled => {
            tracing::warn!("command cancelled");
            return Ok(130);
        }
        Err(e) if e.kind == ErrorKind::CommandFailed => e.exit_code.unwrap_or(1),
        Err(e) => bail!("{e}"),
    };
    for copy in &request.copy_out {
        copy_out(helper, copy, cancel).await?;
    }
    Ok(code)
}

async fn copy_in(helper: &Helper, copy: &CopySpec, cancel: &CancellationToken) -> Result<()> {
    let source = Path::new(&copy.from);
    let meta = std::fs::metadata(source).with_context(|| format!("--copy-in: cannot read {}", source.display()))?;
    let reply = if meta.is_dir() {
        // The host's own tar packs directories; the agent unpacks them as root, so
        // ownership and modes are kept numerically.
        let mut tar = tokio::process::Command::new("tar")
            .args(["-c", "--numeric-owner", "-f", "-", "-C"])
            .arg(source)
            .arg(".")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("running tar")?;
        let stdout = tar.stdout.take().expect("piped");
        let reply = helper
            .session
            .upload(stdout, &copy.to, Transfer::Tar, 0o755, cancel)
            .await?;
        let status = tar.wait().await?;
        if !status.success() {
            bail!("tar of {} failed ({status})", source.display());
        }
        reply
    } else {
        use std::os::unix::fs::PermissionsExt;
        let file = tokio::fs::File::open(source).await?;
        helper
            .session
            .upload(
                file,
                &copy.to,
                Transfer::File,
                meta.permissions().mode() & 0o7777,
                cancel,
            )
            .await?
    };
    reply
        .map(drop)
        .map_err(|e| anyhow::anyhow!("copying {} into the VM: {e}", source.display()))
}

/// A guest path ending in `/` comes out as a tar archive; anything else as a file. The
/// host file appears only once complete.
async fn copy_out(helper: &Helper, copy: &CopySpec, cancel: &CancellationToken) -> Result<()> {
    let dest = PathBuf::from(&copy.to);
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("--copy-out: cannot write in {}", dir.display()))?;
    let format = if copy.from.ends_with('/') {
        Transfer::Tar
    } else {
        Transfer::File
    };
    let mut file = tokio::fs::File::from_std(tmp.reopen()?);
    let reply = helper.session.download(&copy.from, format, &mut file, cancel).await?;
    reply.map_err(|e| anyhow::anyhow!("copying {} out of the VM: {e}", copy.from))?;
    file.sync_all().await?;
    // Temporary files are private; the result gets the permissions of any new file.
    // SAFETY: umask(2) cannot fail; the original mask is restored at once.
    let umask = unsafe {
        let mask = libc::umask(0);
        libc::umask(mask);
        mask
    };
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o666 & !(umask as u32)))?;
    tmp.persist(&dest)?;
    Ok(())
}
