//! The command line as scripts and people meet it, without a VM: exit statuses, recipe
//! settings from the command line, manual pages and completions, and log lines that are
//! coloured only for a person at a terminal. (Exit status 3 is checked by
//! image_tests.rs, 130 by step_cache.rs and helper_vm.rs: they need a VM.)

use imgvm_e2e::terminal::Terminal;
use imgvm_e2e::{give_to_user, imgvm, workdir};
use std::process::Command;
use std::time::Duration;

/// Exit status, stdout and stderr.
fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn exit_statuses_tell_a_wrong_command_line_from_a_failure() {
    let (code, _, stderr) = run(&mut imgvm(["build", "--no-such-flag"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unexpected argument '--no-such-flag'"), "{stderr}");

    let (code, stdout, _) = run(&mut imgvm(["--help"]));
    assert_eq!(code, Some(0));
    assert!(stdout.contains("3    the image's tests failed"), "{stdout}");

    let dir = workdir("cli-exit");
    let recipe = dir.join("r.yaml");
    std::fs::write(&recipe, "name: r\nsuite: [trixie\n").unwrap();
    give_to_user(&recipe);
    let (code, _, stderr) = run(imgvm(["recipe", "check"]).arg(&recipe));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("r.yaml:3:1: did not find expected ','"), "{stderr}");
}

#[test]
fn the_command_line_sets_variables_and_the_mirror_and_sizes_say_their_units() {
    let dir = workdir("cli-recipe");
    let recipe = dir.join("r.yaml");
    std::fs::write(
        &recipe,
        "name: r\nvariables: {suite: trixie}\nsuite: ${suite}\narch: amd64\n\
         disk:\n  size: 3GB\n  partitions:\n    - {name: root, type: root, filesystem: ext4, mount: /}\n",
    )
    .unwrap();
    give_to_user(&recipe);

    let (code, stdout, stderr) = run(imgvm(["recipe", "check"]).arg(&recipe));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("r trixie for amd64"), "{stdout}");
    assert!(stdout.contains("disk: 3GB (2.79 GiB) gpt"), "{stdout}");

    // A mirror on this machine: a recipe may not name one, the user may.
    let check = |extra: &[&str]| {
        run(imgvm(["recipe", "check", "--json", "--var", "suite=bookworm"])
            .args(extra)
            .arg(&recipe))
    };
    let (code, stdout, stderr) = check(&["--mirror", "http://localhost:3142/debian/"]);
    assert_eq!(code, Some(0), "{stderr}");
    let merged: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(merged["suite"], "bookworm");
    assert_eq!(merged["mirror"], "http://localhost:3142/debian");
    assert_eq!(merged["disk_size"], "3GB");

    let (code, _, stderr) = run(imgvm(["recipe", "check", "--var", "suit=bookworm"]).arg(&recipe));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--var suit: the recipe declares no such variable in `variables:` (it has suite)"),
        "{stderr}"
    );
    let (code, _, stderr) = check(&["--mirror", "ftp://mirror/debian"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("expected an http:// or https:// URL"), "{stderr}");
}

#[test]
fn manual_pages_and_shell_completions_are_generated() {
    let dir = workdir("cli-man");
    let pages = dir.join("man1");
    let (code, _, stderr) = run(imgvm(["man", "--dir"]).arg(&pages));
    assert_eq!(code, Some(0), "{stderr}");
    let page = |name: &str| std::fs::read_to_string(pages.join(name)).unwrap();
    assert!(page("imgvm.1").contains("Exit status:"), "{}", page("imgvm.1"));
    assert!(page("imgvm-build.1").contains("\\-\\-trust\\-recipe"));
    assert!(page("imgvm-cache-clean.1").starts_with(".ie"), "roff");

    for (shell, marker) in [
        ("bash", "complete -F _imgvm"),
        ("zsh", "#compdef imgvm"),
        ("fish", "complete -c imgvm"),
    ] {
        let (code, script, stderr) = run(&mut imgvm(["completions", shell]));
        assert_eq!(code, Some(0), "{stderr}");
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("trust-recipe"), "{shell}");
    }
    let (_, bash, _) = run(&mut imgvm(["completions", "bash"]));
    let script = dir.join("imgvm.bash");
    std::fs::write(&script, bash).unwrap();
    let (code, _, stderr) = run(Command::new("bash").arg("-n").arg(&script));
    assert_eq!(code, Some(0), "the bash completion does not parse: {stderr}");
}

/// What `imgvm ARGS` shows when it runs on a terminal.
fn on_a_terminal(args: &[&str], env: &[(&str, &str)]) -> String {
    let terminal = Terminal::spawn(imgvm(args).envs(env.iter().copied()));
    let (status, shown) = terminal.finish(Duration::from_secs(120));
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {shown}");
    shown
}

#[test]
fn log_lines_are_coloured_only_for_a_terminal_that_did_not_ask_for_none() {
    // -vv: the libraries' `log` records (ureq's requests) reach the log as well.
    let args = ["-vv", "build", "--dry-run"];
    let (code, _, piped) = run(&mut imgvm(args));
    assert_eq!(code, Some(0), "{piped}");
    assert!(piped.contains("DEBUG GET http://deb.debian.org/"), "{piped}");
    assert!(!piped.contains('\u{1b}'), "ANSI codes in a log that is not a terminal");
    let (_, _, forced) = run(imgvm(["--color", "always"]).args(args));
    assert!(forced.contains("\u{1b}[34mDEBUG\u{1b}[0m"), "{forced}");

    let terminal = on_a_terminal(&args, &[]);
    assert!(terminal.contains("\u{1b}[34mDEBUG\u{1b}[0m GET http"), "{terminal}");
    let asked = on_a_terminal(&args, &[("NO_COLOR", "1")]);
    assert!(asked.contains("DEBUG GET http"), "{asked}");
    assert!(!asked.contains('\u{1b}'), "NO_COLOR=1, yet: {asked}");
}

#[test]
fn doctor_and_a_failed_build_answer_in_json_when_asked() {
    let (code, stdout, stderr) = run(&mut imgvm(["doctor", "--json"]));
    assert_eq!(code, Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(report["ready"], true);
    let checks = report["checks"].as_array().unwrap();
    let cache = checks
        .iter()
        .find(|c| c["what"] == "cache directory")
        .expect("{report}");
    assert_eq!(cache["ok"], true);
    assert!(checks
        .iter()
        .all(|c| c["detail"].is_string() && c["required"].is_boolean()));

    // A build that fails says so in JSON on stdout, and in words on stderr.
    let dir = workdir("cli-json");
    let recipe = dir.join("r.yaml");
    std::fs::write(&recipe, "name: r\nsuite: trixie\ndisk: {size: 3 gigs}\n").unwrap();
    give_to_user(&recipe);
    let (code, stdout, stderr) = run(imgvm(["build", "--json", "-o"]).arg(dir.join("out")).arg(&recipe));
    assert_eq!(code, Some(1), "{stderr}");
    let failure: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    let error = failure["error"].as_str().unwrap();
    assert!(error.ends_with("r.yaml:3:14: disk: invalid size `3 gigs`: unknown unit `gigs` (use B, KiB, MiB, GiB or TiB, or the SI kB, MB, GB or TB)"), "{error}");
    assert!(stderr.contains(error), "{stderr}");
    assert!(!dir.join("out").exists());
}
