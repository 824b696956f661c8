//! CycloneDX 1.5 documents checked against the specification's published JSON schema
//! (`tests/schemas/`, copied from github.com/CycloneDX/specification with the two
//! schemas it refers to), offline.

use std::path::Path;

/// What keeps `doc` from being a valid CycloneDX 1.5 document, empty when it is one.
pub fn schema_errors(doc: &serde_json::Value) -> Vec<String> {
    let validator = jsonschema::options()
        .with_retriever(Local)
        .should_validate_formats(true)
        .build(&schema("bom-1.5.schema.json"))
        .expect("the published schema compiles");
    validator
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

fn schema(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Serves the schemas the CycloneDX schema refers to from the copies beside it.
struct Local;

impl jsonschema::Retrieve for Local {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>> {
        match uri.as_str().rsplit('/').next() {
            Some(name @ ("spdx.schema.json" | "jsf-0.82.schema.json")) => Ok(schema(name)),
            _ => Err(format!("no local copy of {uri}").into()),
        }
    }
}
