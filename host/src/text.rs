//! Text from the guest made safe for a terminal. Guest strings (error messages, stderr
//! tails, check results, console lines) are written by code imgvm does not trust; a
//! terminal that receives its escape sequences can be made to retitle, clear, rewrite
//! earlier lines or, on some terminals, answer back as if typed. Everything imgvm prints
//! itself goes through [`printable`]; `imgvm run` passes the command's own output
//! through unchanged, as ssh does, because there it is the user's data.

use std::borrow::Cow;

/// `text` with every control character (C0 except tab, DEL and C1) shown as an escape
/// such as `\x1b`, so it prints as what it is and does nothing.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_control(c) {
            // Control characters are all below U+0100.
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn is_control(c: char) -> bool {
    c != '\t' && c != '\n' && c.is_control()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_shown_not_obeyed() {
        assert_eq!(printable("\x1b]0;owned\x07title"), "\\x1b]0;owned\\x07title");
        assert_eq!(printable("progress\roverwritten"), "progress\\x0doverwritten");
        assert_eq!(printable("c1 \u{9b}2J"), "c1 \\x9b2J");
        assert_eq!(printable("del\x7f"), "del\\x7f");
    }

    #[test]
    fn plain_text_is_untouched() {
        assert!(matches!(
            printable("E: Unable to locate package\tx\nnext"),
            Cow::Borrowed(_)
        ));
        assert_eq!(printable("größe ✓"), "größe ✓");
    }
}
