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

pub async fn quit(path: &Path) -> Result<()> {
    let mut stream = QmpStreamTokio::open_uds(path).await?.negotiate().await?;
    // qemu may close the socket before answering; either way it is quitting.
    let _ = stream.execute(qmp::quit {}).await;
    Ok(())
}
