//! Sizes as recipes write them: `3GiB`, `124MiB`, `512M`, `4096`.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (number, unit) = super::quantity::split(s)
            .ok_or_else(|| format!("invalid size `{s}`: expected a number and a unit such as 3GiB"))?;
        let factor: u64 = match unit {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "invalid size `{s}`: unknown unit `{other}` (use B, KiB, MiB, GiB or TiB)"
                ))
            }
        };
        number
            .checked_mul(factor)
            .map(Size)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (1u64 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        match units
            .iter()
            .find(|(factor, _)| self.0 >= *factor && self.0.is_multiple_of(*factor))
        {
            Some((factor, unit)) => write!(f, "{}{unit}", self.0 / factor),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A bare number is bytes.
        super::quantity::text(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("3GiB".parse::<Size>().unwrap(), Size(3 << 30));
        assert_eq!("124M".parse::<Size>().unwrap(), Size(124 << 20));
        assert_eq!("4096".parse::<Size>().unwrap(), Size(4096));
        assert_eq!(Size(3 << 30).to_string(), "3GiB");
        assert_eq!(Size(1000).to_string(), "1000B");
        assert!("3 gigs".parse::<Size>().unwrap_err().contains("unknown unit `gigs`"));
    }
}
