//! Progress display: indicatif bars and spinners on a terminal, nothing extra otherwise
//! (the tracing log lines say the same in plain text, and long steps say how far they
//! are every [`REPORT_EVERY`]). Log lines are written around the bars, never into them.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::LazyLock;
use std::time::Duration;

/// How often a long step says how far it is when nobody watches a spinner (a CI log):
/// enough to show life, little enough to keep the log readable.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);

/// Every bar of the process; log lines suspend them while they are written.
static BARS: LazyLock<MultiProgress> = LazyLock::new(|| {
    MultiProgress::with_draw_target(if on_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    })
});

/// Whether a person watches stderr: bars and spinners then, plain lines otherwise.
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

pub fn bytes_bar(total: u64, message: &'static str) -> ProgressBar {
    let bar = BARS.add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .expect("valid template"),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

pub fn spinner(message: String) -> ProgressBar {
    let bar = BARS.add(ProgressBar::no_length());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// The writer of the log: each event is formatted into a buffer and written to stderr
/// in one piece with the bars taken away meanwhile, so that a line never tears a bar.
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine(Vec::new())
    }
}

/// One event's text, written out when tracing drops it.
pub struct LogLine(Vec<u8>);

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            BARS.suspend(|| {
                let _ = std::io::stderr().lock().write_all(&self.0);
            });
        }
    }
}
