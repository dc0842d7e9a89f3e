"""The test suite: CPU only, offline.  Run:  python -m pytest -q test_smoke.py

Sections: common.py metrics (against brute force and scikit-learn), dataset loaders on generated
fixture folders, the DML sampler, on-device augmentation, downloads, eval.py, then one section per
method script (losses against re-derivations of the papers' equations, end-to-end digits runs,
checkpoint -> eval.py round trips, resume, bad inputs).
"""
import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import camd
import common
import isd
import s2sd
import spkd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def run_script(*argv, env=None, timeout=600):
    """Run a repository script in a subprocess; returns CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


# ------------------------------------------------------------------------------------------------
# Metrics against brute-force definitions (shared/notes/metrics.md)

def brute_ranking(emb, i):
    d = ((emb.double() - emb[i].double()) ** 2).sum(1)
    return sorted((j for j in range(len(emb)) if j != i), key=lambda j: (d[j].item(), j))


def brute_recall_map(emb, labels, ks):
    hits, aps = {k: 0 for k in ks}, []
    for i in range(len(emb)):
        order = brute_ranking(emb, i)
        rel = [int(labels[j] == labels[i]) for j in order]
        for k in ks:
            hits[k] += any(rel[:k])
        r = sum(rel)
        if r:
            aps.append(sum(sum(rel[:p + 1]) / (p + 1) for p in range(r) if rel[p]) / r)
    return {k: v / len(emb) for k, v in hits.items()}, float(np.mean(aps)) if aps else 0.0


@pytest.mark.parametrize("seed", range(4))
def test_recall_and_map_match_brute_force_with_ties_duplicates_singletons(seed, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randint(0, 3, (61, 4), generator=g).float()   # many exact ties and duplicates
    labels = torch.randint(0, 5, (61,), generator=g)
    labels[:3] = torch.tensor([100, 101, 102])                 # single-member classes
    monkeypatch.setattr(common, "_chunk_rows", lambda n, device: 7)    # 61 rows: chunks do not divide N
    common._last_search.clear()
    rec, mapr = common.recall_at_k(emb, labels), common.map_at_r(emb, labels)
    ref_rec, ref_map = brute_recall_map(emb, labels, (1, 2, 4, 8))
    for k in (1, 2, 4, 8):
        assert rec[k] == pytest.approx(ref_rec[k], abs=1e-12)
    assert mapr == pytest.approx(ref_map, abs=1e-7)


def test_self_excluded_by_index_not_by_first_neighbour():
    # two identical points of different classes: dropping "the first neighbour" would drop the
    # wrong one for one of them; exclusion by index must not
    emb = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    assert common.recall_at_k(emb, labels, ks=(1,))[1] == 0.0
    labels = torch.tensor([0, 0, 1, 1])
    assert common.recall_at_k(emb.clone(), labels, ks=(1,))[1] == 1.0
    assert common.map_at_r(emb.clone(), labels) == 1.0


def test_tie_broken_to_lower_index():
    # query 0 has two equidistant neighbours, index 1 (other class) and 2 (same class)
    emb = torch.tensor([[0.0], [1.0], [-1.0], [5.0]])
    labels = torch.tensor([0, 1, 0, 1])
    # query 0's tie goes to index 1 (miss); queries 2 and 3 hit: 0.5 (0.75 if the tie went to 2)
    assert common.recall_at_k(emb, labels, ks=(1,))[1] == 0.5
    assert common.recall_at_k(emb.clone(), labels, ks=(2,))[2] == 0.75  # query 1 misses


def test_recall_at_1_matches_sklearn_nearest_neighbour():
    from sklearn.neighbors import NearestNeighbors
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    labels = torch.randint(0, 12, (300,), generator=g)
    nn = NearestNeighbors(n_neighbors=2).fit(emb.numpy()).kneighbors(emb.numpy(), return_distance=False)
    ref = float(np.mean(labels.numpy()[nn[:, 1]] == labels.numpy()))
    assert common.recall_at_k(emb, labels, ks=(1,))[1] == pytest.approx(ref)


def test_metric_bundle_equals_single_functions_and_cache_respects_inplace_changes():
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(200, 8, generator=g), dim=1)
    labels = torch.randint(0, 7, (200,), generator=g)
    bundle = common.retrieval_metrics(emb, labels, with_nmi=False)
    rec = common.recall_at_k(emb, labels)
    assert bundle["R@1"] == pytest.approx(100 * rec[1]) and bundle["R@8"] == pytest.approx(100 * rec[8])
    assert bundle["MAP@R"] == pytest.approx(100 * common.map_at_r(emb, labels))
    before = common.map_at_r(emb, labels)
    emb.mul_(-1).add_(torch.randn(200, 8, generator=g))      # in place: the cache must not be reused
    common_ref = brute_recall_map(emb, labels, (1,))[1]
    assert common.map_at_r(emb, labels) == pytest.approx(common_ref, abs=1e-7)
    assert before != pytest.approx(common_ref)


def test_nmi_matches_sklearn_on_separated_clusters():
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs
    from sklearn.metrics import normalized_mutual_info_score
    for seed in range(3):
        x, y = make_blobs(n_samples=400, centers=9, n_features=12, cluster_std=0.5, random_state=seed)
        ref = normalized_mutual_info_score(y, KMeans(9, n_init=3, random_state=0).fit_predict(x))
        ours = common.nmi(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
        assert ours == pytest.approx(ref, abs=1e-6) and ours == pytest.approx(1.0)
    # random embeddings: same ballpark as sklearn (different local optima are allowed)
    x = F.normalize(torch.randn(500, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    y = torch.arange(500) % 20
    ref = normalized_mutual_info_score(y.numpy(), KMeans(20, n_init=1, random_state=0).fit_predict(x.numpy()))
    assert abs(common.nmi(x, y) - ref) < 0.05


def test_knn_accuracy_matches_sklearn_and_weighted_brute_force():
    from sklearn.neighbors import KNeighborsClassifier
    g = torch.Generator().manual_seed(0)
    tr = F.normalize(torch.randn(400, 8, generator=g), dim=1)
    te = F.normalize(torch.randn(97, 8, generator=g), dim=1)
    ytr, yte = torch.randint(0, 6, (400,), generator=g), torch.randint(0, 6, (97,), generator=g)
    for k in (1, 20):
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(tr.numpy(), ytr.numpy())
        ref = float(np.mean(clf.predict(te.numpy()) == yte.numpy()))
        assert common.knn_accuracy(tr, ytr, te, yte, k=k) == pytest.approx(ref)
    correct = 0
    for i in range(len(te)):
        sims = tr @ te[i]
        top = torch.topk(sims, 50).indices
        votes = torch.zeros(6).index_add_(0, ytr[top], torch.exp(sims[top] / 0.1))
        correct += int(votes.argmax() == yte[i])
    assert common.knn_accuracy(tr, ytr, te, yte, k=50, weighted=True) == pytest.approx(correct / len(te))
    keys = common.knn_metrics(tr, ytr, te, yte)
    assert set(keys) == {"knn1", "knn20", "knn200w"}


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    acc = common.topk_accuracy(logits, labels, ks=(1, 2, 3))
    assert acc[1] == pytest.approx(1 / 3) and acc[2] == pytest.approx(1 / 3) and acc[3] == 1.0


# ------------------------------------------------------------------------------------------------
# Loaders on fixture folders in each dataset's layout

def write_image(path, seed=0, size=6):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def test_digits_and_synthetic_splits():
    tr, te = common.load_split("digits", split="train"), common.load_split("digits", split="test")
    assert (len(tr), len(te)) == (1437, 360) and tr.images.dtype == torch.uint8
    assert torch.bincount(te.labels).min() >= 35                       # stratified
    dtr, dte = common.load_split("digits", split="dml_train"), common.load_split("digits", split="dml_test")
    assert set(dtr.labels.tolist()) == {0, 1, 2, 3, 4} and set(dte.labels.tolist()) == {5, 6, 7, 8, 9}
    assert len(dtr) + len(dte) == 1797
    big = common.load_split("digits", split="train", image_size=32, channels=3)
    assert big.images.shape[1:] == (3, 32, 32) and len(big.mean) == 3
    a = common.load_split("synthetic", split="train", synthetic_size=(20, 4, 16))
    b = common.load_split("synthetic", split="train", synthetic_size=(20, 4, 16))
    assert torch.equal(a.images, b.images) and a.images.shape == (20, 3, 16, 16)
    assert not torch.equal(a.images, common.load_split("synthetic", split="test", synthetic_size=(20, 4, 16)).images)


def test_unknown_dataset_and_split_raise_dataset_error(tmp_path):
    with pytest.raises(common.DatasetError, match="unknown dataset"):
        common.load_split("mnist", root=str(tmp_path))
    with pytest.raises(common.DatasetError, match="no split"):
        common.load_split("digits", split="validation")
    with pytest.raises(common.DatasetError, match="cifar100"):
        common.load_split("cifar100", root=str(tmp_path), download=False)


def make_cub(root, n_classes=200):
    for c in range(1, n_classes + 1):
        write_image(os.path.join(root, "CUB_200_2011", "images", f"{c:03d}.Bird_{c}", f"img_{c}_0.jpg"), c)
        if c % 2:
            write_image(os.path.join(root, "CUB_200_2011", "images", f"{c:03d}.Bird_{c}", f"img_{c}_1.jpg"), c)
        open(os.path.join(root, "CUB_200_2011", "images", f"{c:03d}.Bird_{c}", f"._img_{c}_0.jpg"), "w").close()


def test_cub_fixture_split_and_half_extracted(tmp_path):
    make_cub(str(tmp_path))
    tr = common.load_split("cub", str(tmp_path), "train", download=False)
    te = common.load_split("cub", str(tmp_path), "test", download=False)
    assert (tr.num_classes, te.num_classes) == (100, 100)
    assert (len(tr), len(te)) == (150, 150)                          # '._' files ignored
    assert all("/001." in p or int(p.split("/images/")[1][:3]) <= 100 for p in tr.paths)
    assert tr.labels.max() == 99 and te.labels.min() == 0
    half = tmp_path / "half"
    make_cub(str(half), n_classes=150)
    with pytest.raises(common.DatasetError, match="incomplete"):
        common.load_split("cub", str(half), "train", download=False)
    with pytest.raises(common.DatasetError, match="CUB_200_2011"):
        common.load_split("cub", str(tmp_path / "nothing"), "train", download=False)


def test_cars_fixture_from_mat(tmp_path):
    import scipy.io
    base = tmp_path / "cars"
    recs = []
    for i, c in enumerate(list(range(1, 197)) + [1, 99]):
        rel = f"car_ims/{i:06d}.jpg"
        write_image(str(base / rel), i)
        recs.append((rel, c, i % 2))
    ann = np.array(recs, dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    scipy.io.savemat(str(base / "cars_annos.mat"), {"annotations": ann[None, :]})
    tr = common.load_split("cars", str(tmp_path), "train")
    te = common.load_split("cars", str(tmp_path), "test")
    assert (len(tr), len(te), tr.num_classes, te.num_classes) == (99, 99, 98, 98)   # test flag ignored
    os.remove(base / "car_ims" / "000005.jpg")
    with pytest.raises(common.DatasetError, match="incomplete"):
        common.load_split("cars", str(tmp_path), "train")


def test_sop_fixture_and_missing_file(tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    for split, classes in (("train", range(1, 6)), ("test", range(6, 10))):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for j in range(2):
                rel = f"bicycle_final/{c}_{j}.JPG"
                write_image(str(base / rel), c * 10 + j)
                lines.append(f"{len(lines)} {c} 1 {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    tr = common.load_split("sop", str(tmp_path), "train", download=False)
    te = common.load_split("sop", str(tmp_path), "test", download=False)
    assert (len(tr), tr.num_classes, len(te), te.num_classes) == (10, 5, 8, 4)
    assert tr.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    os.remove(base / "bicycle_final" / "7_1.JPG")
    with pytest.raises(common.DatasetError, match="1 of 8 images"):
        common.load_split("sop", str(tmp_path), "test", download=False)


def test_tinyimagenet_fixture_and_cache(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n001", "n002", "n003"]
    (base).mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids))
    for i, w in enumerate(wnids):
        for j in range(2):
            write_image(str(base / "train" / w / "images" / f"{w}_{j}.JPEG"), i * 2 + j, size=64)
    lines = []
    for j in range(4):
        write_image(str(base / "val" / "images" / f"val_{j}.JPEG"), 50 + j, size=64)
        lines.append(f"val_{j}.JPEG\t{wnids[j % 3]}\t0\t0\t10\t10")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    tr = common.load_split("tinyimagenet", str(tmp_path), "train", download=False)
    va = common.load_split("tinyimagenet", str(tmp_path), "val", download=False)
    assert tr.images.shape == (6, 3, 64, 64) and tr.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert va.labels.tolist() == [0, 1, 2, 0] and tr.num_classes == 3
    assert (base / "train_uint8.pt").exists()
    again = common.load_split("tinyimagenet", str(tmp_path), "train", download=False)
    assert torch.equal(again.images, tr.images)
    import shutil
    shutil.rmtree(base / "train" / "n002")
    os.remove(base / "train_uint8.pt")
    with pytest.raises(common.DatasetError, match="incomplete"):
        common.load_split("tinyimagenet", str(tmp_path), "train", download=False)


def test_imagenet100_subset_and_folder(tmp_path):
    for w in common.IMAGENET100_WNIDS + ["n99999999"]:
        write_image(str(tmp_path / "imagenet" / "val" / w / "a.JPEG"), 1)
    assert len(set(common.IMAGENET100_WNIDS)) == 100
    sub = common.load_split("imagenet100", str(tmp_path), "val")
    assert sub.num_classes == 100 and len(sub) == 100 and "n99999999" not in " ".join(sub.paths)
    with pytest.raises(common.DatasetError, match="incomplete"):
        common.load_split("imagenet", str(tmp_path), "val")              # 101 of 1000 folders
    with pytest.raises(common.DatasetError, match="imagenet"):
        common.load_split("imagenet", str(tmp_path), "train")
    flat = tmp_path / "flat"
    for j in range(3):
        write_image(str(flat / f"{j}.png"), j)
    f = common.load_split("folder", str(flat))
    assert len(f) == 3 and f.labels.tolist() == [-1, -1, -1]
    lab = common.load_split("folder", str(tmp_path / "imagenet" / "val"))
    assert lab.num_classes == 101
    with pytest.raises(common.DatasetError):
        common.load_split("folder", str(tmp_path / "empty_nowhere"))


# ------------------------------------------------------------------------------------------------
# Sampler and augmentation

def test_class_balanced_batches_released_semantics():
    labels = torch.arange(1000) % 50                       # 50 classes x 20
    g = torch.Generator().manual_seed(0)
    b = common.class_balanced_batches(labels, 8, 2, generator=g)
    assert b.shape == (1000 // 16, 16)
    pairs = labels[b].view(-1, 8, 2)
    assert torch.equal(pairs[..., 0], pairs[..., 1])      # 2 samples of the same class per draw
    again = common.class_balanced_batches(labels, 8, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b, again)
    many = common.class_balanced_batches(labels, 8, 2, num_batches=4000, generator=g)
    counts = torch.bincount(labels[many].flatten(), minlength=50).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.15  # classes uniform (binomial noise ~4%)
    # classes are drawn WITH replacement: some of 62 batches of 8 draws from 50 classes repeat one
    assert any(len(set(row)) < 8 for row in pairs[..., 0].tolist())
    idx_counts = torch.bincount(many.flatten(), minlength=1000).float()
    assert (idx_counts > 0).all()


def test_augmentations_shapes_ranges_and_identities():
    x = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    xf = x.float() / 255
    out = common.random_crop_flip(x, padding=4)
    assert out.shape == xf.shape and out.min() >= 0 and out.max() <= 1
    same = common.random_crop_flip(x, padding=0)
    assert all(torch.equal(same[i], xf[i]) or torch.equal(same[i], xf[i].flip(2)) for i in range(6))
    # crops of a padded image contain only original pixels or zeros
    assert torch.isin(out.flatten(), torch.cat([xf.flatten(), torch.zeros(1)])).all()
    full = common.random_resized_crop(x, 12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(full, xf, atol=1e-5)
    assert common.random_resized_crop(x, 7).shape == (6, 3, 7, 7)
    gray = common.random_grayscale(x, p=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    assert torch.equal(common.color_jitter(x, p=0.0), xf)
    cj = common.color_jitter(x, p=1.0)
    assert cj.shape == xf.shape and cj.min() >= 0 and cj.max() <= 1
    hsv = common._rgb_to_hsv(xf)
    assert torch.allclose(common._hsv_to_rgb(hsv), xf, atol=1e-5)
    n = common.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(n, (xf - 0.5) / 0.25)
    assert common.resize(x, 6).shape == (6, 3, 6, 6)
    batches = common.batch_indices(10, 4, shuffle=True)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [len(b) for b in common.batch_indices(10, 4, drop_last=True)] == [4, 4]


def test_embed_flip_average_and_file_form(tmp_path):
    split = common.load_split("synthetic", split="test", synthetic_size=(10, 3, 8))
    w = torch.randn(3 * 8 * 8, 5)

    def fn(x):
        return x.flatten(1) @ w, x.flatten(1)[:, :2]
    emb, second, labels = common.embed(fn, split, "cpu", batch_size=3, flip_average=True)
    x = common.normalize(split.images, split.mean, split.std)
    assert torch.allclose(emb, ((x.flatten(1) @ w) + (x.flip(3).flatten(1) @ w)) / 2, atol=1e-4)
    assert torch.allclose(second, x.flatten(1)[:, :2]) and torch.equal(labels, split.labels)
    for j in range(3):
        write_image(str(tmp_path / "c" / f"{j}.png"), j, size=20)
    files = common.load_split("folder", str(tmp_path))
    out, lab = common.embed(lambda x: x.mean((2, 3)), files, "cpu", batch_size=2, workers=0,
                            transform=common.eval_transform(16, 12))
    assert out.shape == (3, 3) and lab.tolist() == [0, 0, 0]
    ds = common.ImageFiles(files.paths, files.labels, common.two_views(common.moco_v2_transform(12),
                                                                      common.moco_v2_transform(12, strong=False)))
    (v1, v2), _ = ds[0]
    assert v1.shape == v2.shape == (3, 12, 12)


# ------------------------------------------------------------------------------------------------
# Downloads: checksum verified, a failed download never looks finished

def test_download_checksum_and_extract(tmp_path):
    src = tmp_path / "src" / "payload"
    src.mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    archive = tmp_path / "payload.tgz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src, arcname="payload")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "dl" / "payload.tgz"
    with pytest.raises(common.DatasetError, match="checksum"):
        common.download_url(archive.as_uri(), str(dest), md5="0" * 32)
    assert not dest.exists() and not (tmp_path / "dl" / "payload.tgz.part").exists()
    common.download_url(archive.as_uri(), str(dest), md5=md5)
    assert dest.exists()
    common.extract(str(dest), str(tmp_path / "dl"), "payload")
    assert (tmp_path / "dl" / "payload" / "a.txt").read_text() == "hello"
    assert not any(p.name.startswith(".extracting") for p in (tmp_path / "dl").iterdir())
    with pytest.raises(common.DatasetError, match="could not download"):
        common.download_url((tmp_path / "missing.tgz").as_uri(), str(tmp_path / "x.tgz"))


# ------------------------------------------------------------------------------------------------
# eval.py with a tiny method module that follows the contract

TINY_METHOD = '''
import torch, common
def model_from_args(args):
    torch.manual_seed(123)  # weights are overwritten by the checkpoint
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, args.dim))
def evaluate(model, args, device):
    model.eval()
    split = common.load_split(args.dataset, args.data_root, "dml_test")
    emb, labels = common.embed(lambda x: torch.nn.functional.normalize(model(x), dim=1), split, device)
    return common.retrieval_metrics(emb, labels)
def features(model, args, device, split):
    model.eval()
    s = common.load_split(args.dataset, args.data_root, "dml_train" if split == "train" else "dml_test")
    return common.embed(model, s, device)
'''


def make_tiny_checkpoint(tmp_path):
    (tmp_path / "tinymethod.py").write_text(TINY_METHOD)
    sys.path.insert(0, str(tmp_path))
    import importlib
    mod = importlib.import_module("tinymethod")
    args = {"dataset": "digits", "data_root": str(tmp_path), "dim": 8}
    import argparse
    model = mod.model_from_args(argparse.Namespace(**args))
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_()
    metrics = mod.evaluate(model, argparse.Namespace(**args), "cpu")
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"method": "tinymethod", "args": args, "model": model.state_dict(), "metrics": metrics},
               run / "model.pt")
    return run, metrics


def test_eval_py_reproduces_checkpoint_metrics(tmp_path):
    run, metrics = make_tiny_checkpoint(tmp_path)
    r = run_script("eval.py", str(run / "model.pt"), "--linear-probe", env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = json.loads((run / "eval.json").read_text())
    for k, v in metrics.items():
        assert out[k] == pytest.approx(v, abs=1e-6)
    assert set(out) >= {"R@1", "R@2", "R@4", "R@8", "MAP@R", "NMI", "linear"}
    assert 0 <= out["linear"] <= 100 and "R@1" in r.stdout


def test_eval_py_embeddings_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(120, 6, generator=g), dim=1)
    labels = torch.arange(120) % 10
    train = F.normalize(torch.randn(200, 6, generator=g), dim=1)
    np.savez(tmp_path / "e.npz", emb=emb.numpy(), labels=labels.numpy(), train_emb=train.numpy(),
             train_labels=(torch.arange(200) % 10).numpy())
    r = run_script("eval.py", "--embeddings", str(tmp_path / "e.npz"))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "e_eval.json").read_text())
    assert out["R@1"] == pytest.approx(100 * common.recall_at_k(emb, labels)[1])
    assert out["MAP@R"] == pytest.approx(100 * common.map_at_r(emb, labels))
    assert {"NMI", "knn1", "knn20", "knn200w"} <= set(out)


def test_eval_py_bad_inputs_exit_2(tmp_path):
    run, _ = make_tiny_checkpoint(tmp_path)
    env = {"PYTHONPATH": str(tmp_path)}
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"method": "no_such_method", "args": {}, "model": {}}, tmp_path / "unknown.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    ck = torch.load(run / "model.pt", weights_only=True)
    ck["args"]["dim"] = 9
    torch.save(ck, tmp_path / "mismatch.pt")
    np.savez(tmp_path / "bad.npz", emb=np.zeros((3, 2)))
    cases = [([str(tmp_path / "missing.pt")], "does not exist"),
             ([str(tmp_path / "junk.pt")], "cannot read checkpoint"),
             ([str(tmp_path / "unknown.pt")], "cannot be imported"),
             ([str(tmp_path / "foreign.pt")], "not a checkpoint"),
             ([str(tmp_path / "mismatch.pt")], "do not fit"),
             ([str(run / "model.pt"), "--dataset", "cifar10", "--data-root", str(tmp_path / "none")], "cifar10"),
             (["--embeddings", str(tmp_path / "bad.npz")], "lacks array"),
             (["--embeddings", str(tmp_path / "nope.npz")], "does not exist")]
    for argv, message in cases:
        r = run_script("eval.py", *argv, env=env)
        assert r.returncode == 2, (argv, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ------------------------------------------------------------------------------------------------
# s2sd.py: losses against per-anchor re-derivations, end-to-end runs, eval round trip, resume

_S2SD_HERE = os.path.dirname(os.path.abspath(__file__))


def _s2sd_naive_ms(emb, labels, alpha=2.0, beta=40.0, lam=0.5, eps=0.1):
    """Per-anchor loop of the Multisimilarity loss with Revisiting-DML mining (reference semantics)."""
    sim = emb @ emb.T
    terms = []
    for i in range(len(emb)):
        pos = [sim[i, j] for j in range(len(emb)) if j != i and labels[j] == labels[i]]
        neg = [sim[i, k] for k in range(len(emb)) if labels[k] != labels[i]]
        if not pos or not neg:
            continue
        min_p, max_n = min(v.item() for v in pos), max(v.item() for v in neg)
        pos_m = [v for v in pos if v.item() - eps < max_n]
        neg_m = [v for v in neg if v.item() + eps > min_p]
        if not pos_m or not neg_m:
            continue
        lp = torch.log(1 + sum(torch.exp(-alpha * (v - lam)) for v in pos_m)) / alpha
        ln = torch.log(1 + sum(torch.exp(beta * (v - lam)) for v in neg_m)) / beta
        terms.append(lp + ln)
    return sum(terms) / len(terms) if terms else emb.sum() * 0


def _s2sd_naive_kl(student, teacher, T=1.0):
    """T^2/B * sum_i sum_j p_ij (log p_ij - log q_ij), p from the teacher Gram row, q from the student's."""
    b = len(student)
    total = 0.0
    for i in range(b):
        ls = [torch.dot(student[i], student[j]) / T for j in range(b)]
        lt = [torch.dot(teacher[i], teacher[j]).detach() / T for j in range(b)]
        zs, zt = sum(torch.exp(v) for v in ls), sum(torch.exp(v) for v in lt)
        for j in range(b):
            p, q = torch.exp(lt[j]) / zt, torch.exp(ls[j]) / zs
            total = total + p * (torch.log(p) - torch.log(q))
    return total * T * T / b


def _s2sd_naive_margin(emb, labels, beta, triplets, margin=0.2):
    loss, active = 0.0, 0
    for a, p, n in zip(*[t.tolist() for t in triplets]):
        d_ap = torch.sqrt(((emb[a] - emb[p]) ** 2).sum() + 1e-8)
        d_an = torch.sqrt(((emb[a] - emb[n]) ** 2).sum() + 1e-8)
        lp = torch.clamp(d_ap - beta[labels[a]] + margin, min=0)
        ln = torch.clamp(beta[labels[a]] - d_an + margin, min=0)
        active += int(lp > 0 or ln > 0)
        loss = loss + lp + ln
    return loss / max(active, 1)


def _s2sd_emb(seed, b=12, d=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, y


def _s2sd_close(a, b, tol=1e-6):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("seed", range(6))
def test_s2sd_multisimilarity_matches_naive(seed):
    x, y = _s2sd_emb(seed, b=10 + seed, classes=3 + seed % 3)  # includes singleton classes / no-positive anchors
    x2 = x.detach().clone().requires_grad_(True)
    got, ref = s2sd.multisimilarity_loss(x, y), _s2sd_naive_ms(x2, y)
    got.backward()
    ref.backward()
    assert got.dtype == torch.float64 and _s2sd_close(got, ref)
    assert _s2sd_close(x.grad, x2.grad)


def test_s2sd_multisimilarity_no_survivor_is_connected_zero():
    x = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])  # s_pos = 1, s_neg = 0: no negative passes s + 0.1 > 1
    loss = s2sd.multisimilarity_loss(x, y)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad and torch.all(x.grad == 0)
    assert float(_s2sd_naive_ms(x.detach(), y)) == 0.0


@pytest.mark.parametrize("seed,T", [(0, 1.0), (1, 0.5), (2, 2.0)])
def test_s2sd_similarity_kl_matches_naive(seed, T):
    s, _ = _s2sd_emb(seed, b=7, d=5)
    t, _ = _s2sd_emb(seed + 10, b=7, d=9)
    s2 = s.detach().clone().requires_grad_(True)
    got, ref = s2sd.similarity_kl(s, t, T), _s2sd_naive_kl(s2, t, T)
    got.backward()
    ref.backward()
    assert _s2sd_close(got, ref) and _s2sd_close(s.grad, s2.grad)
    assert t.grad is None  # teacher side detached (dagger in Eq. 3)


def test_s2sd_similarity_kl_zero_for_identical_and_positive_otherwise():
    s, _ = _s2sd_emb(3, b=9, d=4)
    assert abs(s2sd.similarity_kl(s, s.detach().clone()).item()) < 1e-12
    t, _ = _s2sd_emb(4, b=9, d=4)
    assert s2sd.similarity_kl(s, t).item() > 0


def test_s2sd_margin_loss_matches_naive_and_miner():
    x, y = _s2sd_emb(5, b=16, d=8, classes=4)
    beta = torch.full((4,), 1.2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    trip = s2sd.distance_weighted_triplets(x, y)
    a, p, n = trip
    assert torch.all(y[a] == y[p]) and torch.all(y[a] != y[n])
    x2, b2 = x.detach().clone().requires_grad_(True), beta.detach().clone().requires_grad_(True)
    got, ref = s2sd.margin_loss(x, y, beta, trip), _s2sd_naive_margin(x2, y, b2, trip)
    got.backward()
    ref.backward()
    assert _s2sd_close(got, ref) and _s2sd_close(x.grad, x2.grad) and _s2sd_close(beta.grad, b2.grad)
    # R-Margin: swapped triplets are (a, a, same-class sample); about p of them
    swaps = 0
    for _ in range(50):
        a, p, n = s2sd.distance_weighted_triplets(x, y, rho=0.2)
        sw = a == p
        assert torch.all(y[a[sw]] == y[n[sw]]) and torch.all(n[sw] != a[sw]) and torch.all(y[a[~sw]] != y[n[~sw]])
        swaps += int(sw.sum())
    assert 0.12 < swaps / (50 * len(a)) < 0.28


def test_s2sd_distance_weighted_negative_distribution():
    x, y = _s2sd_emb(6, b=8, d=5, classes=3)
    d = torch.cdist(x.detach(), x.detach()).clamp(min=0.5)
    w = d ** (2 - 5) * (1 - d * d / 4) ** (-(5 - 3) / 2)  # 1 / q(d) on the unit sphere, D = 5
    w[y[:, None] == y[None, :]] = 0
    expect = w / w.sum(1, keepdim=True)
    torch.manual_seed(1)
    counts, calls = torch.zeros(8, 8, dtype=torch.float64), 500
    for _ in range(calls):
        a, p, n = s2sd.distance_weighted_triplets(x, y)
        counts[a, n] += 1
    assert float((counts / calls - expect).abs().max()) < 0.08


def test_s2sd_losses_bf16_autocast():
    x, y = _s2sd_emb(7, b=14, d=16)
    xf = x.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ms = s2sd.multisimilarity_loss(xf.bfloat16(), y)
        kl = s2sd.similarity_kl(xf.bfloat16(), xf[:, :8].bfloat16())
    assert ms.dtype == torch.float32 and kl.dtype == torch.float32
    assert abs(float(ms) - float(s2sd.multisimilarity_loss(xf.bfloat16().float(), y))) < 1e-5
    assert torch.isfinite(kl)


def _s2sd_args(tmp_path, *extra):
    return s2sd.get_args(["--device", "cpu", "--save-dir", str(tmp_path), "--log-every", "1000", *extra])


@pytest.mark.parametrize("variant,loss", [("baseline", "multisimilarity"), ("dsd", "multisimilarity"),
                                          ("msd", "margin"), ("msdf", "rmargin"), ("msdfa", "multisimilarity")])
def test_s2sd_variants_and_losses_run_on_digits(tmp_path, variant, loss, capsys):
    args = _s2sd_args(tmp_path, "--variant", variant, "--loss", loss, "--max-steps", "4", "--feat-delay", "2",
                      "--run-name", "r")
    s2sd.run(args)
    ck = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert len(ck["args"]["target_dims"]) == {"baseline": 0, "dsd": 1}.get(variant, 4)
    assert 0 <= ck["metrics"]["R@1"] <= 100 and "NMI" in ck["metrics"] and "MAP@R" in ck["metrics"]
    out = capsys.readouterr().out
    assert "final (last epoch)" in out and "best epoch (chosen on the test set" in out


def test_s2sd_save_eval_identical(tmp_path):
    cmd = [sys.executable, "s2sd.py", "--epochs", "1", "--max-steps", "6", "--save-dir", str(tmp_path),
           "--run-name", "e"]
    r = subprocess.run(cmd, cwd=_S2SD_HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "e" / "model.pt"
    ck = torch.load(path, map_location="cpu", weights_only=True)
    args = s2sd.argparse.Namespace(**ck["args"])
    model = s2sd.model_from_args(args)
    model.load_state_dict(ck["model"])
    again = s2sd.evaluate(model, args, "cpu")
    assert all(abs(again[k] - ck["metrics"][k]) <= 1e-6 for k in ck["metrics"])
    assert (tmp_path / "e" / "config.json").exists() and (tmp_path / "e" / "metrics.jsonl").exists()
    if os.path.exists(os.path.join(_S2SD_HERE, "eval.py")):
        r = subprocess.run([sys.executable, "eval.py", str(path)], cwd=_S2SD_HERE, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        ev = json.loads((tmp_path / "e" / "eval.json").read_text())
        ev = ev.get("metrics", ev)
        assert all(abs(ev[k] - ck["metrics"][k]) <= 1e-6 for k in ck["metrics"])


def test_s2sd_resume_equivalence(tmp_path):
    # 22 steps per digits epoch: stop mid-epoch at 7, resume across the epoch boundary (and its eval) to 26.
    flags = ["--eval-every", "1", "--feat-delay", "5", "--loss", "rmargin"]
    s2sd.run(_s2sd_args(tmp_path, *flags, "--max-steps", "26", "--run-name", "full"))
    s2sd.run(_s2sd_args(tmp_path, *flags, "--max-steps", "7", "--run-name", "part"))
    s2sd.run(_s2sd_args(tmp_path, *flags, "--max-steps", "26", "--resume", str(tmp_path / "part" / "last.pt")))
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "model.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["metrics"] == b["metrics"]
    la = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    lb = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert (la["epoch"], la["next_batch"], la["step"]) == (lb["epoch"], lb["next_batch"], lb["step"]) == (1, 4, 26)
    assert torch.equal(la["betas"]["0"], lb["betas"]["0"])


@pytest.mark.parametrize("flags,needle", [(["--dataset", "imagenet5"], "unknown dataset"),
                                          (["--arch", "vgg"], "unknown arch"),
                                          (["--dataset", "cub", "--no-pretrained"], "cub"),
                                          (["--variant", "dsd", "--target-dims", "8", "16"], "dsd"),
                                          (["--resume", "nonexistent.pt"], "cannot resume")])
def test_s2sd_bad_inputs_exit_2(tmp_path, flags, needle, monkeypatch, capsys):
    # an empty CUB_200_2011/images folder = half-extracted dataset: error without any download attempt
    os.makedirs(tmp_path / "data" / "CUB_200_2011" / "images")
    argv = ["s2sd.py", "--data-root", str(tmp_path / "data"), "--save-dir", str(tmp_path), *flags]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as ex:
        s2sd.main()
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.startswith("error:") and needle in err.lower()
    assert len(err.strip().splitlines()) == 1
    if "cub" in flags:  # the same through a real process: one line, exit 2, no traceback
        r = subprocess.run([sys.executable, *argv], cwd=_S2SD_HERE, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr == err and "Traceback" not in r.stderr


def test_s2sd_nonfinite_loss_exits_2_and_keeps_last(tmp_path, monkeypatch, capsys):
    s2sd.run(_s2sd_args(tmp_path, "--max-steps", "2", "--run-name", "n"))
    last = tmp_path / "n" / "last.pt"
    before = last.read_bytes()
    monkeypatch.setattr(s2sd, "similarity_kl", lambda s, t, T=1.0: (s.sum() * float("nan")))
    with pytest.raises(SystemExit) as ex:
        s2sd.run(_s2sd_args(tmp_path, "--max-steps", "4", "--resume", str(last)))
    assert ex.value.code == 2 and "non-finite distill loss at step 3" in capsys.readouterr().err
    assert last.read_bytes() == before


def test_s2sd_image_files_path_on_cub_fixture(tmp_path):
    # 200 class folders x 2 tiny JPEGs in the CUB layout: exercises the DataLoader + eval_transform path
    from PIL import Image
    base = tmp_path / "data" / "CUB_200_2011" / "images"
    g = torch.Generator().manual_seed(0)
    for c in range(1, 201):
        os.makedirs(base / f"{c:03d}.Bird_{c}")
        for i in range(2):
            arr = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(base / f"{c:03d}.Bird_{c}" / f"img_{i}.jpg")
    args = _s2sd_args(tmp_path, "--dataset", "cub", "--data-root", str(tmp_path / "data"), "--arch", "smallcnn",
                      "--no-pretrained", "--image-size", "16", "--workers", "0", "--batch-size", "8",
                      "--max-steps", "2", "--embed-dim", "8", "--target-dims", "16", "32", "--run-name", "c")
    s2sd.run(args)
    ck = torch.load(tmp_path / "c" / "model.pt", weights_only=True)
    assert ck["args"]["in_channels"] == 3 and 0 <= ck["metrics"]["R@1"] <= 100


# ------------------------------------------------------------------------------------------------
# spkd.py: sp_loss against Eq. 2-4 loops, model zoo, teacher formats, end-to-end, resume

_SPKD_DIR = os.path.dirname(os.path.abspath(__file__))
_SPKD_TINY = ["--dataset", "digits", "--teacher-arch", "resnet8", "--student-arch", "resnet8", "--teacher-epochs", "1",
              "--batch-size", "256", "--log-every", "1000"]


def _spkd_run(args, save_dir, check=True):
    r = subprocess.run([sys.executable, "spkd.py", *args, "--save-dir", str(save_dir)], cwd=_SPKD_DIR,
                       capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def _spkd_naive_sp(f_s, f_t):
    """Eq. 2-4 entry by entry: G_ij = <q_i, q_j> / ||(<q_i, q_k>)_k||_2, then sum_ij (G_t - G_s)_ij^2 / b^2."""
    b = f_s.shape[0]
    q_s, q_t = f_s.reshape(b, -1), f_t.reshape(b, -1)
    total = 0.0
    for i in range(b):
        row_s = [torch.dot(q_s[i], q_s[j]) for j in range(b)]
        row_t = [torch.dot(q_t[i], q_t[j]) for j in range(b)]
        n_s = torch.sqrt(sum(v * v for v in row_s))
        n_t = torch.sqrt(sum(v * v for v in row_t))
        for j in range(b):
            total = total + (row_t[j] / n_t - row_s[j] / n_s) ** 2
    return total / (b * b)


def test_spkd_sp_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    f_t = torch.randn(6, 5, 2, 2, generator=g, dtype=torch.float64)
    a, b = f_s.clone().requires_grad_(True), f_t.clone().requires_grad_(True)
    fast = spkd.sp_loss(a, b)
    ga, gb = torch.autograd.grad(fast, (a, b))
    a2, b2 = f_s.clone().requires_grad_(True), f_t.clone().requires_grad_(True)
    ref = _spkd_naive_sp(a2, b2)
    ra, rb = torch.autograd.grad(ref, (a2, b2))
    assert fast.shape == () and fast.dtype == torch.float64
    assert abs(fast.item() - ref.item()) / ref.item() <= 1e-6
    for g1, g2 in ((ga, ra), (gb, rb)):  # gradients w.r.t. student and teacher activations
        assert (g1 - g2).norm() / g2.norm() <= 1e-6
    # fp32 / bf16 inputs are computed in fp32
    assert spkd.sp_loss(f_s.float(), f_t.float()).dtype == torch.float32
    assert spkd.sp_loss(f_s.bfloat16(), f_t.bfloat16()).dtype == torch.float32


def test_spkd_sp_loss_matches_repdistiller_formula():
    """RepDistiller distiller_zoo/SP.py: G = F.normalize(mm(f, f.t())), ((G_t - G_s)^2).view(-1,1).sum(0) / b^2."""
    torch.manual_seed(1)
    f_s, f_t = torch.randn(8, 16, 4, 4), torch.rand(8, 32, 2, 2)
    qs, qt = f_s.view(8, -1), f_t.view(8, -1)
    d = F.normalize(torch.mm(qt, qt.t())) - F.normalize(torch.mm(qs, qs.t()))
    ref = (d * d).view(-1, 1).sum(0) / 64
    assert torch.allclose(spkd.sp_loss(f_s, f_t), ref[0], rtol=1e-6)


def test_spkd_sp_loss_limits():
    torch.manual_seed(2)
    f = torch.randn(5, 8, 3, 3)
    assert spkd.sp_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert spkd.sp_loss(3.0 * f, f).item() == pytest.approx(0.0, abs=1e-10)  # global scale cancels (Eq. 2)
    f_t = torch.randn(5, 8, 3, 3)
    rot = torch.linalg.qr(torch.randn(8, 8))[0]  # orthogonal transform of the teacher's channels
    f_rot = torch.einsum("dc,bchw->bdhw", rot, f_t)
    assert spkd.sp_loss(f, f_rot).item() == pytest.approx(spkd.sp_loss(f, f_t).item(), rel=1e-5)
    assert spkd.sp_loss(f, f_t).item() > 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 inside autocast
        v = spkd.sp_loss(f.bfloat16(), f_t.bfloat16())
    assert v.dtype == torch.float32
    assert v.item() == pytest.approx(spkd.sp_loss(f.bfloat16().float(), f_t.bfloat16().float()).item(), rel=1e-5)


def test_spkd_kd_loss_matches_naive():
    torch.manual_seed(3)
    zs, zt = torch.randn(4, 7, dtype=torch.float64, requires_grad=True), torch.randn(4, 7, dtype=torch.float64)
    T = 4.0
    ref = 0.0
    for i in range(4):  # T^2 * mean_i sum_c p_t log(p_t / p_s)
        es, et = [torch.exp(zs[i, c] / T) for c in range(7)], [torch.exp(zt[i, c] / T) for c in range(7)]
        ps, pt = [e / sum(es) for e in es], [e / sum(et) for e in et]
        ref = ref + sum(pt[c] * torch.log(pt[c] / ps[c]) for c in range(7))
    ref = ref / 4 * T * T
    out = spkd.kd_loss(zs, zt, T)
    assert abs(out.item() - ref.item()) / ref.item() <= 1e-6
    g1, g2 = torch.autograd.grad(out, zs)[0], torch.autograd.grad(ref, zs)[0]
    assert (g1 - g2).norm() / g2.norm() <= 1e-6
    assert spkd.kd_loss(zt, zt, T).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("arch", list(spkd.ARCHS))
def test_spkd_zoo_shapes(arch):
    torch.manual_seed(0)
    tv = arch in spkd.TV_ARCHS
    m = spkd.build_model(arch, 7).eval()
    x = torch.randn(2, 3, 64 if tv else 32, 64 if tv else 32)
    with torch.no_grad():
        feats, pooled, logits = m(x, with_features=True)
        assert torch.equal(m(x), logits)
    assert logits.shape == (2, 7)
    width = pooled.shape[1]
    expect = {"resnet8x4": 256, "resnet32x4": 256, "wrn_16_2": 128, "wrn_40_2": 128, "wrn_16_8": 512,
              "vgg8": 512, "vgg13": 512, "resnet18": 512, "resnet34": 512, "resnet50": 2048}.get(arch, 64)
    assert width == expect and feats[-1].shape[1] == expect
    n_stages = 5 if arch.startswith("vgg") else 4 if tv else 3
    assert len(feats) == n_stages
    if not tv:  # last map: 8x8 (resnet/wrn) or 4x4 (vgg) at 32 px
        assert feats[-1].shape[-1] == (4 if arch.startswith("vgg") else 8)
    if arch.startswith("wrn"):  # SP map is block3's output BEFORE the final BN-ReLU: can be negative
        assert feats[-1].min() < 0
    elif not tv:
        assert feats[-1].min() >= 0


def test_spkd_zoo_repdistiller_state_dict_names():
    sd = spkd.build_model("resnet8x4", 100).state_dict()
    assert sd["layer1.0.downsample.0.weight"].shape == (64, 32, 1, 1) and sd["fc.weight"].shape == (100, 256)
    sd = spkd.build_model("wrn_16_2", 100).state_dict()
    assert sd["block1.layer.0.convShortcut.weight"].shape == (32, 16, 1, 1) and sd["fc.weight"].shape == (100, 128)
    assert "block1.layer.1.convShortcut.weight" not in sd and not any(k.endswith("conv1.bias") for k in sd)
    sd = spkd.build_model("vgg13", 100).state_dict()
    assert {"block0.0.bias", "block0.1.running_mean", "block0.3.weight", "block0.4.weight", "classifier.weight"} <= set(sd)
    sd = spkd.build_model("resnet8", 100).state_dict()
    assert sd["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1) and "layer1.0.downsample.0.weight" not in sd


def test_spkd_teacher_checkpoint_formats(tmp_path):
    torch.manual_seed(0)
    src = spkd.build_model("wrn_16_1", 10).eval()
    x = torch.randn(3, 3, 32, 32)
    shared = {"epoch": 240, "model": src.state_dict(), "accuracy": 71.5, "optimizer": {"state": {}},
              "opt": argparse.Namespace(model="wrn_16_1")}  # a non-tensor object: needs the trusted-pickle path
    paths = {"shared": shared, "bare": src.state_dict(),
             "repo": {"method": "spkd", "args": {"student_arch": "wrn_16_1"}, "model": src.state_dict(), "metrics": {}}}
    for name, obj in paths.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        t = spkd.load_teacher(str(tmp_path / f"{name}.pt"), "wrn_16_1", 10).eval()
        with torch.no_grad():
            assert torch.equal(t(x), src(x)), name
    with pytest.raises(ValueError, match="does not match"):
        spkd.load_teacher(str(tmp_path / "shared.pt"), "wrn_16_2", 10)
    with pytest.raises(ValueError, match="does not match"):
        spkd.load_teacher(str(tmp_path / "bare.pt"), "wrn_16_1", 100)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        spkd.load_teacher(str(tmp_path / "junk.pt"), "wrn_16_1", 10)


@pytest.fixture(scope="module")
def _spkd_runs(tmp_path_factory):
    """One full tiny run (teacher trained + cached, 2 student epochs) and a 1 + 1 epoch resumed run."""
    d = tmp_path_factory.mktemp("spkd")
    full = _spkd_run([*_SPKD_TINY, "--epochs", "2", "--run-name", "full"], d)
    _spkd_run([*_SPKD_TINY, "--epochs", "1", "--run-name", "half"], d)
    resumed = _spkd_run([*_SPKD_TINY, "--epochs", "2", "--run-name", "half", "--resume", str(d / "half" / "last.pt")], d)
    return d, full, resumed


def test_spkd_digits_teacher_then_student(_spkd_runs):
    d, full, resumed = _spkd_runs
    assert "teacher: training resnet8" in full.stdout and "teacher: reusing" in resumed.stdout
    assert "teacher resnet8: top1" in full.stdout and "best epoch, chosen on the test set" in full.stdout
    ckpt = torch.load(d / "full" / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["method"] == "spkd" and set(ckpt["metrics"]) == {"top1", "error", "Rank-1", "Rank-2"}
    assert ckpt["metrics"]["top1"] > 10.0  # better than chance after 2 epochs
    lines = [json.loads(s) for s in open(d / "full" / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2] and "Rank-1" in lines[-1] and "images_per_s" in lines[-1]
    assert json.load(open(d / "full" / "config.json"))["sp_weight"] == 3000.0


def test_spkd_eval_reproduces_metrics(_spkd_runs):
    d, _, _ = _spkd_runs
    path = d / "full" / "model.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    args = argparse.Namespace(**ckpt["args"])
    model = spkd.model_from_args(args)
    model.load_state_dict(ckpt["model"])
    got = spkd.evaluate(model, args, torch.device("cpu"))
    for k, v in ckpt["metrics"].items():
        assert abs(got[k] - v) <= 1e-6, k
    if os.path.exists(os.path.join(_SPKD_DIR, "eval.py")):
        r = subprocess.run([sys.executable, "eval.py", str(path)], cwd=_SPKD_DIR, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        ev = json.load(open(d / "full" / "eval.json"))
        ev = ev.get("metrics", ev)
        for k, v in ckpt["metrics"].items():
            assert abs(ev[k] - v) <= 1e-6, k


def test_spkd_resume_matches_uninterrupted(_spkd_runs):
    d, _, _ = _spkd_runs
    a = torch.load(d / "full" / "model.pt", map_location="cpu", weights_only=True)
    b = torch.load(d / "half" / "model.pt", map_location="cpu", weights_only=True)
    for k, v in a["metrics"].items():
        assert abs(b["metrics"][k] - v) <= 1e-6, k
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k


def test_spkd_bad_inputs(tmp_path, capsys):
    torch.save({"model": spkd.build_model("resnet14", 10).state_dict(), "epoch": 1}, tmp_path / "wrong.pt")
    r = _spkd_run([*_SPKD_TINY, "--teacher-path", str(tmp_path / "wrong.pt"), "--epochs", "1"], tmp_path, check=False)
    assert r.returncode == 2 and "does not match --teacher-arch resnet8" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    capsys.readouterr()
    for bad, msg in ((["--student-arch", "resnet9"], "unknown architecture"), (["--dataset", "mnist"], "unknown dataset"),
                     (["--teacher-path", str(tmp_path / "none.pt")], "no such file"),
                     (["--epochs", "0"], "must be >= 1"), (["--resume", str(tmp_path / "wrong.pt")], "cannot resume")):
        with pytest.raises(SystemExit) as e:  # in-process: same code path as the CLI, without interpreter start-up
            spkd.main([*bad, "--save-dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and msg in err and len(err.strip().splitlines()) == 1, (bad, err)


def test_spkd_non_finite_loss_exits(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        spkd.main(["--kd-weight", "0", "--sp-weight", "0", "--lr", "1e30", "--max-steps", "4", "--log-every", "2",
                   "--run-name", "nan", "--save-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "non-finite" in err and "loss at step" in err
    assert not (tmp_path / "nan" / "last.pt").exists() and not (tmp_path / "nan" / "model.pt").exists()


# ------------------------------------------------------------------------------------------------
# camd.py: amd_loss / collaborative_kl against per-anchor loops, cut-off, variants, DDP, resume

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dataset", "digits", "--image-size", "16", "--teacher-arch", "resnet8", "--student-arch", "resnet8",
        "--batch-size", "32",
        "--epochs", "1", "--log-every", "1"]


def _camd_naive_amd(t, s, y, gamma, weights="adaptive", mining="hard"):
    """Per-anchor loop of Eq. 2-4 (float64): teacher anchors, Euclidean distances of L2-normalised vectors."""
    t = t / t.norm(dim=1, keepdim=True)
    s = s / s.norm(dim=1, keepdim=True)
    n, terms = len(y), []
    for i in range(n):
        pos = [j for j in range(n) if y[j] == y[i]]  # j = i included
        neg = [k for k in range(n) if y[k] != y[i]]
        if not neg:
            continue
        dist = lambda a, b: torch.sqrt(((a - b) ** 2).sum())
        if mining == "hard":
            dps = [dist(t[i], s[j]) for j in pos]
            dns = [dist(t[i], s[k]) for k in neg]
            jj = pos[max(range(len(pos)), key=lambda q: dps[q].item())]
            kk = neg[min(range(len(neg)), key=lambda q: dns[q].item())]
            pairs = [(jj, kk)]
        else:
            pairs = [(j, k) for j in pos for k in neg]
        for j, k in pairs:
            dp, dn = dist(t[i], s[j]), dist(t[i], s[k])
            if weights == "adaptive":
                ap = max(0.0, dp.item() - dist(t[i], t[j]).item())
                an = max(0.0, dist(t[i], t[k]).item() - dn.item())
            else:
                ap = an = 1.0
            terms.append(torch.log(1 + torch.exp(gamma * (ap * dp - an * dn))))
    return torch.stack(terms).mean()


def _camd_naive_kl(zm, zb, tau):
    out = 0.0
    for i in range(len(zm)):
        pm, pb = torch.softmax(zm[i] / tau, 0), torch.softmax(zb[i] / tau, 0)
        out = out + (pm * (torch.log(pm) - torch.log(pb))).sum()
    return tau ** 2 * out / len(zm)


def _camd_rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("weights,mining", [("adaptive", "hard"), ("fixed", "hard"), ("adaptive", "all"),
                                            ("fixed", "all")])
def test_camd_amd_loss_matches_naive_loop(weights, mining):
    g = torch.Generator().manual_seed(0)
    for n, d, c, gamma in [(12, 8, 3, 80.0), (9, 5, 4, 30.0), (16, 16, 5, 1.0)]:
        y = torch.randint(0, c, (n,), generator=g)
        y[-1] = c  # a class with a single member: its only positive is the anchor itself (j = i)
        t = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
        s = torch.randn(n, d, generator=g, dtype=torch.float64)
        t1, s1 = t.clone().requires_grad_(), s.clone().requires_grad_()
        t2, s2 = t.clone().requires_grad_(), s.clone().requires_grad_()
        fast = camd.amd_loss(t1, s1, y, gamma, weights=weights, mining=mining)
        slow = _camd_naive_amd(t2, s2, y, gamma, weights=weights, mining=mining)
        assert fast.dtype == torch.float64 and fast.dim() == 0
        assert abs(fast.item() - slow.item()) <= 1e-6 * abs(slow.item())
        fast.backward()
        slow.backward()
        assert _camd_rel(s1.grad, s2.grad) <= 1e-6 and _camd_rel(t1.grad, t2.grad) <= 1e-6


def test_camd_amd_loss_cutoff_and_limits():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    t = torch.randn(8, 6, generator=g, dtype=torch.float64)
    # student == teacher: every distance equals its teacher template -> a^p = a^n = 0 (cut-off), loss = log 2,
    # no gradient; with fixed weights the same input still gets a gradient
    s = (t * 2.5).clone().requires_grad_()
    loss = camd.amd_loss(t, s, y, 80.0)
    loss.backward()
    assert abs(loss.item() - math.log(2)) < 1e-12 and s.grad.abs().max().item() < 1e-12
    s2 = (t * 2.5).clone().requires_grad_()
    camd.amd_loss(t, s2, y, 80.0, weights="fixed").backward()
    assert s2.grad.abs().max().item() > 1e-3
    # student beating the teacher on an anchor (positive closer than the teacher's own positive) -> zero weight:
    # anchor 0's hardest positive is the student copy of t_0 itself when the positives collapse onto t_0
    tt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    ss = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    yy = torch.tensor([0, 0, 1])
    camd.amd_loss(tt, ss, yy, 80.0).backward()
    # anchor 0: d^p = ||t0 - s1|| ~ 0.01 < D(t0, t1) = sqrt 2 -> a^p = 0; d^n = 2 = D(t0, t2) -> a^n = 0
    # anchor 1: d^p = ||t1 - s0|| = sqrt 2 = D(t1, t0) -> a^p = 0; anchor 2 (class 1): d^p = 0 -> a^p = 0
    assert torch.allclose(ss.grad, torch.zeros_like(ss.grad), atol=1e-12)
    # no anchor has a negative -> 0 with a graph, finite gradient
    s3 = torch.randn(4, 3, requires_grad=True)
    z = camd.amd_loss(torch.randn(4, 3), s3, torch.zeros(4, dtype=torch.long), 80.0)
    z.backward()
    assert z.item() == 0.0 and torch.isfinite(s3.grad).all()
    # float32 / bf16 inputs are computed in fp32
    assert camd.amd_loss(t.float(), t.bfloat16(), y, 80.0).dtype == torch.float32


def test_camd_collaborative_kl_matches_naive_and_stops_gradient():
    g = torch.Generator().manual_seed(2)
    zm = (torch.randn(7, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    zb = (torch.randn(7, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    for tau in (1.0, 4.0):
        zm2, zb2 = zm.detach().clone().requires_grad_(), zb.detach().clone().requires_grad_()
        fast = camd.collaborative_kl(zm, zb, tau)
        slow = _camd_naive_kl(zm2.detach(), zb2, tau)
        assert abs(fast.item() - slow.item()) <= 1e-6 * slow.item()
        gb, = torch.autograd.grad(fast, zb)
        gb2, = torch.autograd.grad(slow, zb2)
        assert _camd_rel(gb, gb2) <= 1e-6
        assert not fast.requires_grad or torch.autograd.grad(fast, zm, allow_unused=True)[0] is None
    full = camd.collaborative_kl(zm, zb, 4.0, stopgrad=False)  # Eq. 6 ablation: gradient into z_m too
    gm, = torch.autograd.grad(full, zm)
    gm2, = torch.autograd.grad(_camd_naive_kl(zm, zb.detach(), 4.0), zm)
    assert _camd_rel(gm, gm2) <= 1e-6
    assert camd.collaborative_kl(zb, zb, 4.0).abs().item() < 1e-12


@pytest.fixture(scope="module")
def _camd_teacher(tmp_path_factory):
    """A resnet8 'teacher' state_dict on disk (random weights, digits classes): loading is what is tested."""
    path = tmp_path_factory.mktemp("teacher") / "teacher_sd.pt"
    torch.manual_seed(0)
    torch.save(camd.build_model("resnet8", 10).state_dict(), path)
    return str(path)


def _camd_run(args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "camd.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


def _camd_metrics(run_dir):
    return torch.load(os.path.join(run_dir, "model.pt"), map_location="cpu", weights_only=True)["metrics"]


@pytest.mark.parametrize("extra", [["--variant", "amd_b"], ["--variant", "amd_e"], ["--variant", "kd"],
                                   ["--variant", "ce"],
                                   ["--variant", "camd_kd", "--weights", "fixed", "--mining", "all", "--no-stopgrad",
                                    "--no-detach-weights"]])
def test_camd_variants_and_ablations_run(tmp_path, _camd_teacher, extra):
    camd.main(TINY + ["--teacher-path", _camd_teacher, "--max-steps", "2", "--save-dir", str(tmp_path),
                      "--run-name", "r"] + extra)
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and all(math.isfinite(rows[-1][k]) for k in ("top1", "Rank-1", "Rank-2"))
    assert set(_camd_metrics(tmp_path / "r")) == {"top1", "Rank-1", "Rank-2"}


def test_camd_end_to_end_save_eval_identical(tmp_path, _camd_teacher):
    r = _camd_run(TINY + ["--teacher-path", _camd_teacher, "--max-steps", "3", "--save-dir", str(tmp_path),
                          "--run-name", "e2e"])
    assert r.returncode == 0, r.stderr
    assert "teacher resnet8 test:" in r.stdout and "best epoch (chosen on the test set)" in r.stdout
    ckpt = torch.load(tmp_path / "e2e" / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["method"] == "camd" and json.load(open(tmp_path / "e2e" / "config.json"))["variant"] == "camd"
    args = argparse.Namespace(**ckpt["args"])
    model = camd.model_from_args(args)
    model.load_state_dict(ckpt["model"])  # the deployable student only (no embedding block)
    again = camd.evaluate(model, args, "cpu")
    assert all(abs(again[k] - ckpt["metrics"][k]) <= 1e-6 for k in ckpt["metrics"])
    if os.path.exists(os.path.join(HERE, "eval.py")):
        e = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), str(tmp_path / "e2e" / "model.pt")],
                           capture_output=True, text=True, timeout=300, cwd=HERE)
        assert e.returncode == 0, e.stderr
        ev = json.load(open(tmp_path / "e2e" / "eval.json"))
        ev = ev.get("metrics", ev)
        assert all(abs(ev[k] - ckpt["metrics"][k]) <= 1e-6 for k in ckpt["metrics"])


def test_camd_resume_continues_exactly(tmp_path, _camd_teacher):
    base = TINY + ["--teacher-path", _camd_teacher, "--save-dir", str(tmp_path)]
    camd.main(base + ["--max-steps", "4", "--run-name", "full"])
    camd.main(base + ["--max-steps", "2", "--run-name", "half"])  # stops mid-epoch, last.pt holds the position
    camd.main(base + ["--max-steps", "4", "--resume", str(tmp_path / "half" / "last.pt")])
    a, b = _camd_metrics(tmp_path / "full"), _camd_metrics(tmp_path / "half")
    assert all(abs(a[k] - b[k]) <= 1e-6 for k in a)
    sa = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "half" / "model.pt", weights_only=True)["model"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)


def test_camd_teacher_formats_and_cache(tmp_path, _camd_teacher, capsys):
    sd = torch.load(_camd_teacher, weights_only=True)
    # RepDistiller ckpt {"epoch", "model", "accuracy", "optimizer"} with a pickled object (needs the trusted load),
    # this repo's model.pt layout, and a bare state_dict (with a DataParallel "module." prefix) all load strictly
    torch.save({"epoch": 240, "model": sd, "accuracy": 0.5, "optimizer": _camd_pickled_obj()}, tmp_path / "rep.pth")
    torch.save({"method": "camd", "args": {}, "model": sd, "metrics": {}}, tmp_path / "own.pt")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "dp.pt")
    for name in ("rep.pth", "own.pt", "dp.pt"):
        model = camd.build_model("resnet8", 10)
        camd.load_teacher(model, str(tmp_path / name), "resnet8")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    # no --teacher-path: a CE-trained teacher is cached under <save-dir>/teachers and reused by the next run
    cached = TINY + ["--teacher-epochs", "1", "--max-steps", "1", "--save-dir", str(tmp_path), "--no-vanilla"]
    camd.main(cached + ["--run-name", "c"])
    assert len(os.listdir(tmp_path / "teachers")) == 1 and "training teacher" in capsys.readouterr().out
    camd.main(cached + ["--run-name", "d", "--variant", "amd_b"])
    assert "loaded from " + str(tmp_path / "teachers") in capsys.readouterr().out


def _camd_pickled_obj():
    return argparse.Namespace(lr=0.05)


def test_camd_digits_reports_vanilla_student(tmp_path, _camd_teacher, capsys):
    base = TINY + ["--teacher-path", _camd_teacher, "--max-steps", "2", "--save-dir", str(tmp_path)]
    camd.main(base + ["--run-name", "v"])  # digits preset: --vanilla on; CE-trained and cached, then reused
    out = capsys.readouterr().out
    assert "training vanilla student resnet8" in out and out.count("vanilla student resnet8:") == 1
    ckpt = torch.load(tmp_path / "v" / "model.pt", map_location="cpu", weights_only=True)
    camd.main(base + ["--run-name", "ce", "--variant", "ce"])  # the vanilla student is exactly the --variant ce run
    assert ckpt["vanilla_metrics"] == _camd_metrics(tmp_path / "ce") != ckpt["metrics"]
    assert ckpt["metrics"] == {k: json.loads(open(tmp_path / "v" / "metrics.jsonl").readlines()[-1])[k]
                               for k in ("top1", "Rank-1", "Rank-2")}  # the distilled student's, as before
    camd.main(base + ["--run-name", "w"])
    assert "vanilla student resnet8 loaded from " + str(tmp_path / "teachers") in capsys.readouterr().out
    camd.main(base + ["--run-name", "x", "--no-vanilla"])
    assert "vanilla student" not in capsys.readouterr().out


def test_camd_bad_inputs_exit_2(tmp_path, _camd_teacher, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    torch.save(camd.build_model("resnet14", 10).state_dict(), tmp_path / "r14.pt")
    cases = [(["--student-arch", "resnet9"], "unknown architecture"),
             (["--variant", "amd_b", "--teacher-arch", "resnet8x4", "--student-arch", "resnet8"], "amd_b needs equal"),
             (["--teacher-path", str(garbage)], "cannot read teacher checkpoint"),
             (["--teacher-path", str(tmp_path / "r14.pt"), "--teacher-arch", "resnet8"], "does not match"),
             (["--teacher-path", _camd_teacher, "--teacher-arch", "resnet8", "--student-arch", "resnet8",
               "--lr", "1e30", "--max-steps", "3", "--log-every", "1", "--run-name", "nan"], "non-finite")]
    for extra, msg in cases:  # in-process (fast); one real process below checks exit code and stderr
        with pytest.raises(SystemExit) as exc:
            camd.main(["--save-dir", str(tmp_path), "--epochs", "1"] + extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "nan" / "last.pt").exists()
    r = _camd_run(["--dataset", "nope"])
    assert r.returncode == 2 and r.stderr.startswith("error: unknown dataset") and "Traceback" not in r.stderr


def test_camd_two_process_cpu_ddp(tmp_path, _camd_teacher):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "camd.py")] + TINY + ["--teacher-path", _camd_teacher, "--max-steps", "2",
                                                    "--save-dir", str(tmp_path), "--run-name", "ddp"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.load(open(tmp_path / "ddp" / "config.json"))
    assert cfg["world_size"] == 2 and r.stdout.count("final (last epoch") == 1  # rank-0 logging only
    assert set(_camd_metrics(tmp_path / "ddp")) == {"top1", "Rank-1", "Rank-2"}


# ------------------------------------------------------------------------------------------------
# isd.py: isd_loss against a naive loop, queue/EMA arithmetic, moco variant, k-NN rise, resume, DDP

_isd_here = os.path.dirname(os.path.abspath(__file__))
_isd_tiny_run = ["--dataset", "digits", "--epochs", "10", "--eval-every", "10", "--seed", "0"]
_isd_tiny = ["--dataset", "digits", "--batch-size", "64", "--queue-size", "256", "--seed", "1"]


def _isd_run(args, tmp, name, timeout=300):
    cmd = [sys.executable, os.path.join(_isd_here, "isd.py"), *args, "--save-dir", str(tmp), "--run-name", name]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=_isd_here,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _isd_unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def _isd_naive_kl(q, k, queue, tau_s, tau_t):
    """Sec. 2 written out per query and per anchor: mean_b sum_i p_t(i) (log p_t(i) - log p_s(i))."""
    total = 0.0
    for b in range(len(q)):
        s_t = torch.stack([torch.dot(k[b], a) / tau_t for a in queue])
        s_s = torch.stack([torch.dot(q[b], a) / tau_s for a in queue])
        z_t, z_s = torch.exp(s_t).sum(), torch.exp(s_s).sum()
        total = total + sum(torch.exp(s_t[i]) / z_t * (s_t[i] - torch.log(z_t) - s_s[i] + torch.log(z_s))
                            for i in range(len(queue)))
    return total / len(q)


def test_isd_loss_matches_naive_loop_values_and_gradients():
    torch.manual_seed(0)
    for tau_s, tau_t in [(0.1, 0.01), (0.2, 0.2), (0.5, 0.1)]:
        q0, k, queue = _isd_unit(4, 6), _isd_unit(4, 6), _isd_unit(9, 6)
        q1, q2 = q0.clone().requires_grad_(), q0.clone().requires_grad_()
        kg, queue_g = k.clone().requires_grad_(), queue.clone().requires_grad_()
        fast = isd.isd_loss(q1, kg, queue_g, tau_s, tau_t)
        slow = _isd_naive_kl(q2, k, queue, tau_s, tau_t)
        fast.backward()
        slow.backward()
        assert fast.dtype == torch.float64 and fast.dim() == 0
        assert abs(fast.item() - slow.item()) <= 1e-6 * abs(slow.item())
        assert torch.allclose(q1.grad, q2.grad, rtol=1e-6, atol=1e-12)
        assert kg.grad is None and queue_g.grad is None  # no gradient into the teacher keys or the queue


def test_isd_loss_equals_released_kld_and_cross_entropy_gradient():
    torch.manual_seed(1)
    q, k, queue = (F.normalize(torch.randn(*s), dim=1) for s in [(8, 16), (8, 16), (64, 16)])
    ref = F.kl_div(F.log_softmax(q @ queue.t() / 0.1, 1), F.softmax(k @ queue.t() / 0.01, 1), reduction="batchmean")
    assert torch.allclose(isd.isd_loss(q, k, queue, 0.1, 0.01), ref, rtol=1e-6, atol=0)
    # Sec. 2: since the teacher gets no gradient, KL and cross-entropy H(p_t, p_s) give the same student gradient
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    isd.isd_loss(qa, k, queue, 0.1, 0.01).backward()
    p_t = F.softmax(k @ queue.t() / 0.01, 1)
    (-(p_t * F.log_softmax(qb @ queue.t() / 0.1, 1)).sum(1).mean()).backward()
    assert torch.allclose(qa.grad, qb.grad, rtol=1e-5, atol=1e-7)


def test_isd_loss_zero_when_student_equals_teacher():
    q, queue = _isd_unit(5, 8).requires_grad_(), _isd_unit(20, 8)
    loss = isd.isd_loss(q, q.detach(), queue, 0.07, 0.07)
    loss.backward()
    assert abs(loss.item()) < 1e-12 and q.grad.abs().max().item() < 1e-10
    assert isd.isd_loss(q, _isd_unit(5, 8), queue, 0.07, 0.07).item() > 0  # KL > 0 otherwise


def test_isd_moco_variant_is_infonce_with_target_zero():
    torch.manual_seed(2)
    q0, k, queue, tau = _isd_unit(3, 5), _isd_unit(3, 5), _isd_unit(7, 5), 0.2
    q1, q2 = q0.clone().requires_grad_(), q0.clone().requires_grad_()
    fast = isd.moco_loss(q1, k, queue, tau)
    slow = 0.0
    for b in range(3):  # -log( e^{q.k/t} / (e^{q.k/t} + sum_j e^{q.Q_j/t}) )
        pos = torch.exp(torch.dot(q2[b], k[b]) / tau)
        slow = slow - torch.log(pos / (pos + sum(torch.exp(torch.dot(q2[b], a) / tau) for a in queue)))
    slow = slow / 3
    fast.backward()
    slow.backward()
    assert abs(fast.item() - slow.item()) <= 1e-6 * abs(slow.item())
    assert torch.allclose(q1.grad, q2.grad, rtol=1e-6, atol=1e-12)
    logits = torch.cat([(q0 * k).sum(1, keepdim=True), q0 @ queue.t()], 1) / tau
    assert torch.allclose(fast, F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)), rtol=1e-12)


def test_isd_queue_fifo_and_wraparound():
    queue, labels = torch.zeros(5, 2), torch.full((5,), -1)
    keys = torch.arange(14, dtype=torch.float32).view(7, 2)
    ptr = isd.enqueue(queue, labels, 0, keys[:2], torch.tensor([0, 1]))
    assert ptr == 2 and queue[:2].tolist() == keys[:2].tolist() and labels.tolist() == [0, 1, -1, -1, -1]
    ptr = isd.enqueue(queue, labels, ptr, keys[2:4], torch.tensor([2, 3]))
    ptr = isd.enqueue(queue, labels, ptr, keys[4:7], torch.tensor([4, 5, 6]))  # wraps: rows 4, 0, 1
    assert ptr == 2
    assert queue.tolist() == [keys[5].tolist(), keys[6].tolist(), keys[2].tolist(), keys[3].tolist(), keys[4].tolist()]
    assert labels.tolist() == [5, 6, 2, 3, 4]  # the oldest entries (0, 1) were overwritten first


def test_isd_purity_counts_teacher_top5_same_label():
    queue = torch.eye(6)
    queue_labels = torch.tensor([1, 1, 1, 2, 2, -1])
    k = F.normalize(torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 0, 0, 5, 4, 3]]), dim=1)
    s, n = isd.purity(k, queue, torch.tensor([1, -1]), queue_labels)
    assert n.item() == 1 and abs(s.item() - 3 / 5) < 1e-6  # only the labelled query counts


def test_isd_ema_update_arithmetic_and_order():
    torch.manual_seed(3)
    model = isd.ISD("small", True, projection=True)
    with torch.no_grad():
        for p in model.teacher_params():
            p.normal_()
    t0 = [p.clone() for p in model.teacher_params()]
    s0 = [p.clone() for p in model.student_params()]
    bn_t = model.backbone_t[1].running_mean.clone()
    model.momentum_update(0.9)
    for t, a, b in zip(model.teacher_params(), t0, s0):
        assert torch.allclose(t, 0.9 * a + 0.1 * b, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.backbone_t[1].running_mean, bn_t)  # buffers are not averaged
    assert all(not p.requires_grad for p in model.teacher_params())
    # forward(): the teacher is updated BEFORE it embeds x_t
    x = torch.randn(4, 3, 16, 16)
    ref = isd.ISD("small", True, projection=True)
    ref.load_state_dict(model.state_dict())
    ref.momentum_update(0.5)
    model.train()
    ref.train()
    _, k = model(x, x, 0.5)
    with torch.no_grad():
        k_ref = F.normalize(ref.proj_t(ref.backbone_t(x)), dim=1)
    assert torch.allclose(k, k_ref, atol=1e-6)


def test_isd_recipes_resolve_to_paper_settings():
    a = isd.resolve(isd.get_args(["--dataset", "imagenet", "--recipe", "r18"]))
    assert (a.arch, a.tau_s, a.tau_t, a.ema, a.projection, a.teacher_view, a.lr, a.lr_schedule) == \
        ("resnet18", 0.02, 0.02, 0.999, False, "strong", 0.01, "step")
    assert a.lr_milestones == [140, 180] and a.queue_size == 128000 and a.batch_size == 256 and not a.cifar_stem
    b = isd.resolve(isd.get_args(["--dataset", "imagenet", "--recipe", "r50", "--tau-t", "0.02"]))
    assert (b.arch, b.tau_s, b.tau_t, b.ema, b.projection, b.teacher_view, b.lr, b.lr_schedule) == \
        ("resnet50", 0.1, 0.02, 0.99, True, "weak", 0.05, "cosine")
    m = isd.model_from_args(b)
    assert m.predictor[0].in_features == 512 and m.predictor[0].out_features == 4096 and m.out_dim == 512
    c = isd.resolve(isd.get_args(["--dataset", "cifar10"]))
    assert c.cifar_stem and c.queue_size < 50000
    r = isd.model_from_args(c)
    assert r.backbone_s.conv1.kernel_size == (3, 3) and isinstance(r.backbone_s.maxpool, torch.nn.Identity)


@pytest.fixture(scope="module")
def _isd_digits_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isd_digits")
    r = _isd_run(_isd_tiny_run, tmp, "run")
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "run", r



def test_isd_digits_run_improves_knn_and_saves(_isd_digits_run):
    run, r = _isd_digits_run
    lines = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert lines[0]["epoch"] == 0 and lines[-1]["epoch"] == 10
    for key in ("knn200w", "knn20", "teacher/knn200w"):  # the untrained network (epoch 0) is the baseline
        assert lines[-1][key] > lines[0][key] + (3.0 if key == "knn200w" else 0.0), (key, lines[0], lines[-1])
    assert 0 <= lines[-1]["purity"] <= 100 and lines[-1]["loss"] > 0
    cfg = json.load(open(run / "config.json"))
    assert cfg["tau_s"] == 0.1 and cfg["arch"] == "small" and "torch" in cfg
    assert "best epoch (chosen on the test set)" in r.stdout


def test_isd_model_pt_reloads_with_identical_metrics(_isd_digits_run):
    run, _ = _isd_digits_run
    ck = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert ck["method"] == "isd" and set(ck["metrics"]) >= {"knn1", "knn20", "knn200w", "teacher/knn1"}
    import argparse
    args = argparse.Namespace(**ck["args"])
    model = isd.model_from_args(args)
    model.load_state_dict(ck["model"])
    again = isd.evaluate(model, args, "cpu")
    assert all(abs(again[k] - v) <= 1e-6 for k, v in ck["metrics"].items())
    emb, labels = isd.features(model, args, "cpu", "test")
    assert emb.shape == (360, 128) and torch.allclose(emb.norm(dim=1), torch.ones(360), atol=1e-5)
    if os.path.exists(os.path.join(_isd_here, "eval.py")):
        r = subprocess.run([sys.executable, os.path.join(_isd_here, "eval.py"), str(run / "model.pt"), "--linear-probe"],
                           capture_output=True, text=True, timeout=120, cwd=_isd_here)
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.load(open(run / "eval.json"))
        out = out.get("metrics", out)
        assert all(abs(out[k] - v) <= 1e-6 for k, v in ck["metrics"].items())
        assert 50 < out["linear"] <= 100  # features() feeds eval.py's linear protocol


def test_isd_resume_equals_uninterrupted(tmp_path):
    base = _isd_tiny + ["--batch-size", "128", "--epochs", "2", "--eval-every", "0", "--save-dir", str(tmp_path)]
    isd.main(base + ["--run-name", "full"])  # in-process: saves two interpreter start-ups
    isd.main(base + ["--run-name", "part", "--max-steps", "15"])  # stops mid-epoch 2 (11 steps per epoch)
    isd.main(base + ["--run-name", "part", "--resume", str(tmp_path / "part" / "last.pt")])
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 22 and a["queue_ptr"] == b["queue_ptr"] == (22 * 128) % 256
    assert torch.allclose(a["queue"], b["queue"], atol=1e-6) and torch.equal(a["queue_labels"], b["queue_labels"])
    for key, v in a["model"].items():  # student, predictor, teacher (EMA) and every BN buffer
        assert torch.allclose(v.float(), b["model"][key].float(), atol=1e-5), key
    ma = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["metrics"]
    mb = torch.load(tmp_path / "part" / "model.pt", weights_only=True)["metrics"]
    assert all(abs(ma[k] - mb[k]) < 1e-6 for k in ma)


def test_isd_two_process_cpu_run(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(_isd_here, "isd.py"), *_isd_tiny, "--epochs", "1", "--max-steps", "3", "--eval-every", "0",
           "--save-dir", str(tmp_path), "--run-name", "ddp"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=_isd_here,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ck["step"] == 3 and ck["queue_ptr"] == (3 * 64) % 256  # keys of BOTH ranks were enqueued
    assert (ck["queue_labels"] >= 0).sum().item() == 3 * 64 and len(ck["rng_cpu"]) == 2
    assert json.load(open(tmp_path / "ddp" / "config.json"))["world_size"] == 2
    assert (tmp_path / "ddp" / "model.pt").exists()


def test_isd_unlabeled_folder_uses_dataloader_path(tmp_path):
    from PIL import Image
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(12):
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(data / f"{i}.png")
    r = _isd_run(["--dataset", "folder", "--data-root", str(data), "--image-size", "32", "--batch-size", "4",
                  "--queue-size", "16", "--workers", "0", "--epochs", "1", "--max-steps", "2"], tmp_path, "f")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(tmp_path / "f" / "last.pt", weights_only=True)
    assert ck["step"] == 2 and ck["queue_ptr"] == 8 and ck["best"] is None  # no labels: no k-NN monitor
    assert torch.load(tmp_path / "f" / "model.pt", weights_only=True)["metrics"] == {}


@pytest.mark.parametrize("argv,msg", [
    (["--dataset", "nope"], "unknown dataset"),
    (["--queue-size", "16", "--batch-size", "64"], "--queue-size"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/isd"], "cifar10"),
    (["--dataset", "folder", "--data-root", "/nonexistent/isd"], "not a directory"),
    (["--tau-s", "0"], "tau"),
])
def test_isd_bad_inputs_exit_2(argv, msg, capsys, monkeypatch):
    monkeypatch.setattr(isd.common, "load_split", _isd_no_download(isd.common.load_split))
    with pytest.raises(SystemExit) as e:
        isd.main(argv + ["--save-dir", "/tmp/isd_bad_inputs"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and msg in err and "Traceback" not in err


def _isd_no_download(fn):
    return lambda *a, **kw: fn(*a, **dict(kw, download=False))


def test_isd_bad_checkpoints_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        isd.main(_isd_tiny + ["--resume", str(junk), "--save-dir", str(tmp_path)])
    assert e.value.code == 2 and "cannot read checkpoint" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save({"method": "isd", "optimizer": {}, "args": dict(vars(isd.resolve(isd.get_args(_isd_tiny))),
                                                                queue_size=512)}, other)
    with pytest.raises(SystemExit) as e:
        isd.main(_isd_tiny + ["--resume", str(other), "--save-dir", str(tmp_path)])
    assert e.value.code == 2 and "queue-size" in capsys.readouterr().err


def test_isd_non_finite_loss_exits_2_naming_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        isd.main(_isd_tiny + ["--lr", "1e30", "--max-steps", "6", "--log-every", "3", "--eval-every", "0",
                              "--save-dir", str(tmp_path), "--run-name", "nan"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "non-finite isd loss at step" in err
    assert not (tmp_path / "nan" / "last.pt").exists()  # nothing written after the bad step
