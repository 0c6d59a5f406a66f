"""How recognisable sampled digits are, by their nearest neighbours among the training digits.

Each image is compared (L2 in pixel space, [-1, 1], 32x32 with MNIST's 2-pixel border) with the
9,000 training digits of data/; its 10 nearest vote on a label. A clear digit has neighbours that
agree and lie close; a blob or a hybrid has neighbours of mixed labels and lies far from all of
them. The same figures for held-out test digits are the ceiling. Used to compare training
settings (BENCHMARKS.md, "Faster defaults"), alongside the grids and the held-out bound.
Set-up: python3 -m venv .venv && .venv/bin/pip install numpy safetensors
Usage:  .venv/bin/python tools/digit_quality.py SAMPLES.safetensors [...]
        (from `diffwgpu sample --num 256 --save-tensor SAMPLES.safetensors`)"""
import gzip, os, sys
import numpy as np
from safetensors.numpy import load_file

K = 10
DATA = os.path.join(os.path.dirname(__file__), "..", "data")


def idx(name):
    with gzip.open(os.path.join(DATA, name)) as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def digits():
    images = np.pad(idx("mnist-10k-images-idx3-ubyte.gz"), ((0, 0), (2, 2), (2, 2)))
    images = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0
    return images, idx("mnist-10k-labels-idx1-ubyte.gz")


def score(x, train, labels):
    """Mean neighbour agreement, share of images whose 10 nearest agree on 8 or more, median
    nearest distance, and how many of the ten labels the majority votes cover."""
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ train.T + (train * train).sum(1)[None, :]
    near = np.argsort(d2, axis=1)[:, :K]
    votes = labels[near]
    counts = np.stack([(votes == c).sum(1) for c in range(10)], 1)
    agree = counts.max(1) / K
    nearest = np.sqrt(np.maximum(d2[np.arange(len(x)), near[:, 0]], 0.0))
    majority = counts.argmax(1)
    share = np.bincount(majority, minlength=10) / len(x)
    return agree.mean(), (agree >= 0.8).mean(), np.median(nearest), (share >= 0.05).sum()


def main():
    images, labels = digits()
    train, train_labels = images[:9000], labels[:9000]
    print(f"{'images':28s}     n  agreement  >=8/10  median-nearest  classes")
    rows = [("held-out test digits", images[9000:9256])]
    for path in sys.argv[1:]:
        x = load_file(path)["samples"].astype(np.float32)
        rows.append((path, np.clip(x.reshape(len(x), -1), -1.0, 1.0)))
    for name, x in rows:
        agree, clear, nearest, classes = score(x, train, train_labels)
        print(f"{name:28s} {len(x):5d}  {agree:9.3f}  {clear:6.3f}  {nearest:14.2f}  {classes:7d}")


if __name__ == "__main__":
    main()
