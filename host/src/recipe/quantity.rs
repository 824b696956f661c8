//! Quantities as recipes write them: a number with an optional unit (`3GiB`, `30m`, `4096`).

/// The number and the unit after it (trimmed, possibly empty); `None` without a number.
pub fn split(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(end);
    Some((number.parse().ok()?, unit.trim()))
}

/// A YAML number or string, as text: `4096` and `3GiB` are read alike, and the type's
/// `FromStr` decides what a bare number means.
pub fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    Ok(match serde::Deserialize::deserialize(d)? {
        Raw::Number(n) => n.to_string(),
        Raw::Text(s) => s,
    })
}
