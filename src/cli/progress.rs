//! Progress on stderr: a bar on a terminal; elsewhere (a log file, a pipe) a status line now
//! and then, which stays readable where a bar's redraws would not.

/// Whether stderr is a terminal. Progress bars draw only there; without one they are hidden
/// and commands print status lines instead.
pub fn interactive() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}
