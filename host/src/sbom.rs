//! The image's software bill of materials, `NAME.cdx.json` (CycloneDX 1.5): every package
//! the lock lists, with its version, architecture, source package and a package URL that
//! vulnerability scanners match on (`pkg:deb/debian/NAME@VERSION?arch=…&distro=debian-13`).
//!
//! It is made from the lock alone, so it names only what the host verified, and it is
//! reproducible: its timestamp is the lock's `SOURCE_DATE_EPOCH` and its serial number is
//! derived from the lock's content, not drawn at random.

use crate::lock::{Lock, LockedPackage};
use cyclonedx_bom::external_models::normalized_string::NormalizedString;
use cyclonedx_bom::external_models::{date_time::DateTime, uri::Purl};
use cyclonedx_bom::models::bom::{Bom, SpecVersion, UrnUuid};
use cyclonedx_bom::models::component::{Classification, Component, Components};
use cyclonedx_bom::models::hash::{Hash, HashAlgorithm, HashValue, Hashes};
use cyclonedx_bom::models::metadata::Metadata;
use cyclonedx_bom::models::property::{Properties, Property};
use cyclonedx_bom::models::tool::{Tool, Tools};

#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    #[error("cannot form a package URL for {0}: {1}")]
    Purl(String, String),
    #[error("the lock's date {0} is not a valid time")]
    Date(i64),
    #[error("cannot write the SBOM: {0}")]
    Write(String),
}

/// The SBOM of the image `name` whose lock is `lock`, as CycloneDX 1.5 JSON.
pub fn cyclonedx(name: &str, lock: &Lock) -> Result<Vec<u8>, SbomError> {
    let distro = distro(&lock.suite);
    let components = lock
        .packages
        .iter()
        .map(|p| component(p, &distro))
        .collect::<Result<Vec<_>, _>>()?;
    let mut image = Component::new(Classification::OperatingSystem, name, &lock.suite, None);
    image.description = Some(NormalizedString::new(&format!(
        "Debian {} ({}) image built by imgvm from the recipe {}",
        lock.suite, lock.arch, lock.recipe
    )));
    let when = time::OffsetDateTime::from_unix_timestamp(lock.source_date_epoch)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .and_then(|t| DateTime::try_from(t).ok())
        .ok_or(SbomError::Date(lock.source_date_epoch))?;
    let bom = Bom {
        serial_number: Some(serial(lock)),
        metadata: Some(Metadata {
            timestamp: Some(when),
            tools: Some(Tools::List(vec![Tool::new(
                "imgvm",
                "imgvm",
                env!("CARGO_PKG_VERSION"),
            )])),
            component: Some(image),
            ..Metadata::default()
        }),
        components: Some(Components(components)),
        spec_version: SpecVersion::V1_5,
        ..Bom::default()
    };
    let mut out = Vec::new();
    bom.output_as_json_v1_5(&mut out)
        .map_err(|e| SbomError::Write(e.to_string()))?;
    out.push(b'\n');
    Ok(out)
}

fn component(package: &LockedPackage, distro: &str) -> Result<Component, SbomError> {
    let purl = purl(package, distro)?;
    let mut component = Component::new(
        Classification::Library,
        &package.name,
        &package.version,
        Some(purl.clone()),
    );
    component.purl = Some(purl.parse::<Purl>().expect("parsing a purl always succeeds"));
    component.hashes = Some(Hashes(vec![Hash {
        alg: HashAlgorithm::SHA_256,
        content: HashValue(package.sha256.clone()),
    }]));
    component.properties = Some(Properties(vec![
        Property::new("imgvm:architecture", &package.architecture),
        Property::new("imgvm:source", &package.source),
        Property::new("imgvm:source_version", &package.source_version),
        Property::new("imgvm:filename", &package.filename),
    ]));
    Ok(component)
}

/// `pkg:deb/debian/NAME@VERSION?arch=ARCH&distro=DISTRO`, with `upstream=SOURCE` when
/// the source package is named otherwise, as the purl specification's `deb` type says.
fn purl(package: &LockedPackage, distro: &str) -> Result<String, SbomError> {
    let error = |e: purl::ParseError| SbomError::Purl(package.name.clone(), e.to_string());
    let mut builder = purl::GenericPurlBuilder::new("deb".to_owned(), &package.name)
        .with_namespace("debian")
        .with_version(&package.version)
        .with_qualifier("arch", &package.architecture)
        .map_err(error)?
        .with_qualifier("distro", distro)
        .map_err(error)?;
    if package.source != package.name {
        builder = builder.with_qualifier("upstream", &package.source).map_err(error)?;
    }
    let purl = builder
        .build()
        .map_err(|e| SbomError::Purl(package.name.clone(), e.to_string()))?;
    Ok(purl.to_string())
}

/// `debian-13` for trixie: what scanners expect of Debian's `distro` qualifier.
fn distro(suite: &str) -> String {
    let number = match suite {
        "bullseye" => Some(11),
        "bookworm" => Some(12),
        "trixie" => Some(13),
        "forky" => Some(14),
        "duke" => Some(15),
        _ => None,
    };
    match number {
        Some(n) => format!("debian-{n}"),
        None => format!("debian-{suite}"),
    }
}

/// The lock's UUID: the same lock gives the same SBOM.
fn serial(lock: &Lock) -> UrnUuid {
    UrnUuid(format!("urn:uuid:{}", lock.uuid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_have_debian_purls() {
        let mut p = crate::lock::tests::package("libc6", "2.41-12");
        p.source = "glibc".into();
        assert_eq!(
            purl(&p, "debian-13").unwrap(),
            "pkg:deb/debian/libc6@2.41-12?arch=amd64&distro=debian-13&upstream=glibc"
        );
        let mut p = crate::lock::tests::package("bash", "5.2.37-2");
        p.source = "bash".into();
        assert_eq!(
            purl(&p, "debian-13").unwrap(),
            "pkg:deb/debian/bash@5.2.37-2?arch=amd64&distro=debian-13"
        );
        // The purl specification leaves `:` unescaped everywhere, an epoch's too.
        let mut p = crate::lock::tests::package("perl", "1:5.40");
        p.source = "perl".into();
        assert_eq!(
            purl(&p, "debian-12").unwrap(),
            "pkg:deb/debian/perl@1:5.40?arch=amd64&distro=debian-12"
        );
        assert_eq!(distro("trixie"), "debian-13");
        assert_eq!(distro("sid"), "debian-sid");
    }

    #[test]
    fn the_same_lock_gives_the_same_sbom_and_another_lock_another() {
        let lock = crate::lock::tests::lock(&[("bash", "5.2"), ("zsh", "5")]);
        let one = cyclonedx("img", &lock).unwrap();
        assert_eq!(one, cyclonedx("img", &lock).unwrap());
        let other = crate::lock::tests::lock(&[("bash", "5.3"), ("zsh", "5")]);
        let two = cyclonedx("img", &other).unwrap();
        let serial = |json: &[u8]| serde_json::from_slice::<serde_json::Value>(json).unwrap()["serialNumber"].clone();
        assert_ne!(serial(&one), serial(&two));
        let doc: serde_json::Value = serde_json::from_slice(&one).unwrap();
        assert_eq!(doc["specVersion"], "1.5");
        assert_eq!(doc["metadata"]["timestamp"], "2026-11-28T12:30:05Z");
        assert_eq!(doc["components"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn the_sbom_validates_against_the_published_schema() {
        let lock = crate::lock::tests::lock(&[("bash", "5.2"), ("perl", "1:5.40")]);
        let doc = serde_json::from_slice(&cyclonedx("img", &lock).unwrap()).unwrap();
        assert_eq!(imgvm_e2e::cyclonedx::schema_errors(&doc), Vec::<String>::new());
        // The check can fail: a component without its name is refused.
        let mut broken = doc.clone();
        broken["components"][0].as_object_mut().unwrap().remove("name");
        assert!(!imgvm_e2e::cyclonedx::schema_errors(&broken).is_empty());
    }
}
