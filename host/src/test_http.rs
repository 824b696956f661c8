//! A throw-away HTTP server for unit tests of code that fetches (the fetcher, the
//! package proxy): it stands in for a mirror, good or bad.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

/// A server on 127.0.0.1 answering every request with `response(path)`.
pub fn serve(response: impl Fn(&str) -> String + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap() <= 2 {
                    break;
                }
            }
            let _ = (&stream).write_all(response(&path).as_bytes());
        }
    });
    base
}

/// A 200 answer with `body`.
pub fn ok(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
