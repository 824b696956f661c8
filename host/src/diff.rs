//! `imgvm diff OLD NEW`: what differs between two builds, from their manifests, so that a
//! pipeline publishes an image only when something in it changed (exit status 1) and
//! skips it when nothing did (0).
//!
//! Compared: the recipe's content hash, architecture, suite and mirror; the partition
//! layout; every package (added, removed, version changed); every output's checksum,
//! which, with reproducible builds, is the same exactly when the image is; and, with
//! `--files`, the files of the two raw images as `inspect` lists them.

use crate::manifest::Manifest;
use imgvm_protocol::Package;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Diff {
    /// Recipe-level fields that differ: `recipe`, `arch`, `suite`, `mirror`.
    pub fields: Vec<Changed>,
    /// Partitions, by name, whose definition differs (or that one side lacks).
    pub partitions: Vec<Changed>,
    pub packages: Packages,
    /// Outputs, by format, whose checksum differs (or that one side lacks).
    pub outputs: Vec<Changed>,
    /// With `--files`: the files of the two raw images that differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Files>,
}

/// Files of one image that the other lacks, or whose content or metadata differ.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Files {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<FileChanged>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FileChanged {
    pub path: String,
    /// What differs: `kind`, `content`, `size`, `mode`, `owner`, `mtime`, `target`,
    /// `device`.
    pub what: Vec<&'static str>,
}

impl Files {
    pub fn between(old: &crate::inspect::Files, new: &crate::inspect::Files) -> Files {
        let mut files = Files::default();
        for (path, a) in old {
            let Some(b) = new.get(path) else {
                files.removed.push(path.clone());
                continue;
            };
            let what: Vec<&'static str> = [
                ("kind", a.kind != b.kind),
                ("content", a.sha256 != b.sha256),
                ("size", a.size != b.size),
                ("mode", a.mode != b.mode),
                ("owner", (a.uid, a.gid) != (b.uid, b.gid)),
                ("mtime", a.mtime != b.mtime),
                ("target", a.target != b.target),
                ("device", a.rdev != b.rdev),
            ]
            .into_iter()
            .filter_map(|(what, differs)| differs.then_some(what))
            .collect();
            if !what.is_empty() {
                files.changed.push(FileChanged {
                    path: path.clone(),
                    what,
                });
            }
        }
        files.added = new.keys().filter(|p| !old.contains_key(*p)).cloned().collect();
        files
    }
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Packages {
    pub added: Vec<Package>,
    pub removed: Vec<Package>,
    pub changed: Vec<Changed>,
}

/// Something named, with its value before and after (`None`: absent on that side).
#[derive(Debug, Serialize, PartialEq)]
pub struct Changed {
    pub name: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

impl Diff {
    pub fn between(old: &Manifest, new: &Manifest) -> Diff {
        let mut fields = Vec::new();
        for (name, a, b) in [
            ("recipe", &old.recipe.sha256, &new.recipe.sha256),
            ("arch", &old.arch, &new.arch),
            ("suite", &old.suite, &new.suite),
            ("mirror", &old.mirror, &new.mirror),
        ] {
            if a != b {
                fields.push(Changed {
                    name: name.into(),
                    old: Some(a.clone()),
                    new: Some(b.clone()),
                });
            }
        }
        let partitions = changed(
            old.partitions.iter().map(|p| (p.name.clone(), json(p))),
            new.partitions.iter().map(|p| (p.name.clone(), json(p))),
        );
        let outputs = changed(
            old.outputs
                .iter()
                .map(|o| (o.format.name().to_owned(), o.sha256.clone())),
            new.outputs
                .iter()
                .map(|o| (o.format.name().to_owned(), o.sha256.clone())),
        );
        Diff {
            fields,
            partitions,
            packages: packages(&old.packages, &new.packages),
            outputs,
            files: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
            && self.partitions.is_empty()
            && self.packages == Packages::default()
            && self.outputs.is_empty()
            && self.files.as_ref().is_none_or(|f| *f == Files::default())
    }

    /// One line per difference, for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        for c in &self.fields {
            out.push_str(&format!("{}: {} -> {}\n", c.name, shown(&c.old), shown(&c.new)));
        }
        for c in &self.partitions {
            out.push_str(&format!(
                "partition {}: {} -> {}\n",
                c.name,
                shown(&c.old),
                shown(&c.new)
            ));
        }
        let p = &self.packages;
        for added in &p.added {
            out.push_str(&format!(
                "+ {} {} ({})\n",
                added.name, added.version, added.architecture
            ));
        }
        for removed in &p.removed {
            out.push_str(&format!(
                "- {} {} ({})\n",
                removed.name, removed.version, removed.architecture
            ));
        }
        for c in &p.changed {
            out.push_str(&format!("~ {} {} -> {}\n", c.name, shown(&c.old), shown(&c.new)));
        }
        for c in &self.outputs {
            out.push_str(&format!("output {}: {} -> {}\n", c.name, shown(&c.old), shown(&c.new)));
        }
        if let Some(files) = &self.files {
            for path in &files.added {
                out.push_str(&format!("+ file {path}\n"));
            }
            for path in &files.removed {
                out.push_str(&format!("- file {path}\n"));
            }
            for c in &files.changed {
                out.push_str(&format!("~ file {} ({})\n", c.path, c.what.join(", ")));
            }
        }
        out
    }
}

/// A recipe value in a form to compare and show: its JSON.
fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("recipe values serialise")
}

/// Entries whose value differs between `old` and `new`, or that only one side has.
fn changed(old: impl Iterator<Item = (String, String)>, new: impl Iterator<Item = (String, String)>) -> Vec<Changed> {
    let old: BTreeMap<String, String> = old.collect();
    let new: BTreeMap<String, String> = new.collect();
    let mut names: Vec<&String> = old.keys().chain(new.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|name| old.get(*name) != new.get(*name))
        .map(|name| Changed {
            name: name.clone(),
            old: old.get(name).cloned(),
            new: new.get(name).cloned(),
        })
        .collect()
}

/// Packages by name and architecture (a multi-arch image may have both).
fn packages(old: &[Package], new: &[Package]) -> Packages {
    let key = |p: &Package| (p.name.clone(), p.architecture.clone());
    let old: BTreeMap<_, &Package> = old.iter().map(|p| (key(p), p)).collect();
    let new: BTreeMap<_, &Package> = new.iter().map(|p| (key(p), p)).collect();
    let mut diff = Packages::default();
    for (k, p) in &new {
        match old.get(k) {
            None => diff.added.push((*p).clone()),
            Some(before) if before.version != p.version => diff.changed.push(Changed {
                name: format!("{} ({})", p.name, p.architecture),
                old: Some(before.version.clone()),
                new: Some(p.version.clone()),
            }),
            Some(_) => {}
        }
    }
    for (k, p) in &old {
        if !new.contains_key(k) {
            diff.removed.push((*p).clone());
        }
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(packages: &[(&str, &str)]) -> Manifest {
        let json = serde_json::json!({
            "name": "img-amd64",
            "recipe": {"name": "img", "file": "img.yaml", "sha256": "aa"},
            "imgvm_version": "0.1.0",
            "arch": "amd64",
            "suite": "trixie",
            "mirror": "http://deb.debian.org/debian",
            "built_at": 1,
            "build_seconds": 2.0,
            "partitions": [{"name": "root", "type": "linux", "filesystem": "ext4"}],
            "outputs": [{"file": "img-amd64.raw", "format": "raw", "bytes": 3, "sha256": "bb"}],
            "steps": [],
            "packages": packages.iter().map(|(n, v)| serde_json::json!({
                "name": n, "version": v, "architecture": "amd64"
            })).collect::<Vec<_>>(),
            "tests": {"checks": [], "boots": []},
        });
        serde_json::from_value(json).unwrap()
    }

    fn file(path: &str, sha: &str, mode: u32) -> (String, imgvm_protocol::FileEntry) {
        let entry = imgvm_protocol::FileEntry {
            path: path.into(),
            kind: 'f',
            mode,
            uid: 0,
            gid: 0,
            size: 3,
            mtime: 1,
            target: None,
            rdev: 0,
            sha256: Some(sha.into()),
        };
        (path.to_owned(), entry)
    }

    #[test]
    fn files_added_removed_and_changed_are_named_with_what_changed() {
        let old: crate::inspect::Files =
            [file("/a", "1", 0o644), file("/b", "1", 0o644), file("/c", "1", 0o644)].into();
        let new: crate::inspect::Files =
            [file("/a", "1", 0o644), file("/b", "2", 0o600), file("/d", "1", 0o644)].into();
        let mut diff = Diff::between(&manifest(&[]), &manifest(&[]));
        diff.files = Some(Files::between(&old, &old));
        assert!(diff.is_empty(), "{diff:?}");
        diff.files = Some(Files::between(&old, &new));
        assert!(!diff.is_empty());
        assert_eq!(diff.text(), "+ file /d\n- file /c\n~ file /b (content, mode)\n");
    }

    #[test]
    fn the_same_build_has_no_difference() {
        let a = manifest(&[("bash", "5.2"), ("zsh", "5")]);
        let b = manifest(&[("zsh", "5"), ("bash", "5.2")]);
        let diff = Diff::between(&a, &b);
        assert!(diff.is_empty(), "{diff:?}");
        assert_eq!(diff.text(), "");
    }

    #[test]
    fn packages_added_removed_and_changed_are_named() {
        let a = manifest(&[("bash", "5.2"), ("zsh", "5"), ("vim", "9")]);
        let b = manifest(&[("bash", "5.3"), ("vim", "9"), ("curl", "8")]);
        let diff = Diff::between(&a, &b);
        assert_eq!(
            diff.text(),
            "+ curl 8 (amd64)\n- zsh 5 (amd64)\n~ bash (amd64) 5.2 -> 5.3\n"
        );
        assert!(diff.fields.is_empty() && diff.partitions.is_empty() && diff.outputs.is_empty());
    }

    #[test]
    fn recipe_layout_and_outputs_are_compared() {
        let a = manifest(&[]);
        let mut b = manifest(&[]);
        b.recipe.sha256 = "cc".into();
        b.outputs[0].sha256 = "dd".into();
        b.partitions[0].label = Some("root".into());
        let diff = Diff::between(&a, &b);
        assert_eq!(diff.fields[0].name, "recipe");
        assert_eq!(diff.partitions.len(), 1);
        assert_eq!(diff.partitions[0].name, "root");
        assert_eq!(diff.outputs[0].name, "raw");
        assert!(diff.text().contains("output raw: bb -> dd"), "{}", diff.text());
    }
}
