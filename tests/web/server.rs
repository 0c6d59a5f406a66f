//! A static file server for the browser tests: the page, its JavaScript and its WebAssembly
//! served over HTTP from 127.0.0.1, because a page loaded from `file://` may neither `fetch`
//! its `.wasm` module nor import JavaScript modules. (WebGPU needs a secure context too, which
//! 127.0.0.1 is, even over plain HTTP.)
//!
//! It speaks just enough HTTP/1.1 for a browser: `GET` and `HEAD` of files, one request per
//! connection (`Connection: close`), each connection on its own thread. The page may also
//! `POST /log` a line of text, which is printed to stderr as `page: …`, so that a test shows
//! what the page reported even when it never returns.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// A file server on 127.0.0.1 that stops accepting connections when dropped.
pub struct StaticServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    accepter: Option<JoinHandle<()>>,
}

impl StaticServer {
    /// Serves the files under `root` on 127.0.0.1 at a free port, from a background thread.
    pub fn start(root: &Path) -> io::Result<StaticServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let root = root.to_path_buf();
        let accepter = thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let root = root.clone();
                        // A failed connection (the browser gave up on it) only concerns itself.
                        thread::spawn(move || handle(stream, &root).ok());
                    }
                }
            }
        });
        Ok(StaticServer {
            address,
            stop,
            accepter: Some(accepter),
        })
    }

    /// `http://127.0.0.1:PORT/` + path (path without a leading slash).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.address)
    }
}

impl Drop for StaticServer {
    /// Stops the accepting thread: it is blocked in `accept`, so wake it with one connection.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if TcpStream::connect(self.address).is_ok() {
            if let Some(accepter) = self.accepter.take() {
                accepter.join().ok();
            }
        }
    }
}

/// Answers the one request of a connection.
fn handle(stream: TcpStream, root: &Path) -> io::Result<()> {
    // A browser that opens a connection and never sends a request must not hold a thread forever.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream);

    // The request line, `GET /index.html?x=1 HTTP/1.1`, then headers up to an empty line.
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let mut content_length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let path = target.split(['?', '#']).next().unwrap_or("/");

    let response = match method {
        "POST" if path == "/log" => {
            let mut body = vec![0; content_length];
            reader.read_exact(&mut body)?;
            eprintln!("page: {}", String::from_utf8_lossy(&body).trim_end());
            Response::no_content()
        }
        "GET" | "HEAD" => match file_path(root, path) {
            Ok(file) => match std::fs::read(&file) {
                Ok(body) => Response {
                    status: 200,
                    reason: "OK",
                    content_type: content_type(&file),
                    body,
                },
                // Missing, a directory, or unreadable: to the browser, all the same.
                Err(_) => Response::text(404, "Not Found"),
            },
            Err(response) => response,
        },
        _ => Response::text(405, "Method Not Allowed"),
    };
    response.write(reader.get_mut(), method == "HEAD")
}

/// The file a request path names under `root`: percent-decoded, `/` meaning `index.html`
/// (and so for any directory path ending in `/`). A `..` segment, which could climb out of
/// `root`, is refused with 403.
fn file_path(root: &Path, path: &str) -> Result<PathBuf, Response> {
    let decoded =
        String::from_utf8(percent_decode(path)).map_err(|_| Response::text(400, "Bad Request"))?;
    let mut file = root.to_path_buf();
    // Empty segments are skipped, so `//etc/passwd` cannot become the absolute `/etc/passwd`.
    for segment in decoded.split('/').filter(|s| !s.is_empty() && *s != ".") {
        if segment == ".." {
            return Err(Response::text(403, "Forbidden"));
        }
        file.push(segment);
    }
    if decoded.ends_with('/') {
        file.push("index.html");
    }
    Ok(file)
}

/// Replaces each `%XY` (two hex digits) by the byte 0xXY; anything else is kept as it is.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// The value of one hex digit.
fn hex(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|value| value as u8)
}

/// The `Content-Type` of a file, from its extension. WebAssembly must be `application/wasm`:
/// `WebAssembly.instantiateStreaming` refuses anything else.
fn content_type(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "wasm" => "application/wasm",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

/// An HTTP response about to be written.
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    /// 204: done, and nothing to say.
    fn no_content() -> Response {
        Response {
            status: 204,
            reason: "No Content",
            content_type: "",
            body: Vec::new(),
        }
    }

    /// An error response whose body repeats its status line, for whoever reads it.
    fn text(status: u16, reason: &'static str) -> Response {
        let body = format!("{status} {reason}\n").into_bytes();
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }

    /// Writes the status line, the headers and (unless answering `HEAD`) the body.
    fn write(&self, stream: &mut TcpStream, head_only: bool) -> io::Result<()> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        // A 204 has no body to describe, and may not even say its length is 0 (RFC 9110, 8.6).
        if self.status != 204 {
            head += &format!("Content-Type: {}\r\n", self.content_type);
            head += &format!("Content-Length: {}\r\n", self.body.len());
        }
        head += "Cache-Control: no-store\r\nConnection: close\r\n\r\n";
        stream.write_all(head.as_bytes())?;
        if !head_only {
            stream.write_all(&self.body)?;
        }
        stream.flush()
    }
}
