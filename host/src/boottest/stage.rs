//! How far a boot got, read from what the console showed.

/// The stages of a boot, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Firmware,
    Bootloader,
    Kernel,
    Init,
    CloudInit,
    Login,
    /// The report unit ran: systemd finished starting the system.
    Started,
}

impl Stage {
    /// What each stage prints first on a serial console.
    const SIGNS: [(Stage, &'static [&'static str]); 5] = [
        (
            Stage::Bootloader,
            &["GRUB", "Booting `", "Loading Linux", "Welcome to GRUB"],
        ),
        (
            Stage::Kernel,
            &[
                "Linux version",
                "Booting Linux on",
                "Booting paravirtualized kernel",
                "Run /init",
            ],
        ),
        (Stage::Init, &["systemd[1]", "Welcome to Debian", "[  OK  ]"]),
        (Stage::CloudInit, &["cloud-init["]),
        (Stage::Login, &[" login: "]),
    ];

    /// The furthest stage `console` shows.
    pub fn reached(console: &str) -> Stage {
        Stage::SIGNS
            .iter()
            .rev()
            .find(|(_, signs)| signs.iter().any(|s| console.contains(s)))
            .map_or(Stage::Firmware, |(stage, _)| *stage)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Stage::Firmware => "in the firmware (no bootloader ran)",
            Stage::Bootloader => "in the bootloader (the kernel did not start)",
            Stage::Kernel => "in the kernel or initramfs (init did not start)",
            Stage::Init => "in init (systemd ran; starting the system did not finish)",
            Stage::CloudInit => "in cloud-init (it ran; starting the system did not finish)",
            Stage::Login => "at the login prompt (the report unit did not run)",
            Stage::Started => "after the system started",
        }
    }
}

/// What firmware, bootloader, kernel and systemd print when they have given up: the
/// boot can only end in a timeout after that, so the test stops at once.
pub fn dead_end(text: &str) -> Option<&'static str> {
    [
        "No bootable device.",
        "EFI Internal Shell",
        "Shell> ",
        "grub rescue>",
        "Kernel panic - not syncing",
        "You are in emergency mode.",
        "Cannot open access to console, the root account is locked.",
        "Give root password for maintenance",
    ]
    .into_iter()
    .find(|end| text.contains(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_from_console_text() {
        assert_eq!(
            Stage::reached("SeaBIOS (version 1.16)\nBooting from Hard Disk...\nBoot failed"),
            Stage::Firmware
        );
        assert_eq!(
            Stage::reached("Welcome to GRUB!\nerror: file `/boot/vmlinuz' not found."),
            Stage::Bootloader
        );
        assert_eq!(
            Stage::reached("Loading Linux 6.12\n[    0.000000] Linux version 6.12.0"),
            Stage::Kernel
        );
        assert_eq!(
            Stage::reached("Linux version\nWelcome to Debian GNU/Linux 13 (trixie)!"),
            Stage::Init
        );
        assert_eq!(
            Stage::reached("[  OK  ] Started\n[   5.1] cloud-init[301]: Cloud-init v. 25.1"),
            Stage::CloudInit
        );
        assert_eq!(Stage::reached("cloud-init[1]\n\nlocalhost login: "), Stage::Login);
    }
}
