//! Test results as people and CI systems read them: one PASS/FAIL line per case, and
//! JUnit XML. Offline checks and boot tests both become [`Case`]s, so `imgvm build
//! --test`, `imgvm test`, the build log and NAME.junit.xml all say the same thing.

/// One test case's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Case {
    pub name: String,
    /// Zero when not timed (offline checks).
    pub seconds: f64,
    pub passed: bool,
    /// Why it failed, or what it saw when it passed; may be empty.
    pub message: String,
    /// More output for a failure (a console tail).
    pub details: String,
}

impl Case {
    /// `PASS  NAME[ after S s][: MESSAGE]`.
    pub fn line(&self) -> String {
        let mut line = format!("{}  {}", if self.passed { "PASS" } else { "FAIL" }, self.name);
        if self.seconds > 0.0 {
            line.push_str(&format!(" after {:.1} s", self.seconds));
        }
        if !self.message.is_empty() {
            line.push_str(&format!(": {}", self.message));
        }
        line
    }
}

/// One `<testsuite>` named `suite` holding `cases`.
pub fn junit(suite: &str, cases: &[Case]) -> String {
    let failures = cases.iter().filter(|c| !c.passed).count();
    let total: f64 = cases.iter().map(|c| c.seconds).sum();
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" time=\"{total:.3}\">\n",
        escape(suite),
        cases.len()
    );
    for case in cases {
        xml.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
            escape(suite),
            escape(&case.name),
            case.seconds
        ));
        if case.passed {
            xml.push_str("/>\n");
        } else {
            xml.push_str(&format!(
                ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                escape(&case.message),
                escape(&case.details)
            ));
        }
    }
    xml.push_str("  </testsuite>\n</testsuites>\n");
    xml
}

/// XML text and attribute escaping; control characters (console output has them) are
/// not allowed in XML 1.0 at all and become U+FFFD.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' => out.push(c),
            c if (c as u32) < 0x20 => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, seconds: f64, passed: bool, message: &str, details: &str) -> Case {
        Case {
            name: name.into(),
            seconds,
            passed,
            message: message.into(),
            details: details.into(),
        }
    }

    #[test]
    fn lines_say_verdict_name_time_and_why() {
        assert_eq!(case("package nginx", 0.0, true, "", "").line(), "PASS  package nginx");
        assert_eq!(
            case(
                "file /etc/x mode",
                0.0,
                false,
                "expected mode 0600, found mode 0644",
                ""
            )
            .line(),
            "FAIL  file /etc/x mode: expected mode 0600, found mode 0644"
        );
        assert_eq!(
            case("boot (ovmf)", 41.25, false, "boot stopped in grub", "tail").line(),
            "FAIL  boot (ovmf) after 41.2 s: boot stopped in grub"
        );
    }

    #[test]
    fn renders_passes_and_escaped_failures() {
        let xml = junit(
            "debian-13-nocloud-amd64",
            &[
                case("boot (seabios)", 41.5, true, "the marker appeared", ""),
                case(
                    "file /etc/machine-id",
                    0.25,
                    false,
                    "expected <empty> & got \"x\"",
                    "tail\u{1b}[0m",
                ),
            ],
        );
        assert_eq!(
            xml,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  \
             <testsuite name=\"debian-13-nocloud-amd64\" tests=\"2\" failures=\"1\" time=\"41.750\">\n    \
             <testcase classname=\"debian-13-nocloud-amd64\" name=\"boot (seabios)\" time=\"41.500\"/>\n    \
             <testcase classname=\"debian-13-nocloud-amd64\" name=\"file /etc/machine-id\" time=\"0.250\">\n      \
             <failure message=\"expected &lt;empty&gt; &amp; got &quot;x&quot;\">tail\u{fffd}[0m</failure>\n    \
             </testcase>\n  </testsuite>\n</testsuites>\n"
        );
    }
}
