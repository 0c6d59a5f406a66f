//! MNIST's IDX image files, gzipped or not.
//!
//! An IDX images file is a 16-byte header, four big-endian u32: the magic number 0x00000803
//! (unsigned bytes, three dimensions), the image count, the rows and the columns; then the
//! pixels, one byte each, image after image, row-major, 0 the background. The files are
//! usually distributed gzipped (`train-images-idx3-ubyte.gz`); a gzip stream is recognised by
//! its first two bytes, 1f 8b, whatever the file is called.

use std::borrow::Cow;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use rayon::prelude::*;

use super::square::Planes;
use super::{check_shape, Dataset};
use crate::error::{Error, Result};

/// The magic number of an IDX file of unsigned bytes in three dimensions.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// The magic number of an IDX file of unsigned bytes in one dimension (MNIST's labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// The first two bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Length of an IDX images header.
const HEADER_LEN: usize = 16;
/// The black border put around every digit: MNIST's 28 x 28 become 32 x 32, the size
/// LeNet and DDPM's MNIST models use.
const DIGIT_BORDER: usize = 2;

/// The images of an IDX file: `count` images of `rows` x `cols` bytes.
#[derive(Debug, Clone)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    /// `count * rows * cols` bytes, image after image, row-major.
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// Reads an IDX images file, gzipped or not.
    pub fn read(path: &Path) -> Result<IdxImages> {
        let bytes = std::fs::read(path).map_err(|e| Error::Data {
            path: path.display().to_string(),
            msg: format!(
                "cannot read the file ({e}); pass an MNIST IDX images file such as \
                 train-images-idx3-ubyte.gz"
            ),
        })?;
        IdxImages::parse(&bytes, &path.display().to_string())
    }

    /// Parses the bytes of an IDX images file, gunzipping them first if they are a gzip
    /// stream; `path` names the file in errors.
    pub fn parse(bytes: &[u8], path: &str) -> Result<IdxImages> {
        let err = |msg: String| Error::Data {
            path: path.into(),
            msg,
        };
        let bytes = gunzip(bytes, path)?;
        if bytes.len() < HEADER_LEN {
            return Err(err(format!(
                "{} bytes is too short for an IDX images file (its header alone is \
                 {HEADER_LEN}); the file is truncated or not IDX, download it again",
                bytes.len()
            )));
        }
        let word =
            |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        match word(0) {
            IMAGES_MAGIC => {}
            LABELS_MAGIC => {
                return Err(err(
                    "this is an IDX labels file (magic 0x00000801); pass the images file \
                     (the one named *-images-idx3-ubyte)"
                        .into(),
                ))
            }
            magic => {
                return Err(err(format!(
                    "not an IDX images file: magic number 0x{magic:08x}, expected \
                     0x{IMAGES_MAGIC:08x} (bytes, three dimensions); pass an MNIST images file \
                     such as train-images-idx3-ubyte.gz"
                )))
            }
        }
        let [count, rows, cols] = [word(4), word(8), word(12)].map(|d| d as usize);
        if count == 0 || rows == 0 || cols == 0 {
            return Err(err(format!(
                "the header says {count} images of {rows} x {cols}: there are no pixels; \
                 pass a file that holds images"
            )));
        }
        let data = &bytes[HEADER_LEN..];
        let expected = count.checked_mul(rows).and_then(|n| n.checked_mul(cols));
        if expected != Some(data.len()) {
            let want = expected.map_or("more than memory holds".into(), |n| n.to_string());
            return Err(err(format!(
                "the header says {count} images of {rows} x {cols} ({want} bytes) but {} \
                 bytes follow it; the file is truncated or corrupt, download it again",
                data.len()
            )));
        }
        Ok(IdxImages {
            count,
            rows,
            cols,
            pixels: data.to_vec(),
        })
    }

    /// The bytes of image `i`. Panics if `i >= count`, as slice indexing does.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Images `range` as a dataset, treated as MNIST digits: a 2-pixel black border around
    /// each (28 x 28 becomes 32 x 32), then a resize to `size` x `size` when that differs
    /// (centered square crop first if the images are not square), the gray channel repeated
    /// when `channels` is 3. `range` lies within `0..count`.
    pub(crate) fn to_dataset(
        &self,
        range: Range<usize>,
        size: usize,
        channels: usize,
        source: String,
    ) -> Result<Dataset> {
        check_shape(&source, size, channels)?;
        let images = range
            .clone()
            .into_par_iter()
            .map(|i| {
                let digit = Planes {
                    channels: 1,
                    height: self.rows,
                    width: self.cols,
                    data: self
                        .image(i)
                        .iter()
                        .map(|&v| f32::from(v) / 255.0)
                        .collect(),
                };
                let mut out = Vec::with_capacity(channels * size * size);
                digit
                    .pad(DIGIT_BORDER)
                    .fit(size)
                    .append_scaled(channels, &mut out);
                out
            })
            .collect::<Vec<_>>()
            .concat();
        Ok(Dataset {
            images,
            len: range.len(),
            channels,
            size,
            source,
            labels: None,
            class_names: Vec::new(),
        })
    }
}

impl Dataset {
    /// Reads MNIST-style digits from an IDX images file, gzipped or not, or from the folder
    /// holding one, treated as the embedded digits are: padded to 32 x 32, then resized to
    /// `size` x `size`, gray repeated into 3 channels when `channels` is 3.
    pub fn from_idx(path: impl AsRef<Path>, size: usize, channels: usize) -> Result<Dataset> {
        let file = images_file(path.as_ref())?;
        let idx = IdxImages::read(&file)?;
        let source = format!("MNIST IDX file {} ({} images)", file.display(), idx.count);
        idx.to_dataset(0..idx.count, size, channels, source)
    }
}

/// `bytes` gunzipped if they are a gzip stream (they start with 1f 8b), else as they are;
/// `path` names the file in errors.
pub(super) fn gunzip<'a>(bytes: &'a [u8], path: &str) -> Result<Cow<'a, [u8]>> {
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(Cow::Borrowed(bytes));
    }
    let mut out = Vec::new();
    MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| Error::Data {
            path: path.into(),
            msg: format!("corrupt gzip data ({e}); download the file again"),
        })?;
    Ok(Cow::Owned(out))
}

/// The IDX images file `mnist:PATH` names: `path` itself, or the one [`find_images_file`]
/// finds when `path` is a folder.
pub(super) fn images_file(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        find_images_file(path)
    } else {
        Ok(path.to_path_buf())
    }
}

/// The IDX images file in folder `dir`: the one file whose name contains `idx3-ubyte`
/// (`train-images-idx3-ubyte`, `t10k-images.idx3-ubyte.gz`, ...), or of several, the one
/// whose name starts with `train`.
fn find_images_file(dir: &Path) -> Result<PathBuf> {
    let err = |msg: String| Error::Data {
        path: dir.display().to_string(),
        msg,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| {
        err(format!(
            "cannot list the folder ({e}); check its permissions"
        ))
    })?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| err(format!("cannot list the folder ({e})")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains("idx3-ubyte") && entry.path().is_file() {
            found.push(name);
        }
    }
    found.sort();
    let chosen = match found.as_slice() {
        [one] => Some(one),
        several => several.iter().find(|name| name.starts_with("train")),
    };
    match chosen {
        Some(name) => Ok(dir.join(name)),
        None if found.is_empty() => Err(err(
            "no IDX images file in this folder (looked for a name containing idx3-ubyte, \
             such as train-images-idx3-ubyte.gz); pass the file itself with mnist:PATH"
                .into(),
        )),
        None => Err(err(format!(
            "several IDX images files and none named train*: {}; pass the one to use with \
             mnist:PATH",
            found.join(", ")
        ))),
    }
}
