"""Data loaders and metrics shared by s2sd.py, camd.py, spkd.py and isd.py; nothing here knows a method.

Data: load_split -> Split (the four papers' datasets, digits, fashionmnist, synthetic, folder = your own images),
epoch_batches (seeded, shardable, resumable), batched on-device augmentation of uint8 tensors, image files through
DataLoader workers with the papers' transforms, embed. Metrics (tensors in, floats out; exact, chunked, on the
embeddings' device; retrieval_metrics / knn_metrics in percent): the test set is query and gallery, a query is
excluded from its own gallery by index, neighbours are ranked by Euclidean distance (= cosine order for
L2-normalised input), ties go to the lower gallery index, the N x N matrix is never held (shared/notes/metrics.md).
"""
import functools
import gzip
import hashlib
import http.client
import json
import math
import os
import shutil
import sys
import tarfile
import threading
import time
import urllib.request
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # RepDistiller
CINIC10_MEAN, CINIC10_STD = (0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835)  # its README
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3759,)  # pixel statistics of all 1,797 sklearn digits
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)  # pixel statistics of the 60,000 training images
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
DATASETS = ("digits", "fashionmnist", "synthetic", "cifar10", "cifar100", "stl10", "tinyimagenet", "cinic10", "cub",
            "cars", "sop", "imagenet", "imagenet100", "dtd", "food101", "flowers102", "pets", "sun397", "caltech101",
            "aircraft", "stanfordcars", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")

# The fixed ImageNet-100 subset of CMC (Tian et al., 2019), also used by solo-learn.
IMAGENET100_WNIDS = """n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245
n01773797 n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653 n02086910
n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 n02877765 n04429376 n02009229
n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855 n03785016 n03764736 n03775546 n02087046 n07836838
n04099969 n04592741 n03891251 n02701002 n03379051 n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166
n02113799 n02086240 n03903868 n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182
n01729322 n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 n03837869
n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 n04229816 n02100583 n03642806
n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622""".split()

# Downloads: (url, md5 or None where none is published, what it becomes in the dataset's folder: an archive's folder,
# None for a plain file), from torchvision.datasets and the datasets' pages. A url without '://' is inside a download.
VGG, SIMCLR = "https://www.robots.ox.ac.uk/~vgg/data", "https://raw.githubusercontent.com/google-research/simclr/master"
SOURCES = {
    "cub": [("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "97eceeb196236b17998738112f37df78",
             "CUB_200_2011")],
    "sop": [("ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip", "7f73d41a2f44250d4779881525aea32e",
             "Stanford_Online_Products")],
    "tinyimagenet": [("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de",
                      "tiny-imagenet-200")],
    "cinic10": [("https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz", None, "cinic-10")],
    "dtd": [(f"{VGG}/dtd/download/dtd-r1.0.1.tar.gz", "fff73e5086ae6bdbea199a49dfb8a4c1", "dtd")],
    "food101": [("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "85eeb15f3717b99a5da872d97d918f87", "food-101")],
    "flowers102": [(f"{VGG}/flowers/102/102flowers.tgz", "52808999861908f626f3c1f4e79d11fa", "jpg"),
                   (f"{VGG}/flowers/102/imagelabels.mat", "e0620be6f572b9609742df49c70aed4d", None),
                   (f"{VGG}/flowers/102/setid.mat", "a5357ecc9cb78c4bef273ce3793fc85c", None)],
    "pets": [(f"{VGG}/pets/data/images.tar.gz", "5c4f3ee8e5d25df40f4fd59a7f44e54c", "images"),
             (f"{VGG}/pets/data/annotations.tar.gz", "95a8c909bbe2e81eed6a22bccdf3f68f", "annotations")],
    "sun397": [("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", "8ca2778205c41d23104230ba66911c7a",
                "SUN397"), ("https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip", None,
                            "SUN397/Partitions")],
    "caltech101": [("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                    "3138e1922a9193bfa496528edbbc45d0", "caltech-101"),
                   ("caltech-101/101_ObjectCategories.tar.gz", None, "101_ObjectCategories")],
    "aircraft": [(f"{VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz", None, "fgvc-aircraft-2013b")],
    "imagenet_1pct": [(f"{SIMCLR}/imagenet_subsets/1percent.txt", "b61c91b8ddb75fabdb02a9bb2ae3bd74", None)],
    "imagenet_10pct": [(f"{SIMCLR}/imagenet_subsets/10percent.txt", "b0d861160cc9531910d069ff547fc1b6", None)]}
FMNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # Debian/Ubuntu package dataset-fashion-mnist
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


class DatasetError(Exception):
    """A dataset is unknown, missing, incomplete or unreadable. The message is one actionable line."""


@dataclass
class Split:
    """One split of a dataset: labels plus either in-memory images or image file paths."""
    name: str
    labels: torch.Tensor                 # int64 [N]; -1 where the split has no labels
    num_classes: int
    mean: tuple = IMAGENET_MEAN          # per channel, of its images in [0, 1]
    std: tuple = IMAGENET_STD
    images: torch.Tensor | None = None   # uint8 [N, C, H, W] (small-image datasets)
    paths: list | None = None            # image files (large-image datasets)
    classes: list | None = None          # class names where the dataset has them

    def __len__(self):
        return len(self.labels)

    def subset(self, index):
        """The same split restricted to the items `index` (a LongTensor), in that order."""
        return Split(self.name, self.labels[index], self.num_classes, self.mean, self.std,
                     None if self.images is None else self.images[index],
                     None if self.paths is None else [self.paths[i] for i in index], self.classes)


def random_subset(split, n, seed=0):
    """A fixed random n items of `split` (seeded, in dataset order); the split itself when n >= len(split)."""
    if n >= len(split):
        return split
    return split.subset(torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values)


# ----------------------------------------------------------------------------------------------
# Downloads: a file is written as <name>.part and renamed only after its checksum matched, and an archive
# is extracted into a temporary folder renamed only when complete: an interrupted run never looks finished.

def download_url(url, path, md5=None):
    """Download `url` to `path` (resuming a `.part` file over HTTP), verify `md5`, then rename."""
    if os.path.exists(path) and (md5 is None or file_md5(path) == md5):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    done = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except Exception as e:  # no network, host gone, HTTP error
        raise DatasetError(f"could not download {url} ({e}); download it by hand to {path}") from None
    if done and getattr(response, "status", 200) != 206:  # server ignored the range: restart
        done = 0
    size, last = response.headers.get("Content-Length"), 0.0
    total = done + int(size) if size else 0  # bytes of the whole file, if the server said
    try:
        with response, open(part, "ab" if done else "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if time.time() - last > 1.0 or done == total:
                    last, pct = time.time(), (f" ({100 * done / total:.1f}%)" if total else "")
                    print(f"\rdownloading {os.path.basename(path)}: {done / 2**20:.1f} MiB{pct}",
                          end="", file=sys.stderr, flush=True)
        stopped = done < total and "the connection closed early"  # read() gave b"" before Content-Length bytes
    except (OSError, http.client.HTTPException) as e:  # reset, timed out, disk full
        stopped = e
    print(file=sys.stderr)
    if stopped:  # the .part stays: a rerun resumes it
        of = f" of {total / 2**20:.1f}" if total else ""
        raise DatasetError(f"download of {url} stopped at {done / 2**20:.1f}{of} MiB ({stopped}); run again to resume")
    if md5 is not None and file_md5(part) != md5:
        os.remove(part)
        raise DatasetError(f"checksum mismatch for {url} (expected md5 {md5}); the partial file "
                           f"was deleted, run again to re-download")
    os.replace(part, path)
    return path


def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def extract(archive, dest_root, top_folder):
    """Extract `archive` so that dest_root/top_folder appears only once extraction is complete: the archive's folder
    of that (last) name, or its whole content where it has none (CINIC-10, SUN397's Partitions.zip)."""
    final = os.path.join(dest_root, top_folder)
    tmp = os.path.join(os.path.dirname(final), f".extracting-{os.path.basename(final)}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"extracting {archive} ...", file=sys.stderr)
    try:
        if archive.endswith(".zip"):  # zipfile sanitises member names (shutil's unpacker skips any name with "..")
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:  # a tar archive, any compression; the "data" filter refuses links and paths out of tmp
            with tarfile.open(archive) as t:
                t.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        inner = os.path.join(tmp, os.path.basename(final))
        os.replace(inner if os.path.isdir(inner) else tmp, final)
    finally:  # a failed extraction leaves no half folder
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(name, base, need, download, sources):
    """base/need. If absent and `download`: each of `sources` (SOURCES) whose result is absent too is downloaded into
    base and checked, an archive extracted; nothing existing is replaced. Else DatasetError: what to put where."""
    path = os.path.join(base, need)
    hint = (f"download {' and '.join(u for u, _, _ in sources if '://' in u)} into {os.path.normpath(base)}"
            f"{' and extract' if any(b for *_, b in sources) else ''} so that {path} exists")
    if download and not os.path.exists(path):
        try:
            for url, md5, becomes in sources:
                if not os.path.exists(os.path.join(base, becomes or os.path.basename(url))):
                    file = os.path.join(base, os.path.basename(url) if "://" in url else url)
                    if "://" in url:
                        download_url(url, file, md5)
                    try:
                        if becomes:
                            extract(file, base, becomes)
                    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
                        if "://" in url:  # truncated or corrupt, and no md5 caught it: deleted, a rerun fetches it
                            os.remove(file)
                        raise DatasetError(f"cannot extract {file} ({(str(e).splitlines() or [type(e).__name__])[0]})"
                                           + "; deleted it, run again to download it anew" * ("://" in url)) from None
        except DatasetError as e:
            raise DatasetError(f"{e}; or {hint}") from None
    if not os.path.exists(path):
        raise DatasetError(f"{name} expected {path}; {hint}")
    return path


# ----------------------------------------------------------------------------------------------
# Loading splits

@functools.lru_cache(maxsize=8)
def load_split(name, root="./data", split="train", download=True, image_size=None, channels=None,
               synthetic_size=(512, 10, 32)):
    """One split of a dataset (shared/notes/datasets.md), cached: do not modify it. uint8 images in memory
    (`image_size` resizes them once, `channels=3` turns grey into RGB) for digits, fashionmnist, synthetic
    (`synthetic_size` = images, classes, side), cifar10/100, stl10, tinyimagenet, cinic10; for the others paths, each
    file checked once (check_images). 'a+b' is two splits together (every split of these is labelled alike)."""
    dml, val, tt = ("train", "test", "dml_train", "dml_test"), ("train", "val", "test", "train+val"), ("train", "test")
    readers = {"digits": (_digits, dml), "fashionmnist": (_fashionmnist, dml), "synthetic": (_synthetic, val[:3]),
               "cifar10": (_torchvision_small, tt), "cifar100": (_torchvision_small, tt),
               "stl10": (_torchvision_small, ("train", "test", "unlabeled", "train+unlabeled")),
               "tinyimagenet": (_tinyimagenet, ("train", "val")),
               "cinic10": (_cinic10, ("train", "valid", "test", "train+valid")), "cub": (_cub, tt), "cars": (_cars, tt),
               "sop": (_sop, tt), "imagenet": (_imagenet, val[:3] + ("train_1pct", "train_10pct")),
               "imagenet100": (_imagenet, val[:3]), "dtd": (_listed, tuple(
                   s for k in range(1, 11) for s in (f"train{k}", f"val{k}", f"test{k}", f"train{k}+val{k}"))),
               "food101": (_listed, tt), "flowers102": (_flowers102, val), "pets": (_listed, tt),
               "sun397": (_listed, tt), "caltech101": (_caltech101, tt), "aircraft": (_listed, val),
               "stanfordcars": (_cars, tt), "folder": (_folder, dml + ("all",))}
    if name not in readers:
        raise DatasetError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    if os.path.exists(root) and not os.path.isdir(root):
        raise DatasetError(f"--data-root {root} is a file, not a folder")
    reader, allowed = readers[name]
    if split not in allowed:
        raise DatasetError(f"dataset '{name}' has no split '{split}'; choose from {', '.join(allowed)}")
    out, *more = [reader(name, root, s, download, *([tuple(synthetic_size)] if name == "synthetic" else []))
                  for s in split.split("+")]
    for other in more:  # 'a+b'
        out = Split(name, torch.cat([out.labels, other.labels]), out.num_classes, out.mean, out.std,
                    None if out.images is None else torch.cat([out.images, other.images]),
                    None if out.paths is None else out.paths + other.paths, out.classes)
    if out.images is not None and split.startswith("dml"):  # the zero-shot DML protocol: the first half of the
        half = int(out.labels.max()) // 2 + 1                # classes train, the second half test, all their images
        out = out.subset(torch.nonzero((out.labels < half) == (split == "dml_train")).squeeze(1))
    if out.images is not None and image_size is not None and out.images.shape[-1] != image_size:
        out.images = (resize(out.images, image_size) * 255).round().clamp(0, 255).to(torch.uint8)
    if out.images is not None and channels is not None and out.images.shape[1] != channels:
        if out.images.shape[1] != 1:
            raise DatasetError(f"cannot turn {out.images.shape[1]}-channel {name} into {channels} channels")
        out.images = out.images.expand(-1, channels, -1, -1).contiguous()
        out.mean, out.std = out.mean * channels, out.std * channels
    if out.paths is not None:
        check_images(out.paths, f"{name} {split}")
    return out


def _digits(name, root, split, download):
    """sklearn's 8x8 digits: a stratified 80/20 train / test split; the dml splits start from all 1,797."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    if not split.startswith("dml"):
        halves = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=d.target, random_state=0)
        idx = torch.from_numpy(np.sort(halves[1] if split == "test" else halves[0]))
        images, labels = images[idx], labels[idx]
    return Split(name, labels, 10, DIGITS_MEAN, DIGITS_STD, images=images)


def _read_idx(path):
    """A uint8 IDX file (the MNIST format, gzipped or not) as a numpy array."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        ndim = data[3]
        shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
        if data[:3] != b"\x00\x00\x08" or len(data) != 4 + 4 * ndim + math.prod(shape):
            raise ValueError("not a uint8 IDX file of the size its header states")
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise DatasetError(f"cannot read {path} ({e}); delete it and download it again") from None
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashionmnist(name, root, split, download):
    """Fashion-MNIST (Xiao et al. 2017): 28 px grey, the official 60,000 / 10,000 split; dml_train / dml_test:
    the train images of classes 0-4 (30,000) / the test images of 5-9 (5,000). IDX files from torchvision's
    download (<root>/FashionMNIST/raw), the Debian package dataset-fashion-mnist or <root>/fashionmnist."""
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def find():  # the four files (each gzipped or not) from the first folder that has them all
        for folder in (os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "fashionmnist"), FMNIST_DEBIAN):
            found = [next((p for p in (os.path.join(folder, f), os.path.join(folder, f + ".gz"))
                           if os.path.isfile(p)), None) for f in files]
            if all(found):
                return found
    if download and find() is None:
        try:
            import torchvision
            torchvision.datasets.FashionMNIST(root, download=True)
        except Exception:  # offline or host unreachable: the message below says how to get the files
            pass
    paths = find()
    if paths is None:
        raise DatasetError(f"fashionmnist not found in {root}/FashionMNIST/raw, {root}/fashionmnist or {FMNIST_DEBIAN};"
                           f" run once with network access (torchvision downloads it), or 'apt-get install "
                           f"dataset-fashion-mnist', or place the four IDX files in {root}/fashionmnist")
    first = 0 if split in ("train", "dml_train") else 2  # the train or the t10k pair
    images = torch.from_numpy(_read_idx(paths[first]).copy())[:, None]
    labels = torch.from_numpy(_read_idx(paths[first + 1]).astype(np.int64))
    return Split(name, labels, 10, FMNIST_MEAN, FMNIST_STD, images=images, classes=FMNIST_CLASSES)


def _synthetic(name, root, split, download, synthetic_size=(512, 10, 32)):
    """Random images with random labels, deterministic per split: for throughput and tests."""
    n, num_classes, size = synthetic_size
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return Split(name, torch.randint(0, num_classes, (n,), generator=g), num_classes, images=images)


def _torchvision_small(name, root, split, download):
    """CIFAR-10, CIFAR-100 and STL-10 through torchvision (its download, its checksums)."""
    from torchvision import datasets
    cifar = "the python-version archive from https://www.cs.toronto.edu/~kriz/cifar.html"
    cls, folder, how, mean, std = {
        "cifar10": (datasets.CIFAR10, "cifar-10-batches-py", cifar, CIFAR10_MEAN, CIFAR10_STD),
        "cifar100": (datasets.CIFAR100, "cifar-100-python", cifar, CIFAR100_MEAN, CIFAR100_STD),
        "stl10": (datasets.STL10, "stl10_binary", "stl10_binary.tar.gz", STL10_MEAN, STL10_STD)}[name]
    try:
        ds = (cls(root, split=split, download=download) if name == "stl10"
              else cls(root, train=split == "train", download=download))
    except Exception as e:  # offline, or a corrupt/half-extracted folder
        raise DatasetError(f"{name} not found or incomplete under {root}/{folder} ({e}); run once with network "
                           f"access, or place {how} in {root}") from None
    if name == "stl10":  # uint8 [N, 3, 96, 96] already; label -1: unlabeled
        return Split(name, torch.from_numpy(ds.labels.astype(np.int64)), 10, mean, std,
                     images=torch.from_numpy(ds.data))
    return Split(name, torch.tensor(ds.targets, dtype=torch.int64), len(ds.classes), mean, std,
                 images=torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), classes=list(ds.classes))


def _file_split(name, pairs, where, classes=None):
    """Split of (path, label) pairs; DatasetError when files are missing. With `classes` (names) labels index them,
    every split of the dataset numbered alike; without, labels are class ids renumbered 0..C-1 (DML: disjoint)."""
    missing = [p for p, _ in pairs if not os.path.isfile(p)]
    if not pairs:
        raise DatasetError(f"{name} looks incomplete: no images {where}; re-extract or re-download it")
    if missing:
        raise DatasetError(f"{name} looks incomplete: {len(missing)} of {len(pairs)} images {where} are missing "
                           f"(e.g. {missing[0]}); re-extract or re-download it")
    labels = torch.tensor([c for _, c in pairs])
    if classes is None:
        ids, labels = torch.unique(labels, return_inverse=True)
    return Split(name, labels, len(ids if classes is None else classes), paths=[p for p, _ in pairs], classes=classes)


def _lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _mat(path, key):
    """scipy.io.loadmat(path)[key] as an array; DatasetError naming the file when it cannot be read."""
    import scipy.io
    try:
        return np.atleast_1d(scipy.io.loadmat(path, squeeze_me=True)[key])
    except Exception as e:  # missing, truncated, another file
        raise DatasetError(f"cannot read '{key}' from {path} ({e}); expected the dataset's original file") from None


def _decoded(cache, pairs, size):
    """(uint8 [N, 3, size, size], labels) of the (path, label) list pairs(), decoded once (16 threads) into `cache`."""
    if not os.path.isfile(cache):
        paths, labels = zip(*pairs())
        check_images(paths, os.path.dirname(cache))
        images = torch.stack(_threaded(lambda p: read_image(p, size), paths, f"decoding {os.path.dirname(cache)}"))
        torch.save((images, torch.tensor(labels)), cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    return torch.load(cache)


def _tinyimagenet(name, root, split, download):
    """Tiny-ImageNet-200 (64 px): decoded once into a uint8 tensor cached next to the images."""
    wnids_file = _fetch(name, root, "tiny-imagenet-200/wnids.txt", download, SOURCES[name])
    base, wnids = os.path.dirname(wnids_file), _lines(wnids_file)

    def pairs():  # train/<wnid>/images/*.JPEG; val/images/*.JPEG labelled by val/val_annotations.txt
        if split == "train":
            return list(zip(*_image_folder(os.path.join(base, "train"), wnids)[:2]))
        ann = os.path.join(base, "val", "val_annotations.txt")
        if not os.path.isfile(ann):
            raise DatasetError(f"tinyimagenet looks incomplete: {ann} missing; delete {base} and run again")
        index = {w: i for i, w in enumerate(wnids)}
        return [(os.path.join(base, "val", "images", row.split()[0]), index[row.split()[1]]) for row in _lines(ann)]
    images, labels = _decoded(os.path.join(base, f"{split}_uint8.pt"), pairs, 64)
    return Split(name, labels, len(wnids), images=images)


def _cinic10(name, root, split, download):
    """CINIC-10 (Darlow et al. 2018; SP Table 7): <root>/cinic-10/{train,valid,test}/<class>/*.png (90,000 32-px
    images each), decoded once into a uint8 tensor cached beside the folders."""
    base = _fetch(name, root, f"cinic-10/{split}", download, SOURCES[name])
    classes = _subfolders(base)
    if len(classes) != 10:
        raise DatasetError(f"cinic10 looks incomplete: {len(classes)} of 10 class folders in {base}")
    images, labels = _decoded(base + "_uint8.pt", lambda: list(zip(*_image_folder(base)[:2])), 32)
    return Split(name, labels, 10, CINIC10_MEAN, CINIC10_STD, images=images, classes=classes)


def _cub(name, root, split, download):
    """CUB-200-2011: classes 1-100 train, 101-200 test (DML zero-shot protocol)."""
    base = _fetch(name, root, "CUB_200_2011/images", download, SOURCES[name])
    folders = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)) and d[:3].isdigit())
    again = f"delete {os.path.join(root, 'CUB_200_2011')} and run again"
    if len(folders) != 200:
        raise DatasetError(f"cub looks incomplete: {len(folders)} of 200 class folders in {base}; {again}")
    pairs = []
    for d in folders:
        files = sorted(f for f in os.listdir(os.path.join(base, d)) if _is_image(f))
        if not files:
            raise DatasetError(f"cub looks incomplete: {os.path.join(base, d)} has no images; {again}")
        pairs += [(os.path.join(base, d, f), int(d[:3])) for f in files if (int(d[:3]) <= 100) == (split == "train")]
    return _file_split(name, pairs, f"in {base}")


def _cars(name, root, split, download):
    """Stanford Cars, <root>/cars/cars_annos.mat + car_ims/ (16,185 images). cars (DML): class ids 1-98 train, 99-196
    test, the test flag ignored; stanfordcars (classification, ISD Table 2): all 196 classes, the test flag's split."""
    base = os.path.join(root, "cars")
    if not os.path.isfile(os.path.join(base, "cars_annos.mat")):
        raise DatasetError(f"{name} expected {base}/cars_annos.mat and {base}/car_ims/; the original host is gone: "
                           f"place cars_annos.mat and the car_ims folder there by hand")
    ann = _mat(os.path.join(base, "cars_annos.mat"), "annotations")
    rows = [(os.path.join(base, str(p)), int(c), bool(t))
            for p, c, t in zip(*(np.atleast_1d(ann[k]) for k in ("relative_im_path", "class", "test")))]
    where = f"of the {split} split under {base}/car_ims"
    if name == "cars":
        return _file_split(name, [(p, c) for p, c, _ in rows if (c <= 98) == (split == "train")], where)
    return _file_split(name, [(p, c - 1) for p, c, t in rows if t == (split == "test")], where,
                       [str(c) for c in range(1, 197)])


def _sop(name, root, split, download):
    """Stanford Online Products: Ebay_train.txt (11,318 classes) / Ebay_test.txt (11,316)."""
    listing = _fetch(name, root, f"Stanford_Online_Products/Ebay_{split}.txt", download, SOURCES[name])
    rows = [line.split() for line in _lines(listing)[1:]]  # header: image_id class_id super_class_id path
    return _file_split(name, [(os.path.join(os.path.dirname(listing), r[3]), int(r[1])) for r in rows],
                       f"listed in {listing}")


def _listed(name, root, split, download):
    """Transfer datasets of ISD Table 2 (and SP Table 5) whose text files list each split, under <root> as
    torchvision.datasets lays them out; classes numbered by sorted name (all are in every official split):
    dtd       dtd/dtd/images/<class>/<file>, labels/{train,val,test}<k>.txt, the ten partitions: lines <class>/<file>
    food101   food-101/images/<class>/<id>.jpg, meta/{train,test}.txt: lines <class>/<id>
    sun397    SUN397/<x>/<class>/<file>, Partitions/{Training,Testing}_01.txt (the first of ten): /<x>/<class>/<file>
    aircraft  fgvc-aircraft-2013b/data/images/<id>.jpg, data/images_variant_{train,val,test}.txt: <id> <variant>
    pets      oxford-iiit-pet/images/<id>.jpg, annotations/{trainval,test}.txt: <id> <class 1-37> (train: trainval)"""
    folder, listing, images = {
        "dtd": ("dtd", f"dtd/labels/{split}.txt", "dtd/images"),
        "food101": ("", f"food-101/meta/{split}.txt", "food-101/images"),
        "sun397": ("", f"SUN397/Partitions/{'Training' if split == 'train' else 'Testing'}_01.txt", "SUN397"),
        "aircraft": ("", f"fgvc-aircraft-2013b/data/images_variant_{split}.txt", "fgvc-aircraft-2013b/data/images"),
        "pets": ("oxford-iiit-pet", f"annotations/{split.replace('train', 'trainval')}.txt", "images")}[name]
    listing = _fetch(name, os.path.join(root, folder), listing, download, SOURCES[name])
    if name in ("dtd", "food101"):
        rows = [(line + (".jpg" if name == "food101" else ""), line.split("/")[0]) for line in _lines(listing)]
    elif name == "sun397":
        rows = [(line[1:], "/".join(line.split("/")[2:-1])) for line in _lines(listing)]
    else:
        rows = [(f"{r[0]}.jpg", r[1] if name == "aircraft" else int(r[1].split()[0]))
                for r in (line.split(" ", 1) for line in _lines(listing))]
    classes = list(range(1, 38)) if name == "pets" else sorted({c for _, c in rows})
    index, base = {c: i for i, c in enumerate(classes)}, os.path.join(root, folder, images)
    return _file_split(name, [(os.path.join(base, p), index[c]) for p, c in rows], f"listed in {listing}",
                       [str(c) for c in classes])


def _flowers102(name, root, split, download):
    """Oxford Flowers-102 (Nilsback & Zisserman 2008): <root>/flowers-102/jpg/image_NNNNN.jpg, imagelabels.mat (the
    class 1-102 of each image), setid.mat (trnid / valid / tstid: 1,020 / 1,020 / 6,149 image numbers)."""
    base = os.path.dirname(_fetch(name, os.path.join(root, "flowers-102"), "setid.mat", download, SOURCES[name]))
    labels = _mat(os.path.join(base, "imagelabels.mat"), "labels")
    ids = _mat(os.path.join(base, "setid.mat"), {"train": "trnid", "val": "valid", "test": "tstid"}[split])
    pairs = [(os.path.join(base, "jpg", f"image_{i:05d}.jpg"), int(labels[i - 1]) - 1) for i in ids]
    return _file_split(name, pairs, f"of setid.mat's {split} split in {base}/jpg", [str(c) for c in range(1, 103)])


def _caltech101(name, root, split, download):
    """Caltech-101 (Fei-Fei et al. 2004): <root>/caltech101/101_ObjectCategories/<class>/*.jpg. No official split: 30
    images per class train, the rest test, drawn with a fixed seed, from all 102 folders (BACKGROUND_Google kept), as
    Kornblith et al. 2019 (102 classes, 3,060 / 6,084) and BYOL did, whose transfer setting ISD follows (Sec. 4)."""
    base = _fetch(name, os.path.join(root, "caltech101"), "101_ObjectCategories", download, SOURCES[name])
    paths, labels, classes = _image_folder(base)
    out = Split(name, torch.tensor(labels), len(classes), paths=paths, classes=classes)
    train, g = torch.zeros(len(labels), dtype=torch.bool), torch.Generator().manual_seed(0)
    for c in range(len(classes)):
        members = torch.nonzero(out.labels == c).squeeze(1)
        train[members[torch.randperm(len(members), generator=g)[:30]]] = True
    return out.subset(torch.nonzero(train == (split == "train")).squeeze(1))


# Image folders: ImageNet and your own. Links are followed (each real folder once, so a link loop ends, and a link to
# another class's folder adds nothing: its images are that class's), names starting with '.' skipped (.git,
# .ipynb_checkpoints, macOS '._' files), and what is left out is said on stderr.

def _is_image(filename):
    return filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith(".")


def _entries(folder):
    try:
        return sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"cannot list {folder} ({e.strerror})") from None


def _subfolders(folder):
    return [e.name for e in _entries(folder) if e.is_dir() and not e.name.startswith(".")]


def _images_under(folder, hidden, seen):
    """(image files, other files) at any depth under `folder`, sorted, skipping the real folders in `seen` (then added
    to it); hidden folders and images go to `hidden`."""
    found, others, todo = [], [], [folder]
    seen.add(os.path.realpath(folder))
    while todo:
        for e in _entries(todo.pop()):
            if e.name.startswith(".") and (e.is_dir() or _is_image(e.name[1:])):  # a hidden folder or image
                hidden.append(e.path)
            elif e.is_dir():
                if os.path.realpath(e.path) not in seen:
                    seen.add(os.path.realpath(e.path))
                    todo.append(e.path)
            else:
                (found if _is_image(e.name) else others).append(e.path)
    return sorted(found), others


def _image_folder(base, wnids=None, unlabeled=False):
    """(paths, labels, class names) of a folder with one sub-folder per class (images at any depth; images beside the
    class folders are left out), the `wnids` ones in that order if given; or `unlabeled`, every image under it (-1)."""
    entries = [] if unlabeled else _entries(base)
    hidden = [e.path for e in entries if e.name.startswith(".") and (e.is_dir() or _is_image(e.name[1:]))]
    loose = [e.path for e in entries if not e.is_dir() and _is_image(e.name)]
    classes = wnids if wnids is not None else [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    missing = sorted(set(classes) - set(_subfolders(base)))
    if missing:
        raise DatasetError(f"{base} looks incomplete: it lacks {len(missing)} of the {len(classes)} expected class "
                           f"folders, e.g. {missing[0]}")
    seen = {os.path.realpath(os.path.join(base, c)) for c in classes}  # a link to a class folder: its class's only
    paths, others = _images_under(base, hidden, seen) if unlabeled else ([], [])
    labels = [-1] * len(paths)
    for i, c in enumerate(classes):
        found, other = _images_under(os.path.join(base, c), hidden, seen)
        if not found:
            raise DatasetError(f"class folder {os.path.join(base, c)} has no images" +
                               (f", only other files, e.g. {other[0]}" if other else ""))
        paths += found
        labels += [i] * len(found)
        others += other
    from PIL import Image
    kinds = {x for x, f in Image.registered_extensions().items() if f in Image.OPEN}  # .gif, .pgm, .jfif, .avif ...
    odd = [p for p in others if os.path.splitext(p)[1].lower() in kinds]
    types = ", ".join(sorted({os.path.splitext(p)[1].lower() for p in odd}))
    for items, noun, what in (
            (loose, "image", f"beside the class folders of {base} (only images in a class folder have a label)"),
            (hidden, "hidden item", "(names starting with '.')"),
            (odd, "image file", f"of a type not read here ({types}; convert to {', '.join(IMAGE_EXTENSIONS)})")):
        if items:
            print(f"note: left out {len(items):,} {noun}{'' if len(items) == 1 else 's'} {what}, e.g. {items[0]}",
                  file=sys.stderr)
    return paths, labels, classes


def _imagenet(name, root, split, download):
    """ImageNet-1k or the CMC ImageNet-100 subset: user-placed train/<wnid>/, val/<wnid>/. train_1pct / train_10pct:
    the SimCLR labelled subsets (ISD Table 3), the train images that <root>/imagenet/{1,10}percent.txt lists (a file
    name a line; downloaded from google-research/simclr when absent)."""
    if split.startswith("train_"):
        listing = _fetch(name, os.path.join(root, "imagenet"), f"{split[6:-3]}percent.txt", download,
                         SOURCES[f"imagenet_{split[6:]}"])
    subset, split = split.startswith("train_"), "val" if split == "test" else split.split("_")[0]  # train_*: train/
    base, wnids = os.path.join(root, name, split), None
    if name == "imagenet100" and not os.path.isdir(base):  # take the subset from a full ImageNet
        base, wnids = os.path.join(root, "imagenet", split), sorted(IMAGENET100_WNIDS)
    if not os.path.isdir(base):
        raise DatasetError(f"{name} expected {base}/<wnid>/*.JPEG (ImageNet cannot be downloaded "
                           f"automatically; place train/ and val/ with class sub-folders there; "
                           f"sort val images into folders with the usual valprep.sh)")
    paths, labels, classes = ([], [], _subfolders(base)) if subset else _image_folder(base, wnids)
    expected = 100 if name == "imagenet100" else 1000
    if len(classes) != expected:
        raise DatasetError(f"{name} looks incomplete: {len(classes)} of {expected} class folders in {base}")
    if subset:
        index = {c: i for i, c in enumerate(classes)}
        pairs = [(os.path.join(base, f.split("_")[0], f), index.get(f.split("_")[0], -1)) for f in _lines(listing)]
        return _file_split(name, pairs, f"listed in {listing}", classes)
    return Split(name, torch.tensor(labels), len(classes), paths=paths, classes=classes)


def _folder(name, root, split, download):
    """Your own images, DIR = --data-root: 'train' / 'test' DIR/train, DIR/test (or DIR/val) with class folders;
    'dml_train' / 'dml_test' those, else the first / second half of DIR's sorted class folders (as CUB/CARS);
    'all' DIR itself by its class folders or, when DIR holds images itself, unlabeled (labels -1): then every image
    under DIR, sub-folders too, so that none is lost (a note says so if there are sub-folders)."""
    if not os.path.isdir(root):
        raise DatasetError(f"--dataset folder: --data-root {root} is not a folder of images")
    sub = split.removeprefix("dml_")
    folders = [os.path.join(root, s) for s in ((sub,) if sub == "train" else ("test", "val"))]
    folder = root if split == "all" else next((f for f in folders if os.path.isdir(f)), None)
    if folder is None and not split.startswith("dml"):
        raise DatasetError(f"--dataset folder: expected {' or '.join(folders)} with one sub-folder per class")
    wnids, train = None, os.path.join(root, "train")
    if split == "test" and os.path.isdir(train):  # number test classes as train's, by name
        wnids, extra = _subfolders(train), sorted(set(_subfolders(folder)) - set(_subfolders(train)))
        if extra:
            raise DatasetError(f"--dataset folder: {folder} has class folder(s) that {train} lacks, "
                               f"e.g. {extra[0]}: test classes must be training classes")
    halves, folder = folder is None, folder or root  # halves: a dml split of one labelled folder
    flat = split == "all" and any(not e.is_dir() and _is_image(e.name) for e in _entries(root))
    if flat and _subfolders(root):
        print(f"note: {root} holds images beside sub-folders: split 'all' reads it unlabeled, every image under it",
              file=sys.stderr)
    paths, labels, classes = _image_folder(folder, wnids, unlabeled=flat)
    if not paths:
        raise DatasetError(f"--dataset folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    labels = torch.tensor(labels, dtype=torch.int64)
    if halves:  # class-disjoint halves
        if len(classes) < 4:
            raise DatasetError(f"--dataset folder: {root} has {len(classes)} class folder(s); the class-disjoint "
                               f"split (first half train, second half test) needs at least 4")
        half, first = len(classes) // 2, split == "dml_train"
        keep = (labels < half) == first
        paths, labels = [p for p, k in zip(paths, keep) if k], labels[keep] - (0 if first else half)
        classes = classes[:half] if first else classes[half:]
    if split.startswith("dml") and (torch.bincount(labels, minlength=len(classes)) < 2).any():
        raise DatasetError(f"--dataset folder: class '{classes[int(torch.bincount(labels).argmin())]}' has one "
                           f"image; deep metric learning needs at least 2 per class")
    if split != "all" and len(classes) < 2:
        raise DatasetError(f"--dataset folder: {split} needs at least 2 classes, found {len(classes)} under {folder}")
    return Split(name, labels, len(classes), paths=paths, classes=classes)


# ----------------------------------------------------------------------------------------------
# The order of one epoch: a pure function of (seed, epoch), so every rank agrees on it without
# communication and a run resumed at batch b of an epoch skips exactly b.

def epoch_batches(labels, batch_size, seed, epoch, rank=0, world=1, drop_last=False, samples_per_class=None):
    """This rank's index batches (CPU LongTensors) of one epoch: slice `rank` of `world` equal slices (batch_size
    divides by world) of each global batch of a permutation padded by wrapping around (as DistributedSampler;
    drop_last drops a short last batch), or with samples_per_class of class_balanced_batches' len // batch_size."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if samples_per_class:
        batches = list(class_balanced_batches(labels, batch_size // samples_per_class, samples_per_class, generator=g))
    else:
        order = torch.randperm(len(labels), generator=g)
        order = torch.cat([order, order[:(-len(order)) % world]])
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        batches = list(order[:stop].split(batch_size))
    return [b.reshape(world, -1)[rank] for b in batches]


def class_balanced_batches(labels, classes_per_batch, samples_per_class, num_batches=None, generator=None):
    """[num_batches, classes_per_batch * samples_per_class] indices, the DML sampler of the released S2SD code
    (datasampler/class_random_sampler.py): classes uniformly WITH replacement, then images of each WITH
    replacement; len(labels) // batch_size batches by default."""
    labels = torch.as_tensor(labels).cpu()
    batch = classes_per_batch * samples_per_class
    num_batches = len(labels) // batch if num_batches is None else num_batches
    order = torch.argsort(labels, stable=True)                 # indices grouped by class
    classes, counts = torch.unique(labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    cls = torch.randint(len(classes), (num_batches, classes_per_batch, 1), generator=generator)
    offset = (torch.rand(num_batches, classes_per_batch, samples_per_class, generator=generator)
              * counts[cls]).long().clamp_max(counts[cls] - 1)
    return order[starts[cls] + offset].reshape(num_batches, batch)


# ----------------------------------------------------------------------------------------------
# Small images: the uint8 dataset on the device, whole batches augmented there: uint8 or float [B, C, H, W]
# in, float32 in [0, 1] out, drawn from the device's global RNG (a seeded step draws the same views).

def _float(x):
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def random_hflip(x, p=0.5):
    """Flip each image horizontally with probability p."""
    x = _float(x)
    return torch.where((torch.rand(x.shape[0], device=x.device) < p)[:, None, None, None], x.flip(3), x)


def random_crop_flip(x, padding=4, padding_mode="constant"):
    """RandomCrop(H, padding) + flip; zero padding (RepDistiller CIFAR-100) or "reflect" (WRN CIFAR-10)."""
    x = _float(x)
    b, _, h, w = x.shape
    xp = F.pad(x, (padding,) * 4, mode=padding_mode)
    oy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device) + torch.arange(h, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device) + torch.arange(w, device=x.device)
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, oy[:, :, None], ox[:, None, :]]
    return random_hflip(out.permute(0, 3, 1, 2))


def random_resized_crop(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop (10 draws per image, the first that fits, else the whole image) for a
    batch: one bilinear grid_sample, no antialiasing."""
    x = _float(x)
    (b, _, h, w), dev = x.shape, x.device
    area = torch.empty(b, 10, device=dev).uniform_(*scale)
    log_r = torch.empty(b, 10, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    cw = torch.sqrt(area * torch.exp(log_r)) * math.sqrt(h / w)  # crop width / image width
    ch = torch.sqrt(area / torch.exp(log_r)) * math.sqrt(w / h)  # crop height / image height
    ok = (cw <= 1) & (ch <= 1)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)
    cw, ch = (torch.where(ok.any(1), c.gather(1, first).squeeze(1), 1.0) for c in (cw, ch))
    cx = (torch.rand(b, device=dev) * (1 - cw) + cw / 2) * 2 - 1  # crop centre in [-1, 1]
    cy = (torch.rand(b, device=dev) * (1 - ch) + ch / 2) * 2 - 1
    theta = torch.stack([cw, torch.zeros_like(cw), cx, torch.zeros_like(cw), ch, cy], 1).view(b, 2, 3)
    size = (size, size) if isinstance(size, int) else tuple(size)
    grid = F.affine_grid(theta, (b, x.shape[1], *size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x):
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8):
    """ColorJitter with probability p per image (MoCo-v2 views): factors per image as torchvision, but the
    fixed order brightness, contrast, saturation, hue instead of a random one."""
    x = _float(x)
    b, dev = x.shape[0], x.device

    def blend(img, ref, s):  # ref + f (img - ref), f ~ U[max(0, 1 - s), 1 + s] per image
        return ((img - ref) * torch.empty(b, 1, 1, 1, device=dev).uniform_(max(0.0, 1 - s), 1 + s) + ref).clamp(0, 1)
    out = blend(x, 0.0, brightness)
    out = blend(out, _gray(out).mean(dim=(1, 2, 3), keepdim=True), contrast)
    if x.shape[1] == 3:
        out = blend(out, _gray(out), saturation)
        hsv = _rgb_to_hsv(out)
        shift = torch.empty(b, 1, 1, device=dev).uniform_(-hue, hue)
        out = _hsv_to_rgb(torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)).clamp(0, 1)
    return torch.where((torch.rand(b, device=dev) < p)[:, None, None, None], out, x)


def random_grayscale(x, p=0.2):
    """Replace each image by its luminance (kept 3-channel) with probability p."""
    x = _float(x)
    return torch.where((torch.rand(x.shape[0], device=x.device) < p)[:, None, None, None], _gray(x).expand_as(x), x)


def normalize(x, mean, std):
    """(x - mean) / std per channel; uint8 input is first scaled to [0, 1]."""
    x = _float(x)
    mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) for v in (mean, std))
    return (x - mean) / std


def resize(x, size):
    """Bilinear resize (antialiased when shrinking) to size x size; returns float in [0, 1]."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(_float(x), size=size, mode="bilinear", align_corners=False, antialias=True)


# ----------------------------------------------------------------------------------------------
# Image files: DataLoader workers with pinned memory, and the papers' torchvision transforms.

def dml_train_transform(size=224, min_scale=0.08):
    """S2SD / Revisiting-DML training view (also torchvision's ImageNet recipe): RandomResizedCrop, flip."""
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the shorter side, centre crop, normalise."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])


def moco_v2_transform(size=224, strong=True, scale=(0.2, 1.0)):
    """MoCo-v2 augmentation (strong) or its weak counterpart: RandomResizedCrop(0.2-1) + flip."""
    from torchvision import transforms as T
    ops = [T.RandomResizedCrop(size, scale=scale)]
    if strong:
        ops += [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5)]
    return T.Compose(ops + [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TwoViews:
    """A picklable transform returning (first(img), second(img)): the two SSL views."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, img):
        return self.first(img), self.second(img)


def _to_rgb(im):
    """8-bit RGB of a PIL image of any mode: PIL's conversion for 1, L, P, CMYK, YCbCr, LAB, HSV; alpha (LA, PA, RGBA)
    dropped, the colours kept (not composited), as torchvision's loader does. Deeper modes are scaled where convert
    would clip: 16-bit ones (I;16, I;16B, I;16L) by v / 257 (an 8-bit image x 257 comes back exactly); I (int32) and
    F (float) state no range: the first of [0, 1] (F only), [0, 255], [0, 65535] holding all their values, else their
    own min..max (an older Pillow reads a 16-bit PNG as I: v / 257 too, unless all its values are <= 255: then v)."""
    from PIL import Image
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        ranges = [65535] if im.mode.startswith("I;16") else ([1] if im.mode == "F" else []) + [255, 65535]
        top = next((r for r in ranges if a.min() >= 0 and a.max() <= r), None)
        a = a / top if top else (a - a.min()) / max(a.max() - a.min(), 1e-12)
        im = Image.fromarray(np.round(a * 255).astype(np.uint8))
    return im.convert("RGB")


_NAMED_BOMBS, _BOMB_LOCK = set(), threading.Lock()


def _open_image(path):
    """PIL's lazy Image.open(path), past its decompression-bomb limit too (Image.MAX_IMAGE_PIXELS, against crafted
    files from the web; over it PIL warns, over twice it refuses): an image in the user's own data is opened anyway
    and named on stderr, once per process."""
    from PIL import Image
    with _BOMB_LOCK:  # PIL's own warning names no file: off (again, if a catch_warnings block dropped the filter)
        if not any(f[2] is Image.DecompressionBombWarning for f in warnings.filters):
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        limit = Image.MAX_IMAGE_PIXELS
    try:
        im = Image.open(path)
    except Image.DecompressionBombError:
        with _BOMB_LOCK:  # the limit lifted for this file (a thread opening another meanwhile skips the check too)
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    if limit and im.width * im.height > limit and path not in _NAMED_BOMBS:
        _NAMED_BOMBS.add(path)
        print(f"note: {path} is {im.width} x {im.height} pixels, over PIL's decompression-bomb limit of {limit:,}: "
              f"opened anyway, it is in your data", file=sys.stderr)
    return im


def open_rgb(path):
    """The 8-bit RGB PIL image of a file (_to_rgb); DatasetError naming the file when it is not a readable image."""
    try:
        with _open_image(path) as im:
            return _to_rgb(im)
    except (OSError, SyntaxError, ValueError) as e:  # not an image, truncated, corrupt
        raise DatasetError(f"unreadable image {path} ({e}); delete or replace it") from None


def check_images(paths, what):
    """Open each image file of a split once before training (PIL reads the header, no pixels) to find every empty,
    non-image or unreadable file now, not when the sampler draws it: one DatasetError line with their count and the
    first three (a truncated file passes: decoding names it). Files that pass are remembered by (size, mtime) in a JSON
    file per dataset folder under $SIMDISTILL_CACHE (default ~/.cache/simdistill, never the data folder): a later run
    only stats them. Measured on 20,000 page-cached JPEGs (2 busy cores): 50 us per new file, 10 us per known one; for
    ImageNet's 1.28M files about a minute plus the disk reads, once, then seconds (an 80 MB cache file)."""
    from PIL import Image
    top = os.path.dirname(os.path.commonprefix(paths))  # a folder above every file: the cache's key
    cache = os.path.join(os.environ.get("SIMDISTILL_CACHE") or os.path.expanduser("~/.cache/simdistill"),
                         hashlib.md5(os.path.abspath(top).encode()).hexdigest() + ".json")
    try:
        with open(cache) as f:
            known = json.load(f)  # path under top -> "size mtime_ns"
    except (OSError, ValueError):
        known = {}

    def stamp_or_fault(path):
        try:
            st = os.stat(path)
            if st.st_size and known.get(path[len(top):]) != f"{st.st_size} {st.st_mtime_ns}":
                _open_image(path).close()
            return (f"{st.st_size} {st.st_mtime_ns}", None) if st.st_size else (None, "0 bytes")
        except Image.UnidentifiedImageError:
            return None, "not an image PIL can read"
        except (OSError, SyntaxError, ValueError) as e:
            return None, str(e)
    results = _threaded(stamp_or_fault, paths, f"checking the image files of {what}")
    fresh = {p[len(top):]: s for p, (s, _) in zip(paths, results) if s and known.get(p[len(top):]) != s}
    try:
        if fresh:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(f"{cache}.{os.getpid()}", "w") as f:
                json.dump(known | fresh, f)
            os.replace(f"{cache}.{os.getpid()}", cache)
    except OSError:  # a read-only home: all checked again next time
        pass
    bad = [f"{p} ({fault})" for p, (_, fault) in zip(paths, results) if fault]
    if bad:
        raise DatasetError(f"{len(bad):,} of the {len(paths):,} image files of {what} are unreadable images: "
                           f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; delete or replace them")


def _threaded(fn, items, what):
    """[fn(x) for x in items] on 16 threads (file reads and PIL's decoders release the GIL), with a progress line on
    stderr once it takes over 3 s."""
    out, start, shown = [], time.time(), 0.0
    with ThreadPoolExecutor(16) as pool:
        for part in pool.map(lambda i: [fn(x) for x in items[i:i + 256]], range(0, len(items), 256)):
            out += part
            if time.time() - start > 3 and time.time() - shown > 1:
                shown = time.time()
                print(f"\r{what}: {len(out):,} / {len(items):,}", end="", file=sys.stderr, flush=True)
    if shown:
        print(file=sys.stderr)
    return out


def read_image(path, size=None):
    """uint8 [3, H, W] of an image file (resized to size x size if given); DatasetError naming the file."""
    from PIL import Image
    im = open_rgb(path)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageFiles(torch.utils.data.Dataset):
    """(transform(RGB image), label) of image files, indexed by i or (i, seed): the seed draws the transform, so a
    view does not depend on the worker. An unreadable file gives label -2 - i, which loader_batches turns into
    an error naming it (raised in a worker it would reach the user as a worker traceback)."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, [int(v) for v in labels], transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        from PIL import Image
        i, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            torch.manual_seed(seed)
        try:
            img, label = open_rgb(self.paths[i]), self.labels[i]
        except DatasetError:
            img, label = Image.new("RGB", (256, 256)), -2 - i
        return self.transform(img), label


def make_loader(dataset, workers=4):
    """DataLoader over ImageFiles with persistent workers, pinned on CUDA. Its batch sampler is a list that
    loader_batches refills (iterated in the main process, so persistent workers see the new batches)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=[], num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)


def loader_batches(loader, batches, device, seed=None, first=0):
    """(x, y) on `device` per index batch through make_loader's `loader`; with `seed`, item k of batch first + j
    is augmented from its own seed (the same views for any worker count and after a resume at batch `first`)."""
    loader.batch_sampler[:] = [[(int(i), None if seed is None else hash((seed, first + j, k)) % 2**63)
                                for k, i in enumerate(b)] for j, b in enumerate(batches)]
    for x, y in loader:
        if int(y.min()) < -1:
            path = loader.dataset.paths[-2 - int(y.min())]
            read_image(path)  # raises DatasetError with the reason
            raise DatasetError(f"could not read {path} in a DataLoader worker; check the file")
        yield ((tuple(v.to(device, non_blocking=True) for v in x) if isinstance(x, (tuple, list))
                else x.to(device, non_blocking=True)), y.to(device, non_blocking=True))


@torch.no_grad()
def embed(fn, split, device, batch_size=256, flip_average=False, workers=4, transform=None):
    """(out0, [out1, ...], labels), float32 on `device`, of `fn` (a tensor or a tuple; eval mode and fp32 are the
    caller's) over a split in order, batches normalised by `transform` (default: the split's mean / std; for files
    eval_transform()). flip_average: output 0 averaged with the flipped image's (CAMD protocol; normalise after)."""
    chunks = list(torch.arange(len(split)).split(batch_size))
    if split.images is not None:
        prep = transform or (lambda u: normalize(u, split.mean, split.std))
        batches = (prep(split.images[c].to(device, non_blocking=True)) for c in chunks)
    else:
        loader = make_loader(ImageFiles(split.paths, split.labels, transform or eval_transform()), workers)
        batches = (x for x, _ in loader_batches(loader, chunks, device))
    outs = []
    for x in batches:
        out = fn(x)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        if flip_average:
            flipped = fn(x.flip(3))
            out[0] = (out[0].float() + (flipped[0] if isinstance(flipped, (tuple, list)) else flipped).float()) / 2
        outs.append([o.float() for o in out])
    return (*[torch.cat(o) for o in zip(*outs)], split.labels.to(device))


# ----------------------------------------------------------------------------------------------
# Metrics

# A candidate is one int64 key = (order-preserving bits of its float32 distance, gallery index): "smallest k
# keys" is exactly "first k by (distance, index)", no tie is left to topk. Distances come in blocks from one
# matrix product; a block is reduced by vectorised passes (min over strided column groups, compare with each
# row's current k-th distance) and only the entries that can still enter a row's top k are gathered and merged.

_GROUP = 8  # columns per group (see _candidates)
_EMPTY = (0x7F800000 << 32) | 0xFFFFFFFF       # key of (+inf, largest index): "no candidate yet"
_SQUARE, _ROWS, _COLS = 2048, 1024, 4096   # CPU block shapes (floats): self search, other search


def _keys(val, idx):
    """int64 keys ordered as (val, idx); val float32 (not NaN), idx < 2**32."""
    bits = (val + 0.0).view(torch.int32)        # + 0.0 turns -0.0 into +0.0 (they compare equal)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)   # negative floats: reverse their order
    return (bits.long() << 32) | idx


def _augment(x, n_pad, left):
    """Rows [x, ||x||^2, 1] (left) or [-2x, 1, ||x||^2] (right), so left_i . right_j = ||x_i - x_j||^2, padded to
    n_pad rows with ||.||^2 = inf (at distance +inf from everything)."""
    sq, one = (x * x).sum(1, keepdim=True), torch.ones(len(x), 1, device=x.device)
    pad = torch.zeros(n_pad - len(x), x.shape[1] + 2, device=x.device)
    pad[:, -2:] = torch.tensor([float("inf"), 1.0] if left else [1.0, float("inf")], device=x.device)
    return torch.cat([torch.cat([x, sq, one] if left else [-2 * x, one, sq], 1), pad])


def _candidates(d, tau, s, col0, grouped_rows=False):
    """(row, key) of the entries of block d [R, W] (of d.T when grouped_rows) <= tau[row], rows sorted: only the
    strided column groups (c in group c mod W/s) whose minimum is <= tau are gathered (d is read twice, not sorted)."""
    n_items = d.shape[0] if grouped_rows else d.shape[1]
    m = n_items // s
    # group minima; when the queries are the columns of d, a min over row groups (a faster, outer-dim pass)
    g = d.view(s, m, d.shape[1]).amin(0).T if grouped_rows else d.view(d.shape[0], s, m).amin(1)
    rows, grp = (g <= tau[:, None]).nonzero(as_tuple=True)         # sorted by row
    cols = grp[:, None] + m * torch.arange(s, device=d.device)     # [candidate groups, s]
    flat = cols * d.shape[1] + rows[:, None] if grouped_rows else rows[:, None] * n_items + cols
    val = d.view(-1)[flat]
    c, t = (val <= tau[rows, None]).nonzero(as_tuple=True)
    return rows[c], _keys(val[c, t], cols[c, t] + col0)


def _merge(run, rows, keys):
    """The k smallest keys per row of run [R, k] and new (row, key) pairs; `rows` sorted (as nonzero gives)."""
    if rows.numel() == 0:
        return run
    n, k = run.shape
    counts = torch.bincount(rows, minlength=n)
    start = torch.cumsum(counts, 0) - counts
    buf = torch.full((n, k + int(counts.max())), _EMPTY, dtype=torch.long, device=run.device)
    buf[:, :k] = run
    buf[rows, k + torch.arange(rows.numel(), device=rows.device) - start[rows]] = keys
    return buf.topk(k, dim=1, largest=False, sorted=False).values


def _block_size(n, device, what="square"):
    """Block side for `n` items, a multiple of 64. CPU: 4M floats (16 MB), 2048 x 2048 for a self search, else
    1024 query rows x 4096 columns (a row's k-th distance, which filters later blocks, is tight sooner); GPU 4x."""
    p = {"square": _SQUARE, "rows": _ROWS, "cols": _COLS}[what] * (4 if torch.device(device).type == "cuda" else 1)
    return math.ceil(n / max(1, math.ceil(n / p)) / 64) * 64


def _nearest(query, gallery, k, exclude_self):
    """Indices [Nq, k] of the k nearest gallery items by exact float32 squared distance, ties to the lower index,
    query i excluded BY INDEX when `exclude_self`; k clipped to the candidates; memory O(block + N k). A row's
    first block is filtered by its k-th smallest group minimum, later ones by its k-th distance so far. A self
    search computes each block X_I X_J^T (I <= J, diagonal first) once, for rows I and rows J."""
    query, gallery = query.float(), gallery.float()
    n_q, n_g, dev = query.shape[0], gallery.shape[0], query.device
    k = max(0, min(k, n_g - (1 if exclude_self else 0)))
    if k == 0 or n_q == 0:
        return torch.empty(n_q, k, dtype=torch.long, device=dev)
    symmetric = exclude_self and (query is gallery or (query.shape == gallery.shape and torch.equal(query, gallery)))
    pq, pg = ([_block_size(n_q, dev)] * 2 if symmetric
              else [_block_size(n_q, dev, "rows"), _block_size(n_g, dev, "cols")])
    s = min(_GROUP, 2 ** int(math.log2(max(1, pg // (4 * k)))), pg & -pg)   # >= 4k groups; s divides pg
    nbq, nbg = math.ceil(n_q / pq), math.ceil(n_g / pg)
    left, right = _augment(query, nbq * pq, left=True), _augment(gallery, nbg * pg, left=False)
    run = torch.full((nbq * pq, k), _EMPTY, dtype=torch.long, device=dev)
    pad_rows = torch.arange(nbq * pq, device=dev) >= n_q   # padding rows (all distances +inf) take no candidates
    buf = torch.empty(pq, pg, device=dev)      # reused: a fresh 16 MB block costs page faults
    blocks = ([(i, i) for i in range(nbq)] + [(i, j) for i in range(nbq) for j in range(i + 1, nbg)] if symmetric
              else [(i, j) for i in range(nbq) for j in range(nbg)])
    for i, j in blocks:
        d = torch.mm(left[i * pq:(i + 1) * pq], right[j * pg:(j + 1) * pg].T, out=buf)
        lo, hi = max(i * pq, j * pg), min((i + 1) * pq, (j + 1) * pg)
        if exclude_self and lo < hi:   # global row r meets column r here for r in [lo, hi)
            r = torch.arange(lo, hi, device=dev)
            d[r - i * pq, r - j * pg] = float("inf")
        for rows, col0, transposed in [(i, j * pg, False)] + ([(j, i * pq, True)] if symmetric and i != j else []):
            rs = slice(rows * pq, (rows + 1) * pq)
            bits = (run[rs].amax(1) >> 32).int()    # the k-th distance so far (+inf before k candidates)
            tau = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32)
            tau.masked_fill_(pad_rows[rs], -math.inf)
            if not transposed and j == (i if symmetric else 0) and pg // s >= k:   # the first block of rows i
                tau = torch.minimum(tau, d.view(pq, s, pg // s).amin(1).kthvalue(k, dim=1).values)
            run[rs] = _merge(run[rs], *_candidates(d, tau, s, col0, grouped_rows=transposed))
    return run[:n_q].sort(dim=1).values & 0xFFFFFFFF


def _same_class_counts(labels):
    """For each item, how many OTHER items share its label."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] - 1


def _finite(*tensors):
    """False when an embedding is NaN or inf (a diverged model): its metrics are then NaN, never a ranking of NaNs."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def collapsed(emb, tol=1e-3):
    """True when every embedding lies within tol (relative to their mean norm) of their mean: a diverged or dead model
    maps all images to one point, and its metrics are chance, not a result (the scripts say so beside them)."""
    emb = emb.float()
    return bool((emb - emb.mean(0)).norm(dim=1).max() <= tol * emb.norm(dim=1).mean()) if len(emb) > 1 else False


def _retrieval(emb, labels, ks, with_map):
    """({k: Recall@k}, MAP@R or None), fractions from one search. Recall@k: a same-label item among the k nearest
    (none for a class of one). MAP@R (Musgrave et al., 2020): mean over queries with R = #other same-label
    items >= 1 of (1/R) sum_{i<=R} P(i) rel(i)."""
    labels = labels.to(emb.device)
    r = _same_class_counts(labels)
    need = max(max(ks, default=0), int(r.max().item()) if with_map else 0)
    rel = labels[_nearest(emb, emb, need, exclude_self=True)] == labels[:, None]
    recall = {k: rel[:, :k].any(1).double().mean().item() for k in ks}
    if not with_map or not (r > 0).any():
        return recall, 0.0 if with_map else None
    rel = rel.float()
    pos = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float32)
    ap = (torch.cumsum(rel, 1) / pos * rel * (pos[None, :] <= r[:, None])).sum(1) / r.clamp_min(1)
    return recall, ap[r > 0].double().mean().item()


def recall_at_k(emb, labels, ks=(1, 2, 4, 8)):
    """Recall@k, self excluded (see _retrieval)."""
    return _retrieval(emb, labels, ks, False)[0] if _finite(emb) else dict.fromkeys(ks, math.nan)


def map_at_r(emb, labels):
    """MAP@R (see _retrieval); 0 when no class has two members."""
    if len(labels) == 0 or int(_same_class_counts(labels).max().item()) == 0:
        return 0.0
    return _retrieval(emb, labels, (), True)[1] if _finite(emb) else math.nan


# NMI: faiss's k-means as the papers ran it (see nmi), its Lloyd steps sped up exactly by Yinyang bounds (_lloyd).

def _two_smallest(t):
    """(index of the first minimum, minimum, second smallest) of each row of t [R, S] (+inf when S = 1)."""
    val, idx = t.min(1)
    return idx, val, t.scatter(1, idx[:, None], math.inf).amin(1)


def _search(x, centroids, m, need):
    """Per row i of x, over the groups where need[i] (all, or a few): (c, ||c||^2 - 2 x_i . c, [m] each searched
    group's minimum without c, else +inf), c the first minimum. All groups: blocks of 1024 rows, one product each,
    laid out member-major (group minima in one vectorised pass); a few: a product per group with its rows."""
    dev, s, pad = x.device, -(-len(centroids) // m), -len(centroids) % m
    bias = F.pad((centroids * centroids).sum(1), (0, pad), value=math.inf).view(m, s)     # padding never wins
    grouped = F.pad(centroids, (0, 0, 0, pad)).view(m, s, -1)
    c_t, bias_t = grouped.transpose(0, 1).reshape(s * m, -1).T, bias.T.reshape(-1)
    groups = torch.full(need.shape, math.inf, device=dev)
    best, score = torch.empty(len(x), dtype=torch.long, device=dev), torch.empty(len(x), device=dev)
    dense = need.all(1)
    buf = torch.empty(min(1024, len(x)), s * m, device=dev)    # reused: fresh blocks cost page faults
    for rows in dense.nonzero().squeeze(1).split(1024):
        d = torch.addmm(bias_t, x[rows], c_t, alpha=-2, out=buf[:len(rows)]).view(-1, s, m)
        r, g_min = torch.arange(len(rows), device=dev), d.amin(1)
        g = g_min.argmin(1)
        pos, score[rows], g_min[r, g] = _two_smallest(d[r, :, g])    # inside the best group
        groups[rows], best[rows] = g_min, g * s + pos
    grp, row = (need & ~dense[:, None]).T.nonzero(as_tuple=True)     # (group, row) pairs, by group
    tiles = [_two_smallest(torch.addmm(bias[g], x[r], grouped[g].T, alpha=-2))
             for g, r in enumerate(row.split(torch.bincount(grp, minlength=m).tolist()))]
    pos, first, second = (torch.cat(t) for t in zip(*tiles))
    key = _keys(first, pos + grp * s)
    win = key == torch.full((len(x),), _EMPTY, device=dev).scatter_reduce_(0, row, key, "amin")[row]
    groups[row, grp] = torch.where(win, second, first)
    best[row[win]], score[row[win]] = key[win] & 0xFFFFFFFF, first[win]
    return best, score, groups


def _split_empty(centroids, counts, gen):
    """faiss's split_clusters (Clustering.cpp) -> (centroids, counts): each empty cluster in turn copies one drawn
    with probability ~ (size - 1), the two pushed apart by a relative +-1/1024 (alternating), and half its count."""
    counts = counts.double().cpu()
    push = (1 - 2 * (torch.arange(centroids.shape[1], device=centroids.device) % 2)) / 1024
    for ci in (counts == 0).nonzero().flatten().tolist():
        cj = int(torch.multinomial((counts - 1).clamp_min(0), 1, generator=gen))
        centroids[ci], centroids[cj] = centroids[cj] * (1 + push), centroids[cj] * (1 - push)
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
    return centroids, counts


def _lloyd(x, k, seed=0, niter=20):
    """faiss Clustering's k-means, then a search of its centroids -> (that assignment, the exact k-means objective of
    each assignment, float64). Start: the first k points of a seeded permutation; niter times: each point to its nearest
    centroid (squared L2, ties to the lower index), centroids := means (float64 sums in a fixed order: also
    deterministic on a GPU), empty clusters split. An unchanged assignment is a fixed point: stop (faiss >= 1.14 too).
    Yinyang bounds (Ding et al., ICML 2015), centroids in m = 16 ceil(k / 1024) groups (16 up to k = 1024, then ~k / 64)
    of S consecutive indices: upper >= distance to the own centroid, lower[g] <= to the others of group g, moved by the
    drifts. A float32 score is within E = 8 (d + 1) 2^-24 max ||x||^2 of the exact one; each bound carries sqrt(E) (far
    above the drifts' rounding), so a point not searched beats every other centroid by > 2E: float32 keeps it too."""
    x = x.float()
    (n, dim), dev, m = x.shape, x.device, 16 * -(-k // 1024)
    gen = torch.Generator().manual_seed(seed)
    centroids, x_sq, x64 = x[torch.randperm(n, generator=gen)[:k].to(dev)], (x * x).sum(1), x.double()
    err, sq_total = 8 * (dim + 1) * 2.0 ** -24 * float(x_sq.max()), (x64 ** 2).sum()
    assign, objectives, split = torch.zeros(n, dtype=torch.long, device=dev), [], False
    upper, lower = torch.full((n,), math.inf, device=dev), torch.zeros(n, m, device=dev)
    for it in range(niter + 1):
        lower_min = lower.amin(1)
        todo = (upper > lower_min).nonzero().squeeze(1)
        upper[todo] = ((x[todo] - centroids[assign[todo]]) ** 2).sum(1).add_(err).sqrt_() + err ** 0.5
        todo = todo[upper[todo] > lower_min[todo]]
        old = lower[todo]
        need = old < upper[todo, None]               # groups that may hold a nearer centroid, and the own group
        need[torch.arange(len(todo), device=dev), assign[todo] // -(-k // m)] = True
        need[need.sum(1) > m // 8] = True            # then one dense product: ~2x cheaper per score
        c, score, groups = _search(x[todo], centroids, m, need)
        moved, assign[todo] = bool((c != assign[todo]).any()), c
        upper[todo] = (score + x_sq[todo] + err).clamp_min_(0).sqrt_() + err ** 0.5
        lower[todo] = torch.where(need, (groups + x_sq[todo, None] - err).clamp_min_(0).sqrt_() - err ** 0.5, old)
        counts = torch.bincount(assign, minlength=k)
        if dev.type == "cpu":
            sums = torch.zeros(k, dim, dtype=torch.float64).index_add_(0, assign, x64)
        else:                                        # index_add_ adds in no fixed order there: prefix sums
            prefix = F.pad(torch.cumsum(x64[torch.argsort(assign, stable=True)], 0), (0, 0, 1, 0))
            sums = prefix[counts.cumsum(0)] - prefix[counts.cumsum(0) - counts]
        objectives.append(sq_total - ((sums * sums).sum(1) / counts.clamp_min(1)).sum())
        if it == niter or (it > 0 and not moved and not split):
            break
        new, split = (sums / counts.clamp_min(1)[:, None]).float(), bool((counts == 0).any())
        new = _split_empty(new, counts, gen)[0] if split else new
        drift = (new - centroids).norm(dim=1)
        upper += drift[assign]
        lower -= F.pad(drift, (0, -k % m)).view(m, -1).amax(1)
        centroids = new
    return assign, torch.stack(objectives)


def nmi(emb, labels, seed=0):
    """The papers' NMI: sklearn's normalized_mutual_info_score of the labels and the clusters of faiss.Clustering(d,
    k = #labels) with niter 20, min_points_per_centroid 1, then a search of its centroids (Revisiting-DML, S2SD's
    code: metrics/__init__.py, nmi.py; pytorch-metric-learning's AccuracyCalculator, FaissKMeans(niter=20), whose
    subsampling beyond 256 k points never happens on CUB, Cars, SOP, In-Shop). The start is random: NMI varies with
    the seed (ours draws with torch, not faiss's RNG; tested within sklearn Lloyd's spread). NaN if not finite."""
    from sklearn.metrics import normalized_mutual_info_score
    if not _finite(emb):
        return math.nan
    assign = _lloyd(emb, int(torch.unique(labels).numel()), seed=seed)[0]
    return float(normalized_mutual_info_score(labels.cpu().numpy(), assign.cpu().numpy()))


def knn_accuracy(train_emb, train_labels, test_emb, test_labels, k=20, weighted=False, temperature=0.1):
    """k-NN accuracy of test against train items (Euclidean, no self-exclusion): majority vote, ties to the smaller
    label (as sklearn), or votes exp(cos / temperature) (the InstDisc / SSL-library monitor, k = 200, T = 0.1)."""
    if not _finite(train_emb, test_emb):
        return math.nan
    dev = test_emb.device
    train_emb, train_labels, test_labels = train_emb.to(dev).float(), train_labels.to(dev), test_labels.to(dev)
    nn = _nearest(test_emb, train_emb, k, exclude_self=False)
    weight = torch.ones(nn.shape, device=dev)
    if weighted:
        q, g = F.normalize(test_emb.float(), dim=1), F.normalize(train_emb, dim=1)
        weight = torch.cat([torch.exp(torch.einsum("qd,qkd->qk", q[s:s + 256], g[nn[s:s + 256]]) / temperature)
                            for s in range(0, len(q), 256)])
    num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    scores = torch.zeros(len(test_labels), num_classes, device=dev).scatter_add_(1, train_labels[nn], weight)
    return (scores.argmax(1) == test_labels).double().mean().item()


def topk_accuracy(logits, labels, ks=(1, 5)):
    """Fraction of rows whose label is among the top-k logits."""
    top = torch.topk(logits.float(), min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.to(logits.device)[:, None]
    return {k: hits[:, :k].any(1).double().mean().item() for k in ks}


def retrieval_metrics(emb, labels, ks=(1, 2, 4, 8), with_map=True, with_nmi=True, seed=0):
    """{"R@k": .., "MAP@R": .., "NMI": ..} in percent, from one shared neighbour search (NaN: see _finite)."""
    if not _finite(emb):
        return dict.fromkeys([f"R@{k}" for k in ks] + ["MAP@R"] * with_map + ["NMI"] * with_nmi, math.nan)
    recall, mapr = _retrieval(emb, labels, ks, with_map)
    out = {f"R@{k}": 100 * v for k, v in recall.items()}
    if with_map:
        out["MAP@R"] = 100 * mapr
    if with_nmi:
        out["NMI"] = 100 * nmi(emb, labels, seed=seed)
    return out | ({"collapsed": True} if collapsed(emb) else {})  # (emb is finite here)


def knn_metrics(train_emb, train_labels, test_emb, test_labels):
    """ISD's k-NN protocol in percent: 1-NN, 20-NN (majority) and weighted 200-NN (T = 0.1)."""
    protocol = {"knn1": (1, False), "knn20": (20, False), "knn200w": (200, True)}
    out = {name: 100 * knn_accuracy(train_emb, train_labels, test_emb, test_labels, k=k, weighted=w, temperature=0.1)
           for name, (k, w) in protocol.items()}
    return out | ({"collapsed": True} if _finite(test_emb) and collapsed(test_emb) else {})
