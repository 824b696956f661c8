//! Kernel modules: which files to put in the appliance, in which order to load them.
//! `modules.dep` is made by depmod at install time, so it is not in the package;
//! dependencies come from each module's own `.modinfo` section instead.

use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};

pub struct Module {
    /// Path inside the kernel package, e.g. `lib/modules/6.12.0-1-cloud-amd64/kernel/...ko.xz`.
    pub path: String,
    data: Vec<u8>,
    compressed: bool,
}

impl Module {
    /// The loadable module image; only the modules actually used are decompressed.
    pub fn image(&self) -> Result<Vec<u8>> {
        if !self.compressed {
            return Ok(self.data.clone());
        }
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut liblzma::read::XzDecoder::new(&self.data[..]), &mut out)
            .with_context(|| format!("decompressing {}", self.path))?;
        Ok(out)
    }
}

/// Modules by name (dashes as underscores) plus the names the kernel has built in.
#[derive(Default)]
pub struct ModuleSet {
    pub modules: HashMap<String, Module>,
    pub builtin: HashSet<String>,
}

pub fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file.strip_suffix(".ko").or_else(|| file.strip_suffix(".ko.xz"))?;
    Some(stem.replace('-', "_"))
}

impl ModuleSet {
    /// Adds a module file (`.ko` or `.ko.xz`).
    pub fn add(&mut self, path: &str, data: Vec<u8>) {
        if let Some(name) = module_name(path) {
            let compressed = path.ends_with(".xz");
            self.modules.insert(
                name,
                Module {
                    path: path.trim_end_matches(".xz").to_owned(),
                    data,
                    compressed,
                },
            );
        }
    }

    /// Reads `modules.builtin` (paths like `kernel/fs/ext4/ext4.ko`).
    pub fn add_builtin(&mut self, list: &str) {
        self.builtin.extend(list.lines().filter_map(module_name));
    }

    /// The modules to load for `wanted`, each after its dependencies.
    pub fn load_order(&self, wanted: &[String]) -> Result<Vec<&Module>> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in wanted {
            self.visit(&name.replace('-', "_"), &mut seen, &mut order, &mut Vec::new())?;
        }
        Ok(order)
    }

    fn visit<'a>(
        &'a self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<&'a Module>,
        stack: &mut Vec<String>,
    ) -> Result<()> {
        if seen.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            bail!("module dependency cycle: {} -> {name}", stack.join(" -> "));
        }
        let Some(module) = self.modules.get(name) else {
            bail!("the kernel has no module `{name}` (neither a file nor built in)");
        };
        stack.push(name.to_owned());
        let image = module.image()?;
        for dep in depends(&image).with_context(|| format!("reading {}", module.path))? {
            self.visit(&dep, seen, order, stack)?;
        }
        // Soft dependencies name modules or aliases; without depmod's alias table only
        // the ones that are module names can be honoured (aliases are listed in the
        // appliance definition instead).
        for dep in soft_pre_depends(&image) {
            if self.modules.contains_key(&dep) {
                self.visit(&dep, seen, order, stack)?;
            }
        }
        stack.pop();
        seen.insert(name.to_owned());
        order.push(module);
        Ok(())
    }
}

/// The `depends=` entry of an ELF module's `.modinfo` section.
fn depends(elf: &[u8]) -> Result<Vec<String>> {
    let modinfo = section(elf, ".modinfo").context("no .modinfo section")?;
    Ok(modinfo
        .split(|&b| b == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .map(|d| d.replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}

/// The `pre:` part of `softdep=` entries, e.g. `softdep=pre: crc32c` gives `crc32c`.
fn soft_pre_depends(elf: &[u8]) -> Vec<String> {
    let Some(modinfo) = section(elf, ".modinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for field in modinfo.split(|&b| b == 0).filter_map(|f| f.strip_prefix(b"softdep=")) {
        let text = String::from_utf8_lossy(field);
        let mut pre = false;
        for word in text.split_whitespace() {
            match word {
                "pre:" => pre = true,
                "post:" => pre = false,
                name if pre => out.push(name.replace('-', "_")),
                _ => {}
            }
        }
    }
    out
}

/// Finds a section of a 64-bit little-endian ELF file (all three of our architectures).
fn section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?) as usize);
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?) as usize);
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?) as usize);
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab = u64_at(header(shstrndx)? + 0x18)?;
    for i in 0..shnum {
        let h = header(i)?;
        let name_off = strtab.checked_add(u32_at(h)?)?;
        let name = elf.get(name_off..)?.split(|&b| b == 0).next()?;
        if name == wanted.as_bytes() {
            let (off, size) = (u64_at(h + 0x18)?, u64_at(h + 0x20)?);
            return elf.get(off..off.checked_add(size)?);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised() {
        assert_eq!(
            module_name("lib/modules/x/kernel/net/vmw_vsock/vmw-vsock-virtio-transport.ko.xz").as_deref(),
            Some("vmw_vsock_virtio_transport")
        );
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko").as_deref(), Some("ext4"));
        assert_eq!(module_name("README"), None);
    }

    #[test]
    fn garbage_is_not_an_elf() {
        assert!(section(b"not an elf file at all", ".modinfo").is_none());
        assert!(depends(&[0x7f, b'E', b'L', b'F', 2, 1, 0, 0]).is_err());
    }
}
