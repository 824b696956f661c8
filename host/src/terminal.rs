//! The user's terminal, for what runs on it interactively (`imgvm boot`'s serial
//! console, `imgvm shell`): raw mode while it does, what is typed, and its size.

/// The terminal on stdin in raw mode, as a serial line wants it, restored when dropped;
/// nothing when stdin is not a terminal.
pub struct RawTerminal(libc::termios);

impl RawTerminal {
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails on a non-terminal.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: both operate on the termios value and the terminal just read.
        unsafe {
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                return None;
            }
        }
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}

/// What is typed on stdin, as it comes. Read by a thread of its own, not tokio's stdin:
/// a read that waits for a key would otherwise hold up the runtime's end when the
/// machine has gone.
pub fn keyboard() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (send, receive) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin().lock();
        while let Ok(n @ 1..) = stdin.read(&mut buf) {
            if send.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    receive
}

/// The size of the terminal on stdout, if it is one; 24 by 80 for a terminal that does
/// not know its size (a serial line).
pub fn size() -> Option<imgvm_protocol::WindowSize> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it or fails on a non-terminal.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    if unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } != 0 {
        return None;
    }
    if size.ws_row == 0 || size.ws_col == 0 {
        (size.ws_row, size.ws_col) = (24, 80);
    }
    Some(imgvm_protocol::WindowSize {
        rows: size.ws_row,
        cols: size.ws_col,
    })
}
