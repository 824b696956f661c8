//! GRUB, installed with the image's own grub from inside its chroot.

use super::{chroot, run, write};
use crate::command::{self, Input, Program};
use crate::job::Job;
use imgvm_protocol::{Bootloader, GrubInstall, Handle, OperationError};

impl Handle<Bootloader> for Job<'_> {
    fn handle(&self, op: Bootloader) -> Result<(), OperationError> {
        let job = self;
        let boot = &op;
        // Never root=/dev/vda1: the image's disk has another name on most clouds.
        let root = if boot.root_by_partuuid {
            "GRUB_DISABLE_LINUX_UUID=true\nGRUB_DISABLE_LINUX_PARTUUID=false\n"
        } else {
            "GRUB_DISABLE_LINUX_UUID=false\n"
        };
        let settings = format!(
            "GRUB_CMDLINE_LINUX=\"{}\"\nGRUB_TIMEOUT={}\nGRUB_TERMINAL=\"console serial\"\n\
         GRUB_SERIAL_COMMAND=\"serial --speed=115200\"\n{root}",
            boot.cmdline.replace('"', "\\\""),
            boot.timeout
        );
        write(job, "/etc/default/grub.d/99_imgvm.cfg", settings.as_bytes(), 0o644)?;
        // No NVRAM: the image boots on machines imgvm never sees. --force because grub
        // otherwise refuses to embed into a disk it thinks belongs to another system.
        for install in &boot.installs {
            let mut argv = vec!["grub-install".to_owned(), "--no-nvram".into(), "--force".into()];
            match install {
                GrubInstall::Bios { disk } => argv.extend(["--target=i386-pc".into(), disk.clone()]),
                GrubInstall::Efi { target } => argv.extend([
                    format!("--target={target}"),
                    "--efi-directory=/boot/efi".into(),
                    "--removable".into(),
                ]),
                GrubInstall::Prep { device } => argv.extend(["--target=powerpc-ieee1275".into(), device.clone()]),
            }
            run(job, &chroot(&argv))?;
        }
        // grub-mkconfig names the root by UUID or PARTUUID only when udev's links for it
        // exist; the helper has no udev.
        device_links(job)?;
        run(job, &chroot(&["update-grub"]))
    }
}

/// Creates udev's `/dev/disk/by-uuid` and `/dev/disk/by-partuuid` links for every block
/// device blkid knows (the chroot sees them through its bind-mounted /dev).
fn device_links(job: &Job) -> Result<(), OperationError> {
    let out = command::run(job, &Program::new(&["blkid", "-o", "export"]), Input::Null, true)?;
    for device in String::from_utf8_lossy(&out).split("\n\n") {
        let tag = |name: &str| {
            device
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .filter(|v| !v.is_empty())
        };
        let Some(devname) = tag("DEVNAME") else { continue };
        for (kind, value) in [("by-uuid", tag("UUID")), ("by-partuuid", tag("PARTUUID"))] {
            // A link name, never a path.
            let Some(value) = value.filter(|v| !v.contains('/') && *v != "..") else {
                continue;
            };
            let dir = format!("/dev/disk/{kind}");
            std::fs::create_dir_all(&dir).map_err(|e| job.io_error(&e))?;
            let link = format!("{dir}/{value}");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(devname, &link).map_err(|e| job.io_error(&e))?;
        }
    }
    Ok(())
}
