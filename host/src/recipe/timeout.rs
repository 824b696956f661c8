//! How long a step may take, as recipes write it: `90s`, `30m`, `2h`, or seconds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Duration);

impl Timeout {
    /// Long enough for a bootstrap of a large package set under emulation (a foreign
    /// architecture on a slow runner), short enough that a hung step ends the build the
    /// same working day.
    pub const DEFAULT: Timeout = Timeout(Duration::from_secs(3 * 3600));
}

impl FromStr for Timeout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (number, unit) = super::quantity::split(s)
            .ok_or_else(|| format!("invalid duration `{s}`: expected a number and a unit such as 30m"))?;
        let factor = match unit {
            "" | "s" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            other => {
                return Err(format!(
                    "invalid duration `{s}`: unknown unit `{other}` (use s, m or h)"
                ))
            }
        };
        match number.checked_mul(factor) {
            Some(0) => Err(format!("invalid duration `{s}`: a step needs some time")),
            Some(seconds) => Ok(Timeout(Duration::from_secs(seconds))),
            None => Err(format!("duration `{s}` is too long")),
        }
    }
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        match s {
            _ if s.is_multiple_of(3600) => write!(f, "{}h", s / 3600),
            _ if s.is_multiple_of(60) => write!(f, "{}m", s / 60),
            _ => write!(f, "{s}s"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Timeout {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A bare number is seconds.
        super::quantity::text(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Timeout {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("90s".parse::<Timeout>().unwrap().0, Duration::from_secs(90));
        assert_eq!("30m".parse::<Timeout>().unwrap().to_string(), "30m");
        assert_eq!("2h".parse::<Timeout>().unwrap().0, Duration::from_secs(7200));
        assert_eq!("45".parse::<Timeout>().unwrap().to_string(), "45s");
        assert!("0s".parse::<Timeout>().unwrap_err().contains("needs some time"));
        assert!("3 days".parse::<Timeout>().unwrap_err().contains("unknown unit `days`"));
    }
}
