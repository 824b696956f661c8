//! JUnit XML, the report format CI systems read.

/// One test case: its name, duration, and the failure message and details if it failed.
pub struct Case {
    pub name: String,
    pub seconds: f64,
    pub failure: Option<(String, String)>,
}

/// One `<testsuite>` named `suite` holding `cases`.
pub fn render(suite: &str, cases: &[Case]) -> String {
    let failures = cases.iter().filter(|c| c.failure.is_some()).count();
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
        match &case.failure {
            None => xml.push_str("/>\n"),
            Some((message, details)) => xml.push_str(&format!(
                ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                escape(message),
                escape(details)
            )),
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

    #[test]
    fn renders_passes_and_escaped_failures() {
        let xml = render(
            "debian-13-nocloud-amd64",
            &[
                Case {
                    name: "boot (seabios)".into(),
                    seconds: 41.5,
                    failure: None,
                },
                Case {
                    name: "file /etc/machine-id".into(),
                    seconds: 0.25,
                    failure: Some(("expected <empty> & got \"x\"".into(), "tail\u{1b}[0m".into())),
                },
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
