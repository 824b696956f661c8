//! The `Packages` index and dependency resolution over it.

use anyhow::{bail, Result};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::BufRead;

#[derive(Debug, Clone)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub filename: String,
    pub size: u64,
    pub sha256: String,
    /// The source package it was built from, and that source's version (both the
    /// binary's own when the index names no `Source`).
    pub source: String,
    pub source_version: String,
    pub essential: bool,
    /// Depends and Pre-Depends: each inner list is a set of alternatives.
    pub depends: Vec<Vec<String>>,
    pub provides: Vec<String>,
}

pub struct PackageIndex {
    packages: HashMap<String, Package>,
    providers: HashMap<String, Vec<String>>,
}

impl PackageIndex {
    pub fn parse(reader: impl BufRead) -> Result<PackageIndex> {
        let mut packages = HashMap::new();
        let mut fields: HashMap<String, String> = HashMap::new();
        let mut last_key = String::new();
        let mut flush = |fields: &mut HashMap<String, String>| {
            if let Some(package) = Package::from_fields(fields) {
                packages.insert(package.name.clone(), package);
            }
            fields.clear();
        };
        for line in reader.lines() {
            let line = line?;
            if line.is_empty() {
                flush(&mut fields);
            } else if line.starts_with([' ', '\t']) {
                if let Some(value) = fields.get_mut(&last_key) {
                    value.push('\n');
                    value.push_str(line.trim());
                }
            } else if let Some((key, value)) = line.split_once(':') {
                last_key = key.to_owned();
                fields.insert(last_key.clone(), value.trim().to_owned());
            }
        }
        flush(&mut fields);
        if packages.is_empty() {
            bail!("the index lists no packages");
        }
        let mut providers: HashMap<String, Vec<String>> = HashMap::new();
        for p in packages.values() {
            for virt in &p.provides {
                providers.entry(virt.clone()).or_default().push(p.name.clone());
            }
        }
        for list in providers.values_mut() {
            list.sort();
        }
        Ok(PackageIndex { packages, providers })
    }

    pub fn packages(&self) -> impl Iterator<Item = &Package> {
        self.packages.values()
    }

    pub fn get(&self, name: &str) -> Option<&Package> {
        self.packages.get(name)
    }

    /// Takes every package built from one of `sources` from `newer` (a backports suite's
    /// index) in place of this index's, so that resolution installs those builds.
    pub fn prefer(&mut self, newer: &PackageIndex, sources: &[String]) -> Result<()> {
        for source in sources {
            let taken: Vec<&Package> = newer.packages.values().filter(|p| &p.source == source).collect();
            if taken.is_empty() {
                bail!("the newer archive has no package built from {source}");
            }
            for package in taken {
                for virt in &package.provides {
                    let list = self.providers.entry(virt.clone()).or_default();
                    if !list.contains(&package.name) {
                        list.push(package.name.clone());
                        list.sort();
                    }
                }
                self.packages.insert(package.name.clone(), package.clone());
            }
        }
        Ok(())
    }

    /// `wanted` plus every Essential package plus everything they depend on, by name.
    /// Among alternatives the first one that exists wins, unless another is already
    /// selected; a virtual package resolves to its alphabetically first provider.
    pub fn closure(&self, wanted: &[String]) -> Result<BTreeMap<String, Package>> {
        let mut selected: BTreeMap<String, Package> = BTreeMap::new();
        let mut queue: VecDeque<String> = wanted.iter().cloned().collect();
        let mut essentials: Vec<&String> = self
            .packages
            .values()
            .filter(|p| p.essential)
            .map(|p| &p.name)
            .collect();
        essentials.sort();
        queue.extend(essentials.into_iter().cloned());
        let mut missing = Vec::new();
        while let Some(name) = queue.pop_front() {
            if selected.contains_key(&name) {
                continue;
            }
            let Some(package) = self.resolve(&name, &selected) else {
                if wanted.contains(&name) {
                    missing.push(name);
                }
                continue;
            };
            if selected.contains_key(&package.name) {
                continue;
            }
            for alternatives in &package.depends {
                let choice = alternatives
                    .iter()
                    .find(|a| selected.contains_key(*a))
                    .or_else(|| alternatives.iter().find(|a| self.resolve(a, &selected).is_some()));
                match choice {
                    Some(choice) => queue.push_back(choice.clone()),
                    None => bail!(
                        "{} depends on {}, which the archive does not have",
                        package.name,
                        alternatives.join(" | ")
                    ),
                }
            }
            selected.insert(package.name.clone(), package.clone());
        }
        if !missing.is_empty() {
            bail!("the archive has no package named {}", missing.join(", "));
        }
        Ok(selected)
    }

    fn resolve<'a>(&'a self, name: &str, selected: &BTreeMap<String, Package>) -> Option<&'a Package> {
        if let Some(p) = self.packages.get(name) {
            return Some(p);
        }
        let providers = self.providers.get(name)?;
        let pick = providers
            .iter()
            .find(|p| selected.contains_key(*p))
            .unwrap_or(&providers[0]);
        self.packages.get(pick)
    }
}

impl Package {
    fn from_fields(fields: &HashMap<String, String>) -> Option<Package> {
        let relations = |key: &str| -> Vec<Vec<String>> {
            fields
                .get(key)
                .map(|v| {
                    v.split(',')
                        .map(|group| {
                            group
                                .split('|')
                                .map(relation_name)
                                .filter(|n| !n.is_empty())
                                .collect::<Vec<_>>()
                        })
                        .filter(|g| !g.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut depends = relations("Pre-Depends");
        depends.extend(relations("Depends"));
        let name = fields.get("Package")?.clone();
        let version = fields.get("Version")?.clone();
        // `Source: foo` or `Source: foo (1.2-3)`, the latter when the versions differ.
        let (source, source_version) = match fields.get("Source").map(|s| s.split_once(" (")) {
            Some(Some((source, rest))) => (source.to_owned(), rest.trim_end_matches(')').to_owned()),
            Some(None) => (fields["Source"].clone(), version.clone()),
            None => (name.clone(), version.clone()),
        };
        Some(Package {
            name,
            version,
            source,
            source_version,
            architecture: fields.get("Architecture")?.clone(),
            filename: fields.get("Filename")?.clone(),
            size: fields.get("Size")?.parse().ok()?,
            sha256: fields.get("SHA256")?.clone(),
            essential: fields.get("Essential").is_some_and(|v| v == "yes"),
            depends,
            provides: relations("Provides").into_iter().flatten().collect(),
        })
    }
}

/// `libc6 (>= 2.36)` → `libc6`; `perl:any` → `perl`.
fn relation_name(relation: &str) -> String {
    let name = relation.split(['(', '[', '<']).next().unwrap_or("").trim();
    name.split(':').next().unwrap_or("").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = "\
Package: app
Version: 1
Architecture: amd64
Depends: libfoo (>= 2), mail-transport-agent | exim4, perl:any
Filename: pool/a/app.deb
Size: 10
SHA256: aa

Package: libfoo
Version: 2
Architecture: amd64
Source: foo (2.0-1)
Filename: pool/l/libfoo.deb
Size: 10
SHA256: bb

Package: postfix
Version: 3
Architecture: amd64
Source: postfix-src
Provides: mail-transport-agent
Filename: pool/p/postfix.deb
Size: 10
SHA256: cc

Package: perl
Version: 5
Architecture: amd64
Filename: pool/p/perl.deb
Size: 10
SHA256: dd

Package: base
Version: 1
Architecture: all
Essential: yes
Pre-Depends: libfoo
Filename: pool/b/base.deb
Size: 10
SHA256: ee
";

    #[test]
    fn closure_follows_depends_alternatives_and_essentials() {
        let index = PackageIndex::parse(INDEX.as_bytes()).unwrap();
        let names: Vec<_> = index.closure(&["app".into()]).unwrap().into_keys().collect();
        assert_eq!(names, ["app", "base", "libfoo", "perl", "postfix"]);
    }

    #[test]
    fn source_packages_are_read() {
        let index = PackageIndex::parse(INDEX.as_bytes()).unwrap();
        let source = |name| {
            let p = index.get(name).unwrap();
            (p.source.as_str(), p.source_version.as_str())
        };
        assert_eq!(source("libfoo"), ("foo", "2.0-1"));
        assert_eq!(source("postfix"), ("postfix-src", "3"));
        assert_eq!(source("perl"), ("perl", "5"));
    }

    #[test]
    fn unknown_package_is_named() {
        let index = PackageIndex::parse(INDEX.as_bytes()).unwrap();
        let err = index.closure(&["nonesuch".into()]).unwrap_err();
        assert_eq!(err.to_string(), "the archive has no package named nonesuch");
    }

    #[test]
    fn preferred_sources_come_from_the_newer_index() {
        let mut index = PackageIndex::parse(INDEX.as_bytes()).unwrap();
        let newer = PackageIndex::parse(
            "Package: libfoo\nVersion: 2.1~bpo\nArchitecture: amd64\nSource: foo (2.1~bpo)\n\
             Filename: pool/l/libfoo-bpo.deb\nSize: 11\nSHA256: b2\n\n\
             Package: perl\nVersion: 6~bpo\nArchitecture: amd64\nFilename: pool/p/perl-bpo.deb\nSize: 9\nSHA256: d2\n"
                .as_bytes(),
        )
        .unwrap();
        index.prefer(&newer, &["foo".into()]).unwrap();
        let closure = index.closure(&["app".into()]).unwrap();
        let version = |name: &str| closure[name].version.as_str();
        assert_eq!(version("libfoo"), "2.1~bpo", "built from a preferred source");
        assert_eq!(version("perl"), "5", "not built from a preferred source");
        let err = index.prefer(&newer, &["nonesuch".into()]).unwrap_err();
        assert_eq!(err.to_string(), "the newer archive has no package built from nonesuch");
    }
}
