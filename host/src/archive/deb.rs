//! Reading `.deb` files without dpkg: an `ar` archive whose `data.tar.*` member holds the
//! files. Maintainer scripts are never run.

use anyhow::{bail, Context, Result};
use std::io::{BufReader, Read};
use std::path::Path;

/// Calls `each` for every entry of the package's data archive, in archive order.
pub fn extract_data(
    deb: &Path,
    mut each: impl FnMut(&mut tar::Entry<'_, Box<dyn Read + '_>>) -> Result<()>,
) -> Result<()> {
    let mut file = BufReader::new(std::fs::File::open(deb).with_context(|| format!("opening {}", deb.display()))?);
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic)?;
    if &magic != b"!<arch>\n" {
        bail!("{} is not a Debian package (no ar header)", deb.display());
    }
    loop {
        let mut header = [0u8; 60];
        if let Err(e) = file.read_exact(&mut header) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bail!("{} has no data.tar member", deb.display());
            }
            return Err(e.into());
        }
        let name = String::from_utf8_lossy(&header[..16])
            .trim_end()
            .trim_end_matches('/')
            .to_owned();
        let size: u64 = String::from_utf8_lossy(&header[48..58])
            .trim()
            .parse()
            .context("corrupt ar member size")?;
        let mut member = (&mut file).take(size);
        if name.starts_with("data.tar") {
            let reader: Box<dyn Read + '_> = match name.as_str() {
                "data.tar.xz" => Box::new(liblzma::read::XzDecoder::new(member)),
                "data.tar.gz" => Box::new(flate2::read::GzDecoder::new(member)),
                "data.tar" => Box::new(member),
                other => bail!("{}: unsupported compression {other}", deb.display()),
            };
            let mut archive = tar::Archive::new(reader);
            for entry in archive.entries()? {
                each(&mut entry?)?;
            }
            return Ok(());
        }
        // Members are padded to an even size.
        std::io::copy(&mut member, &mut std::io::sink())?;
        if size % 2 == 1 {
            file.read_exact(&mut [0u8; 1])?;
        }
    }
}
