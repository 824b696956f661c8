//! Copying host files and directories into the helper VM and files out of it.

use crate::session::Session;
use anyhow::{bail, Context, Result};
use imgvm_protocol::Transfer;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio_util::sync::CancellationToken;

/// A host file, or a directory (packed by the host's tar and unpacked as root in the
/// guest, numeric owners kept), to `dest` in the guest.
pub async fn copy_in(session: &Session, source: &Path, dest: &str, cancel: &CancellationToken) -> Result<()> {
    let meta = std::fs::metadata(source).with_context(|| format!("cannot read {}", source.display()))?;
    let reply = if meta.is_dir() {
        let (mut tar, stdout) = tar_stream(source)?;
        let reply = session.upload(stdout, dest, Transfer::Tar, 0o755, cancel).await?;
        let status = tar.wait().await?;
        if !status.success() {
            bail!("tar of {} failed ({status})", source.display());
        }
        reply
    } else {
        use std::os::unix::fs::PermissionsExt;
        let file = tokio::fs::File::open(source).await?;
        session
            .upload(file, dest, Transfer::File, meta.permissions().mode() & 0o7777, cancel)
            .await?
    };
    reply
        .map(drop)
        .map_err(|e| anyhow::anyhow!("copying {} into the VM: {e}", source.display()))
}

/// Space left free on the host's disk whatever a guest sends.
const RESERVE: u64 = 1 << 30;

/// A guest file (or with a trailing `/` a directory, as a tar archive) to `dest` on the
/// host, which appears only once complete; at most `limit` bytes, and never so much
/// that less than [`RESERVE`] stays free where `dest` is written.
pub async fn copy_out(
    session: &Session,
    source: &str,
    dest: &Path,
    limit: Option<u64>,
    cancel: &CancellationToken,
) -> Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let room = free_bytes(dir).map_or(u64::MAX, |free| free.saturating_sub(RESERVE));
    let limit = limit.unwrap_or(u64::MAX).min(room);
    let tmp = crate::leftovers::partial_file(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    let format = if source.ends_with('/') {
        Transfer::Tar
    } else {
        Transfer::File
    };
    let mut file = tokio::fs::File::from_std(tmp.reopen()?);
    let reply = session.download(source, format, &mut file, limit, cancel).await?;
    reply.map_err(|e| anyhow::anyhow!("copying {source} out of the VM: {e}"))?;
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
    tmp.persist(PathBuf::from(dest))?;
    Ok(())
}

/// The host's tar packing `dir`, numeric owners kept; the child is killed if dropped.
pub fn tar_stream(dir: &Path) -> Result<(tokio::process::Child, tokio::process::ChildStdout)> {
    let mut tar = crate::child::command("tar")
        .args(["-c", "--numeric-owner", "-f", "-", "-C"])
        .arg(dir)
        .arg(".")
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let stdout = tar.stdout.take().expect("piped");
    Ok((tar, stdout))
}

/// Bytes an unprivileged user may still write on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills a zeroed struct from a NUL-terminated path.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}
