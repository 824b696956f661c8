//! Recipe errors point at the file, line and column, and at the step when there is one.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RecipeError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no single place (a missing field, say).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

impl RecipeError {
    pub fn new(file: impl Into<PathBuf>, line: usize, column: usize, message: impl Into<String>) -> Self {
        RecipeError {
            file: file.into(),
            line,
            column,
            message: message.into(),
        }
    }

    /// From a YAML or schema error of the file whose `text` is given. The parser places
    /// errors about a value at the start of the mapping around it; when the message
    /// quotes the offending word, the error is moved onto that word.
    pub fn from_yaml(file: impl Into<PathBuf>, text: &str, e: &serde_yaml_ng::Error) -> Self {
        let (mut line, mut column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let mut message = e.to_string();
        // Locations go in front of the message, not inside it.
        while let Some(start) = message.find(" at line ") {
            let rest = &message[start + " at line ".len()..];
            let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let after_line = digits(rest);
            let Some(rest2) = rest[after_line..].strip_prefix(" column ") else {
                break;
            };
            let end = start + " at line ".len() + after_line + " column ".len() + digits(rest2);
            message.replace_range(start..end, "");
        }
        if let Some(word) = message.split('`').nth(1).filter(|w| !w.is_empty()) {
            let from = super::load::offset(text, line, column);
            if let Some(found) = text[from..].find(word) {
                (line, column) = super::load::position(text, from + found);
            }
        }
        RecipeError {
            file: file.into(),
            line,
            column,
            message,
        }
    }
}
