"""Data loaders and metrics shared by s2sd.py, camd.py, spkd.py and isd.py; nothing here knows a method.

Data: load_split(name, root, split) -> Split (every dataset of the four papers, plus digits,
fashionmnist, synthetic and folder = your own images; cached); epoch_batches (the seeded, shardable,
resumable order of one epoch); batched on-device augmentation of uint8 tensors (random_crop_flip,
random_resized_crop, random_hflip, color_jitter, random_grayscale, normalize, resize); image files
through DataLoader workers (ImageFiles, make_loader, loader_batches, the papers' transforms); embed.
Metrics (tensors in, floats out; exact, chunked, on the embeddings' device): recall_at_k, map_at_r,
nmi, knn_accuracy, topk_accuracy and the bundles retrieval_metrics / knn_metrics (percentages).
Retrieval (shared/notes/metrics.md): the test set is query and gallery, a query is excluded from its
own gallery by index, neighbours are ranked by Euclidean distance (= cosine order for L2-normalised
input), ties go to the lower gallery index, and the N x N matrix is never held at once.
"""
import functools
import gzip
import hashlib
import math
import os
import shutil
import sys
import tarfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # RepDistiller
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3759,)  # pixel statistics of all 1,797 sklearn digits
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)  # pixel statistics of the 60,000 training images
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
DATASETS = ("digits", "fashionmnist", "synthetic", "cifar10", "cifar100", "stl10", "tinyimagenet",
            "cub", "cars", "sop", "imagenet", "imagenet100", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")

# The fixed ImageNet-100 subset of CMC (Tian et al., 2019), also used by solo-learn.
IMAGENET100_WNIDS = """
n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
""".split()

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
SOP_URL = "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip"
SOP_MD5 = "7f73d41a2f44250d4779881525aea32e"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FMNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # Debian/Ubuntu package dataset-fashion-mnist
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class DatasetError(Exception):
    """A dataset is unknown, missing, incomplete or unreadable. The message is one actionable line."""


@dataclass
class Split:
    """One split of a dataset: labels plus either in-memory images or image file paths."""
    name: str
    labels: torch.Tensor                 # int64 [N]; -1 where the split has no labels
    num_classes: int
    mean: tuple
    std: tuple
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
# Downloads: a file is written as <name>.part and renamed only after its checksum matched, and an
# archive is extracted into a temporary folder that is renamed only when extraction finished, so
# an interrupted run can never be mistaken for a finished one.

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
    total = done + int(response.headers.get("Content-Length") or 0)
    with response, open(part, "ab" if done else "wb") as f:
        last = 0.0
        while chunk := response.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            if time.time() - last > 1.0 or done == total:
                last = time.time()
                pct = f" ({100 * done / total:.1f}%)" if total else ""
                print(f"\rdownloading {os.path.basename(path)}: {done / 2**20:.1f} MiB{pct}",
                      end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if md5 is not None and file_md5(part) != md5:
        os.remove(part)
        raise DatasetError(f"checksum mismatch for {url} (expected md5 {md5}); the partial file "
                           f"was deleted, run again to re-download")
    os.replace(part, path)
    return path


def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def extract(archive, dest_root, top_folder):
    """Extract `archive` so that `dest_root/top_folder` appears only once extraction is complete."""
    tmp = os.path.join(dest_root, f".extracting-{top_folder}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"extracting {archive} ...", file=sys.stderr)
    if archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    else:
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(tmp)
    final = os.path.join(dest_root, top_folder)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(os.path.join(tmp, top_folder), final)
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Loading splits

@functools.lru_cache(maxsize=8)
def load_split(name, root="./data", split="train", download=True, image_size=None, channels=None,
               synthetic_size=(512, 10, 32)):
    """Load one split of a dataset (see the table in shared/notes/datasets.md); cached, so a script
    that evaluates every epoch reads its test split once (do not modify the returned Split).

    Tensor form (uint8 images in memory): digits, fashionmnist, synthetic, cifar10, cifar100, stl10,
    tinyimagenet. File form (paths): cub, cars, sop, imagenet, imagenet100, folder.
    `image_size` resizes tensor-form images once at load time; `channels=3` turns grey into RGB.
    `synthetic_size` = (number of images, classes, image side) for `synthetic`.
    Raises DatasetError with instructions when data are missing or incomplete.
    """
    loaders = {"digits": _digits, "fashionmnist": _fashionmnist, "synthetic": _synthetic,
               "cifar10": _cifar, "cifar100": _cifar, "stl10": _stl10, "tinyimagenet": _tinyimagenet,
               "cub": _cub, "cars": _cars, "sop": _sop, "imagenet": _imagenet, "imagenet100": _imagenet,
               "folder": _folder}
    if name not in loaders:
        raise DatasetError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    if os.path.exists(root) and not os.path.isdir(root):
        raise DatasetError(f"--data-root {root} is a file, not a folder")
    kwargs = {"synthetic_size": tuple(synthetic_size)} if name == "synthetic" else {}
    out = loaders[name](name, root, split, download, **kwargs)
    if out.images is not None and image_size is not None and out.images.shape[-1] != image_size:
        out.images = (resize(out.images, image_size) * 255).round().clamp(0, 255).to(torch.uint8)
    if out.images is not None and channels is not None and out.images.shape[1] != channels:
        if out.images.shape[1] != 1:
            raise DatasetError(f"cannot turn {out.images.shape[1]}-channel {name} into {channels} channels")
        out.images = out.images.expand(-1, channels, -1, -1).contiguous()
        out.mean, out.std = out.mean * channels, out.std * channels
    return out


def _check_split(name, split, allowed):
    if split not in allowed:
        raise DatasetError(f"dataset '{name}' has no split '{split}'; choose from {', '.join(allowed)}")


def _class_split(images, labels, split):
    """dml_train / dml_test: the zero-shot DML protocol (the first half of the classes train, the
    second half test, all images of each); other splits unchanged."""
    if split.startswith("dml"):
        half = int(labels.max()) // 2 + 1
        idx = torch.nonzero((labels < half) if split == "dml_train" else (labels >= half)).squeeze(1)
        images, labels = images[idx], labels[idx]
    return images.contiguous(), labels


def _digits(name, root, split, download):
    """sklearn's 8x8 digits: a zero-shot DML split (0-4 / 5-9) and a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    _check_split(name, split, ("train", "test", "dml_train", "dml_test"))
    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    if not split.startswith("dml"):
        train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2,
                                               stratify=d.target, random_state=0)
        idx = torch.from_numpy(np.sort(train_idx if split == "train" else test_idx))
        images, labels = images[idx], labels[idx]
    images, labels = _class_split(images, labels, split)
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
    """Fashion-MNIST (Xiao et al. 2017): 28 px grey, 10 classes; the official 60,000 / 10,000 split, and
    the zero-shot DML split: the training images of classes 0-4 (30,000) / the test images of 5-9 (5,000).
    Files from torchvision's download into <root>/FashionMNIST/raw, or the four IDX files of the
    Debian package dataset-fashion-mnist, or any folder holding them given as <root>/fashionmnist."""
    _check_split(name, split, ("train", "test", "dml_train", "dml_test"))
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")

    def find():
        for folder in (os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "fashionmnist"), FMNIST_DEBIAN):
            found = [next((p for p in (os.path.join(folder, f), os.path.join(folder, f + ".gz"))
                           if os.path.isfile(p)), None) for f in files]
            if all(found):
                return found
    paths = find()
    if paths is None and download:
        try:
            import torchvision
            torchvision.datasets.FashionMNIST(root, download=True)
        except Exception:  # offline or host unreachable: the message below says how to get the files
            pass
        paths = find()
    if paths is None:
        raise DatasetError(f"fashionmnist not found in {root}/FashionMNIST/raw, {root}/fashionmnist or "
                           f"{FMNIST_DEBIAN}; run once with network access (torchvision downloads it), or "
                           f"'apt-get install dataset-fashion-mnist', or place the four IDX files in {root}/fashionmnist")
    train_x, train_y, test_x, test_y = (_read_idx(p) for p in paths)
    images, labels = (train_x, train_y) if split in ("train", "dml_train") else (test_x, test_y)
    images, labels = _class_split(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)), split)
    return Split(name, labels, 10, FMNIST_MEAN, FMNIST_STD, images=images, classes=FMNIST_CLASSES)


def _synthetic(name, root, split, download, synthetic_size=(512, 10, 32)):
    """Random images with random labels, deterministic per split: for throughput and tests."""
    _check_split(name, split, ("train", "test", "val"))
    n, num_classes, size = synthetic_size
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return Split(name, labels, num_classes, IMAGENET_MEAN, IMAGENET_STD, images=images)


def _cifar(name, root, split, download):
    import torchvision
    _check_split(name, split, ("train", "test"))
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(root, train=split == "train", download=download)
    except Exception as e:  # offline, or a corrupt/half-extracted folder
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        raise DatasetError(f"{name} not found or incomplete under {root}/{folder} ({e}); "
                           f"run once with network access, or place the python-version archive "
                           f"from https://www.cs.toronto.edu/~kriz/cifar.html in {root}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return Split(name, torch.tensor(ds.targets, dtype=torch.int64), 10 if name == "cifar10" else 100,
                 mean, std, images=images, classes=list(ds.classes))


def _stl10(name, root, split, download):
    import torchvision
    _check_split(name, split, ("train", "test", "unlabeled", "train+unlabeled"))
    try:
        ds = torchvision.datasets.STL10(root, split=split, download=download)
    except Exception as e:
        raise DatasetError(f"stl10 not found or incomplete under {root}/stl10_binary ({e}); run "
                           f"once with network access or place stl10_binary.tar.gz in {root}") from None
    return Split(name, torch.from_numpy(ds.labels.astype(np.int64)), 10, STL10_MEAN, STL10_STD,
                 images=torch.from_numpy(ds.data))


def _tinyimagenet(name, root, split, download):
    """Tiny-ImageNet-200 (64 px): decoded once into a uint8 tensor cached next to the images."""
    _check_split(name, split, ("train", "val"))
    base = os.path.join(root, "tiny-imagenet-200")
    if not os.path.isdir(base) and download:
        archive = download_url(TINY_URL, os.path.join(root, "tiny-imagenet-200.zip"), TINY_MD5)
        extract(archive, root, "tiny-imagenet-200")
    wnids_file = os.path.join(base, "wnids.txt")
    if not os.path.isfile(wnids_file):
        raise DatasetError(f"tinyimagenet expected {wnids_file}; download {TINY_URL} and unzip it in {root}")
    wnids = open(wnids_file).read().split()
    cls = {w: i for i, w in enumerate(wnids)}
    cache = os.path.join(base, f"{split}_uint8.pt")
    if os.path.isfile(cache):
        images, labels = torch.load(cache)
        return Split(name, labels, len(wnids), IMAGENET_MEAN, IMAGENET_STD, images=images)
    paths, labels = [], []
    if split == "train":
        for w in wnids:
            folder = os.path.join(base, "train", w, "images")
            files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            if not files:
                raise DatasetError(f"tinyimagenet looks incomplete: no images in {folder}; "
                                   f"delete {base} and run again to re-download")
            paths += [os.path.join(folder, f) for f in files]
            labels += [cls[w]] * len(files)
    else:
        ann = os.path.join(base, "val", "val_annotations.txt")
        if not os.path.isfile(ann):
            raise DatasetError(f"tinyimagenet looks incomplete: {ann} missing; delete {base} and run again")
        for line in open(ann):
            parts = line.split("\t")
            paths.append(os.path.join(base, "val", "images", parts[0]))
            labels.append(cls[parts[1]])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"tinyimagenet looks incomplete: {len(missing)} images missing, e.g. {missing[0]}")
    images = torch.stack([read_image(p, 64) for p in paths])
    labels = torch.tensor(labels, dtype=torch.int64)
    torch.save((images, labels), cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return Split(name, labels, len(wnids), IMAGENET_MEAN, IMAGENET_STD, images=images)


def _relabel(name, paths, class_ids):
    """Contiguous labels 0..C-1 in sorted class-id order within the split."""
    uniq = sorted(set(class_ids))
    index = {c: i for i, c in enumerate(uniq)}
    labels = torch.tensor([index[c] for c in class_ids], dtype=torch.int64)
    return Split(name, labels, len(uniq), IMAGENET_MEAN, IMAGENET_STD, paths=paths)


def _cub(name, root, split, download):
    """CUB-200-2011: classes 1-100 train, 101-200 test (DML zero-shot protocol)."""
    _check_split(name, split, ("train", "test"))
    base = os.path.join(root, "CUB_200_2011", "images")
    if not os.path.isdir(base) and download:
        archive = download_url(CUB_URL, os.path.join(root, "CUB_200_2011.tgz"), CUB_MD5)
        extract(archive, root, "CUB_200_2011")
    if not os.path.isdir(base):
        raise DatasetError(f"cub expected {base}/NNN.Name/*.jpg; download {CUB_URL} and extract it in {root}")
    folders = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)) and d[:3].isdigit())
    paths, class_ids = [], []
    for d in folders:
        files = sorted(f for f in os.listdir(os.path.join(base, d)) if _is_image(f))
        if not files:
            raise DatasetError(f"cub looks incomplete: {os.path.join(base, d)} has no images; "
                               f"delete {os.path.join(root, 'CUB_200_2011')} and run again")
        cid = int(d[:3])
        if (cid <= 100) == (split == "train"):
            paths += [os.path.join(base, d, f) for f in files]
            class_ids += [cid] * len(files)
    if len(folders) != 200:
        raise DatasetError(f"cub looks incomplete: {len(folders)} of 200 class folders in {base}; "
                           f"delete {os.path.join(root, 'CUB_200_2011')} and run again")
    return _relabel(name, paths, class_ids)


def _cars(name, root, split, download):
    """Stanford Cars (CARS196): class ids 1-98 train, 99-196 test, all 16,185 images."""
    import scipy.io
    _check_split(name, split, ("train", "test"))
    base = os.path.join(root, "cars")
    mat = os.path.join(base, "cars_annos.mat")
    if not os.path.isfile(mat):
        raise DatasetError(f"cars expected {mat} and {base}/car_ims/; the original host is gone: place "
                           f"cars_annos.mat and the car_ims folder there by hand")
    try:
        ann = scipy.io.loadmat(mat, squeeze_me=True)["annotations"]
        rel = [str(p) for p in np.atleast_1d(ann["relative_im_path"])]
        cids = [int(c) for c in np.atleast_1d(ann["class"])]
    except Exception as e:
        raise DatasetError(f"cannot read {mat} ({e}); expected the original cars_annos.mat") from None
    pairs = [(os.path.join(base, p), c) for p, c in zip(rel, cids) if (c <= 98) == (split == "train")]
    missing = [p for p, _ in pairs if not os.path.isfile(p)]
    if missing or not pairs:
        raise DatasetError(f"cars looks incomplete: {len(missing)} of {len(pairs)} {split} images "
                           f"missing under {base}/car_ims (e.g. {missing[0] if missing else '-'})")
    return _relabel(name, [p for p, _ in pairs], [c for _, c in pairs])


def _sop(name, root, split, download):
    """Stanford Online Products: Ebay_train.txt (11,318 classes) / Ebay_test.txt (11,316)."""
    _check_split(name, split, ("train", "test"))
    base = os.path.join(root, "Stanford_Online_Products")
    listing = os.path.join(base, f"Ebay_{split}.txt")
    if not os.path.isfile(listing) and download:
        try:
            archive = download_url(SOP_URL, os.path.join(root, "Stanford_Online_Products.zip"), SOP_MD5)
            extract(archive, root, "Stanford_Online_Products")
        except DatasetError as e:
            raise DatasetError(f"{e}; or place Stanford_Online_Products/ (Ebay_*.txt and "
                               f"*_final/ folders) in {root}") from None
    if not os.path.isfile(listing):
        raise DatasetError(f"sop expected {listing}; place Stanford_Online_Products/ (from "
                           f"{SOP_URL}) in {root}")
    with open(listing) as f:
        rows = [line.split() for line in list(f)[1:] if line.strip()]  # header: image_id class_id super_class_id path
    paths, class_ids = [os.path.join(base, r[3]) for r in rows], [int(r[1]) for r in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"sop looks incomplete: {len(missing)} of {len(paths)} images listed in "
                           f"{listing} are missing (e.g. {missing[0]}); re-extract the archive")
    return _relabel(name, paths, class_ids)


def _is_image(filename):
    """An image file, not a macOS '._' resource fork (CUB's tgz ships those)."""
    return filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith("._")


def _image_folder(base, wnids=None):
    """(paths, labels, class names) of an ImageFolder-style tree; `wnids` restricts the classes."""
    classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    if wnids is not None:
        missing = sorted(set(wnids) - set(classes))
        if missing:
            raise DatasetError(f"{base} lacks {len(missing)} of the {len(wnids)} expected class "
                               f"folders, e.g. {missing[0]}")
        classes = sorted(wnids)
    paths, labels = [], []
    for i, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(base, c))):
            paths += [os.path.join(dirpath, f) for f in sorted(files) if _is_image(f)]
            labels += [i] * (len(paths) - len(labels))
    return paths, labels, classes


def _imagenet(name, root, split, download):
    """ImageNet-1k or the CMC ImageNet-100 subset: user-placed train/<wnid>/, val/<wnid>/."""
    _check_split(name, split, ("train", "val", "test"))
    split = "val" if split == "test" else split
    base = os.path.join(root, name, split)
    wnids = None
    if name == "imagenet100" and not os.path.isdir(base):  # take the subset from a full ImageNet
        base, wnids = os.path.join(root, "imagenet", split), IMAGENET100_WNIDS
    if not os.path.isdir(base):
        raise DatasetError(f"{name} expected {base}/<wnid>/*.JPEG (ImageNet cannot be downloaded "
                           f"automatically; place train/ and val/ with class sub-folders there; "
                           f"sort val images into folders with the usual valprep.sh)")
    paths, labels, classes = _image_folder(base, wnids)
    expected = 100 if name == "imagenet100" else 1000
    if len(classes) != expected or not paths:
        raise DatasetError(f"{name} looks incomplete: {len(classes)} of {expected} class folders and "
                           f"{len(paths)} images in {base}")
    return Split(name, torch.tensor(labels), len(classes), IMAGENET_MEAN, IMAGENET_STD, paths=paths, classes=classes)


def _folder(name, root, split, download):
    """Your own images (--data-root DIR). split 'train' / 'test': DIR/train and DIR/test (or DIR/val),
    class sub-folders inside. 'dml_train' / 'dml_test': those folders when they exist, otherwise DIR's
    class folders split class-disjointly (the first half of the sorted classes train, the second half
    test, as CUB/CARS). 'all': DIR itself, with class sub-folders or flat (labels -1, unlabeled)."""
    _check_split(name, split, ("train", "test", "dml_train", "dml_test", "all"))
    if not os.path.isdir(root):
        raise DatasetError(f"--dataset folder: --data-root {root} is not a folder of images")
    sub = split.removeprefix("dml_")
    folders = [os.path.join(root, s) for s in ((sub,) if sub == "train" else ("test", "val"))]
    folder = next((f for f in folders if os.path.isdir(f)), None)
    if split == "all":
        folder = root
    elif folder is None and not split.startswith("dml"):
        raise DatasetError(f"--dataset folder: expected {' or '.join(folders)} with one sub-folder per class")
    wnids = None
    if split == "test" and os.path.isdir(os.path.join(root, "train")):  # number test classes as train's, by name
        wnids = sorted(d for d in os.listdir(os.path.join(root, "train")) if os.path.isdir(os.path.join(root, "train", d)))
        extra = sorted(set(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))) - set(wnids))
        if extra:
            raise DatasetError(f"--dataset folder: {folder} has class folder(s) that {os.path.join(root, 'train')} "
                               f"lacks, e.g. {extra[0]}: test classes must be training classes")
    paths, labels, classes = _image_folder(folder or root, wnids)
    if split == "all" and not classes:  # flat folder: unlabeled
        paths = sorted(os.path.join(root, f) for f in os.listdir(root) if _is_image(f))
        labels = [-1] * len(paths)
    if not paths:
        raise DatasetError(f"--dataset folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder or root}")
    counts = np.bincount(np.maximum(labels, 0), minlength=max(1, len(classes)))
    if classes and (counts == 0).any():
        raise DatasetError(f"--dataset folder: class folder {os.path.join(folder or root, classes[int(np.argmin(counts))])} has no images")
    labels = torch.tensor(labels, dtype=torch.int64)
    if folder is None:  # class-disjoint halves of one labelled folder
        if len(classes) < 4:
            raise DatasetError(f"--dataset folder: {root} has {len(classes)} class folder(s); the class-disjoint split "
                               f"(first half train, second half test) needs at least 4")
        half = len(classes) // 2
        keep = (labels < half) if split == "dml_train" else (labels >= half)
        paths, labels = [p for p, k in zip(paths, keep) if k], labels[keep] - (0 if split == "dml_train" else half)
        classes = classes[:half] if split == "dml_train" else classes[half:]
    if split.startswith("dml") and (torch.bincount(labels, minlength=len(classes)) < 2).any():
        raise DatasetError(f"--dataset folder: class '{classes[int(torch.bincount(labels).argmin())]}' has one image; "
                           f"deep metric learning needs at least 2 per class")
    if split != "all" and len(classes) < 2:
        raise DatasetError(f"--dataset folder: {split} needs at least 2 classes, found {len(classes)} under {folder or root}")
    return Split(name, labels, len(classes), IMAGENET_MEAN, IMAGENET_STD, paths=paths, classes=classes)


# ----------------------------------------------------------------------------------------------
# The order of one epoch, shared by every script: a pure function of (seed, epoch), so every rank
# agrees on it without communication and a run resumed at batch b of an epoch skips exactly b.

def epoch_batches(labels, batch_size, seed, epoch, rank=0, world=1, drop_last=False, samples_per_class=None):
    """List of LongTensors (CPU): this rank's index batches of one epoch.

    Global batches of `batch_size`; with world > 1 each is cut into `world` equal contiguous slices
    and this rank keeps slice `rank` (the permutation is padded by wrapping around, as
    DistributedSampler, so every slice has the same length; batch_size must divide by world).
    samples_per_class: the class-balanced DML sampler of the released S2SD code instead of a
    permutation (class_balanced_batches: always len // batch_size full batches).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if samples_per_class:
        batches = list(class_balanced_batches(labels, batch_size // samples_per_class, samples_per_class, generator=g))
    else:
        n = len(labels)
        order = torch.randperm(n, generator=g)
        order = torch.cat([order, order[:(-n) % world]])
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        batches = list(order[:stop].split(batch_size))
    return [b.reshape(world, -1)[rank] for b in batches]


# The class-balanced DML sampler of the released S2SD / Revisiting-DML code
# (datasampler/class_random_sampler.py): per batch, `classes_per_batch` classes drawn uniformly
# WITH replacement, and for each `samples_per_class` images of that class WITH replacement;
# len(labels) // batch_size batches per epoch.

def class_balanced_batches(labels, classes_per_batch, samples_per_class, num_batches=None, generator=None):
    """LongTensor [num_batches, classes_per_batch * samples_per_class] of dataset indices."""
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
# Small images: the whole uint8 dataset on the device, whole batches augmented there.
# Augmentations take uint8 or float [B, C, H, W] and return float32 in [0, 1]; they draw from the
# global RNG of the tensor's device, so a seeded step draws the same augmentation every time.

def _float(x):
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def random_hflip(x, p=0.5):
    """Flip each image horizontally with probability p."""
    x = _float(x)
    flip = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_crop_flip(x, padding=4, padding_mode="constant"):
    """RandomCrop(H, padding) + RandomHorizontalFlip, batched; zero padding (the RepDistiller CIFAR-100
    recipe) or padding_mode="reflect" (the WRN / attention-transfer CIFAR-10 recipe)."""
    x = _float(x)
    b, _, h, w = x.shape
    xp = F.pad(x, (padding,) * 4, mode=padding_mode)
    oy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device) + torch.arange(h, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device) + torch.arange(w, device=x.device)
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, oy[:, :, None], ox[:, None, :]]
    return random_hflip(out.permute(0, 3, 1, 2))


def random_resized_crop(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop for a whole batch: one bilinear grid_sample.

    Like torchvision, up to 10 (area, aspect) draws per image and the first that fits is used;
    images with no fitting draw fall back to the whole image. No antialiasing when shrinking.
    """
    x = _float(x)
    b, _, h, w = x.shape
    dev = x.device
    area = torch.empty(b, 10, device=dev).uniform_(*scale)
    log_r = torch.empty(b, 10, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    cw = torch.sqrt(area * torch.exp(log_r)) * math.sqrt(h / w)  # crop width / image width
    ch = torch.sqrt(area / torch.exp(log_r)) * math.sqrt(w / h)  # crop height / image height
    ok = (cw <= 1) & (ch <= 1)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)
    any_ok = ok.any(1)
    cw = torch.where(any_ok, cw.gather(1, first).squeeze(1), torch.ones(b, device=dev))
    ch = torch.where(any_ok, ch.gather(1, first).squeeze(1), torch.ones(b, device=dev))
    cx = (torch.rand(b, device=dev) * (1 - cw) + cw / 2) * 2 - 1  # crop centre in [-1, 1]
    cy = (torch.rand(b, device=dev) * (1 - ch) + ch / 2) * 2 - 1
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw, cx, ch, cy
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
    """ColorJitter applied with probability p per image (MoCo-v2 / SimCLR views).

    Factors are drawn per image as in torchvision; the four operations are applied in a fixed
    order (brightness, contrast, saturation, hue) rather than torchvision's random order.
    """
    x = _float(x)
    b, dev = x.shape[0], x.device

    def factor(s):
        return torch.empty(b, 1, 1, 1, device=dev).uniform_(max(0.0, 1 - s), 1 + s)
    out = (x * factor(brightness)).clamp(0, 1)
    mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * factor(contrast) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(out)
        out = ((out - gray) * factor(saturation) + gray).clamp(0, 1)
        hsv = _rgb_to_hsv(out)
        shift = torch.empty(b, 1, 1, device=dev).uniform_(-hue, hue)
        out = _hsv_to_rgb(torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)).clamp(0, 1)
    apply = torch.rand(b, device=dev) < p
    return torch.where(apply[:, None, None, None], out, x)


def random_grayscale(x, p=0.2):
    """Replace each image by its luminance (kept 3-channel) with probability p."""
    x = _float(x)
    apply = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(apply[:, None, None, None], _gray(x).expand_as(x), x)


def normalize(x, mean, std):
    """(x - mean) / std per channel; uint8 input is first scaled to [0, 1]."""
    x = _float(x)
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
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
    ops += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


class TwoViews:
    """A picklable transform returning (first(img), second(img)): the two SSL views."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, img):
        return self.first(img), self.second(img)


def read_image(path, size=None):
    """uint8 [3, H, W] of an image file (resized to size x size if given); DatasetError naming the file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # not an image, truncated, corrupt
        raise DatasetError(f"unreadable image {path} ({e}); delete or replace it") from None
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageFiles(torch.utils.data.Dataset):
    """(transform(RGB image), label) for a list of image files. Indexed by i or by (i, seed): with a
    seed the random transform is drawn from it, so a view does not depend on which worker made it.
    An unreadable file yields label -2 - i, which loader_batches turns into an error naming it
    (raising inside a worker would reach the user as a worker traceback)."""

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
            with Image.open(self.paths[i]) as im:
                img = im.convert("RGB")
        except (OSError, SyntaxError, ValueError):  # not an image, truncated, corrupt
            return self.transform(Image.new("RGB", (256, 256))), -2 - i
        return self.transform(img), self.labels[i]


class _BatchList:
    """A batch sampler whose list is replaced before each epoch (it is iterated in the main process,
    so persistent workers see the new batches)."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def make_loader(dataset, workers=4):
    """DataLoader over ImageFiles, fed by loader_batches: pinned memory on CUDA machines, persistent
    prefetching workers."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=_BatchList(), num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)


def loader_batches(loader, batches, device, seed=None, first=0):
    """(x, y) on `device` for each index batch through `loader` (make_loader). With `seed`, item k of
    batch `first + j` is augmented from its own seed (the same views whatever the worker count, and
    after a resume at batch `first`). An unreadable image stops with a DatasetError naming it."""
    loader.batch_sampler.batches = [[(int(i), None if seed is None else hash((seed, first + j, k)) % 2**63)
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
    """Run `fn` over a split in order; returns (out0, [out1, ...], labels) as float32 on `device`.

    fn receives a normalised float batch on `device` (tensor form: `transform(uint8 batch)` or
    normalize with the split's mean/std; file form: `transform` or eval_transform()). It may
    return a tensor or a tuple. With `flip_average`, output 0 is averaged over the image and its
    horizontal flip (the CAMD protocol; normalise afterwards); other outputs use the plain image.
    The caller sets eval mode. Evaluation is fp32: no autocast here, none expected inside fn.
    """
    chunks = list(torch.arange(len(split)).split(batch_size))
    if split.images is not None:
        prep = transform or (lambda u: normalize(u, split.mean, split.std))
        batches = (prep(split.images[c].to(device, non_blocking=True)) for c in chunks)
    else:
        loader = make_loader(ImageFiles(split.paths, split.labels, transform or eval_transform()), workers)
        batches = (x for x, _ in loader_batches(loader, chunks, device))
    outs = None
    for x in batches:
        out = fn(x)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        if flip_average:
            flipped = fn(x.flip(3))
            out[0] = (out[0].float() + (flipped[0] if isinstance(flipped, (tuple, list)) else flipped).float()) / 2
        outs = [[] for _ in out] if outs is None else outs
        for acc, o in zip(outs, out):
            acc.append(o.float())
    return (*[torch.cat(o) for o in outs], split.labels.to(device))


# ----------------------------------------------------------------------------------------------
# Metrics

# Every candidate is carried as one int64 key = (order-preserving bits of its float32 distance,
# gallery index), so "smallest k keys" is exactly "first k by (distance, index)": no tie is left to
# topk's internal order. Distances come in blocks from one matrix product (squared norms folded in);
# a block is reduced with vectorised passes (min over strided groups of columns, compare with each
# row's current k-th distance) and only the few entries that can still enter a row's top k are
# gathered and merged, instead of running topk over every row of every block.

_GROUP = 8  # columns per group (see _candidates)
_EMPTY = (0x7F800000 << 32) | 0xFFFFFFFF       # key of (+inf, largest index): "no candidate yet"


def _keys(val, idx):
    """int64 keys ordered as (val, idx); val float32 (not NaN), idx < 2**32."""
    bits = (val + 0.0).view(torch.int32)        # + 0.0 turns -0.0 into +0.0 (they compare equal)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)   # negative floats: reverse their order
    return (bits.long() << 32) | idx


def _key_values(key):
    bits = (key >> 32).int()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32)


def _augment(x, n_pad, left):
    """Rows [x, ||x||^2, 1] (left) or [-2x, 1, ||x||^2] (right), zero-padded to n_pad rows, so that
    left_i . right_j = ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j: the squared distance comes out of one
    matrix product, and padding rows (||.||^2 = inf) are at distance +inf from everything."""
    n, d = x.shape
    out = torch.zeros(n_pad, d + 2, device=x.device)
    sq = (x * x).sum(1)
    out[:n, :d] = x if left else -2 * x
    out[:n, d + (0 if left else 1)] = sq
    out[:, d + (1 if left else 0)] = 1
    out[n:, d + (0 if left else 1)] = float("inf")
    return out


def _candidates(d, tau, s, col0, grouped_rows=False):
    """Entries of the distance block `d` [R, W] (or of d.T when grouped_rows) that are <= tau (one
    threshold per query row) as (row, key), rows sorted. Columns are first reduced to W/s strided
    groups (column c is in group c mod W/s) by their minimum: only groups whose minimum is <= tau
    are gathered, so the block is read twice (min, compare) instead of being sorted."""
    n_items = d.shape[0] if grouped_rows else d.shape[1]
    m = n_items // s
    if grouped_rows:   # queries are the columns of d: min over row groups, a vectorised pass
        g = d.view(s, m, d.shape[1]).amin(0).T
    else:
        g = d.view(d.shape[0], s, m).amin(1)
    rows, grp = (g <= tau[:, None]).nonzero(as_tuple=True)         # sorted by row
    cols = grp[:, None] + m * torch.arange(s, device=d.device)     # [candidate groups, s]
    flat = cols * d.shape[1] + rows[:, None] if grouped_rows else rows[:, None] * n_items + cols
    val = d.view(-1)[flat]
    c, t = (val <= tau[rows, None]).nonzero(as_tuple=True)
    return rows[c], _keys(val[c, t], cols[c, t] + col0)


def _kth_group_min(d, k, s):
    """Per row an upper bound on the k-th smallest entry: the k-th smallest of the group minima
    (the k groups with the smallest minima hold k distinct entries at most that large)."""
    m = d.shape[1] // s
    if m < k:
        return torch.full((d.shape[0],), float("inf"), device=d.device)
    return d.view(d.shape[0], s, m).amin(1).kthvalue(k, dim=1).values


def _merge(run, rows, keys):
    """Keep the k smallest keys per row of run [R, k] together with new (row, key) pairs; `rows`
    must be sorted (as nonzero returns them)."""
    if rows.numel() == 0:
        return run
    n, k = run.shape
    counts = torch.bincount(rows, minlength=n)
    start = torch.cumsum(counts, 0) - counts
    buf = torch.full((n, k + int(counts.max())), _EMPTY, dtype=torch.long, device=run.device)
    buf[:, :k] = run
    buf[rows, k + torch.arange(rows.numel(), device=rows.device) - start[rows]] = keys
    return buf.topk(k, dim=1, largest=False, sorted=False).values


def _tau(run):
    """Current k-th smallest distance per row (+inf while a row has fewer than k candidates)."""
    return _key_values(run.amax(1))


_SQUARE, _ROWS, _COLS = 2048, 1024, 4096   # CPU block shapes (floats): self search, other search


def _block_size(n, device, what="square"):
    """Block side for `n` items (a multiple of 64, blocks of about equal size). On a CPU a block
    is 4M floats (16 MB): 2048 x 2048 when the query set is the gallery (both sides of a block are
    used), 1024 query rows x 4096 gallery columns otherwise (wider rows: fewer blocks per query, so
    its k-th distance, which filters the later blocks, is tight sooner). GPU: 4x longer sides."""
    p = {"square": _SQUARE, "rows": _ROWS, "cols": _COLS}[what] * (4 if torch.device(device).type == "cuda" else 1)
    return math.ceil(n / max(1, math.ceil(n / p)) / 64) * 64


def _nearest(query, gallery, k, exclude_self):
    """Indices [Nq, k] of the k nearest gallery items (Euclidean), each row ordered by
    (distance, index): ties go to the lower gallery index; query i is excluded BY INDEX when
    `exclude_self` (query set = gallery). k is clipped to the number of candidates.

    Exact: squared distances ||q||^2 + ||g||^2 - 2 q.g in float32,
    ordered with ties broken by index, on the tensors' device; memory O(block + N k). Rows keep
    their k best as (distance, index) keys; a block's entries are only gathered where they are
    <= the row's current k-th distance. When the query set is the gallery, each block X_I X_J^T
    (I <= J) is computed once and used for rows I and for rows J (half the matrix product).
    """
    query, gallery = query.float(), gallery.float()
    n_q, n_g = query.shape[0], gallery.shape[0]
    dev = query.device
    k = max(0, min(k, n_g - (1 if exclude_self else 0)))
    if k == 0 or n_q == 0:
        return torch.empty(n_q, k, dtype=torch.long, device=dev)
    symmetric = exclude_self and (query is gallery or (query.shape == gallery.shape and torch.equal(query, gallery)))
    if symmetric:
        pq = pg = _block_size(n_q, dev)
    else:
        pq, pg = _block_size(n_q, dev, "rows"), _block_size(n_g, dev, "cols")
    s = min(_GROUP, 2 ** int(math.log2(max(1, pg // (4 * k)))), pg & -pg)   # >= 4k groups; s divides pg
    nbq, nbg = math.ceil(n_q / pq), math.ceil(n_g / pg)
    left = _augment(query, nbq * pq, left=True)
    right = _augment(gallery, nbg * pg, left=False)
    run = torch.full((nbq * pq, k), _EMPTY, dtype=torch.long, device=dev)
    pad_rows = torch.arange(nbq * pq, device=dev) >= n_q
    buf = torch.empty(pq, pg, device=dev)      # reused: a fresh 16 MB block costs page faults

    def tau(i):   # padding rows (all distances +inf) take no candidates
        return _tau(run[i * pq:(i + 1) * pq]).masked_fill_(pad_rows[i * pq:(i + 1) * pq], -float("inf"))

    def update(i, rows, keys):
        run[i * pq:(i + 1) * pq] = _merge(run[i * pq:(i + 1) * pq], rows, keys)

    def block(i, j):
        d = torch.mm(left[i * pq:(i + 1) * pq], right[j * pg:(j + 1) * pg].T, out=buf)
        if exclude_self:   # global row r meets column r here for r in [lo, hi)
            lo, hi = max(i * pq, j * pg), min((i + 1) * pq, (j + 1) * pg)
            if lo < hi:
                r = torch.arange(lo, hi, device=dev)
                d[r - i * pq, r - j * pg] = float("inf")
        return d

    # a row's first block is filtered by a bound from its group minima (for a self search: the
    # diagonal blocks, all first), every later block by the row's current k-th distance
    for i in range(nbq) if symmetric else []:
        d = block(i, i)
        update(i, *_candidates(d, _kth_group_min(d, k, s).masked_fill_(pad_rows[i * pq:(i + 1) * pq], -float("inf")), s, i * pg))
    for i in range(nbq):
        for j in range(i + 1, nbg) if symmetric else range(nbg):
            d = block(i, j)
            t = tau(i) if symmetric or j > 0 else torch.minimum(tau(i), _kth_group_min(d, k, s))
            update(i, *_candidates(d, t, s, j * pg))
            if symmetric:  # the same block seen from rows j: d.T
                update(j, *_candidates(d, tau(j), s, i * pq, grouped_rows=True))
    return run[:n_q].sort(dim=1).values & 0xFFFFFFFF


def _same_class_counts(labels):
    """For each item, how many OTHER items share its label."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] - 1


def _recall_from_neighbours(nn_labels, labels, ks):
    hits = nn_labels == labels[:, None]
    return {k: hits[:, :k].any(1).double().mean().item() for k in ks}


def _map_at_r_from_neighbours(nn_labels, labels):
    r = _same_class_counts(labels)
    valid = r > 0
    if not valid.any():
        return 0.0
    rel = (nn_labels == labels[:, None]).float()
    pos = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float32)
    within_r = pos[None, :] <= r[:, None]
    precision = torch.cumsum(rel, 1) / pos
    ap = (precision * rel * within_r).sum(1) / r.clamp_min(1)
    return ap[valid].double().mean().item()


def _finite(*tensors):
    """False when an embedding is NaN or inf (a diverged model): its metrics are then NaN, never a ranking of NaNs."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def recall_at_k(emb, labels, ks=(1, 2, 4, 8)):
    """Recall@k: fraction of queries with a same-label item among their k nearest (self excluded).

    Queries whose class has no other member count as misses.
    """
    if not _finite(emb):
        return dict.fromkeys(ks, math.nan)
    labels = labels.to(emb.device)
    return _recall_from_neighbours(labels[_nearest(emb, emb, max(ks), exclude_self=True)], labels, ks)


def map_at_r(emb, labels):
    """MAP@R (Musgrave et al., 2020): per query with R = #other same-label items >= 1,
    (1/R) sum_{i<=R} P(i) rel(i); mean over those queries."""
    labels = labels.to(emb.device)
    max_r = int(_same_class_counts(labels).max().item()) if len(labels) else 0
    if max_r == 0 or not _finite(emb):
        return 0.0 if max_r == 0 else math.nan
    return _map_at_r_from_neighbours(labels[_nearest(emb, emb, max_r, exclude_self=True)], labels)


def _chunk(n_cols, device):
    """Rows per chunk of an [rows, n_cols] score matrix: 4M floats (16 MB) on a CPU, 64M on a GPU."""
    return max(1, (1 << (26 if torch.device(device).type == "cuda" else 22)) // max(1, n_cols))


def _row_argmin(d, s=16):
    """Column of a minimum of each row of d [R, W] (W divisible by s). A plain min(1) with indices
    is 4x slower on a CPU than amin, so: amin over s strided column groups (c -> c mod W/s), the
    minimal group, then the minimum inside it. Ties: lowest group, then lowest position in it."""
    m = d.shape[1] // s
    grp = d.view(d.shape[0], s, m).amin(1).min(1).indices
    cols = grp[:, None] + m * torch.arange(s, device=d.device)
    return cols.gather(1, d.gather(1, cols).min(1).indices[:, None]).squeeze(1)


def _argmin_scores(left, right, exclude=None):
    """argmin_j left_i . right_j for every row i, chunked; `right` has a multiple of 16 rows.
    `exclude` [n]: a column per row that may not be chosen."""
    step = _chunk(right.shape[0], left.device)
    buf = torch.empty(min(step, left.shape[0]), right.shape[0], device=left.device)
    out = []
    for s in range(0, left.shape[0], step):
        d = torch.mm(left[s:s + step], right.T, out=buf[:len(left[s:s + step])])
        if exclude is not None:
            d[torch.arange(d.shape[0], device=d.device), exclude[s:s + step]] = float("inf")
        out.append(_row_argmin(d))
    return torch.cat(out)


def _padded(rows, k_pad, inf_col):
    """rows [k, c] zero-padded to k_pad rows whose column `inf_col` is +inf (scores +inf there)."""
    out = torch.zeros(k_pad, rows.shape[1], device=rows.device)
    out[:rows.shape[0]] = rows
    out[rows.shape[0]:, inf_col] = float("inf")
    return out


def _cluster_sums(x, assign, k):
    """Per-cluster float64 sums of x, and counts, deterministic on every device: on a CPU
    index_add_ (adds in index order; 5 ms at SOP scale), elsewhere _prefix_sums (index_add_ on a
    GPU adds with atomics in no fixed order)."""
    counts = torch.bincount(assign, minlength=k)
    if x.device.type == "cpu":
        return torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, assign, x.double()), counts
    return _prefix_sums(x, assign, counts), counts


def _prefix_sums(x, assign, counts):
    """Per-cluster float64 sums by sorting the points by cluster and differencing prefix sums."""
    prefix = torch.cumsum(x[torch.argsort(assign, stable=True)].double(), 0)
    prefix = torch.cat([torch.zeros_like(prefix[:1]), prefix])
    ends = torch.cumsum(counts, 0)
    return prefix[ends] - prefix[ends - counts]


def _objective(sq_total, sums, counts):
    """k-means objective sum_i ||x_i - mu(i)||^2 = sum_i ||x_i||^2 - sum_c ||S_c||^2 / n_c (float64)."""
    return (sq_total - ((sums * sums).sum(1) / counts.clamp_min(1)).sum()).item()


def _move_gain(x, assign, dest, centres, counts):
    """Change of the k-means objective when point i alone moves from its cluster A to B = dest[i]
    (Hartigan): |B|/(|B|+1) ||x - mu_B||^2 - |A|/(|A|-1) ||x - mu_A||^2, and a tolerance below
    which it is surely negative despite float32 rounding; +inf where the move is not allowed
    (A a singleton, or B = A)."""
    n_a, n_b = counts[assign].float(), counts[dest].float()
    leave = n_a / (n_a - 1).clamp_min(1) * ((x - centres[assign]) ** 2).sum(1)
    gain = n_b / (n_b + 1) * ((x - centres[dest]) ** 2).sum(1) - leave
    return gain.masked_fill_((n_a <= 1) | (dest == assign), float("inf")), 1e-5 * leave


def _fill_empty(x, assign, k):
    """Give each empty cluster one point: the point whose removal lowers the objective most
    (|A|/(|A|-1) ||x - mu_A||^2, at most one per source cluster, never from a singleton)."""
    sums, counts = _cluster_sums(x, assign, k)
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel() == 0:
        return assign
    n_a = counts[assign].double()
    leave = n_a / (n_a - 1).clamp_min(1) * ((x.double() - sums[assign] / n_a[:, None]) ** 2).sum(1)
    leave = leave.float().masked_fill_(n_a <= 1, -float("inf"))
    key = _keys(-leave, torch.arange(len(x), device=x.device))         # smallest key = best point
    best = torch.full((k,), _EMPTY, dtype=torch.long, device=x.device).scatter_reduce_(0, assign, key, "amin")
    pts = (best[(counts > 1) & (best != _EMPTY)].sort().values & 0xFFFFFFFF)[:empty.numel()]
    assign = assign.clone()
    assign[pts] = empty[:pts.numel()]
    return assign


def _refine(x, left, assign, k, sq_total, max_sweeps=30):
    """One round of Hartigan-style refinement; returns (assignment, objective).

    One matrix product finds every point's best destination B (smallest |B|/(|B|+1) ||x - mu_B||^2,
    own cluster excluded). Two ways to use them, the one reaching the lower exact objective wins:
    sweeps, in which the improving moves are re-evaluated and those touching pairwise-disjoint
    clusters applied (a move is taken when it is the best move of both its clusters, so each
    lowers the objective by exactly its gain; with few points per cluster, SOP: 5.3, this is what
    escapes Lloyd's fixed points), or all improving moves at once (except one member of a
    cluster they would empty), which with many points per cluster is a Lloyd step."""
    dev = x.device
    assign = _fill_empty(x, assign, k)
    sums, counts = _cluster_sums(x, assign, k)
    centres = (sums / counts.clamp_min(1)[:, None]).float()
    w = counts.float() / (counts.float() + 1)
    # w_B ||x - c_B||^2 = [x, ||x||^2, 1] . [-2 w_B c_B, w_B, w_B ||c_B||^2]; an empty B (possible
    # only with duplicate points) is excluded: +inf
    right = torch.cat([-2 * w[:, None] * centres, w[:, None], (w * (centres * centres).sum(1))[:, None]], 1)
    right[counts == 0] = torch.tensor([0.0] * (right.shape[1] - 1) + [float("inf")], device=dev)
    dest = _argmin_scores(left, _padded(right, math.ceil(k / 16) * 16, -1), exclude=assign)
    dest = torch.where(dest < k, dest, assign)       # no allowed destination at all (k = 1): stay
    gain, tol = _move_gain(x, assign, dest, centres, counts)
    cand = (gain < -tol).nonzero().squeeze(1)
    batch = None
    if cand.numel():   # all improving moves at once, keeping one member of a cluster they would empty
        key = _keys(-gain[cand], cand)
        worst = torch.full((k,), _EMPTY, dtype=torch.long, device=dev).scatter_reduce_(0, assign[cand], key, "amin")
        emptied = torch.bincount(assign[cand], minlength=k) == counts
        moving = cand[~(emptied[assign[cand]] & (worst[assign[cand]] == key))]
        batch = assign.clone()
        batch[moving] = dest[moving]
        batch_obj = _objective(sq_total, *_cluster_sums(x, batch, k))
    for _ in range(max_sweeps):
        gain, tol = _move_gain(x[cand], assign[cand], dest[cand], centres, counts)
        cand = cand[gain < -tol]                    # later sweeps only re-check these
        if cand.numel() == 0:
            break
        key = _keys(gain[gain < -tol], cand)        # unique keys: at most one move per cluster
        best = torch.full((k,), _EMPTY, dtype=torch.long, device=dev)
        best.scatter_reduce_(0, assign[cand], key, "amin").scatter_reduce_(0, dest[cand], key, "amin")
        take = cand[(best[assign[cand]] == key) & (best[dest[cand]] == key)]
        src, dst = assign[take], dest[take]
        xt = x[take].double()
        sums[src] -= xt                              # clusters are distinct: plain indexed updates
        sums[dst] += xt
        counts[src] -= 1
        counts[dst] += 1
        assign = assign.clone()
        assign[take] = dst
        touched = torch.cat([src, dst])
        centres[touched] = (sums[touched] / counts[touched].clamp_min(1)[:, None]).float()
    obj = _objective(sq_total, sums, counts)
    if batch is not None and batch_obj < obj:    # the batch (a Lloyd step) did better than the sweeps
        return batch, batch_obj
    return assign, obj


def _sq_dist(x, c):
    """Squared distances [n, m] from the rows of x to a few centres c [m, d] (clamped at 0)."""
    return torch.addmm((c * c).sum(1)[None], x, c.T, alpha=-2).add_((x * x).sum(1, keepdim=True)).clamp_min_(0)


def _init_greedy_pp(x, k, gen, batches=64):
    """Greedy k-means++ (as scikit-learn: 2 + ln k D^2-sampled candidates per centre, keep the one
    that lowers the potential most), in at most `batches` rounds of ceil(k / batches) centres that
    are chosen together (exactly sequential for k <= batches)."""
    n, dev = x.shape[0], x.device
    trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=gen).to(dev)
    chosen = [first]
    closest = _sq_dist(x, x[first]).squeeze(1)
    rounds = min(batches, k - 1)
    for r in range(rounds):
        b = (k - 1) // rounds + (r < (k - 1) % rounds)
        p = closest.double().cpu()
        p = p if p.sum() > 0 else torch.ones(n, dtype=torch.float64)
        cand = torch.multinomial(p, b * trials, replacement=True, generator=gen).to(dev).view(b, trials)
        d = torch.minimum(closest[:, None], _sq_dist(x, x[cand.flatten()]))       # [n, b * trials]
        best = d.sum(0).view(b, trials).argmin(1)
        chosen.append(cand[torch.arange(b, device=dev), best])
        closest = torch.minimum(closest, d.view(n, b, trials)[:, torch.arange(b, device=dev), best].amin(1))
    return x[torch.cat(chosen)]


_BUDGET = 4e10   # multiply-adds (~0.3 s of matrix products on a 2-core CPU) beyond the minimum


def _kmeans(x, k, seed=0, tol=1e-4):
    """k-means assignments [N] (long) of the rows of x, on x's device, deterministic for a seed.

    Settings (one run): initial centres by greedy k-means++ (scikit-learn's, see _init_greedy_pp)
    when that costs at most _BUDGET multiply-adds, else k distinct random points (faiss's init;
    SOP scale); one nearest-centre assignment; then rounds of _refine (a Lloyd step when it helps,
    then Hartigan single-point moves) until a round lowers the objective by less than `tol`
    (relative), at most max(2, _BUDGET / (N k d)) rounds (100 at most): 2 at SOP scale (60,502 x
    128, 11,316 clusters), where 2 rounds already reach a lower objective than faiss's 20 Lloyd
    iterations in less time. Empty clusters get refilled (a point moved into one always lowers the
    objective).
    """
    x = x.float()
    n, dim = x.shape
    k = max(1, min(k, n))
    dev = x.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    work = n * k * dim
    if k > 1 and work * (2 + math.log(k)) <= _BUDGET:
        centres = _init_greedy_pp(x, k, gen)
    else:
        centres = x[torch.randperm(n, generator=gen)[:k].to(dev)]
    # nearest centre: ||x - c||^2 - ||x||^2 = [x, 1] . [-2c, ||c||^2]
    right = torch.cat([-2 * centres, (centres * centres).sum(1, keepdim=True)], 1)
    assign = _argmin_scores(torch.cat([x, torch.ones(n, 1, device=dev)], 1), _padded(right, math.ceil(k / 16) * 16, -1))
    left = torch.cat([x, (x * x).sum(1, keepdim=True), torch.ones(n, 1, device=dev)], 1)
    sq_total = (x.double() ** 2).sum()
    prev = None
    for _ in range(int(max(2, min(100, _BUDGET // work)))):
        assign, obj = _refine(x, left, assign, k, sq_total)
        if prev is not None and prev - obj <= tol * prev:
            break
        prev = obj
    return assign


def nmi(emb, labels, seed=0):
    """Normalised mutual information between labels and k-means clusters (k = #distinct labels),
    sklearn's normalized_mutual_info_score (arithmetic mean). k-means: see _kmeans (one seeded run;
    at SOP scale lower objective than faiss's 20 Lloyd iterations, in less time)."""
    from sklearn.metrics import normalized_mutual_info_score
    if not _finite(emb):
        return math.nan
    k = int(torch.unique(labels).numel())
    assign = _kmeans(emb, k, seed=seed)
    return float(normalized_mutual_info_score(labels.cpu().numpy(), assign.cpu().numpy()))


def knn_accuracy(train_emb, train_labels, test_emb, test_labels, k=20, weighted=False, temperature=0.1):
    """k-NN classification accuracy of test items against the train gallery (no self-exclusion).

    Neighbours by Euclidean distance. Unweighted: majority vote, ties to the smaller label (as
    scikit-learn). Weighted: each neighbour votes exp(cos / temperature) with cos the cosine
    similarity (the InstDisc / SSL-library monitor, k = 200, temperature 0.1).
    """
    if not _finite(train_emb, test_emb):
        return math.nan
    dev = test_emb.device
    train_emb, train_labels = train_emb.to(dev).float(), train_labels.to(dev)
    test_labels = test_labels.to(dev)
    nn = _nearest(test_emb, train_emb, k, exclude_self=False)
    votes_labels = train_labels[nn]
    num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    if weighted:
        q = F.normalize(test_emb.float(), dim=1)
        g = F.normalize(train_emb, dim=1)
        weight = torch.cat([torch.exp(torch.einsum("qd,qkd->qk", q[s:s + 256], g[nn[s:s + 256]]) / temperature)
                            for s in range(0, len(q), 256)])
    else:
        weight = torch.ones_like(votes_labels, dtype=torch.float32)
    scores = torch.zeros(len(test_labels), num_classes, device=dev).scatter_add_(1, votes_labels, weight)
    return (scores.argmax(1) == test_labels).double().mean().item()


def topk_accuracy(logits, labels, ks=(1, 5)):
    """Fraction of rows whose label is among the top-k logits."""
    labels = labels.to(logits.device)
    top = torch.topk(logits.float(), min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: hits[:, :k].any(1).double().mean().item() for k in ks}


def retrieval_metrics(emb, labels, ks=(1, 2, 4, 8), with_map=True, with_nmi=True, seed=0):
    """{"R@k": .., "MAP@R": .., "NMI": ..} in percent, from one shared neighbour search (NaN: see _finite)."""
    if not _finite(emb):
        return dict.fromkeys([f"R@{k}" for k in ks] + ["MAP@R"] * with_map + ["NMI"] * with_nmi, math.nan)
    labels = labels.to(emb.device)
    need = max(ks)
    if with_map:
        need = max(need, int(_same_class_counts(labels).max().item()))
    nn_labels = labels[_nearest(emb, emb, need, exclude_self=True)]
    out = {f"R@{k}": 100 * v for k, v in _recall_from_neighbours(nn_labels, labels, ks).items()}
    if with_map:
        out["MAP@R"] = 100 * _map_at_r_from_neighbours(nn_labels, labels)
    if with_nmi:
        out["NMI"] = 100 * nmi(emb, labels, seed=seed)
    return out


def knn_metrics(train_emb, train_labels, test_emb, test_labels):
    """ISD's k-NN protocol in percent: 1-NN, 20-NN (majority) and weighted 200-NN (T = 0.1)."""
    return {"knn1": 100 * knn_accuracy(train_emb, train_labels, test_emb, test_labels, k=1),
            "knn20": 100 * knn_accuracy(train_emb, train_labels, test_emb, test_labels, k=20),
            "knn200w": 100 * knn_accuracy(train_emb, train_labels, test_emb, test_labels, k=200,
                                          weighted=True, temperature=0.1)}
