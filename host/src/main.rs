//! The `imgvm` command line.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use imgvm::arch::Arch;
use imgvm::helper::HelperOptions;
use imgvm::run::{CopySpec, RunRequest};
use imgvm::text::printable;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Build operating-system disk images without root, in a helper VM.
#[derive(Parser)]
#[command(version, about, after_long_help = exit::HELP)]
struct Cli {
    /// More detail in the log (-v imgvm's debug lines, -vv its trace and the libraries'
    /// debug lines, -vvv everything).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log lines as text or as JSON objects (for CI).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Colours in log lines: `auto` when stderr is a terminal and NO_COLOR is not set.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    color: Color,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

impl Color {
    /// Colours for a person at a terminal, who has not asked for none
    /// (<https://no-color.org>); logs and CI get plain lines.
    fn ansi(self) -> bool {
        match self {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::io::IsTerminal::is_terminal(&std::io::stderr())
            }
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check this machine for everything imgvm needs and say what to install.
    Doctor {
        /// The report as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Build an image from a recipe (default: Debian stable nocloud for this machine).
    Build(BuildArgs),
    /// Boot a built image on its firmware and check that it comes up; with `--checks RECIPE`,
    /// run that recipe's offline checks on it first, read-only.
    Test(TestArgs),
    /// Boot a built image on its firmware with its serial console on this terminal
    /// (Ctrl-] powers it off, twice stops it at once; a reboot ends it too).
    Boot(BootArgs),
    /// A root shell, or a command, in a built image's tree: its filesystems mounted in a
    /// helper VM as its manifest lays them out, read-only unless `--rw`.
    Shell(ShellArgs),
    /// Boot the helper VM and run a command in it (the debugging entry point).
    Run(RunArgs),
    /// Assemble or inspect the helper VM's appliance.
    #[command(subcommand)]
    Appliance(ApplianceCmd),
    /// Check recipes without building them.
    #[command(subcommand)]
    Recipe(RecipeCmd),
    /// Write the lock of a recipe (every package it installs, pinned) beside it: the
    /// recipe's steps run in the helper VM, as for a build, but no image is written.
    Lock(LockArgs),
    /// What differs between two builds: recipe, partitions, packages and outputs. Exit
    /// status 0 when nothing does, 1 when something does, 2 when one cannot be read.
    Diff(DiffArgs),
    /// The step cache: the image as earlier builds left it after each step, which later
    /// builds of the same first steps start from.
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Print the shell completion script for bash, zsh, fish, elvish or powershell
    /// (`cargo xtask install` installs them).
    Completions { shell: clap_complete::Shell },
    /// Print imgvm's manual page, in roff (`imgvm man | man -l -`), or write it and one
    /// page per command (imgvm-build.1, …) into a directory.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List the stored states per recipe: each step's state and its size.
    Info,
    /// Remove every stored state (not while a build is using them).
    Clean,
}

#[derive(clap::Args)]
struct DiffArgs {
    /// The older build: its manifest, or the output directory holding it.
    old: PathBuf,
    /// The newer build: its manifest, or the output directory holding it.
    new: PathBuf,
    /// Print the differences as JSON.
    #[arg(long)]
    json: bool,
    /// Also compare the files of the two raw images (content, kind, mode, owner, mtime,
    /// link target), listed in a helper VM that has both attached read-only.
    #[arg(long)]
    files: bool,
}

#[derive(Subcommand)]
enum RecipeCmd {
    /// Read and validate a recipe (with everything it extends) and summarise it.
    Check {
        recipe: PathBuf,
        #[command(flatten)]
        settings: RecipeArgs,
        /// Print the merged recipe as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What the command line sets over a recipe, and how far it is trusted.
#[derive(clap::Args)]
struct RecipeArgs {
    /// Architecture of the image (default: the recipe's, else this machine's).
    #[arg(long)]
    arch: Option<Arch>,
    /// Set a variable the recipe declares in `variables:` (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_var)]
    vars: Vec<(String, String)>,
    /// Debian mirror the image's packages come from, instead of the recipe's `mirror:`
    /// (the helper VM's own packages: --helper-mirror).
    #[arg(long, value_parser = parse_mirror)]
    mirror: Option<String>,
    /// The build's version, e.g. `20261128-1`: outputs are named NAME-ARCH-VERSION, and a
    /// recipe that declares the variable `version` gets it (the Debian recipes write it
    /// into /etc/cloud-release).
    #[arg(long, value_name = "VERSION")]
    version: Option<String>,
    /// Let the recipe copy files from outside its directory and use a mirror on this
    /// machine or its link-local network (a local apt-cacher-ng): for recipes you wrote.
    #[arg(long)]
    trust_recipe: bool,
}

fn parse_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not NAME=VALUE")),
    }
}

fn parse_mirror(text: &str) -> Result<String, String> {
    text.parse::<imgvm::recipe::Mirror>().map(|m| m.0)
}

impl RecipeArgs {
    fn load(&self, path: &std::path::Path) -> Result<imgvm::recipe::Recipe> {
        let overrides = imgvm::recipe::Overrides {
            arch: self.arch,
            vars: self.vars.iter().cloned().collect(),
            mirror: self.mirror.clone(),
            version: self.version.clone(),
        };
        let trust = if self.trust_recipe {
            imgvm::recipe::Trust::Trusted
        } else {
            imgvm::recipe::Trust::Confined
        };
        Ok(imgvm::recipe::Recipe::load_with(path, &overrides, trust)?)
    }
}

#[derive(clap::Args)]
struct VmArgs {
    /// Architecture of the helper VM: amd64, arm64 or ppc64el.
    #[arg(long, default_value_t = Arch::host().unwrap_or(Arch::Amd64))]
    arch: Arch,
    /// Debian mirror for the appliance's packages.
    #[arg(long, env = "IMGVM_MIRROR")]
    mirror: Option<String>,
    /// Debian suite for the appliance's packages.
    #[arg(long, env = "IMGVM_SUITE")]
    suite: Option<String>,
}

#[derive(clap::Args)]
struct ShellArgs {
    /// The image (raw or qcow2), as `imgvm build` wrote it, beside its manifest.
    image: PathBuf,
    /// Architecture of the image (default: its manifest's).
    #[arg(long)]
    arch: Option<Arch>,
    /// Let the shell change the image; without it, the image is attached and mounted
    /// read-only.
    #[arg(long)]
    rw: bool,
    /// Debian mirror for the helper appliance's packages (not the image's).
    #[arg(long, env = "IMGVM_MIRROR")]
    helper_mirror: Option<String>,
    /// Debian suite for the helper appliance's packages.
    #[arg(long, env = "IMGVM_SUITE")]
    helper_suite: Option<String>,
    /// Memory of the helper VM in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// vCPUs of the helper VM (default: the host's cores, at most 8).
    #[arg(long)]
    cpus: Option<u32>,
    /// The command and its arguments (default: a login shell, on this terminal).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Attach a disk image (raw or qcow2) as /dev/vda, /dev/vdb, ... in order.
    #[arg(long = "disk", value_name = "FILE")]
    disks: Vec<PathBuf>,
    /// Copy a host file or directory into the VM before the command: HOST:GUEST.
    #[arg(long, value_name = "HOST:GUEST")]
    copy_in: Vec<CopySpec>,
    /// Copy a file out of the VM after the command: GUEST:HOST (a GUEST/ directory comes
    /// out as a tar archive).
    #[arg(long, value_name = "GUEST:HOST")]
    copy_out: Vec<CopySpec>,
    /// Forward this process's standard input to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Memory of the helper VM in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// vCPUs of the helper VM (default: the host's cores, at most 8).
    #[arg(long)]
    cpus: Option<u32>,
    /// Seconds to wait for the agent to come up.
    #[arg(long, default_value_t = 180)]
    boot_timeout: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct BuildArgs {
    /// The recipe (YAML); without one, the built-in Debian stable nocloud recipe.
    recipe: Option<PathBuf>,
    #[command(flatten)]
    settings: RecipeArgs,
    /// Where the image and its manifest, lock, SBOM, checksums and log go.
    #[arg(short, long, default_value = "out")]
    output: PathBuf,
    #[command(flatten)]
    helper: BuildHelperArgs,
    /// Install exactly the packages of this lock (default: NAME-ARCH.lock beside the
    /// recipe, when there is one).
    #[arg(long, value_name = "FILE", conflicts_with = "no_lock")]
    lock: Option<PathBuf>,
    /// Ignore the lock beside the recipe: resolve packages from the mirror as it is now.
    #[arg(long)]
    no_lock: bool,
    /// Then test the image: the recipe's offline checks, and a boot on each firmware of
    /// its architecture. Results go to NAME.junit.xml and the manifest.
    #[arg(long)]
    test: bool,
    /// Print the plan (every operation the helper VM would carry out) and build nothing.
    #[arg(long)]
    dry_run: bool,
    /// The result as one JSON document on stdout (outputs, steps, tests; with
    /// --dry-run the plan; `{"error": …}` when the build fails); logs stay on stderr.
    #[arg(long)]
    json: bool,
    /// Build from an empty disk, and keep no state of this build in the step cache.
    #[arg(long)]
    no_cache: bool,
    /// When a step fails, open a root shell in the image (in the helper VM, which is
    /// still running) before the build ends as failed; in the helper itself when no
    /// image is mounted yet.
    #[arg(long)]
    debug_shell: bool,
}

/// The helper VM of a build.
#[derive(clap::Args)]
struct BuildHelperArgs {
    /// Memory of the helper VM in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// vCPUs of the helper VM (default: the host's cores, at most 8).
    #[arg(long)]
    cpus: Option<u32>,
    /// Debian mirror for the helper VM's own packages (not the image's).
    #[arg(long, env = "IMGVM_MIRROR")]
    helper_mirror: Option<String>,
    /// Debian suite of the helper VM (not the image's).
    #[arg(long, env = "IMGVM_SUITE")]
    helper_suite: Option<String>,
}

#[derive(clap::Args)]
struct LockArgs {
    /// The recipe (YAML); the lock is written beside it, as NAME-ARCH.lock.
    recipe: PathBuf,
    #[command(flatten)]
    settings: RecipeArgs,
    /// Replace the lock that is there, resolving packages from the mirror as it is now.
    #[arg(long)]
    update: bool,
    #[command(flatten)]
    helper: BuildHelperArgs,
}

#[derive(clap::Args)]
struct BootArgs {
    /// The image (raw, qcow2 or vmdk), as `imgvm build` wrote it.
    image: PathBuf,
    /// Architecture of the image (default: its manifest's, else this machine's).
    #[arg(long)]
    arch: Option<Arch>,
    /// Firmware to boot with (default: the architecture's first: BIOS on amd64).
    #[arg(long, value_enum)]
    firmware: Option<imgvm::boottest::Firmware>,
    /// Write to the image itself; without it, changes go to a snapshot that is dropped.
    #[arg(long)]
    persist: bool,
    /// Forward this port on 127.0.0.1 to the guest's ssh port (22).
    #[arg(long, value_name = "PORT")]
    ssh_port: Option<u16>,
    /// Let this public key in as the image's default user, through a NoCloud seed (for
    /// images with cloud-init).
    #[arg(long, value_name = "FILE")]
    ssh_key: Option<PathBuf>,
    /// Memory of the VM in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// vCPUs of the VM (default: the host's cores, at most 8).
    #[arg(long)]
    cpus: Option<u32>,
}

#[derive(clap::Args)]
struct TestArgs {
    /// The image (raw, qcow2 or vmdk), as `imgvm build` wrote it.
    image: PathBuf,
    /// Architecture of the image (default: its manifest's, else this machine's).
    #[arg(long)]
    arch: Option<Arch>,
    /// Firmware to boot with (default: each of the architecture's: BIOS and UEFI on
    /// amd64, UEFI on arm64, SLOF on ppc64el).
    #[arg(long, value_enum)]
    firmware: Option<imgvm::boottest::Firmware>,
    /// Seconds each boot may take to show the marker.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Also write the results as JUnit XML to this file.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// The results as one JSON document on stdout (`{"error": …}` when the test could
    /// not run); logs stay on stderr.
    #[arg(long)]
    json: bool,
    /// Memory of the test VM in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// vCPUs of the test VM (default: the host's cores, at most 8).
    #[arg(long)]
    cpus: Option<u32>,
    /// Debian mirror for the packages of the helper VM that prepares the boot.
    #[arg(long, env = "IMGVM_MIRROR")]
    helper_mirror: Option<String>,
    /// Debian suite of the helper VM that prepares the boot.
    #[arg(long, env = "IMGVM_SUITE")]
    helper_suite: Option<String>,
    /// Run this recipe's offline checks (`tests:`) on the image first, in the helper VM,
    /// on a read-only view of a throw-away overlay: the image is not changed.
    #[arg(long, value_name = "RECIPE")]
    checks: Option<PathBuf>,
    /// Set a variable the checks' recipe declares (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_var, requires = "checks")]
    vars: Vec<(String, String)>,
    /// Only the offline checks: boot nothing.
    #[arg(long, requires = "checks", conflicts_with = "firmware")]
    no_boot: bool,
}

#[derive(Subcommand)]
enum ApplianceCmd {
    /// Download and assemble the appliance (again, with --refresh).
    Build {
        #[command(flatten)]
        vm: VmArgs,
        /// Re-resolve packages from the mirror even if an appliance is cached.
        #[arg(long)]
        refresh: bool,
    },
    /// Show the cached appliance: kernel, modules and packages.
    Info {
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Boot the helper VM, print the seconds from launch to the agent's handshake, and
    /// power it off.
    BootTime {
        #[command(flatten)]
        vm: VmArgs,
        /// Boot the kernel with only the agent and its modules, without the userland.
        #[arg(long)]
        bare: bool,
    },
}

/// `println!` for what imgvm answers on stdout, which a reader may stop reading
/// (`imgvm recipe check R | head`): that is no reason to panic, and the rest is dropped.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// imgvm's exit statuses, one owner for what each means (the README's "Exit status"
/// lists them): a pipeline tells a broken build from failed image tests by them.
/// `run` passes on its command's status, and `diff` says 1 for "they differ".
mod exit {
    pub const SUCCESS: u8 = 0;
    /// Anything went wrong (the message says what).
    pub const ERROR: u8 = 1;
    /// The command line is wrong.
    pub const USAGE: u8 = 2;
    /// The image's tests failed; the image was still delivered.
    pub const TESTS_FAILED: u8 = 3;
    /// Stopped by Ctrl-C, SIGTERM or SIGHUP.
    pub const CANCELLED: u8 = 130;

    /// The same, for `--help` and the manual page.
    pub const HELP: &str = "Exit status:
  0    success
  1    an error (the message says what)
  2    the command line is wrong
  3    the image's tests failed (the image was still delivered)
  130  stopped by Ctrl-C, SIGTERM or SIGHUP

`imgvm run` exits with its command's status; `imgvm diff` with 1 when the builds differ and 2 when one cannot be read.";
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // `--help` and `--version` come this way too, to stdout.
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::SUCCESS });
        }
    };
    init_logging(cli.verbose, cli.log_format, cli.color.ansi());
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report(&e);
            ExitCode::from(exit::ERROR)
        }
    }
}

fn report(e: &anyhow::Error) {
    // Errors quote the guest (messages, stderr tails): see imgvm::text.
    eprintln!("error: {}", printable(&e.to_string()));
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {}", printable(&cause.to_string()));
    }
}

/// `diff`'s exit status: 1 says "they differ", so trouble is 2, as for diff(1).
async fn diff(args: DiffArgs) -> u8 {
    let compared = async {
        let (old_path, old) = imgvm::manifest::Manifest::find(&args.old)?;
        let (new_path, new) = imgvm::manifest::Manifest::find(&args.new)?;
        let mut diff = imgvm::diff::Diff::between(&old, &new);
        if args.files {
            let old = imgvm::inspect::Image::beside(&old_path, old)?;
            let new = imgvm::inspect::Image::beside(&new_path, new)?;
            let listed =
                interruptible(|cancel| async move { imgvm::inspect::files([&old, &new], &cancel).await }).await?;
            let Some([old, new]) = listed else {
                return anyhow::Ok(None);
            };
            diff.files = Some(imgvm::diff::Files::between(&old, &new));
        }
        anyhow::Ok(Some(diff))
    }
    .await;
    match compared {
        Ok(None) => exit::CANCELLED,
        Ok(Some(diff)) => {
            if args.json {
                say!("{}", serde_json::to_string_pretty(&diff).expect("a diff serialises"));
            } else {
                let text = diff.text();
                if !text.is_empty() {
                    say!("{}", printable(text.trim_end()));
                }
            }
            u8::from(!diff.is_empty())
        }
        Err(e) => {
            report(&e);
            2
        }
    }
}

async fn dispatch(command: Cmd) -> Result<u8> {
    match command {
        Cmd::Doctor { json } => {
            let report = imgvm::doctor::examine();
            if json {
                say!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                say!("{}", report.text().trim_end());
            }
            Ok(if report.ready { exit::SUCCESS } else { exit::ERROR })
        }
        Cmd::Shell(args) => shell(args).await,
        Cmd::Run(args) => run(args).await,
        Cmd::Build(args) => {
            let json = args.json;
            answered(json, build(args).await)
        }
        Cmd::Boot(args) => boot(args).await,
        Cmd::Test(args) => {
            let json = args.json;
            answered(json, test(args).await)
        }
        Cmd::Diff(args) => Ok(diff(args).await),
        Cmd::Lock(args) => lock(args).await,
        Cmd::Cache(command) => cache(command),
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "imgvm", &mut std::io::stdout());
            Ok(exit::SUCCESS)
        }
        Cmd::Man { dir: None } => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(exit::SUCCESS)
        }
        Cmd::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)?;
            // imgvm.1 and imgvm-build.1 and so on, as git and cargo name theirs.
            clap_mangen::generate_to(Cli::command(), &dir)?;
            say!("{}", dir.display());
            Ok(exit::SUCCESS)
        }
        Cmd::Recipe(RecipeCmd::Check { recipe, settings, json }) => {
            let recipe = settings.load(&recipe)?;
            if json {
                say!("{}", serde_json::to_string_pretty(&recipe)?);
            } else {
                say!(
                    "{}: {} {} for {}",
                    recipe.file.display(),
                    recipe.name,
                    recipe.suite,
                    recipe.arch
                );
                say!("  disk: {} {}", recipe.disk_size.explained(), recipe.table.name());
                for part in &recipe.partitions {
                    let size = part.size.map_or("rest".to_owned(), |s| s.explained());
                    let mount = part.mount.as_deref().unwrap_or("-");
                    say!("    {:<10} {:<9} {:>8}  {mount}", part.name, part.kind.name(), size);
                }
                say!("  packages: {}", recipe.packages.len());
                let steps: Vec<&str> = recipe.steps.iter().map(|s| s.kind()).collect();
                say!("  steps: {}", steps.join(", "));
                let outputs: Vec<&str> = recipe.outputs.iter().map(|o| o.name()).collect();
                say!("  outputs: {}", outputs.join(", "));
            }
            Ok(exit::SUCCESS)
        }
        Cmd::Appliance(ApplianceCmd::Build { vm, refresh }) => {
            let spec = imgvm::appliance::Spec::new(vm.arch, vm.mirror.as_deref(), vm.suite.as_deref())?;
            let fetcher = imgvm::archive::Fetcher::default();
            let stats = fetcher.clone();
            let appliance = tokio::task::spawn_blocking(move || spec.ensure(&fetcher, refresh)).await??;
            tracing::info!(
                downloaded_files = stats.stats().files(),
                downloaded_bytes = stats.stats().bytes(),
                "appliance {}",
                appliance.dir.display()
            );
            say!("{}", appliance.dir.display());
            Ok(exit::SUCCESS)
        }
        Cmd::Appliance(ApplianceCmd::BootTime { vm, bare }) => {
            let options = HelperOptions {
                bare,
                ..helper_options(vm, Vec::new(), 2048, None, 180)
            };
            let helper = imgvm::helper::Helper::boot(&options, &imgvm::archive::Fetcher::default()).await?;
            say!("{:.3}", helper.boot_time.as_secs_f64());
            helper.shutdown().await?;
            Ok(exit::SUCCESS)
        }
        Cmd::Appliance(ApplianceCmd::Info { vm }) => {
            let spec = imgvm::appliance::Spec::new(vm.arch, vm.mirror.as_deref(), vm.suite.as_deref())?;
            let Some(appliance) = spec.cached() else {
                anyhow::bail!(
                    "no {} appliance is cached yet: run `imgvm appliance build --arch {}`",
                    vm.arch,
                    vm.arch
                );
            };
            say!("{}", serde_json::to_string_pretty(&appliance.manifest)?);
            Ok(exit::SUCCESS)
        }
    }
}

async fn run(args: RunArgs) -> Result<u8> {
    let request = RunRequest {
        helper: helper_options(args.vm, args.disks, args.memory, args.cpus, args.boot_timeout),
        copy_in: args.copy_in,
        copy_out: args.copy_out,
        stdin: args.interactive,
        argv: args.command,
    };
    let code = interruptible(|cancel| imgvm::run::run(request, cancel))
        .await?
        .unwrap_or(i32::from(exit::CANCELLED));
    Ok(code.clamp(0, 255) as u8)
}

async fn shell(args: ShellArgs) -> Result<u8> {
    let (info, arch) = built_image(&args.image, args.arch)?;
    let Some((table, partitions)) = info.layout else {
        anyhow::bail!(
            "{}: no manifest beside it says how its disk is laid out (`imgvm build` writes NAME.manifest.json)",
            args.image.display()
        );
    };
    let vm = VmArgs {
        arch,
        mirror: args.helper_mirror,
        suite: args.helper_suite,
    };
    let request = imgvm::shell::ShellRequest {
        image: args.image,
        table,
        partitions,
        helper: helper_options(vm, Vec::new(), args.memory, args.cpus, 180),
        writable: args.rw,
        argv: args.command,
    };
    let code = interruptible(|cancel| imgvm::shell::shell(request, cancel))
        .await?
        .flatten();
    Ok(code.map_or(exit::CANCELLED, |code| code.clamp(0, 255) as u8))
}

async fn build(args: BuildArgs) -> Result<u8> {
    // The built-in recipe lives in a temporary directory for the duration of the build.
    let (builtin, path) = match args.recipe {
        Some(path) => (None, path),
        None => {
            let dir = imgvm::recipe::builtin::materialize()?;
            let path = dir.path().join(imgvm::recipe::builtin::DEFAULT);
            (Some(dir), path)
        }
    };
    let recipe = args.settings.load(&path)?;
    let beside = recipe.lock_path();
    let lock = match args.lock {
        Some(path) => Some(path),
        None if !args.no_lock && builtin.is_none() && beside.exists() => Some(beside),
        None => None,
    };
    let options = imgvm::build::BuildOptions {
        lock: lock.map(|path| imgvm::lock::LockFile::read(&path)).transpose()?,
        lock_only: false,
        test: args.test,
        no_cache: args.no_cache,
        debug_shell: args.debug_shell,
        ..build_options(recipe, args.output, args.helper)
    };
    if args.dry_run {
        let plan = imgvm::build::plan(options).await?;
        if args.json {
            say!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            say!("{}", plan.text().trim_end());
        }
        return Ok(exit::SUCCESS);
    }
    let Some(report) = interruptible(|cancel| imgvm::build::build(options, cancel)).await? else {
        return Ok(exit::CANCELLED);
    };
    drop(builtin);
    for timing in &report.timings {
        tracing::info!("{:>8.1} s  {}", timing.seconds, timing.step);
    }
    tracing::info!("built in {:.0} s", report.seconds);
    let outputs: Vec<_> = report
        .outputs
        .iter()
        .map(|path| {
            let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            serde_json::json!({"path": path, "bytes": bytes})
        })
        .collect();
    let cases = report.tests.as_ref().map(|t| t.cases());
    let passed = cases.as_ref().is_none_or(|cases| cases.iter().all(|c| c.passed));
    if args.json {
        let result = serde_json::json!({
            "outputs": outputs,
            "steps": report.timings,
            "seconds": report.seconds,
            "tests": cases.as_ref().map(|cases| serde_json::json!({"passed": passed, "cases": cases})),
        });
        say!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        for output in &outputs {
            let bytes = output["bytes"].as_u64().unwrap_or(0);
            say!(
                "{}  ({:.1} MiB)",
                output["path"].as_str().unwrap_or_default(),
                bytes as f64 / (1 << 20) as f64
            );
        }
        for case in cases.iter().flatten() {
            say!("{}", printable(&case.line()));
        }
    }
    Ok(if passed { exit::SUCCESS } else { exit::TESTS_FAILED })
}

/// With `--json`, a failure is a JSON document too (`{"error": …, "causes": […]}`), and
/// so is a cancellation, so that a tool reading stdout always gets one. The message
/// goes to stderr as well, for the person watching.
fn answered(json: bool, result: Result<u8>) -> Result<u8> {
    if !json {
        return result;
    }
    let (status, error) = match result {
        Ok(exit::CANCELLED) => (exit::CANCELLED, serde_json::json!({"error": "cancelled"})),
        Ok(status) => return Ok(status),
        Err(e) => {
            report(&e);
            let causes: Vec<String> = e.chain().skip(1).map(ToString::to_string).collect();
            (
                exit::ERROR,
                serde_json::json!({"error": e.to_string(), "causes": causes}),
            )
        }
    };
    say!("{}", serde_json::to_string_pretty(&error)?);
    Ok(status)
}

fn build_options(
    recipe: imgvm::recipe::Recipe,
    output: PathBuf,
    helper: BuildHelperArgs,
) -> imgvm::build::BuildOptions {
    imgvm::build::BuildOptions {
        recipe,
        output,
        memory_mib: helper.memory,
        cpus: helper.cpus,
        boot_timeout: Duration::from_secs(180),
        helper_mirror: helper.helper_mirror,
        helper_suite: helper.helper_suite,
        test: false,
        lock: None,
        lock_only: false,
        no_cache: false,
        debug_shell: false,
        fallback: None,
    }
}

/// `imgvm cache info|clean`.
fn cache(command: CacheCmd) -> Result<u8> {
    use indicatif::HumanBytes;
    match command {
        CacheCmd::Info => {
            let store = imgvm::states::Store::open()?;
            let entries = store.entries();
            let total: u64 = entries.iter().map(|e| e.bytes).sum();
            let mut recipe = None;
            for entry in &entries {
                let this = (&entry.meta.recipe, &entry.meta.arch);
                if recipe != Some(this) {
                    let bytes: u64 = entries
                        .iter()
                        .filter(|e| (&e.meta.recipe, &e.meta.arch) == this)
                        .map(|e| e.bytes)
                        .sum();
                    say!("{} ({}): {}", entry.meta.recipe, entry.meta.arch, HumanBytes(bytes));
                    recipe = Some(this);
                }
                say!(
                    "  {:>10}  {}  {}",
                    HumanBytes(entry.bytes).to_string(),
                    &entry.key[..12],
                    printable(&entry.meta.step)
                );
            }
            say!(
                "{} states, {} of {} ({})",
                entries.len(),
                HumanBytes(total),
                HumanBytes(imgvm::states::limit()),
                store.dir().display()
            );
        }
        CacheCmd::Clean => {
            let store = imgvm::states::Store::exclusive()?;
            let removed = store.clean();
            say!("removed {} from {}", HumanBytes(removed), store.dir().display());
        }
    }
    Ok(exit::SUCCESS)
}

/// `imgvm lock`: the build's steps in a scratch directory of the cache, and only the
/// lock kept, beside the recipe.
async fn lock(args: LockArgs) -> Result<u8> {
    let recipe = args.settings.load(&args.recipe)?;
    let dest = recipe.lock_path();
    if dest.exists() && !args.update {
        anyhow::bail!(
            "{} exists: `imgvm lock --update {}` replaces it",
            dest.display(),
            args.recipe.display()
        );
    }
    let cache = imgvm::cache::dir();
    std::fs::create_dir_all(&cache)?;
    let scratch = imgvm::leftovers::ClaimedDir::new_in(&cache, ".imgvm-lock-")?;
    let options = imgvm::build::BuildOptions {
        lock_only: true,
        ..build_options(recipe, scratch.path().to_owned(), args.helper)
    };
    let Some(report) = interruptible(|cancel| imgvm::build::build(options, cancel)).await? else {
        return Ok(exit::CANCELLED);
    };
    let written = report.outputs.first().context("the build wrote no lock")?;
    // Into place in one rename, from beside it.
    let dir = dest.parent().unwrap_or(std::path::Path::new("."));
    let mut tmp = imgvm::leftovers::partial_file(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    std::io::copy(&mut std::fs::File::open(written)?, tmp.as_file_mut())?;
    // A file to commit beside the recipe, not a private temporary one.
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(&dest)?;
    say!("{}", dest.display());
    Ok(exit::SUCCESS)
}

/// A built image named on the command line, what its manifest says of it, and its
/// architecture (`--arch`, else the manifest's, else this machine's).
fn built_image(image: &std::path::Path, arch: Option<Arch>) -> Result<(imgvm::boottest::ImageInfo, Arch)> {
    if !image.is_file() {
        anyhow::bail!("{}: no such image", image.display());
    }
    let info = imgvm::boottest::ImageInfo::of(image);
    let arch = arch.or(info.arch).or_else(Arch::host).unwrap_or(Arch::Amd64);
    Ok((info, arch))
}

async fn boot(args: BootArgs) -> Result<u8> {
    use imgvm::boottest::firmware;
    let (_, arch) = built_image(&args.image, args.arch)?;
    let firmware = match args.firmware {
        Some(firmware) => firmware,
        None => *firmware::defaults(arch)
            .first()
            .context("no firmware for this architecture")?,
    };
    let ssh_keys = match &args.ssh_key {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            imgvm::boot::ssh_keys(&text).with_context(|| format!("--ssh-key {}", path.display()))?
        }
        None => Vec::new(),
    };
    let options = imgvm::boot::BootOptions {
        image: args.image.clone(),
        arch,
        firmware,
        persist: args.persist,
        ssh_port: args.ssh_port,
        ssh_keys,
        memory_mib: args.memory,
        cpus: args.cpus.unwrap_or_else(imgvm::helper::default_cpus),
    };
    let changes = if args.persist {
        "written to it"
    } else {
        "dropped at the end"
    };
    tracing::info!(
        "booting {} ({arch}, {}); changes are {changes}; Ctrl-] powers it off",
        args.image.display(),
        firmware::name(arch, firmware)
    );
    if let Some(port) = args.ssh_port {
        tracing::info!("ssh: ssh -p {port} USER@127.0.0.1");
    }
    let Some(_) = interruptible(|cancel| async move { imgvm::boot::boot(&options, &cancel).await }).await? else {
        return Ok(exit::CANCELLED);
    };
    Ok(exit::SUCCESS)
}

async fn test(args: TestArgs) -> Result<u8> {
    use imgvm::boottest::{self, BootOptions};
    let (info, arch) = built_image(&args.image, args.arch)?;
    let firmwares = match (args.no_boot, args.firmware) {
        (true, _) => Vec::new(),
        (false, Some(f)) => vec![f],
        (false, None) => boottest::firmware::defaults(arch),
    };
    // The recipe's checks, and the units its boot test allows to fail.
    let (checks, may_fail) = match &args.checks {
        Some(path) => {
            let overrides = imgvm::recipe::Overrides {
                arch: Some(arch),
                vars: args.vars.iter().cloned().collect(),
                mirror: None,
                version: None,
            };
            let recipe = imgvm::recipe::Recipe::load_with(path, &overrides, imgvm::recipe::Trust::Confined)?;
            (imgvm::plan::checks(&recipe), recipe.boot_test.may_fail)
        }
        None => (Vec::new(), Vec::new()),
    };
    let Some((table, partitions)) = &info.layout else {
        anyhow::bail!(
            "{}: no manifest beside it says how its disk is laid out (`imgvm build` writes NAME.manifest.json)",
            args.image.display()
        );
    };
    let vm = VmArgs {
        arch,
        mirror: args.helper_mirror.clone(),
        suite: args.helper_suite.clone(),
    };
    let helper = helper_options(vm, Vec::new(), 1024, args.cpus, 180);
    let image = &args.image;
    let wanted = checks.iter().map(|c| c.check.clone()).collect();
    let prepared = interruptible(|cancel| async move {
        boottest::Probe::prepare(image, *table, partitions, wanted, helper, &cancel).await
    })
    .await?;
    let Some(mut probe) = prepared else {
        return Ok(exit::CANCELLED);
    };
    let mut cases = Vec::new();
    for outcome in imgvm::build::check_outcomes(checks, std::mem::take(&mut probe.checks))? {
        let case = outcome.case();
        if !args.json {
            say!("{}", printable(&case.line()));
        }
        cases.push(case);
    }
    for firmware in firmwares {
        let options = BootOptions {
            arch,
            firmware,
            timeout: Duration::from_secs(args.timeout),
            memory_mib: args.memory,
            cpus: args.cpus.unwrap_or_else(imgvm::helper::default_cpus),
            may_fail: may_fail.clone(),
        };
        let name = boottest::firmware::name(arch, firmware);
        tracing::info!("booting {} ({arch}) with {name}", args.image.display());
        let probe = &probe;
        let Some(result) =
            interruptible(|cancel| async move { boottest::boot(&options, probe, &cancel).await }).await?
        else {
            return Ok(exit::CANCELLED);
        };
        let case = result.case();
        if !args.json {
            say!("{}", printable(&case.line()));
            if !case.passed {
                say!("      last lines of the console:");
                for line in case.details.lines() {
                    say!("      | {}", printable(line));
                }
            }
        }
        cases.push(case);
    }
    if let Some(path) = &args.junit {
        write_atomically(path, imgvm::report::junit(&info.name, &cases).as_bytes())?;
    }
    let passed = cases.iter().all(|c| c.passed);
    if args.json {
        let result = serde_json::json!({"image": args.image, "arch": arch, "passed": passed, "cases": cases});
        say!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(if passed { exit::SUCCESS } else { exit::TESTS_FAILED })
}

/// Readers of `path` see the old content or the new, never a part.
fn write_atomically(path: &std::path::Path, content: &[u8]) -> Result<()> {
    use anyhow::Context;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = imgvm::leftovers::partial_file(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, content)?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn helper_options(vm: VmArgs, disks: Vec<PathBuf>, memory_mib: u32, cpus: Option<u32>, timeout: u64) -> HelperOptions {
    HelperOptions {
        arch: vm.arch,
        disks,
        read_only: false,
        memory_mib,
        cpus,
        boot_timeout: Duration::from_secs(timeout),
        mirror: vm.mirror,
        suite: vm.suite,
        bare: false,
        proxy_mirrors: Vec::new(),
        fallback: None,
        pinned: Vec::new(),
        appliance: None,
    }
}

/// Runs `work` so that a first Ctrl-C (or SIGTERM, SIGHUP) cancels it cleanly and a
/// second drops it at once, which kills the VM. `None` when a signal stopped it: the
/// error `work` ended with then is reported here, and the caller exits as cancelled.
async fn interruptible<T, F>(work: impl FnOnce(CancellationToken) -> F) -> Result<Option<T>>
where
    F: std::future::Future<Output = Result<T>>,
{
    let cancel = CancellationToken::new();
    let abort = std::sync::Arc::new(tokio::sync::Notify::new());
    tokio::spawn(watch_signals(cancel.clone(), abort.clone()));
    tokio::select! {
        result = work(cancel.clone()) => match result {
            Err(e) if cancel.is_cancelled() => {
                report(&e);
                Ok(None)
            }
            result => result.map(Some),
        },
        _ = abort.notified() => Ok(None),
    }
}

async fn watch_signals(cancel: CancellationToken, abort: std::sync::Arc<tokio::sync::Notify>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        if cancel.is_cancelled() {
            abort.notify_one();
        } else {
            tracing::warn!("stopping (press Ctrl-C again to abort at once)");
            cancel.cancel();
        }
    }
}

fn init_logging(verbose: u8, format: LogFormat, ansi: bool) {
    // Libraries log through `log` too (ureq, rustls): their records come this way.
    let level = match verbose {
        0 => "imgvm=info,warn",
        1 => "imgvm=debug,info",
        2 => "imgvm=trace,debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("IMGVM_LOG").unwrap_or_else(|_| level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(imgvm::progress::LogWriter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).without_time().with_ansi(ansi).init(),
    }
}
