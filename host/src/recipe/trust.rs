//! What a recipe may reach on the machine that builds it.
//!
//! A recipe is input, like a Dockerfile from a repository one has just cloned: building
//! it must not read the builder's files or reach services only the builder's machine can
//! reach. So by default
//!
//! - a `copy` step reads only below the recipe's own directory (after symlinks are
//!   resolved);
//! - the recipe's mirror (which the helper VM's package proxy fetches from on the
//!   guest's behalf) is not on a loopback or link-local address: not a service on the
//!   builder's own machine, not a cloud metadata endpoint.
//!
//! The user who runs imgvm can lift both with `--trust-recipe` (for their own recipes:
//! a local apt-cacher-ng, files from elsewhere on their disk). What the user types on
//! the command line (`--helper-mirror`) is theirs and not checked.

use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Trust {
    /// The defaults above.
    #[default]
    Confined,
    /// `--trust-recipe`: copy from anywhere, any mirror.
    Trusted,
}

/// Where a `copy` source named `from` in a recipe in `dir` is, if the recipe may read it.
pub fn copy_source(dir: &Path, from: &str, trust: Trust) -> Result<PathBuf, String> {
    let path = dir.join(from);
    if trust == Trust::Trusted {
        return Ok(path);
    }
    let real = path.canonicalize().map_err(|e| format!("cannot read `{from}`: {e}"))?;
    let root = dir
        .canonicalize()
        .map_err(|e| format!("cannot read the recipe's directory: {e}"))?;
    if !real.starts_with(&root) {
        return Err(format!(
            "`{from}` is outside the recipe's directory ({}); a recipe copies only its own files \
             unless you pass --trust-recipe",
            root.display()
        ));
    }
    Ok(real)
}

/// Refuses a mirror on a loopback or link-local address (by name or after resolving it).
pub fn mirror(url: &str, trust: Trust) -> Result<(), String> {
    if trust == Trust::Trusted {
        return Ok(());
    }
    let host = host_of(url);
    let local_name = host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost");
    let addresses: Vec<IpAddr> = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        // Unresolvable names fail later, when fetched, with the resolver's own error.
        Err(_) => (host.as_str(), 80)
            .to_socket_addrs()
            .map(|addrs| addrs.map(|a| a.ip()).collect())
            .unwrap_or_default(),
    };
    if local_name || addresses.iter().any(|ip| local(*ip)) {
        return Err(format!(
            "mirror `{url}` is on this machine or its link-local network; a recipe may not \
             make imgvm fetch from there unless you pass --trust-recipe"
        ));
    }
    Ok(())
}

/// The host part of an `http(s)://` URL, without port or credentials.
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if let Some(end) = authority.find(']') {
        return authority[..=end].to_owned();
    }
    authority.split(':').next().unwrap_or("").to_owned()
}

fn local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| local(IpAddr::V4(v4)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_mirrors_are_refused_unless_trusted() {
        for url in [
            "http://127.0.0.1:3142/debian",
            "http://localhost/debian",
            "http://mirror.localhost/debian",
            "http://169.254.169.254/latest",
            "http://[::1]:8080/debian",
            "http://[fe80::1]/debian",
            "http://[::ffff:127.0.0.1]/debian",
            "http://user:pw@127.0.0.2/debian",
            "http://0.0.0.0/debian",
        ] {
            assert!(mirror(url, Trust::Confined).is_err(), "{url} was accepted");
            assert_eq!(mirror(url, Trust::Trusted), Ok(()));
        }
        for url in [
            "http://deb.debian.org/debian",
            "http://192.168.1.10:3142/debian",
            "http://[2001:db8::1]/debian",
        ] {
            assert_eq!(mirror(url, Trust::Confined), Ok(()), "{url}");
        }
    }

    #[test]
    fn copies_stay_in_the_recipe_directory_unless_trusted() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("recipe");
        std::fs::create_dir_all(dir.join("files")).unwrap();
        std::fs::write(dir.join("files/motd"), "hi").unwrap();
        std::fs::write(top.path().join("secret"), "key").unwrap();
        std::os::unix::fs::symlink(top.path().join("secret"), dir.join("files/link")).unwrap();
        assert!(copy_source(&dir, "files/motd", Trust::Confined).is_ok());
        for from in ["../secret", "files/../../secret", "files/link", "/etc/hostname"] {
            let err = copy_source(&dir, from, Trust::Confined).unwrap_err();
            assert!(err.contains("outside the recipe's directory"), "{from}: {err}");
            assert!(copy_source(&dir, from, Trust::Trusted).is_ok());
        }
    }
}
