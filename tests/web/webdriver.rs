//! A minimal WebDriver client: it starts `chromedriver`, opens a headless Chromium session in
//! which WebGPU runs on SwiftShader (Chromium's CPU implementation of Vulkan, so no GPU is
//! needed), and drives it with the handful of commands the browser tests use.
//!
//! WebDriver (<https://www.w3.org/TR/webdriver2/>) is JSON over HTTP: each command is a request
//! to `chromedriver`, such as `POST /session/{id}/url {"url": …}`, and each answer is
//! `{"value": …}`, where a failure's value is `{"error": …, "message": …}`. The HTTP client
//! is hand-written below, one connection per request.
//!
//! Needs Debian's `chromium` and `chromium-driver` packages.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where Debian installs Chromium.
const CHROMIUM: &str = "/usr/bin/chromium";

/// How to install what is missing.
const INSTALL: &str = "apt-get install chromium chromium-driver";

/// Chromium's command line, found by experiment to give WebGPU with no GPU and no network.
const CHROMIUM_ARGS: &[&str] = &[
    // The new headless mode is the full browser without a window (plain `--headless` means the
    // same since Chromium 132); without it Chromium needs a display and exits at once.
    "--headless=new",
    // Chromium will not start its sandbox as root, and the tests may run as root.
    "--no-sandbox",
    // Without it `navigator.gpu.requestAdapter()` resolves to null: Chromium does not yet offer
    // WebGPU on Linux by default. For compute, it is the one flag WebGPU needs.
    "--enable-unsafe-webgpu",
    // Always the SwiftShader adapter, even where a GPU exists, so that every machine runs the
    // same implementation.
    "--use-webgpu-adapter=swiftshader",
    // Fills in `adapter.info.description` ("SwiftShader Device (Subzero)"), for the test's log.
    "--enable-webgpu-developer-features",
    // The compositor on SwiftShader's Vulkan too. Compute and 2D canvases work without these
    // three, but without them the first frame of a WebGPU canvas kills the GPU process's
    // WebGPU ("A valid external Instance reference no longer exists") and the page stops being
    // drawn. All three are needed.
    "--enable-features=Vulkan",
    "--use-vulkan=swiftshader",
    "--use-angle=swiftshader",
    // Containers often have a small /dev/shm.
    "--disable-dev-shm-usage",
    // No first-run dialogs, and no connections to Google's services, which a closed network
    // refuses.
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    // The viewport, and so the screenshot, is then 1280×885.
    "--window-size=1280,1024",
];

/// A headless Chromium, driven through its own `chromedriver`; dropping it closes both.
pub struct Browser {
    driver: Child,
    port: u16,
    /// Empty until the session exists, so that a failed launch cleans up through `Drop` too.
    session: String,
    /// Chromium's profile, a fresh directory that `Drop` removes.
    profile: PathBuf,
}

impl Browser {
    /// Starts `chromedriver` on a free port and a headless Chromium session with WebGPU on
    /// SwiftShader. Err(message) naming the missing package (`apt-get install chromium
    /// chromium-driver`) when either binary is missing.
    pub fn launch() -> Result<Browser, String> {
        let driver_path = chromedriver().ok_or(format!("no chromedriver: {INSTALL}"))?;
        if !Path::new(CHROMIUM).exists() {
            return Err(format!("no {CHROMIUM}: {INSTALL}"));
        }
        let port = free_port().map_err(|e| format!("no free port for chromedriver: {e}"))?;
        let driver = Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", driver_path.display()))?;
        let profile = fresh_profile_path();
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            profile,
        };

        browser.wait_until_ready(Duration::from_secs(20))?;
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(ToString::to_string).collect();
        args.push(format!("--user-data-dir={}", browser.profile.display()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // Keep the page's console messages for `console()`.
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let created = browser.request("POST", "/session", Some(&capabilities))?;
        browser.session = created["sessionId"]
            .as_str()
            .ok_or(format!("no session id in {created}"))?
            .to_string();
        Ok(browser)
    }

    /// Runs `script` in every page before the page's own scripts, from the next navigation on
    /// (the DevTools command `Page.addScriptToEvaluateOnNewDocument`, through chromedriver).
    pub fn before_each_page(&self, script: &str) -> Result<(), String> {
        let params = json!({ "source": script });
        let body = json!({ "cmd": "Page.addScriptToEvaluateOnNewDocument", "params": params });
        self.command("POST", "goog/cdp/execute", body).map(drop)
    }

    /// Opens `url` and waits until the page has loaded.
    pub fn goto(&self, url: &str) -> Result<(), String> {
        self.command("POST", "url", json!({ "url": url })).map(drop)
    }

    /// WebDriver "Execute Async Script": `script` is a function body; its arguments are `args`
    /// (a JSON array) followed by the callback it must call with its result. Result: the value
    /// passed to the callback, or Err with the JS error message. `timeout` sets the session's
    /// script timeout first. (chromedriver also ends the script when it returns a promise that
    /// rejects, with the error and its JavaScript stack, but not when the promise resolves: the
    /// result must go through the callback.)
    pub fn execute_async(
        &self,
        script: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, String> {
        let timeouts = json!({ "script": timeout.as_millis() as u64 });
        self.command("POST", "timeouts", timeouts)?;
        self.command(
            "POST",
            "execute/async",
            json!({ "script": script, "args": args }),
        )
    }

    /// WebDriver "Execute Script" (synchronous): `script` is a function body whose arguments
    /// are `args` (a JSON array); the result is what it returns, or Err with the JS error message.
    pub fn execute(&self, script: &str, args: Value) -> Result<Value, String> {
        self.command(
            "POST",
            "execute/sync",
            json!({ "script": script, "args": args }),
        )
    }

    /// Chooses `path` (a file, or a folder for an `<input webkitdirectory>`) in the file input
    /// that the CSS selector `input` finds, as a user picking it would ("Element Send Keys").
    pub fn choose_files(&self, input: &str, path: &Path) -> Result<(), String> {
        let found = self.command(
            "POST",
            "element",
            json!({ "using": "css selector", "value": input }),
        )?;
        let element = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .ok_or(format!("no element {input}: {found}"))?;
        let text = path.to_str().ok_or("a path that is not UTF-8")?;
        self.command(
            "POST",
            &format!("element/{element}/value"),
            json!({ "text": text }),
        )
        .map(drop)
    }

    /// Resizes the window to `width` x `height` CSS pixels (a screenshot shows the viewport).
    pub fn resize(&self, width: u32, height: u32) -> Result<(), String> {
        self.command(
            "POST",
            "window/rect",
            json!({ "width": width, "height": height }),
        )
        .map(drop)
    }

    /// A PNG screenshot of the viewport.
    pub fn screenshot_png(&self) -> Result<Vec<u8>, String> {
        let encoded = self.command("GET", "screenshot", Value::Null)?;
        base64_decode(
            encoded
                .as_str()
                .ok_or(format!("a screenshot that is not text: {encoded}"))?,
        )
    }

    /// The browser's console messages since the last call, one `LEVEL message` line each;
    /// empty if the driver cannot tell. (Chromium writes an object argument of `console.log`
    /// as just `Object`: log strings.)
    pub fn console(&self) -> Vec<String> {
        // A legacy command that chromedriver keeps under the `se/` prefix.
        let Ok(Value::Array(entries)) = self.command("POST", "se/log", json!({"type": "browser"}))
        else {
            return Vec::new();
        };
        entries
            .iter()
            .map(|entry| {
                let level = entry["level"].as_str().unwrap_or("?");
                format!("{level} {}", entry["message"].as_str().unwrap_or(""))
            })
            .collect()
    }

    /// Polls `GET /status` until chromedriver is ready for a session.
    fn wait_until_ready(&mut self, patience: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(status) = self.request("GET", "/status", None) {
                if status["ready"] == true {
                    return Ok(());
                }
            }
            if let Ok(Some(exit)) = self.driver.try_wait() {
                return Err(format!("chromedriver exited at start: {exit}"));
            }
            if start.elapsed() > patience {
                return Err(format!("chromedriver not ready after {patience:?}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A command of the session: `method /session/{id}/{command}`, with `body` unless null.
    fn command(&self, method: &str, command: &str, body: Value) -> Result<Value, String> {
        let path = format!("/session/{}/{command}", self.session);
        self.request(method, &path, (!body.is_null()).then_some(&body))
    }

    /// One HTTP/1.1 request to chromedriver, and the `value` of its JSON answer; a WebDriver
    /// error becomes Err with its message.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))
            .map_err(|e| format!("cannot reach chromedriver: {e}"))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
             Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            self.port,
            body.len()
        );
        let (status, body) = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body.as_bytes()))
            .and_then(|()| read_response(&stream))
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let answer: Value = serde_json::from_slice(&body).map_err(|e| {
            format!(
                "{method} {path}: HTTP {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        let value = answer["value"].clone();
        if let Some(error) = value["error"].as_str() {
            // chromedriver appends "\n  (Session info: chrome=…)" to every message.
            let message = value["message"].as_str().unwrap_or(error);
            let message = message
                .split("\n  (Session info:")
                .next()
                .unwrap_or(message);
            return Err(format!("{method} {path}: {message}"));
        }
        if !(200..300).contains(&status) {
            return Err(format!("{method} {path}: HTTP {status}: {answer}"));
        }
        Ok(value)
    }
}

impl Drop for Browser {
    /// Ends the session (which closes Chromium), stops chromedriver and removes the profile.
    fn drop(&mut self) {
        if !self.session.is_empty() {
            self.request("DELETE", &format!("/session/{}", self.session), None)
                .ok();
        }
        self.driver.kill().ok();
        self.driver.wait().ok();
        std::fs::remove_dir_all(&self.profile).ok();
    }
}

/// `chromedriver` on PATH, else where Debian installs it.
fn chromedriver() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromedriver"))
        .chain([PathBuf::from("/usr/bin/chromedriver")])
        .find(|candidate| candidate.is_file())
}

/// A port no one listens on now: the one the system picks for a listener that is then closed.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A path under the system's temporary directory, unique to this process and this call, where
/// Chromium will create a new profile.
fn fresh_profile_path() -> PathBuf {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let count = COUNT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("chromium-{}-{count}", std::process::id()));
    // A directory left by an earlier process of the same id would hold an old profile.
    std::fs::remove_dir_all(&dir).ok();
    dir
}

/// Reads one HTTP/1.1 response: its status code and body. The body is the `Content-Length`
/// bytes after the headers, or a sequence of chunks (`Transfer-Encoding: chunked`), or else
/// everything up to the end of the connection. (chromedriver keeps the connection open after
/// its answer, `Connection: close` or not, so reading to the end would wait forever.)
fn read_response(stream: impl Read) -> io::Result<(u16, Vec<u8>)> {
    let mut reader = BufReader::new(stream);
    // `HTTP/1.1 200 OK`, then headers up to an empty line.
    let status_line = read_line(&mut reader)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("not an HTTP status line: {status_line:?}")))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        let header = read_line(&mut reader)?;
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.trim().eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok();
            }
        }
    }

    let mut body = Vec::new();
    if chunked {
        // Each chunk is its size in hex (perhaps followed by `;extensions`), CRLF, that many
        // bytes, CRLF; a chunk of size 0 ends the body.
        loop {
            let size_line = read_line(&mut reader)?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| invalid(format!("not a chunk size: {size_line:?}")))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            read_line(&mut reader)?;
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok((status, body))
}

/// The next line, without its CRLF; an error at the end of the stream.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// An error for a response that is not HTTP as we know it.
fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Decodes standard base64 (RFC 4648, `A–Z a–z 0–9 + /`, `=` padding), as WebDriver sends
/// screenshots and the page's `btoa` writes: each character carries 6 bits, and every 8 bits
/// gathered make a byte.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::with_capacity(text.len() / 4 * 3);
    let (mut bits, mut bit_count) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let sextet = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("not base64: {:?}", char::from(c))),
        };
        // At most 7 bits wait from before, so 13 bits are enough.
        bits = (bits << 6 | u32::from(sextet)) & 0x1fff;
        bit_count += 6;
        if bit_count >= 8 {
            bit_count -= 8;
            bytes.push((bits >> bit_count) as u8);
        }
    }
    Ok(bytes)
}
