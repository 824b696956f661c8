//! GRUB, installed with the image's own grub from inside its chroot.

use super::{chroot, run, write};
use crate::job::Job;
use imgvm_protocol::{Bootloader, GrubInstall, OperationError};

pub fn install(job: &Job, boot: &Bootloader) -> Result<(), OperationError> {
    let settings = format!(
        "GRUB_CMDLINE_LINUX=\"{}\"\nGRUB_TIMEOUT={}\nGRUB_TERMINAL=\"console serial\"\n\
         GRUB_SERIAL_COMMAND=\"serial --speed=115200\"\n",
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
    run(job, &chroot(&["update-grub"]))
}
