//! The appliance's file system, built in memory from package contents and written out as
//! a newc cpio archive (the initramfs format). Every file is owned by root inside the
//! archive whoever runs imgvm, which is what makes the assembly rootless.

use anyhow::Result;
use std::collections::BTreeMap;
use std::io::{self, Write};

pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// Top-level directories that Debian's merged /usr turns into symlinks into /usr.
const MERGED: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

#[derive(Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    /// Normalises a package path (`./bin/sh`) to a tree key (`usr/bin/sh`).
    pub fn key(path: &str) -> String {
        let path = path
            .trim_start_matches("./")
            .trim_start_matches('/')
            .trim_end_matches('/');
        let first = path.split('/').next().unwrap_or("");
        if MERGED.contains(&first) {
            format!("usr/{path}")
        } else {
            path.to_owned()
        }
    }

    /// Whether `path` is one of the merged-/usr links some packages ship themselves.
    pub fn is_merged_link(path: &str) -> bool {
        let path = path
            .trim_start_matches("./")
            .trim_start_matches('/')
            .trim_end_matches('/');
        MERGED.contains(&path)
    }

    pub fn insert(&mut self, key: String, node: Node) {
        if key.is_empty() {
            return;
        }
        self.nodes.insert(key, node);
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.nodes.get(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.nodes.contains_key(key)
    }

    /// Adds the merged-/usr links and any missing parent directories.
    pub fn finish(&mut self) {
        for dir in MERGED {
            if self.contains(&format!("usr/{dir}")) {
                self.nodes.insert(
                    dir.to_owned(),
                    Node::Symlink {
                        target: format!("usr/{dir}"),
                    },
                );
            }
        }
        let parents: Vec<String> = self
            .nodes
            .keys()
            .flat_map(|k| k.match_indices('/').map(move |(i, _)| k[..i].to_owned()))
            .filter(|p| !self.nodes.contains_key(p))
            .collect();
        for parent in parents {
            self.nodes.entry(parent).or_insert(Node::Dir { mode: 0o755 });
        }
    }

    /// Writes the tree as one cpio archive, parents before children, with fixed
    /// timestamps so identical inputs give identical bytes.
    pub fn write_cpio(&self, out: &mut impl Write) -> Result<()> {
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (0o040000 | mode, &[], (0, 0)),
                Node::File { mode, data } => (0o100000 | mode, data, (0, 0)),
                Node::Symlink { target } => (0o120777, target.as_bytes(), (0, 0)),
                Node::CharDevice { mode, major, minor } => (0o020000 | mode, &[], (*major, *minor)),
            };
            write_entry(out, ino as u32 + 1, path, mode, data, rdev)?;
        }
        write_entry(out, 0, "TRAILER!!!", 0, &[], (0, 0))?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }
}

/// Writes a one-file archive (used for the agent, appended to the cached appliance).
pub fn single_file_cpio(out: &mut impl Write, path: &str, mode: u32, data: &[u8]) -> Result<()> {
    write_entry(out, 1, path, 0o100000 | mode, data, (0, 0))?;
    write_entry(out, 0, "TRAILER!!!", 0, &[], (0, 0))?;
    Ok(())
}

fn write_entry(out: &mut impl Write, ino: u32, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> io::Result<()> {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        0,
        data.len(),
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() + 1,
        0
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, header.len() + name.len() + 1)?;
    out.write_all(data)?;
    pad(out, data.len())
}

fn pad(out: &mut impl Write, len: usize) -> io::Result<()> {
    out.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_usr_paths_are_normalised() {
        assert_eq!(Tree::key("./bin/sh"), "usr/bin/sh");
        assert_eq!(
            Tree::key("./lib/x86_64-linux-gnu/libc.so.6"),
            "usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(Tree::key("./etc/passwd"), "etc/passwd");
        assert_eq!(Tree::key("./binfoo/x"), "binfoo/x");
        assert!(Tree::is_merged_link("./bin"));
    }

    #[test]
    fn cpio_is_aligned_and_ordered() {
        let mut tree = Tree::default();
        tree.insert(
            "usr/bin/tool".into(),
            Node::File {
                mode: 0o755,
                data: b"abc".to_vec(),
            },
        );
        tree.finish();
        let mut out = Vec::new();
        tree.write_cpio(&mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        let usr = text.find("usr\0").unwrap();
        let tool = text.find("usr/bin/tool\0").unwrap();
        assert!(usr < tool);
        assert!(text.contains("TRAILER!!!"));
        // With the file present the merged link appears.
        assert!(text.contains("bin\0") && text.contains("usr/bin\0"));
    }
}
