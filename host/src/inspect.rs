//! The files of finished images, listed in a helper VM that has them attached read-only:
//! what `imgvm diff --files` compares. The guest's listing is bounded by the session's
//! reply limit and only ever compared, never used as a path on the host.

use crate::archive::Fetcher;
use crate::helper::{Helper, HelperOptions};
use crate::manifest::Manifest;
use crate::recipe::TableKind;
use anyhow::{bail, Context, Result};
use imgvm_protocol::{FileEntry, ListFiles};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One image's files by path in the image (`/boot/efi/EFI/...`).
pub type Files = BTreeMap<String, FileEntry>;

/// A finished raw image and the manifest that describes it.
pub struct Image {
    pub raw: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    /// The raw image the manifest at `manifest` (in its output directory) lists.
    pub fn beside(manifest_path: &std::path::Path, manifest: Manifest) -> Result<Image> {
        let raw = manifest
            .outputs
            .iter()
            .find(|o| o.format == crate::recipe::OutputFormat::Raw)
            .with_context(|| format!("{} lists no raw image to compare files in", manifest_path.display()))?;
        let dir = manifest_path.parent().unwrap_or(std::path::Path::new("."));
        // The output's bare file name: a manifest names no path of its own choosing.
        let name = std::path::Path::new(&raw.file)
            .file_name()
            .with_context(|| format!("{}: output {:?} is not a file name", manifest_path.display(), raw.file))?;
        let raw = dir.join(name);
        if !raw.is_file() {
            bail!("{} is not there: --files needs both raw images", raw.display());
        }
        Ok(Image { raw, manifest })
    }
}

/// Lists the files of both images in one helper VM of their architecture.
pub async fn files(images: [&Image; 2], cancel: &CancellationToken) -> Result<[Files; 2]> {
    let arch: crate::arch::Arch = images[0]
        .manifest
        .arch
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("the older build's architecture")?;
    let options = HelperOptions {
        arch,
        disks: images.iter().map(|i| i.raw.clone()).collect(),
        read_only: true,
        memory_mib: 1024,
        cpus: None,
        boot_timeout: Duration::from_secs(180),
        mirror: None,
        suite: None,
        bare: false,
        proxy_mirrors: Vec::new(),
        fallback: None,
        pinned: Vec::new(),
        appliance: None,
    };
    let fetcher = Fetcher::default();
    let helper = tokio::select! {
        helper = Helper::boot(&options, &fetcher) => helper?,
        _ = cancel.cancelled() => bail!("cancelled while starting the helper VM"),
    };
    let listed = async {
        let mut out = [Files::new(), Files::new()];
        for (i, image) in images.iter().enumerate() {
            let disk = ["/dev/vda", "/dev/vdb"][i];
            let table = image.manifest.table.unwrap_or(TableKind::Gpt);
            for (device, mount, filesystem) in crate::plan::image_filesystems(table, &image.manifest.partitions, disk) {
                let op = ListFiles { device, filesystem };
                let entries = helper.session.image(op, None, |_| {}, cancel).await??;
                for mut entry in entries {
                    entry.path = match (mount.as_str(), entry.path.as_str()) {
                        ("/", path) => path.to_owned(),
                        (mount, "/") => mount.to_owned(),
                        (mount, path) => format!("{mount}{path}"),
                    };
                    out[i].insert(entry.path.clone(), entry);
                }
            }
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    let shutdown = helper.shutdown().await;
    let listed = listed?;
    shutdown?;
    Ok(listed)
}
