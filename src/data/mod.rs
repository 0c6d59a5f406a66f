//! Datasets: the embedded MNIST digits, MNIST IDX files and image folders, as batches in [-1, 1].
