//! The helper appliance: a Debian kernel and an initramfs holding a Debian userland,
//! the kernel modules the agent loads, and the agent itself as `/init`.
//!
//! Assembly is done on the host without root and without the host's package manager:
//! packages come from [`crate::archive`], their data archives are unpacked into an
//! in-memory tree and written as cpio. The result is cached under a key derived from the
//! definition, so a second run neither downloads nor assembles anything; the agent is
//! appended as a second cpio archive, so rebuilding the agent does not invalidate it.

mod definition;
mod kmod;
mod tree;

pub use definition::{Definition, BUILTIN};

use crate::arch::Arch;
use crate::archive::{self, Archive, Fetcher, Package};
use crate::lock::HelperLock;
use crate::progress;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use tree::{Node, Tree};

/// Bumped whenever assembly changes in a way that changes its output.
const FORMAT: u32 = 4;

/// Where the agent writes its load list from (see the agent's `init`).
const MODULE_LIST: &str = "etc/imgvm/modules";

/// A ready appliance in the cache.
pub struct Appliance {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub arch: Arch,
    pub suite: String,
    pub mirror: String,
    pub kernel_package: String,
    pub kernel_version: String,
    pub modules: Vec<String>,
    /// The releases and every package (the kernel's too) it was assembled from, for the
    /// lock of every image it builds.
    pub built_from: HelperLock,
}

/// Which appliance to use: the definition plus any mirror or suite override, and the
/// releases and packages a lock pins it to.
pub struct Spec {
    pub arch: Arch,
    pub definition: Definition,
    key: String,
    /// The lock's appliance, and the cache key of one assembled from it.
    pin: Option<(HelperLock, String)>,
}

impl Spec {
    pub fn new(arch: Arch, mirror: Option<&str>, suite: Option<&str>) -> Result<Spec> {
        let mut definition = Definition::parse(BUILTIN)?;
        if let Some(mirror) = mirror {
            definition.mirror = mirror.trim_end_matches('/').to_owned();
        }
        if let Some(suite) = suite {
            definition.suite = suite.to_owned();
        }
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "{FORMAT}\0{arch}\0{}\0{}\0",
            definition.mirror, definition.suite
        ));
        hasher.update(BUILTIN);
        let key = format!("{arch}-{}", &archive::hex(&hasher.finalize())[..16]);
        Ok(Spec {
            arch,
            definition,
            key,
            pin: None,
        })
    }

    /// The appliance exactly as `pin` (a lock's) lists it, so that a locked build runs
    /// its steps with the same programs (mke2fs decides the bytes of every ext4) even
    /// after the mirror moved on: assembled from the releases the lock names, which
    /// must resolve to the lock's packages.
    pub fn pinned(mut self, pin: HelperLock) -> Result<Spec> {
        let def = &self.definition;
        let url = crate::lock::release_url(&def.mirror, &def.suite);
        let Some(first) = pin.releases.first() else {
            bail!("the lock names no release of the helper VM's packages");
        };
        if first.url != url {
            bail!(
                "the lock's helper VM came from {}, this build's from {url}: build with the helper \
                 suite and mirror the lock was written with, or refresh it with `imgvm lock --update`",
                first.url
            );
        }
        let mut hasher = Sha256::new();
        hasher.update(&self.key);
        hasher.update(serde_json::to_vec(&pin)?);
        let key = format!("{}-{}", self.arch, &archive::hex(&hasher.finalize())[..16]);
        self.pin = Some((pin, key));
        Ok(self)
    }

    fn dir(&self) -> PathBuf {
        let key = self.pin.as_ref().map_or(&self.key, |(_, key)| key);
        crate::cache::dir().join("appliances").join(key)
    }

    /// The cached appliance, if one was assembled before: with a pin, the latest one
    /// when the pin lists what it holds (the machine that wrote the lock), else one
    /// assembled from the pin.
    pub fn cached(&self) -> Option<Appliance> {
        let read = |key: &str| {
            let dir = crate::cache::dir().join("appliances").join(key);
            let manifest = std::fs::read(dir.join("manifest.json")).ok()?;
            let manifest = serde_json::from_slice(&manifest).ok()?;
            Some(Appliance { dir, manifest })
        };
        match &self.pin {
            None => read(&self.key),
            Some((pin, key)) => [&self.key, key]
                .into_iter()
                .filter_map(|key| read(key))
                .find(|appliance| appliance.manifest.built_from == *pin),
        }
    }

    /// The cached appliance, or a freshly assembled one when there is none or `refresh`.
    pub fn ensure(&self, fetcher: &Fetcher, refresh: bool) -> Result<Appliance> {
        if !refresh {
            if let Some(appliance) = self.cached() {
                tracing::info!("using cached {} appliance ({})", self.arch, appliance.dir.display());
                return Ok(appliance);
            }
        }
        // Concurrent runs assemble once: the others wait, then find it cached.
        let _lock = self.lock()?;
        if !refresh {
            if let Some(appliance) = self.cached() {
                return Ok(appliance);
            }
        }
        self.assemble(fetcher)
    }

    /// An exclusive lock on this appliance's cache entry, released when dropped.
    fn lock(&self) -> Result<std::fs::File> {
        let path = self.dir().with_extension("lock");
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        // SAFETY: flock on a valid open descriptor.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", path.display()));
        }
        Ok(file)
    }

    fn assemble(&self, fetcher: &Fetcher) -> Result<Appliance> {
        let def = &self.definition;
        let arch = self.arch;
        let pin = self.pin.as_ref().map(|(pin, _)| pin);
        let pinned = |suite: &str| {
            let url = crate::lock::release_url(&def.mirror, suite);
            pin.and_then(|pin| pin.releases.iter().find(|r| r.url == url))
        };
        let archive = Archive::new(&def.mirror, &def.suite, &crate::cache::verified(), fetcher.clone());
        tracing::info!("resolving the {arch} appliance from {} {}", def.mirror, def.suite);
        let (mut index, release) = archive.index(arch, pinned(&def.suite))?;
        let mut releases = vec![release];
        if let Some(sources) = def.backports.get(&def.suite) {
            let suite = format!("{}-backports", def.suite);
            let backports = Archive::new(&def.mirror, &suite, &crate::cache::verified(), fetcher.clone());
            let (newer, release) = backports.index(arch, pinned(&suite))?;
            index
                .prefer(&newer, sources)
                .with_context(|| format!("taking {} from {suite}", sources.join(", ")))?;
            releases.push(release);
        }
        let kernel_meta = def.kernel_package(arch)?;
        let kernel = kernel_image_package(&index, kernel_meta)?;
        let packages = index
            .closure(&def.packages)
            .context("resolving the appliance's packages")?;
        let mut all: Vec<&Package> = packages.values().collect();
        all.push(kernel);
        let mut locked: Vec<_> = all.iter().map(|p| archive.locked(p)).collect();
        locked.sort();
        let built_from = HelperLock {
            releases,
            packages: locked,
        };
        if let Some(pin) = pin {
            check_pin(pin, &built_from)?;
        }
        let debs = download_all(&archive, &all, arch)?;

        tracing::info!("assembling the {arch} appliance from {} packages", packages.len());
        let mut tree = Tree::default();
        for package in packages.values() {
            unpack(&debs[&package.name], &mut tree, &def.exclude)
                .with_context(|| format!("unpacking {} {}", package.name, package.version))?;
        }
        let (kernel_file, kernel_version, modules) = unpack_kernel(&debs[&kernel.name])
            .with_context(|| format!("unpacking {} {}", kernel.name, kernel.version))?;
        let order = modules.load_order(&def.modules(arch)?)?;
        // The bare tree (modules only) is what `imgvm appliance boot-time --bare` boots
        // to measure the kernel without the userland.
        let mut bare = Tree::default();
        let mut list = String::new();
        for module in &order {
            let key = Tree::key(&module.path);
            let image = module.image()?;
            tree.insert(
                key.clone(),
                Node::File {
                    mode: 0o644,
                    data: image.clone(),
                },
            );
            bare.insert(
                key.clone(),
                Node::File {
                    mode: 0o644,
                    data: image,
                },
            );
            list.push_str(&format!("/{key}\n"));
        }
        for t in [&mut tree, &mut bare] {
            t.insert(
                MODULE_LIST.into(),
                Node::File {
                    mode: 0o644,
                    data: list.clone().into_bytes(),
                },
            );
            add_system_files(t);
            t.finish();
        }

        let parent = self.dir().parent().context("cache directory")?.to_owned();
        std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let staging = crate::leftovers::ClaimedDir::new_in(&parent, ".imgvm-appliance-")?;
        std::fs::write(staging.path().join("kernel"), &kernel_file)?;
        for (t, name) in [(&tree, "base.cpio"), (&bare, "bare.cpio")] {
            let mut cpio = BufWriter::new(std::fs::File::create(staging.path().join(name))?);
            t.write_cpio(&mut cpio)?;
            cpio.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        let manifest = Manifest {
            arch,
            suite: def.suite.clone(),
            mirror: def.mirror.clone(),
            kernel_package: kernel.name.clone(),
            kernel_version,
            modules: order
                .iter()
                .map(|m| kmod::module_name(&m.path).unwrap_or_default())
                .collect(),
            built_from,
        };
        std::fs::write(
            staging.path().join("manifest.json"),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        // Replace any older appliance of the same key in one rename.
        let dir = self.dir();
        let old = parent.join(format!(".old-{}", self.key));
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(&dir, &old)?;
        }
        staging.persist(&dir)?;
        let _ = std::fs::remove_dir_all(&old);
        tracing::info!(
            "{arch} appliance ready: {} files, kernel {}",
            tree.len(),
            manifest.kernel_version
        );
        Ok(Appliance { dir, manifest })
    }
}

impl Appliance {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("kernel")
    }

    /// The initramfs to boot: the cached base archive (or with `bare` the modules-only
    /// one) with `agent` appended as `/init`. Kept in the cache next to the base, keyed by
    /// the agent's hash.
    pub fn initrd(&self, agent: &[u8], bare: bool) -> Result<PathBuf> {
        let hash = archive::hex(&Sha256::digest(agent));
        let base = if bare { "bare" } else { "base" };
        let name = format!("initrd-{base}-{}.cpio", &hash[..16]);
        let path = self.dir.join(&name);
        if path.exists() {
            return Ok(path);
        }
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        std::io::copy(
            &mut std::fs::File::open(self.dir.join(format!("{base}.cpio")))?,
            tmp.as_file_mut(),
        )?;
        tree::single_file_cpio(tmp.as_file_mut(), "init", 0o755, agent)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path)?;
        // Initrds for older agents are dead weight.
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(&format!("initrd-{base}-")) && file != name {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(path)
    }
}

/// The appliance assembled from the pinned releases is the one the lock lists: the
/// same definition resolves to the same packages, so anything else means imgvm's
/// appliance changed since the lock was written.
fn check_pin(pin: &HelperLock, built_from: &HelperLock) -> Result<()> {
    if pin == built_from {
        return Ok(());
    }
    let by_name = |lock: &HelperLock| -> BTreeMap<String, crate::lock::LockedPackage> {
        lock.packages.iter().map(|p| (p.name.clone(), p.clone())).collect()
    };
    let (locked, ours) = (by_name(pin), by_name(built_from));
    let mut changes = Vec::new();
    for (name, package) in &locked {
        match ours.get(name) {
            None => changes.push(format!("-{name} {}", package.version)),
            Some(our) if our.version != package.version => {
                changes.push(format!("~{name} {} -> {}", package.version, our.version))
            }
            Some(our) if our != package => changes.push(format!("~{name} {} (another file)", package.version)),
            Some(_) => {}
        }
    }
    changes.extend(
        ours.iter()
            .filter(|(name, _)| !locked.contains_key(*name))
            .map(|(name, p)| format!("+{name} {}", p.version)),
    );
    if pin.releases != built_from.releases {
        changes.push("other releases".into());
    }
    let more = changes.len().saturating_sub(10);
    changes.truncate(10);
    if more > 0 {
        changes.push(format!("and {more} more"));
    }
    bail!(
        "the helper VM this imgvm assembles from the releases the lock names differs from the lock's ({}): \
         the appliance definition changed since the lock was written; refresh it with `imgvm lock --update`",
        changes.join(", ")
    )
}

/// Follows the kernel metapackage (`linux-image-cloud-amd64`) to the package with the
/// kernel in it (`linux-image-6.12.48+deb13-cloud-amd64`).
fn kernel_image_package<'a>(index: &'a archive::PackageIndex, meta: &str) -> Result<&'a Package> {
    let mut package = index
        .get(meta)
        .with_context(|| format!("the archive has no kernel package {meta}"))?;
    for _ in 0..4 {
        if package.name != meta {
            return Ok(package);
        }
        let next = package
            .depends
            .iter()
            .flatten()
            .find(|d| d.starts_with("linux-image-") && index.get(d).is_some());
        match next {
            Some(name) => package = index.get(name).expect("checked above"),
            None => return Ok(package),
        }
    }
    bail!("cannot find the kernel image package behind {meta}")
}

/// The .deb of each of `packages`. A mirror that lacks some its signed index lists gets
/// one error naming all of them, and the ways out: a whole suite's helper fails on the
/// first missing file otherwise, and the user learns of the next one a retry later.
fn download_all(archive: &Archive, packages: &[&Package], arch: Arch) -> Result<BTreeMap<String, PathBuf>> {
    let total: u64 = packages.iter().map(|p| p.size).sum();
    let bar = progress::bytes_bar(total, "fetching packages");
    let fetched = archive::in_parallel(packages, 4, |package| {
        let deb = archive.deb(package);
        bar.inc(package.size);
        match deb {
            Ok(deb) => Ok(Ok((package.name.clone(), deb))),
            Err(e) if archive::missing(&e) => Ok(Err(format!("{} {}", package.name, package.version))),
            Err(e) => Err(e),
        }
    });
    bar.finish_and_clear();
    let (debs, mut missing): (Vec<_>, Vec<_>) = fetched?.into_iter().partition(Result::is_ok);
    if !missing.is_empty() {
        let mut names: Vec<String> = missing.drain(..).filter_map(Result::err).collect();
        names.sort();
        bail!(
            "the mirror {} lacks {} of the {} {arch} helper's packages that its signed index \
             lists: {}. It is incomplete or being synced: try again later, take the helper's \
             packages from another mirror (--helper-mirror URL), or assemble the helper from a \
             suite this mirror has in full (--helper-suite SUITE, e.g. bookworm, or \
             IMGVM_SUITE=SUITE; the image's own suite stays the recipe's)",
            archive.mirror(),
            names.len(),
            archive.suite(),
            names.join(", ")
        );
    }
    let debs: Vec<(String, PathBuf)> = debs.into_iter().filter_map(Result::ok).collect();
    let stats = archive.fetcher().stats();
    tracing::info!(
        "{} packages ({} MB) needed, {} files ({} MB) downloaded",
        packages.len(),
        total >> 20,
        stats.files(),
        stats.bytes() >> 20
    );
    Ok(debs.into_iter().collect())
}

fn unpack(deb: &Path, tree: &mut Tree, exclude: &[String]) -> Result<()> {
    archive::extract_data(deb, |entry| {
        let path = entry.path()?.to_string_lossy().into_owned();
        let key = Tree::key(&path);
        if exclude.iter().any(|e| key == *e || key.starts_with(&format!("{e}/"))) {
            return Ok(());
        }
        let mode = entry.header().mode()? & 0o7777;
        let node = match entry.header().entry_type() {
            tar::EntryType::Directory => Node::Dir { mode },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut data)?;
                Node::File { mode, data }
            }
            tar::EntryType::Symlink => {
                if Tree::is_merged_link(&path) {
                    return Ok(());
                }
                let target = entry.link_name()?.context("symlink without target")?;
                Node::Symlink {
                    target: target.to_string_lossy().into_owned(),
                }
            }
            tar::EntryType::Link => {
                let target = Tree::key(
                    &entry
                        .link_name()?
                        .context("hard link without target")?
                        .to_string_lossy(),
                );
                match tree.get(&target) {
                    Some(Node::File { data, .. }) => Node::File {
                        mode,
                        data: data.clone(),
                    },
                    _ => bail!("hard link {path} points to {target}, which is not a file"),
                }
            }
            _ => return Ok(()),
        };
        // A directory entry never replaces what is already there.
        if matches!(node, Node::Dir { .. }) && tree.contains(&key) {
            return Ok(());
        }
        tree.insert(key, node);
        Ok(())
    })
}

fn unpack_kernel(deb: &Path) -> Result<(Vec<u8>, String, kmod::ModuleSet)> {
    let mut kernel = None;
    let mut modules = kmod::ModuleSet::default();
    archive::extract_data(deb, |entry| {
        let path = entry.path()?.to_string_lossy().trim_start_matches("./").to_owned();
        let is_kernel = path.starts_with("boot/vmlinuz-") || path.starts_with("boot/vmlinux-");
        let is_module = kmod::module_name(&path).is_some();
        let is_builtin = path.ends_with("/modules.builtin");
        if !(is_kernel || is_module || is_builtin) || entry.header().entry_type() != tar::EntryType::Regular {
            return Ok(());
        }
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        if is_kernel {
            kernel = Some((data, path["boot/vmlinuz-".len()..].to_owned()));
        } else if is_builtin {
            modules.add_builtin(&String::from_utf8_lossy(&data));
        } else {
            modules.add(&path, data);
        }
        Ok(())
    })?;
    let (image, version) = kernel.context("the kernel package contains no boot/vmlinu[xz]-*")?;
    Ok((image, version, modules))
}

/// What dpkg's maintainer scripts would have created and the agent relies on.
fn add_system_files(tree: &mut Tree) {
    for (from, to) in [
        ("usr/share/base-passwd/passwd.master", "etc/passwd"),
        ("usr/share/base-passwd/group.master", "etc/group"),
    ] {
        if let (Some(Node::File { data, .. }), false) = (tree.get(from), tree.contains(to)) {
            let data = data.clone();
            tree.insert(to.into(), Node::File { mode: 0o644, data });
        }
    }
    if !tree.contains("usr/bin/sh") {
        tree.insert("usr/bin/sh".into(), Node::Symlink { target: "dash".into() });
    }
    for dir in ["dev", "proc", "sys", "run", "tmp", "root", "var/tmp", "mnt"] {
        tree.insert(
            dir.into(),
            Node::Dir {
                mode: if dir.ends_with("tmp") { 0o1777 } else { 0o755 },
            },
        );
    }
    // The kernel opens /dev/console for PID 1 before anything is mounted.
    tree.insert(
        "dev/console".into(),
        Node::CharDevice {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    );
    tree.insert(
        "etc/hostname".into(),
        Node::File {
            mode: 0o644,
            data: b"imgvm\n".to_vec(),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(name: &str) -> Package {
        Package {
            name: name.into(),
            version: "1.0-1".into(),
            architecture: "ppc64el".into(),
            filename: format!("pool/main/{name}_1.0-1_ppc64el.deb"),
            size: 3,
            sha256: crate::archive::hex(&<sha2::Sha256 as sha2::Digest>::digest(name)),
            source: name.into(),
            source_version: "1.0-1".into(),
            essential: false,
            depends: Vec::new(),
            provides: Vec::new(),
        }
    }

    /// A mirror that lacks files its signed index lists (as ours lacks some of trixie's
    /// newest ppc64el packages): the error names every missing package, not the first
    /// one, and says how to build with a helper from another suite.
    #[test]
    fn an_incomplete_mirror_names_every_missing_package_and_the_way_out() {
        let base = crate::test_http::serve(|path| {
            if path.ends_with("/present_1.0-1_ppc64el.deb") {
                crate::test_http::ok("present")
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            }
        });
        let store = tempfile::tempdir().unwrap();
        let fetcher = crate::archive::Fetcher::new(std::time::Duration::ZERO);
        let archive = Archive::new(&base, "trixie", store.path(), fetcher);
        let present = Package {
            sha256: crate::archive::hex(&<sha2::Sha256 as sha2::Digest>::digest("present")),
            size: 7,
            ..package("present")
        };
        let (a, b) = (package("libfoo1"), package("e2fsprogs"));
        let err = download_all(&archive, &[&present, &a, &b], Arch::Ppc64el).unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("lacks 2 of the trixie ppc64el helper's packages")
                && message.contains("e2fsprogs 1.0-1, libfoo1 1.0-1")
                && message.contains("--helper-suite"),
            "{message}"
        );
        assert!(!message.contains("present"), "{message}");
    }
}
