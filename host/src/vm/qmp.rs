//! The few QMP commands imgvm needs, through the `qapi` crate.

use anyhow::{bail, Context, Result};
use qapi::{futures::QmpStreamTokio, qmp};
use std::path::Path;
use std::time::Duration;
use tokio::process::Child;

/// Waits until qemu answers on its QMP socket, or fails if qemu exits first.
pub async fn wait_ready(path: &Path, qemu: &mut Child) -> Result<()> {
    for _ in 0..600 {
        if let Some(status) = qemu.try_wait()? {
            bail!("qemu exited at start ({status})");
        }
        if path.exists() && status(path).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("qemu did not answer on QMP within 30 s")
}

pub async fn status(path: &Path) -> Result<String> {
    let mut stream = QmpStreamTokio::open_uds(path).await?.negotiate().await?;
    let status = stream.execute(qmp::query_status {}).await.context("query-status")?;
    Ok(serde_json::to_value(status.status)?
        .as_str()
        .unwrap_or("unknown")
        .to_owned())
}

/// Presses the machine's power button (ACPI): the guest shuts down as it sees fit.
pub async fn powerdown(path: &Path) -> Result<()> {
    let mut stream = QmpStreamTokio::open_uds(path).await?.negotiate().await?;
    stream
        .execute(qmp::system_powerdown {})
        .await
        .context("system_powerdown")?;
    Ok(())
}

pub async fn quit(path: &Path) -> Result<()> {
    let mut stream = QmpStreamTokio::open_uds(path).await?.negotiate().await?;
    // qemu may close the socket before answering; either way it is quitting.
    let _ = stream.execute(qmp::quit {}).await;
    Ok(())
}

/// A QMP command given as its name and JSON arguments, for the commands whose generated
/// types carry far more than imgvm sets.
macro_rules! raw_command {
    ($type:ident, $name:literal) => {
        #[derive(serde::Serialize)]
        #[serde(transparent)]
        struct $type(serde_json::Value);
        impl qapi::Command for $type {
            type Ok = qapi::Empty;
            const NAME: &'static str = $name;
            const ALLOW_OOB: bool = false;
        }
        impl qmp::QmpCommand for $type {}
    };
}
raw_command!(BlockdevAdd, "blockdev-add");
raw_command!(BlockdevSnapshot, "blockdev-snapshot");

/// Makes `overlay` (an empty qcow2 file whose header already names what it will be
/// backed by) the top of `device`'s image, with the current top as its backing: from now
/// on the guest writes into `overlay`, and the old top keeps the disk as it was. qemu
/// flushes the old top first. `node` is the new top's name, new for each snapshot.
pub async fn snapshot(path: &Path, device: &str, overlay: &Path, node: &str) -> Result<()> {
    let mut stream = QmpStreamTokio::open_uds(path).await?.negotiate().await?;
    let add = serde_json::json!({
        "driver": "qcow2",
        "node-name": node,
        "file": {"driver": "file", "filename": overlay},
        "backing": null,
        "discard": "unmap",
        "cache": {"no-flush": true},
    });
    stream.execute(BlockdevAdd(add)).await.context("blockdev-add")?;
    let snapshot = serde_json::json!({"node": device, "overlay": node});
    stream
        .execute(BlockdevSnapshot(snapshot))
        .await
        .context("blockdev-snapshot")?;
    Ok(())
}
