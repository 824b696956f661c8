//! What a PID 1 must do before anything else can run, and how it ends.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// Kernel modules to load, in dependency order, one path per line. Written by the host
/// when it assembles the appliance.
const MODULE_LIST: &str = "/etc/imgvm/modules";

pub fn prepare_system() -> io::Result<()> {
    mount("proc", "/proc", "proc", "")?;
    mount("sysfs", "/sys", "sysfs", "")?;
    mount("devtmpfs", "/dev", "devtmpfs", "mode=0755")?;
    mkdir("/dev/pts")?;
    mount("devpts", "/dev/pts", "devpts", "mode=0620,ptmxmode=0666")?;
    mkdir("/dev/shm")?;
    mount("tmpfs", "/dev/shm", "tmpfs", "mode=1777")?;
    mount("tmpfs", "/run", "tmpfs", "mode=0755")?;
    mount("tmpfs", "/tmp", "tmpfs", "mode=1777")?;
    // Tools look things up in /proc/self/mounts through /etc/mtab.
    let _ = std::os::unix::fs::symlink("/proc/self/mounts", "/etc/mtab");
    std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    std::env::set_var("HOME", "/root");
    std::env::set_var("LANG", "C.UTF-8");
    // SAFETY: the name is a valid buffer of the given length.
    unsafe { libc::sethostname(b"imgvm".as_ptr().cast(), 5) };
    load_modules()?;
    crate::reaper::start();
    Ok(())
}

fn load_modules() -> io::Result<()> {
    let list = match std::fs::read_to_string(MODULE_LIST) {
        Ok(list) => list,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let file = std::fs::File::open(path).map_err(|e| io::Error::new(e.kind(), format!("module {path}: {e}")))?;
        let params = CString::default();
        // SAFETY: finit_module reads the module from a valid open fd; params is a valid C string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                params.as_ptr(),
                0,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(io::Error::new(err.kind(), format!("loading module {path}: {err}")));
            }
        }
    }
    Ok(())
}

fn mkdir(path: &str) -> io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn mount(source: &str, target: &str, fstype: &str, data: &str) -> io::Result<()> {
    if !Path::new(target).exists() {
        mkdir(target)?;
    }
    let c = |s: &str| CString::new(s).expect("static strings have no NUL");
    let (source_c, target_c, fstype_c, data_c) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            libc::MS_NOSUID,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("mount {target}: {err}")));
    }
    Ok(())
}

/// Flushes every filesystem and block device, then turns the VM off. Never returns.
pub fn power_off() -> ! {
    // SAFETY: plain system calls without pointers.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot(2) only returns on failure; as PID 1 exiting panics the kernel, which the
    // host sees as the VM going away.
    std::process::exit(1)
}
