//! Progress on stderr: a bar on a terminal; elsewhere (a log file, a pipe) a status line now
//! and then, which stays readable where a bar's redraws would not.

/// Whether stderr is a terminal. Progress bars draw only there; without one they are hidden
/// and commands print status lines instead.
pub fn interactive() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Whether unit `done` (from 1) of `total` is the first past one of `parts` even marks of
/// the work (`parts = 10`: every 10 %); the last unit always is.
pub fn at_mark(done: u64, total: u64, parts: u64) -> bool {
    done >= 1 && done * parts / total > (done - 1) * parts / total
}
