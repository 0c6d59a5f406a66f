//! Writing a file so that a reader sees its old contents or its new ones, never a part: the
//! new contents go to a temporary file in the same folder, which is synced to disk and then
//! renamed over the target (a rename within one folder replaces the file in one step).

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use super::error;
use crate::error::Result;

/// Writes `path` atomically: `write` fills the temporary file `.{name}.tmp-{pid}` beside it,
/// which is synced and renamed over `path`. On failure the temporary file is removed and
/// `path` keeps its old contents (or stays absent). The folder must exist.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path)?;
    let written = write_synced(&tmp, write)
        .and_then(|()| fs::rename(&tmp, path))
        .and_then(|()| sync_folder(&folder(path)));
    written.map_err(|e| {
        // The write already failed; a temporary file that cannot be removed changes nothing.
        let _ = fs::remove_file(&tmp);
        error(
            path,
            format!(
                "cannot write the file: {e}; check that its folder exists and is writable and \
                 that the disk has room"
            ),
        )
    })
}

/// The folder `path` is in (`.` for a bare file name).
fn folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `.{name}.tmp-{pid}` in the folder of `path`: hidden, and distinct between processes.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| error(path, "names no file; give the path of a file to write"))?;
    let tmp = format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id());
    Ok(folder(path).join(tmp))
}

/// Creates `tmp`, lets `write` fill it, and syncs it to disk.
fn write_synced(
    tmp: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(tmp)?);
    write(&mut out)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Syncs a folder, so that a rename in it survives a crash (Unix; elsewhere a no-op).
#[cfg(unix)]
fn sync_folder(folder: &Path) -> io::Result<()> {
    File::open(folder)?.sync_all()
}

/// Syncs a folder, so that a rename in it survives a crash (Unix; elsewhere a no-op).
#[cfg(not(unix))]
fn sync_folder(_folder: &Path) -> io::Result<()> {
    Ok(())
}
