//! Reading a recipe: variables, `extends`, per-architecture parts, then one merged
//! [`Recipe`], checked as a whole before any VM starts.

use super::error::RecipeError;
use super::model::*;
use super::trust::{self, Trust};
use super::{HostSource, Overrides, Recipe};
use crate::arch::Arch;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How deep `extends` may nest before it is taken for a cycle.
const MAX_DEPTH: usize = 8;

/// A parsed file with what is needed to point back into it.
struct Source {
    path: PathBuf,
    text: String,
    body: Body,
}

pub fn load(path: &Path, overrides: &Overrides, trust: Trust) -> Result<Recipe, RecipeError> {
    let mut sources = Vec::new();
    let mut vars = overrides.vars.clone();
    if let Some(version) = &overrides.version {
        let valid = !version.is_empty()
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._+~-".contains(c))
            && !version.starts_with(['.', '-']);
        if !valid {
            return Err(RecipeError::new(
                path,
                0,
                0,
                format!("--version `{version}`: use letters, digits, `.`, `_`, `+`, `~` and `-`, not starting with `.` or `-`"),
            ));
        }
        if vars.contains_key("version") {
            return Err(RecipeError::new(
                path,
                0,
                0,
                "give --version or --var version=..., not both",
            ));
        }
        vars.insert("version".into(), version.clone());
    }
    read_chain(path, &vars, &mut Vec::new(), &mut sources)?;
    let top_path = sources.last().expect("the file itself was read").path.clone();
    let declared: std::collections::BTreeSet<&String> = sources.iter().flat_map(|s| s.body.variables.keys()).collect();
    if let Some(name) = overrides.vars.keys().find(|name| !declared.contains(name)) {
        let names: Vec<&str> = declared.iter().map(|n| n.as_str()).collect();
        let known = match names.is_empty() {
            true => "it has none".to_owned(),
            false => format!("it has {}", names.join(", ")),
        };
        return Err(RecipeError::new(
            &top_path,
            0,
            0,
            format!("--var {name}: the recipe declares no such variable in `variables:` ({known})"),
        ));
    }
    // A setting found wrong after merging is pointed to in the file that has it: the
    // recipe itself first, then what it extends, nearest first.
    let locate = |needle: &str| -> (PathBuf, usize, usize) {
        sources
            .iter()
            .rev()
            .find_map(|s| match locate(&s.text, needle) {
                (0, _) => None,
                (line, column) => Some((s.path.clone(), line, column)),
            })
            .unwrap_or_else(|| (top_path.clone(), 0, 0))
    };
    let err = |needle: &str, message: String| {
        let (file, line, column) = locate(needle);
        RecipeError::new(file, line, column, message)
    };

    let mut merged = Body::default();
    for source in &sources {
        merge(&mut merged, source.body.clone());
    }
    let arch = overrides
        .arch
        .or(merged.arch)
        .or_else(Arch::host)
        .ok_or_else(|| err("arch:", "no architecture: set `arch:` or pass --arch".into()))?;
    if let Some(arches) = &merged.arches {
        if !arches.contains(&arch) {
            let list: Vec<String> = arches.iter().map(ToString::to_string).collect();
            return Err(err(
                "arches:",
                format!("this recipe builds {}, not {arch}", list.join(", ")),
            ));
        }
    }
    for source in &sources {
        for (per, body) in &source.body.per_arch {
            if !body.extends.is_empty() || !body.variables.is_empty() || !body.per_arch.is_empty() {
                let (line, column) = super::load::locate(&source.text, "per_arch:");
                return Err(RecipeError::new(
                    &source.path,
                    line,
                    column,
                    format!("per_arch.{per}: extends, variables and per_arch belong at the top level"),
                ));
            }
            if *per == arch {
                merge(&mut merged, body.clone());
            }
        }
    }

    let name = merged
        .name
        .clone()
        .ok_or_else(|| err("", "missing field `name`".into()))?;
    let suite = merged
        .suite
        .clone()
        .ok_or_else(|| err("", "missing field `suite`".into()))?;
    let disk = merged.disk.clone().unwrap_or_default();
    let size = disk
        .size
        .ok_or_else(|| err("disk:", "missing field `disk.size`".into()))?;
    let table = disk.table.unwrap_or(TableKind::Gpt);
    let partitions = disk.partitions.unwrap_or_default();
    let mut steps = merged.steps.clone().unwrap_or_default();
    if !matches!(steps.first(), Some(Step::Bootstrap(_))) {
        steps.insert(0, Step::Bootstrap(Bootstrap::default()));
    }
    if !matches!(steps.last(), Some(Step::Finalize(_))) {
        steps.push(Step::Finalize(Finalize { trim: true }));
    }
    // GRUB is installed after every other step, so that its configuration from any
    // step (a vendor part's, or per_arch's, which come after the parts) is in grub.cfg.
    if let Some(at) = steps.iter().position(|s| matches!(s, Step::Bootloader(_))) {
        let bootloader = steps.remove(at);
        let finalize = steps.len() - 1;
        steps.insert(finalize, bootloader);
    }
    let outputs = merged.outputs.clone().unwrap_or_else(|| vec![OutputFormat::Raw]);
    let declared = overrides
        .mirror
        .clone()
        .or_else(|| merged.mirror.clone().map(|m| m.0))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
    let (mirror, snapshot_for) = match &merged.snapshot {
        Some(Snapshot(url)) => (url.clone(), Some(declared)),
        None => (declared, None),
    };

    let mut recipe = Recipe {
        name,
        description: merged.description.clone(),
        vendor: merged.vendor.clone(),
        arch,
        suite,
        mirror,
        snapshot_for,
        components: merged.components.clone().unwrap_or_else(|| vec!["main".into()]),
        disk_size: size,
        table,
        partitions,
        packages: merged.packages.clone().unwrap_or_default(),
        step_timeout: merged.step_timeout.unwrap_or(super::Timeout::DEFAULT),
        steps,
        outputs,
        tests: merged.tests.clone().unwrap_or_default(),
        boot_test: merged.boot_test.clone().unwrap_or_default(),
        file: top_path.clone(),
        version: overrides.version.clone(),
        hash: {
            let mut hasher = Sha256::new();
            for source in &sources {
                hasher.update(source.path.to_string_lossy().as_bytes());
                hasher.update([0]);
                hasher.update(source.text.as_bytes());
            }
            crate::archive::hex(&hasher.finalize())
        },
    };
    super::validate::check(&recipe, &locate)?;
    // A mirror the user named is theirs; only the recipe's own are confined.
    let recipes_mirror = |url: &String| overrides.mirror.as_ref() != Some(url);
    match &recipe.snapshot_for {
        None if recipes_mirror(&recipe.mirror) => {
            trust::mirror(&recipe.mirror, trust).map_err(|message| err("mirror:", message))?
        }
        None => {}
        Some(declared) => {
            trust::mirror(&recipe.mirror, trust).map_err(|message| err("snapshot:", message))?;
            if recipes_mirror(declared) {
                trust::mirror(declared, trust).map_err(|message| err("mirror:", message))?;
            }
        }
    }
    let dir = recipe.dir().to_owned();
    for step in &mut recipe.steps {
        if let Step::Copy(copy) = step {
            let path = trust::copy_source(&dir, &copy.from, trust).map_err(|message| err(&copy.from, message))?;
            let source =
                HostSource::read(&path).map_err(|e| err(&copy.from, format!("cannot read `{}`: {e}", copy.from)))?;
            copy.source = Some(source);
        }
    }
    Ok(recipe)
}

/// Reads `path` and, first, everything it extends. `vars` are the variables of the files
/// that extend this one (they win over this file's own).
fn read_chain(
    path: &Path,
    vars: &BTreeMap<String, String>,
    stack: &mut Vec<PathBuf>,
    out: &mut Vec<Source>,
) -> Result<(), RecipeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RecipeError::new(path, 0, 0, format!("cannot read the recipe: {e}")))?;
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    if stack.contains(&canonical) || stack.len() >= MAX_DEPTH {
        let chain: Vec<String> = stack
            .iter()
            .chain([&canonical])
            .map(|p| p.display().to_string())
            .collect();
        return Err(RecipeError::new(
            path,
            0,
            0,
            format!("`extends` forms a cycle: {}", chain.join(" -> ")),
        ));
    }
    // First pass: only the variables and what this file extends.
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        extends: Vec<String>,
        #[serde(default)]
        variables: BTreeMap<String, String>,
    }
    let head: Head = serde_yaml_ng::from_str(&text).map_err(|e| RecipeError::from_yaml(path, &text, &e))?;
    let mut all_vars = head.variables.clone();
    all_vars.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));

    stack.push(canonical);
    for parent in &head.extends {
        let parent_path = path.parent().unwrap_or(Path::new(".")).join(parent);
        if !parent_path.is_file() {
            let (line, column) = locate(&text, parent);
            return Err(RecipeError::new(
                path,
                line,
                column,
                format!("extends `{parent}`, which does not exist"),
            ));
        }
        read_chain(&parent_path, &all_vars, stack, out)?;
    }
    stack.pop();

    // Variables of the parents are visible here too.
    let mut visible: BTreeMap<String, String> = BTreeMap::new();
    for source in out.iter() {
        visible.extend(source.body.variables.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    visible.extend(all_vars);
    let text = substitute(path, &text, &visible)?;
    let body: Body = serde_yaml_ng::from_str(&text).map_err(|e| RecipeError::from_yaml(path, &text, &e))?;
    out.push(Source {
        path: path.to_owned(),
        text,
        body,
    });
    Ok(())
}

/// Replaces `${name}`; `$${` stands for a literal `${`.
fn substitute(path: &Path, text: &str, vars: &BTreeMap<String, String>) -> Result<String, RecipeError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let offset = text.len() - rest.len() + i;
        if in_comment(text, offset) {
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        let Some(end) = rest[i..].find('}') else {
            let (line, column) = position(text, offset);
            return Err(RecipeError::new(path, line, column, "unterminated `${`"));
        };
        let name = &rest[i + 2..i + end];
        match vars.get(name) {
            Some(value) => out.push_str(value),
            None => {
                let (line, column) = position(text, offset);
                let known: Vec<&str> = vars.keys().map(String::as_str).collect();
                let known = if known.is_empty() {
                    "none are defined".to_owned()
                } else {
                    format!("defined: {}", known.join(", "))
                };
                return Err(RecipeError::new(
                    path,
                    line,
                    column,
                    format!("unknown variable `{name}` ({known})"),
                ));
            }
        }
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether `offset` is inside a YAML comment: after a `#` that starts the line or
/// follows a blank, outside quotes.
fn in_comment(text: &str, offset: usize) -> bool {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let before = &text[line_start..offset];
    let (mut single, mut double) = (false, false);
    let mut previous = ' ';
    for c in before.chars() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && previous.is_whitespace() => return true,
            _ => {}
        }
        previous = c;
    }
    false
}

/// Later files override single values and append to `packages` and `steps`.
fn merge(into: &mut Body, from: Body) {
    macro_rules! take {
        ($($field:ident),*) => { $( if from.$field.is_some() { into.$field = from.$field; } )* };
    }
    take!(
        name,
        description,
        vendor,
        arch,
        arches,
        suite,
        mirror,
        snapshot,
        components,
        outputs,
        step_timeout,
        boot_test
    );
    if let Some(disk) = from.disk {
        let target = into.disk.get_or_insert_with(DiskBody::default);
        if disk.size.is_some() {
            target.size = disk.size;
        }
        if disk.table.is_some() {
            target.table = disk.table;
        }
        if disk.partitions.is_some() {
            target.partitions = disk.partitions;
        }
    }
    if let Some(packages) = from.packages {
        into.packages.get_or_insert_with(Vec::new).extend(packages);
    }
    if let Some(steps) = from.steps {
        into.steps.get_or_insert_with(Vec::new).extend(steps);
    }
    if let Some(tests) = from.tests {
        into.tests.get_or_insert_with(Vec::new).extend(tests);
    }
    into.variables.extend(from.variables);
}

/// Byte offset of a 1-based line and column; 0 for (0, 0).
pub(super) fn offset(text: &str, line: usize, column: usize) -> usize {
    if line == 0 {
        return 0;
    }
    let line_start: usize = text.split_inclusive('\n').take(line - 1).map(str::len).sum();
    (line_start + column.saturating_sub(1)).min(text.len())
}

/// Line and column (1-based) of byte `offset` in `text`.
pub(super) fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Where `needle` first appears in `text`, for errors about the merged recipe that the
/// YAML parser cannot place; (0, 0) when it does not appear.
pub(super) fn locate(text: &str, needle: &str) -> (usize, usize) {
    if needle.is_empty() {
        return (0, 0);
    }
    text.find(needle).map_or((0, 0), |offset| position(text, offset))
}
