//! A place to run programs in the image without changing it by accident: [`TARGET`] and
//! every filesystem below it bound at a directory of the helper (read-only unless asked),
//! with the pseudo filesystems a chroot needs on top, the helper's own and not the
//! image's. Offline checks and `imgvm shell` run their programs chrooted there.

use super::{run, target};
use crate::command::Program;
use crate::job::Job;
use imgvm_protocol::{ErrorKind, OperationError, TARGET};

pub struct View<'j> {
    pub job: &'j Job<'j>,
    /// Where programs are chrooted; in unit tests, the test's tree itself.
    pub root: String,
}

impl<'j> View<'j> {
    /// Binds the image at `at`, read-only unless `writable`.
    pub fn mount(job: &'j Job<'j>, at: &str, writable: bool) -> Result<Self, OperationError> {
        let io = |e: std::io::Error| job.io_error(&e);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(io)?;
        // Field 5 is the mount point (spaces escaped as \040); parents come first.
        let mut below: Vec<String> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter_map(|m| m.strip_prefix(TARGET))
            .filter(|rel| rel.is_empty() || rel.starts_with('/'))
            .map(|rel| rel.replace("\\040", " "))
            .collect();
        if !below.contains(&String::new()) {
            return Err(job.error(ErrorKind::InvalidRequest, format!("nothing is mounted at {TARGET}")));
        }
        below.sort_by_key(|rel| rel.matches('/').count() + usize::from(!rel.is_empty()));
        below.dedup();
        std::fs::create_dir_all(at).map_err(io)?;
        let view = View {
            job,
            root: at.to_owned(),
        };
        for rel in &below {
            let point = format!("{at}{rel}");
            view.mount_at(&["--bind", &format!("{TARGET}{rel}")], &point)?;
            if !writable {
                view.mount_at(&["-o", "remount,bind,ro"], &point)?;
            }
        }
        for (dir, how) in [
            ("/proc", &["-t", "proc", "proc"][..]),
            ("/sys", &["-t", "sysfs", "sysfs"]),
            ("/dev", &["--bind", "/dev"]),
            // A terminal's name (`tty`) is looked up here.
            ("/dev/pts", &["--bind", "/dev/pts"]),
            ("/run", &["-t", "tmpfs", "tmpfs"]),
            ("/tmp", &["-t", "tmpfs", "tmpfs"]),
        ] {
            // A tree without the directory (an image that is no Debian) goes without.
            if std::fs::symlink_metadata(format!("{at}{dir}")).is_ok_and(|m| m.is_dir()) {
                view.mount_at(how, &format!("{at}{dir}"))?;
            }
        }
        Ok(view)
    }

    /// The test's tree itself as the view, for unit tests of what runs in one.
    #[cfg(test)]
    pub fn of_tree(job: &'j Job<'j>) -> Self {
        View {
            job,
            root: job.root.clone(),
        }
    }

    fn mount_at(&self, how: &[&str], at: &str) -> Result<(), OperationError> {
        let mut argv = vec!["mount"];
        argv.extend(how);
        argv.push(at);
        if let Err(e) = run(self.job, &Program::new(&argv)) {
            let _ = run(self.job, &Program::new(&["umount", "-R", &self.root]));
            return Err(e);
        }
        Ok(())
    }

    pub fn unmount(self) -> Result<(), OperationError> {
        run(self.job, &Program::new(&["umount", "-R", &self.root]))
    }

    /// `path` in the image itself, for the checks that only read: through the view, the
    /// image's /dev, /proc and /sys would be the helper's.
    pub fn path(&self, path: &str) -> Result<String, OperationError> {
        target(self.job, path)
    }

    /// A program in the view's chroot.
    pub fn chroot<S: AsRef<str>>(&self, argv: &[S]) -> Program {
        let mut full = vec!["chroot".to_owned(), self.root.clone()];
        full.extend(argv.iter().map(|a| a.as_ref().to_owned()));
        Program::new(&full).env("DEBIAN_FRONTEND", "noninteractive")
    }
}
