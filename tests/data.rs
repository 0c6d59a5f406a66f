//! The dataset loaders and the batch sampler.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use diffwgpu::data::{Batcher, Dataset, Split};
use diffwgpu::Error;
use flate2::write::GzEncoder;
use flate2::Compression;
use image::{GrayImage, Rgb, RgbImage};

/// A fresh empty folder under the system's temporary folder.
fn temp_dir(name: &str) -> PathBuf {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "diffwgpu-data-{}-{}-{name}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The message of a dataset error, failing on any other outcome.
fn data_error<T: std::fmt::Debug>(result: diffwgpu::Result<T>) -> String {
    let err = result.expect_err("expected a dataset error");
    assert!(
        matches!(err, Error::Data { .. }),
        "not a dataset error: {err:?}"
    );
    err.to_string()
}

fn assert_close(got: f32, want: f32) {
    assert!((got - want).abs() < 1e-5, "{got} != {want}");
}

/// Pixel `(y, x)` of channel `c` of image `i`.
fn pixel(ds: &Dataset, i: usize, c: usize, y: usize, x: usize) -> f32 {
    ds.image(i)[(c * ds.size + y) * ds.size + x]
}

#[test]
fn embedded_train_split_is_9000_padded_digits() {
    let ds = Dataset::embedded_mnist(Split::Train, 32, 1).unwrap();
    assert_eq!((ds.len, ds.channels, ds.size), (9000, 1, 32));
    assert_eq!(ds.images.len(), 9000 * 32 * 32);
    assert!(ds.source.contains("9000"), "{}", ds.source);
    assert!(ds.images.iter().all(|v| (-1.0..=1.0).contains(v)));
    for i in 0..ds.len {
        for k in 0..32 {
            for b in [0, 1, 30, 31] {
                assert_eq!(pixel(&ds, i, 0, b, k), -1.0);
                assert_eq!(pixel(&ds, i, 0, k, b), -1.0);
            }
        }
    }
    // MNIST's mean intensity is about 0.13 over 28 x 28, so about 0.10 over 32 x 32.
    let mean = ds.images.iter().map(|&v| v as f64).sum::<f64>() / ds.images.len() as f64;
    assert!((-0.82..-0.78).contains(&mean), "mean {mean}");
    assert!(ds.images.contains(&1.0), "no white pixel");
    ds.check().unwrap();
}

#[test]
fn embedded_test_split_and_other_shapes() {
    let test = Dataset::embedded_mnist(Split::Test, 32, 1).unwrap();
    assert_eq!((test.len, test.size), (1000, 32));
    let train = Dataset::open(None, 32, 1).unwrap();
    assert_eq!(train.len, 9000);
    assert_ne!(test.image(0), train.image(0));

    let small = Dataset::embedded_mnist(Split::Test, 16, 1).unwrap();
    assert_eq!((small.len, small.size), (1000, 16));
    assert_eq!(small.images.len(), 1000 * 16 * 16);
    assert!(small.images.iter().all(|v| (-1.0..=1.0).contains(v)));
    // Area averaging: a 16 x 16 pixel is the mean of its 2 x 2 block of the 32 x 32.
    for y in 0..16 {
        for x in 0..16 {
            let block = [(0, 0), (0, 1), (1, 0), (1, 1)]
                .map(|(dy, dx)| pixel(&test, 7, 0, 2 * y + dy, 2 * x + dx));
            assert_close(pixel(&small, 7, 0, y, x), block.iter().sum::<f32>() / 4.0);
        }
    }

    let rgb = Dataset::embedded_mnist(Split::Test, 32, 3).unwrap();
    assert_eq!(rgb.images.len(), 1000 * 3 * 32 * 32);
    let plane = 32 * 32;
    for c in 0..3 {
        assert_eq!(&rgb.image(5)[c * plane..(c + 1) * plane], test.image(5));
    }
}

#[test]
fn bad_shapes_are_refused() {
    let msg = data_error(Dataset::embedded_mnist(Split::Train, 32, 2));
    assert!(msg.contains("1 (grayscale) or 3 (RGB)"), "{msg}");
    let msg = data_error(Dataset::embedded_mnist(Split::Train, 0, 1));
    assert!(msg.contains("size 0"), "{msg}");
    let msg = data_error(Dataset::open(Some("mnist:"), 32, 1));
    assert!(msg.contains("no path given"), "{msg}");
}

/// An IDX images file of `count` `rows` x `cols` images, pixel `k` of image `i` being
/// `(7 i + k) % 256`.
fn idx_bytes(count: u32, rows: u32, cols: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    for word in [0x0803, count, rows, cols] {
        bytes.extend_from_slice(&word.to_be_bytes());
    }
    for i in 0..count as usize {
        bytes.extend((0..(rows * cols) as usize).map(|k| ((7 * i + k) % 256) as u8));
    }
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn idx_files_round_trip_plain_and_gzipped() {
    let dir = temp_dir("idx");
    let plain = idx_bytes(3, 28, 28);
    std::fs::write(dir.join("digits.bin"), &plain).unwrap();
    // Gzip is recognised by its magic bytes, not the file name.
    std::fs::write(dir.join("digits-gz.bin"), gzip(&plain)).unwrap();
    for name in ["digits.bin", "digits-gz.bin"] {
        let ds = Dataset::from_idx(dir.join(name), 32, 1).unwrap();
        assert_eq!((ds.len, ds.channels, ds.size), (3, 1, 32));
        for i in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let want = if (2..30).contains(&y) && (2..30).contains(&x) {
                        let k = (y - 2) * 28 + (x - 2);
                        ((7 * i + k) % 256) as f32 / 255.0 * 2.0 - 1.0
                    } else {
                        -1.0
                    };
                    assert_close(pixel(&ds, i, 0, y, x), want);
                }
            }
        }
    }
    let small = Dataset::from_idx(dir.join("digits.bin"), 16, 3).unwrap();
    assert_eq!(small.images.len(), 3 * 3 * 16 * 16);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn idx_folder_finds_the_images_file() {
    let dir = temp_dir("idx-folder");
    std::fs::write(
        dir.join("t10k-images-idx3-ubyte.gz"),
        gzip(&idx_bytes(2, 28, 28)),
    )
    .unwrap();
    std::fs::write(dir.join("train-images-idx3-ubyte"), idx_bytes(5, 28, 28)).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), [0u8; 8]).unwrap();
    let ds = Dataset::open(Some(&format!("mnist:{}", dir.display())), 32, 1).unwrap();
    assert_eq!(ds.len, 5);
    assert!(
        ds.source.contains("train-images-idx3-ubyte"),
        "{}",
        ds.source
    );

    let empty = temp_dir("idx-empty");
    let msg = data_error(Dataset::from_idx(&empty, 32, 1));
    assert!(msg.contains("idx3-ubyte"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn bad_idx_files_are_explained() {
    let dir = temp_dir("idx-bad");
    let msg = data_error(Dataset::from_idx(
        dir.join("missing-images-idx3-ubyte"),
        32,
        1,
    ));
    assert!(
        msg.contains("missing-images-idx3-ubyte") && msg.contains("cannot read"),
        "{msg}"
    );

    let mut labels = idx_bytes(2, 28, 28);
    labels[3] = 0x01;
    std::fs::write(dir.join("labels"), &labels).unwrap();
    let msg = data_error(Dataset::from_idx(dir.join("labels"), 32, 1));
    assert!(msg.contains("labels file"), "{msg}");

    let mut other = idx_bytes(2, 28, 28);
    other[2] = 0x0d;
    std::fs::write(dir.join("floats"), &other).unwrap();
    let msg = data_error(Dataset::from_idx(dir.join("floats"), 32, 1));
    assert!(msg.contains("0x00000d03"), "{msg}");

    let full = idx_bytes(2, 28, 28);
    std::fs::write(dir.join("cut"), &full[..full.len() - 10]).unwrap();
    std::fs::write(dir.join("cut.gz"), gzip(&full[..full.len() - 10])).unwrap();
    for name in ["cut", "cut.gz"] {
        let msg = data_error(Dataset::from_idx(dir.join(name), 32, 1));
        assert!(msg.contains("truncated"), "{msg}");
    }
    std::fs::write(dir.join("short"), &full[..9]).unwrap();
    let msg = data_error(Dataset::from_idx(dir.join("short"), 32, 1));
    assert!(msg.contains("too short"), "{msg}");

    let zipped = gzip(&full);
    std::fs::write(dir.join("bad.gz"), &zipped[..zipped.len() / 2]).unwrap();
    let msg = data_error(Dataset::from_idx(dir.join("bad.gz"), 32, 1));
    assert!(msg.contains("gzip"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A folder with a wide RGB PNG (red center square, blue sides), a tall green PNG with an
/// upper-case extension, a gray PNG and a light gray JPEG in a subfolder, and a text file.
fn image_folder() -> PathBuf {
    let dir = temp_dir("folder");
    let wide = RgbImage::from_fn(48, 16, |x, _| {
        if (16..32).contains(&x) {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    wide.save(dir.join("a.png")).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    GrayImage::from_pixel(32, 32, image::Luma([128]))
        .save(dir.join("sub").join("b.png"))
        .unwrap();
    RgbImage::from_pixel(20, 60, Rgb([0, 255, 0]))
        .save_with_format(dir.join("c.PNG"), image::ImageFormat::Png)
        .unwrap();
    RgbImage::from_pixel(24, 24, Rgb([200, 200, 200]))
        .save_with_format(dir.join("sub").join("d.JPG"), image::ImageFormat::Jpeg)
        .unwrap();
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
    dir
}

#[test]
fn folder_images_are_cropped_resized_and_converted() {
    let dir = image_folder();
    let rgb = Dataset::open(Some(dir.to_str().unwrap()), 16, 3).unwrap();
    assert_eq!((rgb.len, rgb.channels, rgb.size), (4, 3, 16));
    assert_eq!(rgb.images.len(), 4 * 3 * 16 * 16);
    assert!(rgb.source.contains("4 images"), "{}", rgb.source);
    // Sorted paths: a.png, c.PNG, sub/b.png, sub/d.JPG. The wide image's center crop is red.
    for (i, color) in [(0, [1.0, -1.0, -1.0]), (1, [-1.0, 1.0, -1.0])] {
        for (c, want) in color.into_iter().enumerate() {
            for v in &rgb.image(i)[c * 256..(c + 1) * 256] {
                assert_close(*v, want);
            }
        }
    }
    for v in rgb.image(2) {
        assert_close(*v, 128.0 / 255.0 * 2.0 - 1.0);
    }
    for v in rgb.image(3) {
        assert!((v - (200.0 / 255.0 * 2.0 - 1.0)).abs() < 0.02, "{v}");
    }

    let gray = Dataset::from_folder(&dir, 8, 1).unwrap();
    assert_eq!(gray.images.len(), 4 * 8 * 8);
    for (i, luma) in [
        (0, 0.2126),
        (1, 0.7152),
        (2, 128.0 / 255.0),
        (3, 200.0 / 255.0),
    ] {
        for v in gray.image(i) {
            assert!((v - (luma * 2.0 - 1.0)).abs() < 0.02, "image {i}: {v}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_folders_are_explained() {
    let dir = temp_dir("folder-bad");
    let missing = dir.join("nowhere");
    let msg = data_error(Dataset::from_folder(&missing, 32, 1));
    assert!(
        msg.contains("nowhere") && msg.contains("no such folder"),
        "{msg}"
    );

    std::fs::write(dir.join("readme.txt"), "text").unwrap();
    let msg = data_error(Dataset::from_folder(&dir, 32, 1));
    assert!(
        msg.contains("no images") && msg.contains(".png, .jpg, .jpeg"),
        "{msg}"
    );

    let msg = data_error(Dataset::from_folder(dir.join("readme.txt"), 32, 1));
    assert!(msg.contains("not a folder"), "{msg}");

    GrayImage::from_pixel(4, 4, image::Luma([9]))
        .save(dir.join("good.png"))
        .unwrap();
    std::fs::write(dir.join("x.png"), b"these bytes are no PNG").unwrap();
    let msg = data_error(Dataset::from_folder(&dir, 32, 1));
    assert!(
        msg.contains("x.png") && msg.contains("cannot decode"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A dataset of `len` 1 x 2 x 2 images whose pixels are `[i, i + 0.1, i + 0.2, i + 0.3]`
/// for image `i` (not the [-1, 1] range, so that every value is told apart).
fn counting_dataset(len: usize) -> Dataset {
    Dataset {
        images: (0..len)
            .flat_map(|i| (0..4).map(move |k| i as f32 + 0.1 * k as f32))
            .collect(),
        len,
        channels: 1,
        size: 2,
        source: "counting".into(),
        labels: None,
        class_names: Vec::new(),
    }
}

fn assert_permutation(indices: &[usize], len: usize) {
    let mut sorted = indices.to_vec();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..len).collect::<Vec<_>>());
}

#[test]
fn batches_are_shuffled_epochs() {
    let batcher = Batcher::new(7, 3, 42, false).unwrap();
    assert_eq!(batcher.batch_size(), 3);
    let draws: Vec<usize> = (0..7)
        .flat_map(|step| batcher.batch_indices(step))
        .collect();
    for epoch in 0..3 {
        let visited = &draws[epoch * 7..(epoch + 1) * 7];
        assert_permutation(visited, 7);
        assert_eq!(visited, batcher.permutation(epoch as u64));
    }
    assert_ne!(batcher.permutation(0), batcher.permutation(1));
    assert_ne!(
        batcher.permutation(0),
        Batcher::new(7, 3, 43, false).unwrap().permutation(0)
    );

    let big = Batcher::new(1000, 64, 7, false).unwrap();
    assert_permutation(&big.permutation(3), 1000);
    assert_ne!(big.batch_indices(0), big.batch_indices(1));
    // Batches larger than the dataset span several epochs.
    let wide = Batcher::new(3, 7, 1, false).unwrap();
    assert_permutation(&wide.batch_indices(0)[..3], 3);
}

#[test]
fn batches_depend_only_on_seed_and_step() {
    let ds = counting_dataset(10);
    let a = Batcher::new(10, 4, 5, true).unwrap();
    let b = Batcher::new(10, 4, 5, true).unwrap();
    let later: Vec<_> = (0..6).map(|step| a.batch(&ds, step).unwrap()).collect();
    for step in (0..6).rev() {
        assert_eq!(b.batch(&ds, step).unwrap(), later[step as usize]);
    }
    assert_eq!(later[0].len(), 4 * 4);
    assert_ne!(later[0], later[1]);
}

#[test]
fn horizontal_flips_mirror_about_half_the_draws() {
    let ds = counting_dataset(10);
    let plain = Batcher::new(10, 5, 9, false).unwrap();
    let flipping = Batcher::new(10, 5, 9, true).unwrap();
    let (mut flipped, mut kept) = (0, 0);
    for step in 0..40 {
        let indices = plain.batch_indices(step);
        assert_eq!(indices, flipping.batch_indices(step));
        let straight = plain.batch(&ds, step).unwrap();
        let maybe = flipping.batch(&ds, step).unwrap();
        for (i, &index) in indices.iter().enumerate() {
            let image = ds.image(index);
            assert_eq!(&straight[i * 4..(i + 1) * 4], image);
            let mirrored = [image[1], image[0], image[3], image[2]];
            let got = &maybe[i * 4..(i + 1) * 4];
            if got == mirrored {
                flipped += 1;
            } else {
                assert_eq!(got, image);
                kept += 1;
            }
        }
    }
    assert!((70..=130).contains(&flipped), "{flipped} of 200 flipped");
    assert_eq!(flipped + kept, 200);
}

#[test]
fn batcher_misuse_is_refused() {
    assert!(Batcher::new(0, 4, 1, false).is_err());
    assert!(Batcher::new(4, 0, 1, false).is_err());
    let batcher = Batcher::new(4, 2, 1, false).unwrap();
    let msg = data_error(batcher.batch(&counting_dataset(5), 0));
    assert!(msg.contains("made for 4 images"), "{msg}");
    let mut broken = counting_dataset(4);
    broken.images.pop();
    let msg = data_error(batcher.batch(&broken, 0));
    assert!(msg.contains("pixel values"), "{msg}");
}

/// The class counts of the embedded labels, digits 0 to 9 (data/README.md).
const EMBEDDED_CLASS_COUNTS: [usize; 10] = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978];

/// How many of `labels` are each class id `0..classes`.
fn class_counts(labels: &[u32], classes: usize) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for &label in labels {
        counts[label as usize] += 1;
    }
    counts
}

#[test]
fn embedded_labels_have_the_readme_class_counts() {
    let train = Dataset::open_labelled(None, 32, 1).unwrap();
    let test = Dataset::embedded_mnist_labelled(Split::Test, 16, 3).unwrap();
    let digits: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    for (ds, len) in [(&train, 9000), (&test, 1000)] {
        ds.check().unwrap();
        assert_eq!(ds.len, len);
        assert_eq!(ds.labels.as_ref().unwrap().len(), len);
        assert_eq!(ds.class_names, digits);
        assert_eq!(ds.num_classes(), 10);
    }
    let (train_labels, test_labels) = (train.labels.unwrap(), test.labels.unwrap());
    assert_eq!(train_labels[..12], [3, 8, 1, 0, 4, 0, 9, 3, 4, 9, 3, 2]);
    assert_eq!(test_labels[..6], [2, 6, 6, 7, 0, 4]);
    let (a, b) = (
        class_counts(&train_labels, 10),
        class_counts(&test_labels, 10),
    );
    let total: Vec<usize> = a.iter().zip(&b).map(|(a, b)| a + b).collect();
    assert_eq!(total, EMBEDDED_CLASS_COUNTS);
    assert!(b.iter().all(|&n| n > 50), "test split counts {b:?}");

    // The labelled loaders make the same images as the unlabelled ones.
    let plain = Dataset::open(None, 32, 1).unwrap();
    assert_eq!(plain.images, train.images);
    assert_eq!((plain.labels.as_ref(), plain.num_classes()), (None, 0));
    let plain_test = Dataset::embedded_mnist(Split::Test, 16, 3).unwrap();
    assert_eq!(plain_test.images, test.images);
}

/// An IDX labels file holding `labels`.
fn idx_label_bytes(labels: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for word in [0x0801, labels.len() as u32] {
        bytes.extend_from_slice(&word.to_be_bytes());
    }
    bytes.extend_from_slice(labels);
    bytes
}

#[test]
fn mnist_labels_are_found_beside_the_images() {
    let labels = [2u8, 0, 5, 1, 2];
    let want: Vec<u32> = labels.iter().map(|&l| u32::from(l)).collect();
    let names: Vec<String> = (0..6).map(|d| d.to_string()).collect();
    let images = idx_bytes(5, 28, 28);
    // MNIST's download names, both gzipped; the t10k names, both plain; and gzip on one side.
    let cases = [
        (
            "train-images-idx3-ubyte.gz",
            gzip(&images),
            "train-labels-idx1-ubyte.gz",
            gzip(&idx_label_bytes(&labels)),
        ),
        (
            "t10k-images.idx3-ubyte",
            images.clone(),
            "t10k-labels.idx1-ubyte",
            idx_label_bytes(&labels),
        ),
        (
            "digits-images-idx3-ubyte",
            images.clone(),
            "digits-labels-idx1-ubyte.gz",
            gzip(&idx_label_bytes(&labels)),
        ),
    ];
    for (images_name, images_bytes, labels_name, labels_bytes) in cases {
        let dir = temp_dir("idx-labels");
        std::fs::write(dir.join(images_name), images_bytes).unwrap();
        std::fs::write(dir.join(labels_name), labels_bytes).unwrap();
        let unlabelled = Dataset::from_idx(dir.join(images_name), 32, 1).unwrap();
        for spec in [dir.clone(), dir.join(images_name)] {
            let ds =
                Dataset::open_labelled(Some(&format!("mnist:{}", spec.display())), 32, 1).unwrap();
            ds.check().unwrap();
            assert_eq!(ds.labels.as_deref(), Some(&want[..]), "{images_name}");
            assert_eq!(ds.class_names, names);
            assert_eq!(ds.images, unlabelled.images);
            assert!(ds.source.contains(labels_name), "{}", ds.source);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn bad_labels_files_are_explained() {
    let dir = temp_dir("idx-labels-bad");
    let images = dir.join("train-images-idx3-ubyte");
    std::fs::write(&images, idx_bytes(3, 28, 28)).unwrap();
    let spec = format!("mnist:{}", images.display());
    let labels = dir.join("train-labels-idx1-ubyte");
    let open = || Dataset::open_labelled(Some(&spec), 32, 1);

    let msg = data_error(open());
    assert!(
        msg.contains("no labels file") && msg.contains(&labels.display().to_string()),
        "{msg}"
    );

    let labelled = |bytes: &[u8]| {
        std::fs::write(&labels, bytes).unwrap();
        let msg = data_error(open());
        assert!(msg.contains("train-labels-idx1-ubyte"), "{msg}");
        msg
    };
    let msg = labelled(&idx_bytes(3, 28, 28));
    assert!(msg.contains("images file (magic 0x00000803)"), "{msg}");
    let mut other = idx_label_bytes(&[1, 2, 3]);
    other[2] = 0x0d;
    let msg = labelled(&other);
    assert!(msg.contains("0x00000d01"), "{msg}");
    let full = idx_label_bytes(&[1, 2, 3]);
    let msg = labelled(&full[..10]);
    assert!(
        msg.contains("3 labels but 2 bytes") && msg.contains("truncated"),
        "{msg}"
    );
    let msg = labelled(&full[..6]);
    assert!(msg.contains("too short"), "{msg}");
    let zipped = gzip(&full);
    let msg = labelled(&zipped[..zipped.len() / 2]);
    assert!(msg.contains("gzip"), "{msg}");
    let msg = labelled(&idx_label_bytes(&[1, 2, 3, 4]));
    assert!(
        msg.contains("holds 4 labels") && msg.contains("holds 3 images"),
        "{msg}"
    );
    let msg = labelled(&[&full[..], &[7]].concat());
    assert!(msg.contains("3 labels but 4 bytes"), "{msg}");
    std::fs::write(&labels, &full).unwrap();
    assert_eq!(open().unwrap().labels, Some(vec![1, 2, 3]));

    std::fs::write(dir.join("digits.bin"), idx_bytes(3, 28, 28)).unwrap();
    let msg = data_error(Dataset::open_labelled(
        Some(&format!("mnist:{}", dir.join("digits.bin").display())),
        32,
        1,
    ));
    assert!(
        msg.contains("digits.bin") && msg.contains("neither"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Saves a 4 x 4 gray PNG of value `v` at `dir/path`, making the folders it needs.
fn gray_png(dir: &std::path::Path, path: &str, v: u8) {
    let file = dir.join(path);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    GrayImage::from_pixel(4, 4, image::Luma([v]))
        .save(file)
        .unwrap();
}

#[test]
fn class_folders_are_labelled_in_sorted_order() {
    let dir = temp_dir("classes");
    gray_png(&dir, "zebra/b.png", 60);
    gray_png(&dir, "zebra/a.png", 50);
    gray_png(&dir, "ant/x.png", 10);
    gray_png(&dir, "cat/2.png", 30);
    gray_png(&dir, "cat/1.png", 20);
    gray_png(&dir, "cat/kittens/3.png", 40);
    std::fs::write(dir.join("cat").join("notes.txt"), "not an image").unwrap();
    std::fs::write(dir.join("README.md"), "three classes").unwrap();
    let ds = Dataset::open_labelled(Some(dir.to_str().unwrap()), 2, 3).unwrap();
    ds.check().unwrap();
    assert_eq!((ds.len, ds.channels, ds.size), (6, 3, 2));
    assert_eq!(ds.class_names, ["ant", "cat", "zebra"]);
    assert_eq!(ds.num_classes(), 3);
    assert_eq!(ds.labels, Some(vec![0, 1, 1, 1, 2, 2]));
    assert!(ds.source.contains("6 images, 3 classes"), "{}", ds.source);
    // Classes in order, each class's images in sorted path order.
    for (i, v) in [10, 20, 30, 40, 50, 60].into_iter().enumerate() {
        for &got in ds.image(i) {
            assert_close(got, v as f32 / 255.0 * 2.0 - 1.0);
        }
    }
    // The unlabelled loader reads the same folder as one pile of images.
    assert_eq!(
        Dataset::open(Some(dir.to_str().unwrap()), 2, 3)
            .unwrap()
            .len,
        6
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_class_folders_are_explained() {
    let dir = temp_dir("classes-bad");
    let open = |dir: &std::path::Path| Dataset::from_class_folders(dir, 8, 1);
    std::fs::write(dir.join("README.md"), "no classes yet").unwrap();
    let msg = data_error(open(&dir));
    assert!(msg.contains("no class subfolders"), "{msg}");

    gray_png(&dir, "cat/a.png", 1);
    std::fs::create_dir_all(dir.join("dog").join("puppies")).unwrap();
    std::fs::write(dir.join("dog").join("notes.txt"), "text").unwrap();
    let msg = data_error(open(&dir));
    assert!(
        msg.contains(&dir.join("dog").display().to_string()) && msg.contains("holds no images"),
        "{msg}"
    );

    gray_png(&dir, "dog/puppies/b.png", 2);
    gray_png(&dir, "loose.PNG", 3);
    let msg = data_error(open(&dir));
    assert!(
        msg.contains("loose.PNG") && msg.contains("its own subfolder"),
        "{msg}"
    );
    std::fs::remove_file(dir.join("loose.PNG")).unwrap();
    assert_eq!(open(&dir).unwrap().labels, Some(vec![0, 1]));

    let msg = data_error(open(&dir.join("nowhere")));
    assert!(msg.contains("no such folder"), "{msg}");
    let msg = data_error(Dataset::from_class_folders(&dir, 8, 2));
    assert!(msg.contains("1 (grayscale) or 3 (RGB)"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// [`counting_dataset`] labelled `i % 3` for image `i`, in 3 classes.
fn labelled_counting_dataset(len: usize) -> Dataset {
    Dataset {
        labels: Some((0..len as u32).map(|i| i % 3).collect()),
        class_names: ["a", "b", "c"].map(String::from).to_vec(),
        ..counting_dataset(len)
    }
}

#[test]
fn batch_labels_match_the_batch_images() {
    let ds = labelled_counting_dataset(10);
    let labels = ds.labels.clone().unwrap();
    let mut flips = 0;
    for hflip in [false, true] {
        let batcher = Batcher::new(10, 4, 11, hflip).unwrap();
        for step in 0..30 {
            let images = batcher.batch(&ds, step).unwrap();
            let got = batcher.batch_labels(&ds, step).unwrap();
            assert_eq!(got.len(), 4);
            for (image, label) in images.chunks_exact(4).zip(got) {
                // Which dataset image this is, mirrored or not.
                let index = (0..ds.len)
                    .find(|&i| {
                        let x = ds.image(i);
                        image == x || image == [x[1], x[0], x[3], x[2]]
                    })
                    .unwrap();
                flips += usize::from(image != ds.image(index));
                assert_eq!(label, labels[index], "step {step}");
            }
        }
    }
    assert!(flips > 20, "{flips} flips");

    let batcher = Batcher::new(10, 4, 11, false).unwrap();
    let msg = data_error(batcher.batch_labels(&counting_dataset(10), 0));
    assert!(msg.contains("no class labels"), "{msg}");
    let msg = data_error(batcher.batch_labels(&labelled_counting_dataset(9), 0));
    assert!(msg.contains("made for 10 images"), "{msg}");
}

#[test]
fn dataset_check_refuses_bad_labels() {
    labelled_counting_dataset(4).check().unwrap();
    let mut short = labelled_counting_dataset(4);
    short.labels.as_mut().unwrap().pop();
    let msg = data_error(short.check());
    assert!(msg.contains("3 labels for 4 images"), "{msg}");

    let mut unnamed = labelled_counting_dataset(4);
    unnamed.class_names.pop();
    let msg = data_error(unnamed.check());
    assert!(msg.contains("image 2 has label 2"), "{msg}");

    let mut nameless = counting_dataset(4);
    nameless.class_names.push("a".into());
    let msg = data_error(nameless.check());
    assert!(msg.contains("has no labels"), "{msg}");
    let batcher = Batcher::new(4, 2, 1, false).unwrap();
    let msg = data_error(batcher.batch_labels(&unnamed, 0));
    assert!(msg.contains("has label 2"), "{msg}");
}
