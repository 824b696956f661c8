//! Files and scripts from the recipe.

use super::{chroot, remove, run, target};
use crate::command::{self, Input, Program};
use crate::job::Job;
use imgvm_protocol::{Handle, OperationError, Script, Unpack, WriteFile, TARGET};

/// Writes the request's input stream to `path`, resolved inside the image's chroot so a
/// symlink in the image cannot point the write into the helper, with owner names from
/// the image's own passwd.
impl Handle<WriteFile> for Job<'_> {
    fn handle(&self, op: WriteFile) -> Result<(), OperationError> {
        let job = self;
        let WriteFile { path, mode, owner } = &op;
        target(job, path)?;
        let script = r#"set -e; mkdir -p "$(dirname "$1")"; cat > "$1"; chmod "$2" "$1"; chown "$3" "$1""#;
        let mode = format!("{mode:o}");
        let program = chroot(&["sh", "-c", script, "imgvm", path, &mode, owner]);
        command::run(job, &program, Input::Host, false).map(drop)
    }
}

/// Unpacks the request's input stream (a tar archive) into `path` in the image. Files
/// keep their modes but belong to `owner`, not to whoever owned them on the host.
impl Handle<Unpack> for Job<'_> {
    fn handle(&self, op: Unpack) -> Result<(), OperationError> {
        let job = self;
        let Unpack { path, owner } = &op;
        target(job, path)?;
        let script = r#"set -e
mkdir -p "$1"
cd "$1"
case "$2" in root|root:root|0|0:0) exec tar -x -p --no-same-owner -f - ;; esac
list=$(mktemp)
tar -x -p --no-same-owner -v -f - > "$list"
while IFS= read -r f; do [ "$f" = ./ ] || chown -h "$2" "$f"; done < "$list"
rm -f "$list""#;
        let program = chroot(&["sh", "-c", script, "imgvm", path, owner]);
        command::run(job, &program, Input::Host, false).map(drop)
    }
}

/// Runs a recipe's script with `sh -e`, in the image's chroot or in the helper.
impl Handle<Script> for Job<'_> {
    fn handle(&self, op: Script) -> Result<(), OperationError> {
        let job = self;
        let Script {
            script,
            env,
            chroot: in_chroot,
        } = &op;
        let in_chroot = *in_chroot;
        let (file, mut program) = if in_chroot {
            let inside = "/tmp/imgvm-step.sh";
            super::write(job, inside, script.as_bytes(), 0o700)?;
            (format!("{TARGET}{inside}"), chroot(&["sh", "-e", inside]))
        } else {
            let file = "/run/imgvm-step.sh".to_owned();
            std::fs::write(&file, script).map_err(|e| job.io_error(&e))?;
            let program = Program::new(&["sh", "-e", &file]).env("TARGET", TARGET);
            (file, program)
        };
        program.env.extend(env.iter().cloned());
        let result = run(job, &program);
        if in_chroot {
            remove(job, "/tmp/imgvm-step.sh")?;
        } else {
            let _ = std::fs::remove_file(file);
        }
        result
    }
}
