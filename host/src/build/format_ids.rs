//! What qemu-img writes at random or from the clock into VHD and VMDK files (the VHD
//! footer's UUID and time stamp, the VMDK descriptor's content id), replaced by values
//! derived from the image's name and `SOURCE_DATE_EPOCH`, so that the same disk gives
//! the same file.

use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00:00 UTC.
const VHD_EPOCH: i64 = 946_684_800;

fn derived(what: &str, name: &str, epoch: i64) -> [u8; 32] {
    Sha256::new()
        .chain_update(format!("{what}\0{name}\0{epoch}"))
        .finalize()
        .into()
}

/// A fixed VHD's footer (its last 512 bytes): the time stamp (offset 24) and the UUID
/// (offset 68), then the checksum over the footer (offset 64).
pub fn vhd(path: &Path, name: &str, epoch: i64) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let end = file.seek(SeekFrom::End(0))?;
    let at = end
        .checked_sub(512)
        .ok_or_else(|| invalid("shorter than a VHD footer"))?;
    let mut footer = [0u8; 512];
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut footer)?;
    if &footer[..8] != b"conectix" {
        return Err(invalid("no VHD footer"));
    }
    let stamp = u32::try_from((epoch - VHD_EPOCH).max(0)).unwrap_or(u32::MAX);
    footer[24..28].copy_from_slice(&stamp.to_be_bytes());
    footer[68..84].copy_from_slice(&derived("vhd", name, epoch)[..16]);
    footer[64..68].fill(0);
    let sum = footer.iter().fold(0u32, |sum, &b| sum.wrapping_add(u32::from(b)));
    footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
    file.seek(SeekFrom::Start(at))?;
    file.write_all(&footer)?;
    file.sync_all()
}

/// A VMDK's embedded descriptor: its `CID=` line, written with eight hex digits (qemu
/// writes as many as its random number needs), the rest of the text moved up or down
/// within the descriptor's sectors.
pub fn vmdk(path: &Path, name: &str, epoch: i64) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut header = [0u8; 512];
    file.read_exact(&mut header)?;
    if &header[..4] != b"KDMV" {
        return Err(invalid("no VMDK header"));
    }
    let sectors = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let (offset, size) = (sectors(28) * 512, sectors(36) * 512);
    if offset == 0 || size == 0 || size > 1 << 20 {
        return Err(invalid("no embedded descriptor"));
    }
    let mut area = vec![0u8; usize::try_from(size).map_err(|_| invalid("descriptor too large"))?];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut area)?;
    let len = area.iter().position(|&b| b == 0).unwrap_or(area.len());
    let text = std::str::from_utf8(&area[..len]).map_err(|_| invalid("descriptor is not text"))?;
    let cid = derived("vmdk", name, epoch);
    let cid = u32::from_be_bytes(cid[..4].try_into().expect("4 bytes"));
    let mut found = false;
    let lines: Vec<String> = text
        .split_inclusive('\n')
        .map(|line| match line.starts_with("CID=") {
            true => {
                found = true;
                format!("CID={cid:08x}\n")
            }
            false => line.to_owned(),
        })
        .collect();
    let text = lines.concat();
    if !found || text.len() > area.len() {
        return Err(invalid("descriptor without a CID, or no room for it"));
    }
    area.fill(0);
    area[..text.len()].copy_from_slice(text.as_bytes());
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(&area)?;
    file.sync_all()
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}
