//! Turns the failures users hit most into errors that say what happened, from what the
//! failing program printed.

use imgvm_protocol::{ErrorKind, OperationError};

pub fn explain(mut error: OperationError) -> OperationError {
    if error.kind == ErrorKind::Cancelled {
        return error;
    }
    let tail = error.stderr_tail.clone();
    if let Some((package, line)) = tail.iter().find_map(|l| missing_package(l).map(|p| (p, l))) {
        error.kind = ErrorKind::MissingPackage;
        error.message = format!("package {package} is not in the archive (apt: {})", line.trim());
    } else if let Some(line) = tail.iter().find(|l| l.contains("No space left on device")) {
        error.kind = ErrorKind::NoSpace;
        error.message = format!("the image is full: {} ({})", line.trim(), error.message);
    } else if error.kind == ErrorKind::NoSpace {
        error.message = format!("the image is full: {}", error.message);
    }
    error
}

/// apt's two ways of saying a package does not exist.
fn missing_package(line: &str) -> Option<String> {
    if let Some(rest) = line.split("Unable to locate package ").nth(1) {
        return Some(rest.trim().to_owned());
    }
    let rest = line.split("Package '").nth(1)?;
    let (name, after) = rest.split_once('\'')?;
    after.contains("has no installation candidate").then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(tail: &[&str]) -> OperationError {
        OperationError {
            operation: "apt".into(),
            kind: ErrorKind::CommandFailed,
            message: "`chroot /target apt-get -y -q install nosuch` exited with status 100".into(),
            errno: None,
            exit_code: Some(100),
            stderr_tail: tail.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn apt_missing_package() {
        let e = explain(failed(&["E: Unable to locate package nosuch"]));
        assert_eq!(e.kind, ErrorKind::MissingPackage);
        assert_eq!(
            e.message,
            "package nosuch is not in the archive (apt: E: Unable to locate package nosuch)"
        );
        let e = explain(failed(&["E: Package 'vim' has no installation candidate"]));
        assert_eq!(e.kind, ErrorKind::MissingPackage);
        assert!(
            e.message.starts_with("package vim is not in the archive"),
            "{}",
            e.message
        );
    }

    #[test]
    fn full_disk() {
        let e = explain(failed(&[
            "dpkg: error processing archive /var/cache/apt/archives/x.deb (--unpack):",
            " cannot copy extracted data for './usr/bin/x' to '/usr/bin/x.dpkg-new': failed to write (No space left on device)",
        ]));
        assert_eq!(e.kind, ErrorKind::NoSpace);
        assert!(e.message.starts_with("the image is full: cannot copy"), "{}", e.message);
    }

    #[test]
    fn other_failures_unchanged() {
        let e = explain(failed(&["E: something else"]));
        assert_eq!(e, failed(&["E: something else"]));
    }
}
