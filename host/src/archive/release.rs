//! `InRelease`: checked with `gpgv` against the Debian archive keys compiled into imgvm,
//! then parsed for the SHA256 of every index file.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;

/// Debian's archive keyring (bullseye, bookworm and trixie keys), from the
/// `debian-archive-keyring` package.
pub const KEYRING: &[u8] = include_bytes!("../../../images/keys/debian-archive-keyring.gpg");

pub struct Release {
    files: HashMap<String, Entry>,
}

pub struct Entry {
    pub sha256: String,
    pub size: u64,
}

impl Release {
    /// Verifies the clearsigned `InRelease` and parses only the signed text that `gpgv`
    /// hands back, never the bytes around it.
    pub fn verify(in_release: &[u8]) -> Result<Release> {
        let dir = tempfile::tempdir()?;
        let keyring = dir.path().join("keyring.gpg");
        std::fs::write(&keyring, KEYRING)?;
        let input = dir.path().join("InRelease");
        std::fs::File::create(&input)?.write_all(in_release)?;
        let output = dir.path().join("Release");
        let result = crate::child::std_command("gpgv")
            .arg("--status-fd=1")
            .arg("--keyring")
            .arg(&keyring)
            .arg("--output")
            .arg(&output)
            .arg(&input)
            .output()
            .context("running gpgv (install the gpgv package)")?;
        let status = String::from_utf8_lossy(&result.stdout);
        let good = status.lines().any(|l| l.starts_with("[GNUPG:] VALIDSIG "));
        let bad = status.lines().any(|l| l.starts_with("[GNUPG:] BADSIG "));
        if !good || bad {
            bail!(
                "no valid signature by a Debian archive key{}",
                String::from_utf8_lossy(&result.stderr)
                    .lines()
                    .map(|l| format!("\n  gpgv: {l}"))
                    .collect::<String>()
            );
        }
        Ok(Release::parse(&std::fs::read_to_string(&output)?))
    }

    fn parse(text: &str) -> Release {
        let mut files = HashMap::new();
        let mut in_sha256 = false;
        for line in text.lines() {
            if !line.starts_with(' ') {
                in_sha256 = line.trim_end() == "SHA256:";
                continue;
            }
            if !in_sha256 {
                continue;
            }
            let mut fields = line.split_whitespace();
            if let (Some(sha256), Some(Ok(size)), Some(path)) =
                (fields.next(), fields.next().map(str::parse), fields.next())
            {
                files.insert(
                    path.to_owned(),
                    Entry {
                        sha256: sha256.to_owned(),
                        size,
                    },
                );
            }
        }
        Release { files }
    }

    pub fn file(&self, path: &str) -> Option<&Entry> {
        self.files.get(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sha256_section_only() {
        let text = "Origin: Debian\nMD5Sum:\n 0123 10 main/binary-amd64/Packages.xz\nSHA256:\n abcd 42 main/binary-amd64/Packages.xz\n ef01 7 main/binary-arm64/Packages.xz\n";
        let release = Release::parse(text);
        let entry = release.file("main/binary-amd64/Packages.xz").unwrap();
        assert_eq!((entry.sha256.as_str(), entry.size), ("abcd", 42));
        assert_eq!(release.file("main/binary-arm64/Packages.xz").unwrap().size, 7);
    }

    #[test]
    fn rejects_unsigned_release() {
        let err = Release::verify(b"Origin: Debian\nSHA256:\n abcd 42 x\n").err().unwrap();
        assert!(format!("{err:#}").contains("no valid signature"), "{err:#}");
    }
}
