//! `NAME.build.json`: the build in debian-cloud-images' manifest schema (apiVersion
//! `cloud.debian.org/v1alpha1`, kind `Build`), which Debian's upload and publishing tools
//! read beside the image's `NAME.tar`. Written for recipes that name their `vendor`.
//!
//! Formatted as Debian's `cli/build.py` writes it (keys sorted, four-space indent), and
//! made from the build's facts only, so that a rebuild from the same lock gives the same
//! file: Debian's `uid` is a random UUID, imgvm's is the lock's.

use crate::lock::Lock;
use crate::recipe::Recipe;
use base64::Engine;
use imgvm_protocol::Package;
use serde::Serialize;
use std::collections::BTreeMap;

/// Fields in alphabetical order, as Debian's `sort_keys` writes them.
#[derive(Serialize)]
struct Build<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    data: Data<'a>,
    kind: &'static str,
    metadata: Metadata,
}

#[derive(Serialize)]
struct Data<'a> {
    info: Info<'a>,
    packages: Vec<Named>,
}

#[derive(Serialize)]
struct Info<'a> {
    arch: String,
    build_id: &'static str,
    release: &'a str,
    release_baseid: String,
    release_id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    vendor: &'a str,
    version: &'a str,
}

#[derive(Serialize)]
struct Named {
    name: String,
    version: String,
}

#[derive(Serialize)]
struct Metadata {
    annotations: BTreeMap<&'static str, String>,
    labels: BTreeMap<&'static str, String>,
    uid: String,
}

/// Who made the build, where Debian's CI puts its pipeline's id.
const BUILD_ID: &str = "imgvm";

/// The Build manifest of an image of `recipe` holding `packages`; `tar_sha512` is the
/// digest of its `NAME.tar`, when the recipe writes one (Debian's tools check the tar
/// against it). None when the recipe names no vendor.
pub fn build_json(recipe: &Recipe, packages: &[Package], lock: &Lock, tar_sha512: Option<&[u8]>) -> Option<String> {
    let vendor = recipe.vendor.as_deref()?;
    // `--version` makes an official build, as Debian's official builds carry a
    // YYYYMMDD-N version; without one it is a development build.
    let (kind, version) = match &recipe.version {
        Some(version) => ("official", version.as_str()),
        None => ("dev", "dev"),
    };
    // The image's own release number: base-files' major version (13.8 -> 13).
    let release_id = packages
        .iter()
        .find(|p| p.name == "base-files")
        .and_then(|p| p.version.split(['.', '+', '~']).next())
        .unwrap_or(&recipe.suite)
        .to_owned();
    let mut packages: Vec<Named> = packages
        .iter()
        .map(|p| Named {
            // Debian names a package by its architecture too when several can be
            // installed side by side.
            name: match p.multi_arch.as_str() {
                "same" => format!("{}:{}", p.name, p.architecture),
                _ => p.name.clone(),
            },
            version: p.version.clone(),
        })
        .collect();
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    let mut labels = BTreeMap::from([
        ("cloud.debian.org/vendor", vendor.to_owned()),
        ("cloud.debian.org/version", version.to_owned()),
        ("debian.org/arch", recipe.arch.to_string()),
        ("debian.org/dist", "debian".to_owned()),
        ("debian.org/release", recipe.suite.clone()),
    ]);
    if kind == "dev" {
        labels.insert("build.cloud.debian.org/build-id", BUILD_ID.to_owned());
        labels.insert("build.cloud.debian.org/type", kind.to_owned());
    }
    let annotations = tar_sha512
        .map(|digest| {
            let digest = base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest);
            ("cloud.debian.org/digest", format!("sha512:{digest}"))
        })
        .into_iter()
        .collect();
    let build = Build {
        api_version: "cloud.debian.org/v1alpha1",
        data: Data {
            info: Info {
                arch: recipe.arch.to_string(),
                build_id: BUILD_ID,
                release: &recipe.suite,
                release_baseid: release_id.clone(),
                release_id,
                kind,
                vendor,
                version,
            },
            packages,
        },
        kind: "Build",
        metadata: Metadata {
            annotations,
            labels,
            uid: lock.uuid(),
        },
    };
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    build.serialize(&mut serializer).expect("a Build serialises");
    Some(String::from_utf8(out).expect("JSON is UTF-8"))
}
