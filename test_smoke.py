"""The test suite: CPU only, offline.  Run:  python -m pytest -q test_smoke.py

Sections: common.py metrics (against brute force and scikit-learn); dataset loaders on generated fixture
folders; the epoch order, the DML sampler and the on-device augmentation; downloads; each method's losses
against re-derivations of the papers' equations; the contract every script keeps (one parametrised section
over the four: digits run -> eval.py reproduces, resume == uninterrupted, bad input -> exit 2, non-finite ->
exit 2, Ctrl-C -> exit 130 and a resumable last.pt, no git, TensorBoard, bf16 autocast) and that their shared
blocks are the same text; then each method's own end-to-end checks (variants, DDP, ShuffleBN, teachers) and
eval.py.
"""
import argparse
import builtins
import importlib
import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import camd  # noqa: E402
import common  # noqa: E402
import eval as eval_py  # noqa: E402
import isd  # noqa: E402
import s2sd  # noqa: E402
import spkd  # noqa: E402

SCRIPTS = {"s2sd": s2sd, "camd": camd, "spkd": spkd, "isd": isd}


def main_of(module, argv):
    """Run module.main(argv) in this process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def run_script(script, *argv, env=None, timeout=600):
    """A repository script in its own process -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, script, *argv], cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {})))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _fresh_split_cache():
    """common.load_split caches its splits; tests that edit fixture folders must see the edits."""
    common.load_split.cache_clear()


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
    monkeypatch.setattr(common, "_block_size", lambda n, device, what="square": 7)  # blocks do not divide N
    rec, mapr = common.recall_at_k(emb, labels), common.map_at_r(emb, labels)
    ref_rec, ref_map = brute_recall_map(emb, labels, (1, 2, 4, 8))
    for k in (1, 2, 4, 8):
        assert rec[k] == pytest.approx(ref_rec[k], abs=1e-12)
    assert mapr == pytest.approx(ref_map, abs=1e-7)


def brute_nearest(query, gallery, k, exclude_self):
    """First k gallery indices per query by (squared distance in float64, index)."""
    d = ((query.double()[:, None, :] - gallery.double()[None]) ** 2).sum(-1).numpy()
    out = [[j for j in np.lexsort((np.arange(len(gallery)), d[i])) if not (exclude_self and j == i)][:k]
           for i in range(len(query))]
    return torch.tensor(out, dtype=torch.long).view(len(query), -1)


@pytest.mark.parametrize("block", [7, 16, 2048])    # blocks not dividing N; one block
@pytest.mark.parametrize("k", [1, 8, 60, 200])     # 60 = all candidates, 200 > candidates
def test_nearest_matches_brute_force_with_ties_and_duplicates(block, k, monkeypatch):
    monkeypatch.setattr(common, "_block_size", lambda n, device, what="square": block if what != "cols" else 2 * block)
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 3, (61, 4), generator=g).float()  # 81 distinct points: many duplicates, exact ties
        x[5] = x[40]
        assert torch.equal(common._nearest(x, x, k, exclude_self=True), brute_nearest(x, x, min(k, 60), True))
        q, gal = torch.randint(-2, 3, (37, 3), generator=g).float(), torch.randint(-2, 3, (61, 3), generator=g).float()
        assert torch.equal(common._nearest(q, gal, k, exclude_self=False), brute_nearest(q, gal, min(k, 61), False))


def test_non_finite_embeddings_give_nan_metrics_not_a_perfect_score():
    emb = F.normalize(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(40) % 4
    for bad in (float("nan"), float("inf")):
        e = emb.clone()
        e[3, 1] = bad
        assert all(math.isnan(v) for v in common.retrieval_metrics(e, labels).values())
        assert all(math.isnan(v) for v in common.knn_metrics(emb, labels, e, labels).values())
        assert math.isnan(common.recall_at_k(e, labels)[1]) and math.isnan(common.map_at_r(e, labels))
    full = torch.full((40, 4), float("nan"))
    assert math.isnan(common.retrieval_metrics(full, labels, with_nmi=False)["R@1"])


def test_a_collapsed_embedding_is_flagged_beside_its_metrics():
    g = torch.Generator().manual_seed(0)
    point = F.normalize(torch.randn(1, 16, generator=g), dim=1)
    same, near = point.repeat(50, 1), F.normalize(point + 1e-5 * torch.randn(50, 16, generator=g), dim=1)
    spread = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    labels = torch.arange(50) % 5
    assert common.collapsed(same) and common.collapsed(near) and not common.collapsed(spread)
    assert not common.collapsed(torch.zeros(1, 4))  # one item: nothing to compare
    assert common.retrieval_metrics(same, labels, with_nmi=False)["collapsed"] is True
    assert "collapsed" not in common.retrieval_metrics(spread, labels, with_nmi=False)
    assert common.knn_metrics(spread, labels, near, labels)["collapsed"] is True


def test_s2sd_a_diverged_run_says_its_embedding_collapsed(tmp_path):
    code, out, err = main_of(s2sd, ["--lr", "1e10", "--epochs", "2", "--save-dir", str(tmp_path), "--run-name", "c"])
    assert code == 0, err  # a result, not a crash: but never reported as a normal one
    assert "| COLLAPSED: every test embedding is (nearly) one point" in next(
        line for line in out.splitlines() if line.startswith("eval "))
    assert "the headline): R@1" in out and out.count("COLLAPSED") == 2  # and the summary
    assert json.loads(open(tmp_path / "c" / "metrics.jsonl").readlines()[-1])["collapsed"] is True


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


def lloyd_start(x, k, seed):
    """The protocol's start as common.nmi draws it: the first k points of a seeded random permutation."""
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k]]


def clustered(n_classes, per_class, dim, noise, seed):
    """Embeddings like a trained model's: unit class centres plus Gaussian noise, L2-normalised; labels."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=1)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return F.normalize(centres[y] + noise * torch.randn(len(y), dim, generator=g) / dim ** 0.5, dim=1), y


def test_nmi_matches_sklearn_on_separated_clusters():
    # from the same start, scikit-learn's own Lloyd (20 iterations, then the labels of the final centres) gives the
    # same clustering, so the same NMI: separated, overlapping and structureless points (none empties a cluster,
    # where scikit-learn relocates and faiss splits)
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score
    data = [clustered(9, 45, 12, 0.5, seed=0), clustered(12, 40, 32, 1.5, seed=1),
            (F.normalize(torch.randn(500, 16, generator=torch.Generator().manual_seed(0)), dim=1), torch.arange(500) % 20)]
    for i, (x, y) in enumerate(data):
        k = len(torch.unique(y))
        ref = KMeans(k, init=lloyd_start(x, k, seed=i).numpy(), n_init=1, max_iter=20, tol=0, algorithm="lloyd")
        ref = normalized_mutual_info_score(y.numpy(), ref.fit(x.numpy()).labels_)
        assert common.nmi(x, y, seed=i) == pytest.approx(ref, abs=1e-12)
    assert common.nmi(*data[0], seed=0) > 0.8


@pytest.mark.parametrize("n_classes, per_class, dim, noise", [(100, 59, 128, 2.4), (100, 59, 64, 2.0), (20, 30, 16, 1.5)])
def test_nmi_within_the_seed_spread_of_sklearn_random_start_lloyd(n_classes, per_class, dim, noise):
    # the papers' protocol, not a better optimum: over 10 seeds, our NMI is distributed as scikit-learn's Lloyd with
    # the same settings (k random points, 20 iterations); two CUB-sized cases (5,900 points, 100 classes): in the
    # first, the k-means++ / Hartigan clustering this replaced scored 93.6 against sklearn's 83.4 +- 2.8
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score
    x, y = clustered(n_classes, per_class, dim, noise, seed=0)
    ours = np.array([common.nmi(x, y, seed=s) for s in range(10)])
    ref = np.array([normalized_mutual_info_score(y.numpy(), KMeans(
        n_classes, init="random", n_init=1, max_iter=20, tol=0, algorithm="lloyd", random_state=s).fit_predict(x.numpy()))
        for s in range(10)])
    spread = ref.max() - ref.min()
    assert abs(ours.mean() - ref.mean()) <= 2 * ref.std()
    assert ((ours >= ref.min() - spread / 2) & (ours <= ref.max() + spread / 2)).all()


def plain_lloyd(x, start, niter=20):
    """Textbook Lloyd in float64 -> (assignment after each of the niter + 1 searches, k-means objective of each)."""
    x, c = x.double(), start.double()
    history = []
    for it in range(niter + 1):
        a = torch.cdist(x, c).argmin(1)
        counts = torch.bincount(a, minlength=len(c))
        mean = torch.zeros_like(c).index_add_(0, a, x) / counts.clamp_min(1)[:, None]
        history.append((a, ((x - mean[a]) ** 2).sum().item()))
        assert (counts > 0).all()                       # these data never empty a cluster
        c = mean.float().double()                       # common.nmi keeps float32 centroids
    return history


@pytest.mark.parametrize("noise", [0.3, 3.0])          # clear and unclear structure
def test_accelerated_lloyd_is_exactly_plain_lloyd(noise):
    # the bounds skip only points whose centroid provably stays: same assignments as a plain Lloyd from the same
    # start, iteration by iteration (k = 300 > 64: several bound groups; searched densely and group by group)
    x, _ = clustered(60, 40, 24, noise, seed=1)
    for k, seed in ((300, 0), (40, 1)):
        assign, objectives = common._lloyd(x, k, seed=seed)
        history = plain_lloyd(x, lloyd_start(x, k, seed))
        assert torch.equal(assign, history[-1][0])
        ref = [o for _, o in history]
        assert objectives.tolist() == pytest.approx(ref[:len(objectives)], rel=1e-9)   # stopped at a fixed point
        assert ref[len(objectives) - 1:] == pytest.approx([ref[-1]] * (len(ref) - len(objectives) + 1), rel=1e-12)
        assert all(b <= a * (1 + 1e-12) for a, b in zip(ref, ref[1:]))   # the objective never rises


def test_lloyd_seeded_and_edge_cases():
    x, y = clustered(30, 20, 16, 2.0, seed=0)
    a = common._lloyd(x, 30, seed=0)[0]
    assert torch.equal(a, common._lloyd(x.clone(), 30, seed=0)[0]) and not torch.equal(a, common._lloyd(x, 30, seed=1)[0])
    assert common.nmi(x, y, seed=3) == common.nmi(x.clone(), y, seed=3)
    assert common._lloyd(x, 1)[0].tolist() == [0] * len(x)                      # k = 1
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    assert sorted(common._lloyd(z, 7)[0].tolist()) == list(range(7))            # k = n: one point each
    dup = torch.tensor([[0.0, 0.0]] * 6 + [[1.0, 0.0]] * 3 + [[0.0, 1.0]])     # 10 points, 3 distinct
    for seed in range(5):                                                        # k close to n: empty clusters
        a, objectives = common._lloyd(dup, 8, seed=seed)
        assert 0 <= int(a.min()) and int(a.max()) < 8 and torch.isfinite(objectives).all()
        assert len(set(map(tuple, dup[a == a[0]].tolist()))) == 1                 # never two distinct points merged
    assert common._lloyd(torch.zeros(10, 3), 4)[0].tolist() == [0] * 10          # identical points: ties to index 0


def test_empty_clusters_split_as_faiss_does():
    # one empty cluster, one cluster with size - 1 > 0: it is copied, the pair pushed apart by +-1/1024 (alternating)
    centroids = torch.tensor([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    out, after = common._split_empty(centroids.clone(), torch.tensor([1, 0, 9, 1]), torch.Generator().manual_seed(0))
    push = torch.tensor([1, -1, 1]) / 1024
    assert torch.equal(out[1], centroids[2] * (1 + push)) and torch.equal(out[2], centroids[2] * (1 - push))
    assert after.tolist() == [1.0, 4.5, 4.5, 1.0] and torch.equal(out[[0, 3]], centroids[[0, 3]])
    # several empties: none left, the total kept; the source drawn with probability ~ (size - 1)
    out, after = common._split_empty(torch.randn(6, 4), torch.tensor([0, 3, 0, 5, 0, 1]), torch.Generator())
    assert (after > 0).all() and after.sum() == 9
    picks = [common._split_empty(centroids.clone(), torch.tensor([0, 3, 5, 1]), torch.Generator().manual_seed(s))[1][1]
             for s in range(400)]
    assert np.mean([p == 1.5 for p in picks]) == pytest.approx(2 / 6, abs=0.08)   # cluster 1 (size 3) split


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


def make_cub(root, n_classes=200, size=6, per_class=None):
    for c in range(1, n_classes + 1):
        folder = os.path.join(root, "CUB_200_2011", "images", f"{c:03d}.Bird_{c}")
        for i in range(per_class or (1 + c % 2)):
            write_image(os.path.join(folder, f"img_{c}_{i}.jpg"), c * 10 + i, size)
        open(os.path.join(folder, f"._img_{c}_0.jpg"), "w").close()


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
    common.load_split.cache_clear()
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
    common.load_split.cache_clear()
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
    common.load_split.cache_clear()
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
    f = common.load_split("folder", str(flat), "all")
    assert len(f) == 3 and f.labels.tolist() == [-1, -1, -1]
    lab = common.load_split("folder", str(tmp_path / "imagenet" / "val"), "all")
    assert lab.num_classes == 101
    with pytest.raises(common.DatasetError):
        common.load_split("folder", str(tmp_path / "empty_nowhere"), "all")


def write_idx(path, array, gz):
    """An IDX file (the MNIST format) as torchvision / the Debian package ship it."""
    import gzip
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_fashionmnist_from_idx_files_both_splits(tmp_path, gz):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        suffix = ".gz" if gz else ""
        write_idx(str(raw / f"{prefix}-images-idx3-ubyte{suffix}"), rng.integers(0, 255, (n, 28, 28)), gz)
        write_idx(str(raw / f"{prefix}-labels-idx1-ubyte{suffix}"), np.arange(n) % 10, gz)
    tr, te = (common.load_split("fashionmnist", str(tmp_path), s, download=False) for s in ("train", "test"))
    assert tr.images.shape == (30, 1, 28, 28) and len(te) == 20 and tr.num_classes == 10
    assert tr.labels.tolist() == [i % 10 for i in range(30)] and tr.classes[9] == "Ankle boot"
    dtr, dte = (common.load_split("fashionmnist", str(tmp_path), s, download=False) for s in ("dml_train", "dml_test"))
    assert set(dtr.labels.tolist()) == {0, 1, 2, 3, 4} and set(dte.labels.tolist()) == {5, 6, 7, 8, 9}
    assert (len(dtr), len(dte)) == (15, 10)  # train images of classes 0-4, test images of 5-9
    rgb = common.load_split("fashionmnist", str(tmp_path), "train", download=False, image_size=32, channels=3)
    assert rgb.images.shape == (30, 3, 32, 32)
    (raw / f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}").write_bytes(b"garbage")
    common.load_split.cache_clear()
    with pytest.raises(common.DatasetError, match="cannot read"):
        common.load_split("fashionmnist", str(tmp_path), "dml_test", download=False)


def test_fashionmnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "FMNIST_DEBIAN", str(tmp_path / "not_installed"))
    with pytest.raises(common.DatasetError, match="apt-get install dataset-fashion-mnist"):
        common.load_split("fashionmnist", str(tmp_path), "train", download=False)


def test_folder_dataset_layouts_and_errors(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog", "owl"):
            for j in range(2):
                write_image(str(tmp_path / "split" / split / c / f"{j}.png"), j)
    tr, te = (common.load_split("folder", str(tmp_path / "split"), s) for s in ("train", "test"))  # test -> val/
    assert (len(tr), tr.num_classes, len(te)) == (6, 3, 6) and tr.classes == ["cat", "dog", "owl"]
    for c in ("a", "b", "c", "d"):
        for j in range(2):
            write_image(str(tmp_path / "one" / c / f"{j}.jpg"), j)
    dtr, dte = (common.load_split("folder", str(tmp_path / "one"), s) for s in ("dml_train", "dml_test"))
    assert dtr.classes == ["a", "b"] and dte.classes == ["c", "d"] and dte.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(common.DatasetError, match="expected"):
        common.load_split("folder", str(tmp_path / "one"), "train")  # no train/ sub-folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.DatasetError, match="no images"):
        common.load_split("folder", str(tmp_path / "empty"), "all")
    write_image(str(tmp_path / "single" / "train" / "only" / "0.png"), 0)
    with pytest.raises(common.DatasetError, match="at least 2 classes"):
        common.load_split("folder", str(tmp_path / "single"), "train")
    for split, names in (("train", ("a", "b", "c")), ("test", ("b", "c"))):
        for c in names:
            write_image(str(tmp_path / "gap" / split / c / "0.png"), 0)
    with pytest.raises(common.DatasetError, match="lacks 1 of the 3 expected class folders, e.g. a"):
        common.load_split("folder", str(tmp_path / "gap"), "test")  # b would silently have been class 0
    write_image(str(tmp_path / "gap" / "test" / "a" / "0.png"), 0)
    write_image(str(tmp_path / "gap" / "test" / "d" / "0.png"), 0)
    common.load_split.cache_clear()
    with pytest.raises(common.DatasetError, match="lacks, e.g. d"):
        common.load_split("folder", str(tmp_path / "gap"), "test")
    for c in ("x", "y", "z"):
        write_image(str(tmp_path / "three" / c / "0.png"), 0)
        write_image(str(tmp_path / "three" / c / "1.png"), 1)
    with pytest.raises(common.DatasetError, match="has 3 class folder"):  # halves of 3 classes: 1 train class
        common.load_split("folder", str(tmp_path / "three"), "dml_train")
    (tmp_path / "one" / "e").mkdir()
    common.load_split.cache_clear()
    with pytest.raises(common.DatasetError, match="has no images"):
        common.load_split("folder", str(tmp_path / "one"), "dml_train")
    with pytest.raises(common.DatasetError, match="not a folder"):
        common.load_split("folder", str(tmp_path / "nowhere"), "train")


def test_unreadable_images_are_named_in_training_and_evaluation(tmp_path):
    for c in ("a", "b", "c", "d"):
        for j in range(3):
            write_image(str(tmp_path / "imgs" / c / f"{j}.png"), j, size=20)
    good = tmp_path / "imgs" / "b" / "0.png"  # a truncated file passes the header check: named when decoded
    (tmp_path / "imgs" / "b" / "truncated.png").write_bytes(good.read_bytes()[:60])
    split = common.load_split("folder", str(tmp_path / "imgs"), "all")
    assert len(split) == 13
    loader = common.make_loader(common.ImageFiles(split.paths, split.labels, common.eval_transform(16, 12)), workers=1)
    with pytest.raises(common.DatasetError, match="unreadable image .*truncated.png"):
        list(common.loader_batches(loader, list(torch.arange(13).split(4)), torch.device("cpu")))
    with pytest.raises(common.DatasetError, match="unreadable image"):  # the evaluation pass
        common.embed(lambda x: x.mean((2, 3)), split, "cpu", batch_size=4, workers=0,
                     transform=common.eval_transform(16, 12))
    code, _, err = main_of(s2sd, ["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--arch", "smallcnn",
                                  "--no-pretrained", "--image-size", "16", "--workers", "1", "--batch-size", "4",
                                  "--embed-dim", "8", "--target-dims", "16", "--save-dir", str(tmp_path / "runs")])
    assert code == 2 and "unreadable image" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(autouse=True)
def _image_check_cache(tmp_path_factory, monkeypatch):
    """common.check_images remembers good files in $SIMDISTILL_CACHE: a fresh folder per test, never ~/.cache."""
    monkeypatch.setenv("SIMDISTILL_CACHE", str(tmp_path_factory.mktemp("image_check")))


def test_every_pil_mode_reads_as_the_8bit_original(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    grey, rgb = rng.integers(0, 256, (6, 5), dtype=np.uint8), rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    grey[0, :2] = 0, 255                                          # the full 8-bit range occurs
    grey3 = np.repeat(grey[..., None], 3, axis=2)

    def read(im, ext):
        path = str(tmp_path / f"{len(os.listdir(tmp_path))}.{ext}")
        im.save(path)
        with Image.open(path) as again:
            assert again.mode == im.mode                          # the file really holds that mode
        return np.asarray(common.open_rgb(path))

    def same(a, b):
        return a.shape == b.shape and np.array_equal(a, b)
    wide = grey.astype(np.uint16) * 257                           # an 8-bit image stored at 16 bits: exact back
    assert same(read(Image.fromarray(wide), "png"), grey3)                        # I;16 (PNG)
    for mode, ext in (("I;16B", "tif"), ("I;16L", None)):                        # (PIL's convert clips to these)
        raw = Image.frombytes(mode, (5, 6), wide.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        assert same(read(raw, ext) if ext else np.asarray(common._to_rgb(raw)), grey3)
    assert same(read(Image.fromarray(wide.astype(np.int32)), "tif"), grey3)       # I with 16-bit values (older PNGs)
    assert same(read(Image.fromarray(grey.astype(np.int32)), "tif"), grey3)       # I with 8-bit values
    assert same(read(Image.fromarray(grey.astype(np.int32) * 1000 - 7), "tif"), grey3)  # I beyond 16 bits: min..max
    assert same(read(Image.fromarray(grey.astype(np.float32) / 255), "tif"), grey3)     # F in [0, 1]: x 255
    assert same(read(Image.fromarray(grey.astype(np.float32)), "tif"), grey3)           # F in [0, 255]
    assert same(read(Image.fromarray(grey > 127), "png"), np.where(grey3 > 127, 255, 0).astype(np.uint8))  # 1
    assert same(read(Image.fromarray(grey), "png"), grey3)                        # L
    assert same(read(Image.fromarray(rgb), "png"), rgb)                           # RGB
    index, palette = rng.integers(0, 40, (6, 5), dtype=np.uint8), rng.integers(0, 256, (256, 3), dtype=np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette.tobytes())
    assert same(read(p, "png"), palette[index])                                   # P
    assert same(np.asarray(common._to_rgb(p.convert("PA"))), palette[index])      # PA: alpha dropped
    alpha = Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8))
    assert same(read(Image.merge("LA", [Image.fromarray(grey), alpha]), "png"), grey3)          # LA: alpha dropped,
    assert same(read(Image.merge("RGBA", [*Image.fromarray(rgb).split(), alpha]), "png"), rgb)  # not composited
    assert same(read(Image.fromarray(rgb).convert("CMYK"), "tif"), rgb)           # CMYK
    for mode, tolerance in (("YCbCr", 3), ("LAB", 20), ("HSV", 8)):                # PIL's own conversions, 8 bits
        other = Image.fromarray(rgb).convert(mode)
        out = np.asarray(common._to_rgb(other)) if mode == "HSV" else read(other, "tif")  # no file holds HSV
        assert same(out, np.asarray(other.convert("RGB"))) and np.abs(out.astype(int) - rgb).max() <= tolerance


def test_a_decompression_bomb_in_the_data_is_opened_and_named_once(tmp_path, monkeypatch, capfd, recwarn):
    from PIL import Image
    for c in ("a", "b"):
        for j in range(2):
            write_image(str(tmp_path / "imgs" / c / f"{j}.png"), j, size=3)              # 9 pixels: under the limit
    write_image(str(tmp_path / "imgs" / "a" / "warn.png"), 5, size=4)                    # 16: PIL warns
    write_image(str(tmp_path / "imgs" / "b" / "bomb.png"), 6, size=8)                    # 64 > 2 x 10: PIL refuses
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    split = common.load_split("folder", str(tmp_path / "imgs"), "all")                   # the header check opens them
    err = capfd.readouterr().err
    for name in ("warn.png", "bomb.png"):
        assert len([line for line in err.splitlines() if name in line and "decompression" in line]) == 1
    assert "0.png" not in err and "Traceback" not in err and Image.MAX_IMAGE_PIXELS == 10
    assert common.read_image(str(tmp_path / "imgs" / "b" / "bomb.png")).shape == (3, 8, 8)
    loader = common.make_loader(common.ImageFiles(split.paths, split.labels, common.eval_transform(8, 8)), workers=1)
    batches = list(common.loader_batches(loader, [torch.arange(len(split))], torch.device("cpu")))
    assert batches[0][0].shape == (6, 3, 8, 8)
    assert "bomb.png" not in capfd.readouterr().err                                       # named once per process
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]  # PIL's: no file name


def test_folders_follow_links_skip_hidden_entries_and_say_what_they_left_out(tmp_path, capsys):
    base = tmp_path / "d" / "train"
    for c in ("cat", "dog"):
        for j in range(2):
            write_image(str(base / c / f"{j}.png"), j)
    write_image(str(tmp_path / "elsewhere" / "more.png"), 3)
    write_image(str(tmp_path / "outside" / "far.png"), 3)
    os.symlink(tmp_path / "outside", base / "cat" / "linked")                    # a linked sub-folder: followed
    os.symlink(base / "cat", base / "cat" / "loop")                              # a link back up: no endless walk
    os.symlink(tmp_path / "elsewhere", base / "bird")                            # a linked class folder
    os.symlink(tmp_path / "elsewhere", base / "cat" / "birds")                   # a link to class bird's folder
    os.symlink(base / "dog", base / "bird" / "dogs")                             # ... and to dog's: each image once
    write_image(str(base / ".ipynb_checkpoints" / "0-checkpoint.png"), 4)        # hidden: not a class
    write_image(str(base / "dog" / ".hidden.png"), 5)
    (base / ".git").mkdir()
    (base / "dog" / "notes.txt").write_text("not an image: no line for it")
    write_image(str(base / "loose.png"), 6)                                      # beside the class folders
    for name in ("anim.gif", "scan.PGM"):                                        # images PIL reads, not this loader
        write_image(str(base / "dog" / name), 7)
    tr = common.load_split("folder", str(tmp_path / "d"), "train")
    assert tr.classes == ["bird", "cat", "dog"] and tr.labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert [os.path.relpath(p, base) for p in tr.paths] == ["bird/more.png", "cat/0.png", "cat/1.png",
                                                             "cat/linked/far.png", "dog/0.png", "dog/1.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "notes.txt" not in " ".join(err)
    assert "1 image" in err[0] and str(base / "loose.png") in err[0] and "beside the class folders" in err[0]
    assert "3 hidden" in err[1] and str(base / ".git") in err[1]               # .git, .ipynb_checkpoints, .hidden.png
    assert "2 image files" in err[2] and "(.gif, .pgm;" in err[2] and str(base / "dog" / "anim.gif") in err[2]
    for name in ("0.png", "1.png", "anim.gif", "scan.PGM"):
        (base / "dog" / name).unlink()
    common.load_split.cache_clear()
    with pytest.raises(common.DatasetError, match=r"class folder .*dog has no images, only other files.*notes.txt"):
        common.load_split("folder", str(tmp_path / "d"), "train")
    flat = tmp_path / "flat"                                                     # a flat folder and one sub-folder
    for j in range(5):
        write_image(str(flat / f"{j}.jpg"), j)
    write_image(str(flat / "rejects" / "5.jpg"), 5)
    everything = common.load_split("folder", str(flat), "all")
    assert len(everything) == 6 and everything.labels.tolist() == [-1] * 6 and everything.num_classes == 0
    note = capsys.readouterr().err
    assert "images beside sub-folders" in note and "unlabeled" in note and len(note.strip().splitlines()) == 1


def test_every_image_is_checked_once_before_training_and_remembered(tmp_path, monkeypatch):
    from PIL import Image
    for c in ("a", "b"):
        for j in range(3):
            write_image(str(tmp_path / "imgs" / c / f"{j}.png"), j)
    (tmp_path / "imgs" / "a" / "empty.jpg").write_bytes(b"")
    (tmp_path / "imgs" / "b" / "text.png").write_text("not an image")
    with pytest.raises(common.DatasetError) as e:
        common.load_split("folder", str(tmp_path / "imgs"), "all")
    assert "2 of the 8 image files" in str(e.value) and "empty.jpg (0 bytes)" in str(e.value)
    assert "text.png (not an image" in str(e.value) and "\n" not in str(e.value)
    for name in ("a/empty.jpg", "b/text.png"):
        os.remove(tmp_path / "imgs" / name)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    common.load_split.cache_clear()
    assert len(common.load_split("folder", str(tmp_path / "imgs"), "all")) == 6
    assert opened == [] and len(os.listdir(os.environ["SIMDISTILL_CACHE"])) == 1  # the good ones were remembered
    write_image(str(tmp_path / "imgs" / "b" / "1.png"), 7, size=9)               # changed: checked again
    common.load_split.cache_clear()
    common.load_split("folder", str(tmp_path / "imgs"), "all")
    assert opened == [str(tmp_path / "imgs" / "b" / "1.png")]
    monkeypatch.setenv("SIMDISTILL_CACHE", str(tmp_path / "fresh"))               # nothing remembered: all opened
    common.load_split.cache_clear()
    opened.clear()
    common.load_split("folder", str(tmp_path / "imgs"), "all")
    assert sorted(opened) == sorted(common.load_split("folder", str(tmp_path / "imgs"), "all").paths)
    assert not [p for p in (tmp_path / "imgs").rglob("*") if p.suffix not in (".png", "")]  # nothing written there

def many_images(root, rel_paths, size=6):
    for i, rel in enumerate(rel_paths):
        write_image(os.path.join(root, rel), i, size)


CINIC = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cinic10_fixture_decoded_once_and_train_plus_valid(tmp_path):
    base = tmp_path / "cinic-10"
    many_images(str(base), [f"{s}/{c}/{s}-{c}-{j}.png" for s in ("train", "valid", "test") for c in CINIC
                            for j in range(1 + (s == "train"))], size=32)
    tr = common.load_split("cinic10", str(tmp_path), "train", download=False)
    assert tr.images.shape == (20, 3, 32, 32) and tr.images.dtype == torch.uint8 and tr.num_classes == 10
    assert tr.labels.tolist() == [i // 2 for i in range(20)] and tr.classes == CINIC
    assert tr.mean == (0.47889522, 0.47227842, 0.43047404)                      # the CINIC-10 README's statistics
    from PIL import Image
    first = np.array(Image.open(base / "train" / "airplane" / "train-airplane-0.png"))
    assert torch.equal(tr.images[0], torch.from_numpy(first).permute(2, 0, 1))
    both = common.load_split("cinic10", str(tmp_path), "train+valid", download=False)
    assert len(both) == 30 and torch.equal(both.images[:20], tr.images) and both.labels[20:].tolist() == list(range(10))
    assert (base / "train_uint8.pt").exists()
    os.remove(base / "train" / "cat" / "train-cat-0.png")                       # the cache is what is read now
    common.load_split.cache_clear()
    assert torch.equal(common.load_split("cinic10", str(tmp_path), "train", download=False).images, tr.images)
    with pytest.raises(common.DatasetError, match="cinic-10.*datashare"):
        common.load_split("cinic10", str(tmp_path / "none"), "test", download=False)


def test_dtd_fixture_ten_partitions_in_torchvision_layout(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    classes = ["banded", "blotchy", "braided"]
    many_images(str(base / "images"), [f"{c}/{c}_{j:04d}.jpg" for c in classes for j in range(3)])
    (base / "labels").mkdir()
    for k in range(1, 11):
        for s, j in (("train", k % 3), ("val", (k + 1) % 3), ("test", (k + 2) % 3)):
            (base / "labels" / f"{s}{k}.txt").write_text("".join(f"{c}/{c}_{j:04d}.jpg\n" for c in classes[::-1]))
    tr, te = (common.load_split("dtd", str(tmp_path), s, download=False) for s in ("train1", "test10"))
    assert tr.classes == classes and tr.labels.tolist() == [2, 1, 0] and tr.num_classes == 3
    assert tr.paths[0] == str(base / "images" / "braided" / "braided_0001.jpg")
    assert te.paths[0].endswith("braided_0000.jpg")
    assert len(common.load_split("dtd", str(tmp_path), "train3+val3", download=False)) == 6
    with pytest.raises(common.DatasetError, match="no split 'train11'"):
        common.load_split("dtd", str(tmp_path), "train11")
    (base / "labels" / "val2.txt").write_text("banded/banded_0009.jpg\n")
    with pytest.raises(common.DatasetError, match="1 of 1 images .* missing .*banded_0009.jpg"):
        common.load_split("dtd", str(tmp_path), "val2", download=False)


def make_transfer_fixtures(root):
    """Each ISD Table 2 transfer dataset in the layout torchvision's class for it reads, with a few tiny images."""
    import scipy.io
    food = os.path.join(root, "food-101")
    many_images(os.path.join(food, "images"), [f"{c}/{j}.jpg" for c in ("apple_pie", "baklava") for j in (11, 12)])
    os.makedirs(os.path.join(food, "meta"))
    for s, j in (("train", 11), ("test", 12)):
        open(os.path.join(food, "meta", f"{s}.txt"), "w").write(f"baklava/{j}\napple_pie/{j}\n")
    flowers = os.path.join(root, "flowers-102")
    many_images(os.path.join(flowers, "jpg"), [f"image_{i:05d}.jpg" for i in range(1, 7)])
    scipy.io.savemat(os.path.join(flowers, "imagelabels.mat"), {"labels": np.array([[3, 1, 2, 3, 102, 1]])})
    scipy.io.savemat(os.path.join(flowers, "setid.mat"), {"trnid": np.array([[1, 2]]), "valid": np.array([[3, 4]]),
                                                          "tstid": np.array([[5, 6]])})
    pets = os.path.join(root, "oxford-iiit-pet")
    many_images(os.path.join(pets, "images"), ["Abyssinian_1.jpg", "beagle_7.jpg", "Bengal_2.jpg", "boxer_3.jpg"])
    os.makedirs(os.path.join(pets, "annotations"))
    open(os.path.join(pets, "annotations", "trainval.txt"), "w").write("Abyssinian_1 1 1 1\nbeagle_7 3 2 2\n")
    open(os.path.join(pets, "annotations", "test.txt"), "w").write("Bengal_2 2 1 2\nboxer_3 4 2 3\n")
    sun = os.path.join(root, "SUN397")
    many_images(sun, ["a/abbey/sun_a.jpg", "a/apartment_building/outdoor/sun_b.jpg", "a/abbey/sun_c.jpg",
                      "a/apartment_building/outdoor/sun_d.jpg"])
    os.makedirs(os.path.join(sun, "Partitions"))
    open(os.path.join(sun, "Partitions", "Training_01.txt"), "w").write(
        "/a/apartment_building/outdoor/sun_b.jpg\n/a/abbey/sun_a.jpg\n")
    open(os.path.join(sun, "Partitions", "Testing_01.txt"), "w").write(
        "/a/abbey/sun_c.jpg\n/a/apartment_building/outdoor/sun_d.jpg\n")
    caltech = os.path.join(root, "caltech101", "101_ObjectCategories")
    many_images(caltech, [f"{c}/image_{j:04d}.jpg" for c, n in (("BACKGROUND_Google", 33), ("Faces", 31),
                                                                  ("accordion", 35)) for j in range(1, n + 1)], size=2)
    aircraft = os.path.join(root, "fgvc-aircraft-2013b", "data")
    many_images(os.path.join(aircraft, "images"), [f"{i:07d}.jpg" for i in range(6)])
    for s, (i, j) in (("train", (0, 1)), ("val", (2, 3)), ("test", (4, 5))):
        open(os.path.join(aircraft, f"images_variant_{s}.txt"), "w").write(f"{i:07d} Falcon 2000\n{j:07d} 707-320\n")


@pytest.mark.parametrize("name, split, n, num_classes, first, label", [
    ("food101", "train", 2, 2, "food-101/images/baklava/11.jpg", 1),
    ("food101", "test", 2, 2, "food-101/images/baklava/12.jpg", 1),
    ("flowers102", "train", 2, 102, "flowers-102/jpg/image_00001.jpg", 2),
    ("flowers102", "val", 2, 102, "flowers-102/jpg/image_00003.jpg", 1),
    ("flowers102", "test", 2, 102, "flowers-102/jpg/image_00005.jpg", 101),
    ("pets", "train", 2, 37, "oxford-iiit-pet/images/Abyssinian_1.jpg", 0),
    ("pets", "test", 2, 37, "oxford-iiit-pet/images/Bengal_2.jpg", 1),
    ("sun397", "train", 2, 2, "SUN397/a/apartment_building/outdoor/sun_b.jpg", 1),
    ("sun397", "test", 2, 2, "SUN397/a/abbey/sun_c.jpg", 0),
    ("aircraft", "train", 2, 2, "fgvc-aircraft-2013b/data/images/0000000.jpg", 1),
    ("aircraft", "val", 2, 2, "fgvc-aircraft-2013b/data/images/0000002.jpg", 1),
    ("aircraft", "test", 2, 2, "fgvc-aircraft-2013b/data/images/0000004.jpg", 1),
])
def test_transfer_dataset_fixtures_in_torchvision_layouts(tmp_path, name, split, n, num_classes, first, label):
    make_transfer_fixtures(str(tmp_path))
    out = common.load_split(name, str(tmp_path), split, download=False)
    assert (len(out), out.num_classes) == (n, num_classes)
    assert out.paths[0] == str(tmp_path / first) and int(out.labels[0]) == label
    os.remove(out.paths[-1])
    common.load_split.cache_clear()
    with pytest.raises(common.DatasetError, match="1 of 2 images .*missing"):
        common.load_split(name, str(tmp_path), split, download=False)


def test_caltech101_thirty_per_class_seeded_background_kept(tmp_path):
    make_transfer_fixtures(str(tmp_path))
    tr, te = (common.load_split("caltech101", str(tmp_path), s, download=False) for s in ("train", "test"))
    assert tr.classes == ["BACKGROUND_Google", "Faces", "accordion"] and tr.num_classes == te.num_classes == 3
    assert torch.bincount(tr.labels).tolist() == [30, 30, 30] and torch.bincount(te.labels).tolist() == [3, 1, 5]
    assert not set(tr.paths) & set(te.paths) and len(set(tr.paths) | set(te.paths)) == 99
    common.load_split.cache_clear()
    assert common.load_split("caltech101", str(tmp_path), "train", download=False).paths == tr.paths  # fixed seed
    background = [os.path.basename(p) for p in te.paths if "BACKGROUND" in p]
    assert background != ["image_0031.jpg", "image_0032.jpg", "image_0033.jpg"]  # drawn, not the first 30


def test_stanfordcars_is_the_196_class_split_of_the_test_flag(tmp_path):
    import scipy.io
    base = tmp_path / "cars"
    recs = [(f"car_ims/{i:06d}.jpg", 1 + i % 196, int(i >= 200)) for i in range(400)]
    many_images(str(base), [r[0] for r in recs], size=2)
    ann = np.array(recs, dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    scipy.io.savemat(str(base / "cars_annos.mat"), {"annotations": ann[None, :]})
    tr, te = (common.load_split("stanfordcars", str(tmp_path), s) for s in ("train", "test"))
    assert (len(tr), len(te), tr.num_classes, te.num_classes) == (200, 200, 196, 196)
    assert tr.labels[:3].tolist() == [0, 1, 2] and te.labels[:3].tolist() == [4, 5, 6]   # class id 1 -> label 0
    assert tr.paths[0].endswith("car_ims/000000.jpg") and te.paths[0].endswith("car_ims/000200.jpg")


def test_imagenet_1pct_and_10pct_subsets(tmp_path, monkeypatch):
    train = tmp_path / "imagenet" / "train"
    wnids = sorted(f"n{i:08d}" for i in range(1000))
    for w in wnids:
        (train / w).mkdir(parents=True)
    names = [f"{wnids[7]}_1.JPEG", f"{wnids[3]}_5.JPEG", f"{wnids[999]}_2.JPEG"]
    many_images(str(train), [f"{n.split('_')[0]}/{n}" for n in names])
    listing = tmp_path / "1percent.txt"
    listing.write_text("".join(n + "\n" for n in names))
    md5 = hashlib.md5(listing.read_bytes()).hexdigest()
    monkeypatch.setitem(common.SOURCES, "imagenet_1pct", [(listing.as_uri(), md5, None)])
    one = common.load_split("imagenet", str(tmp_path), "train_1pct")          # the list is downloaded next to train/
    assert (tmp_path / "imagenet" / "1percent.txt").exists() and one.num_classes == 1000
    assert sorted(zip(one.labels.tolist(), one.paths)) == sorted([(7, str(train / wnids[7] / names[0])),
                                                                 (3, str(train / wnids[3] / names[1])),
                                                                 (999, str(train / wnids[999] / names[2]))])
    (tmp_path / "imagenet" / "10percent.txt").write_text(names[0] + "\nn00000003_9.JPEG\n")   # placed by hand
    with pytest.raises(common.DatasetError, match="1 of 2 images listed in .*10percent.txt.*missing.*n00000003_9"):
        common.load_split("imagenet", str(tmp_path), "train_10pct", download=False)


def test_missing_datasets_say_what_to_put_where(tmp_path):
    for name, split, where in (("dtd", "train1", "dtd/dtd/labels"), ("food101", "train", "food-101"),
                               ("flowers102", "val", "flowers-102"), ("pets", "test", "oxford-iiit-pet"),
                               ("sun397", "train", "SUN397"), ("caltech101", "train", "caltech101"),
                               ("aircraft", "val", "fgvc-aircraft-2013b"), ("stanfordcars", "train", "cars_annos.mat"),
                               ("imagenet", "train_1pct", "1percent.txt"), ("cinic10", "valid", "cinic-10")):
        with pytest.raises(common.DatasetError, match=re.escape(where)) as e:
            common.load_split(name, str(tmp_path), split, download=False)
        assert "\n" not in str(e.value)


def test_downloads_extract_into_torchvision_layouts(tmp_path, monkeypatch):
    """cinic10's tar has no top folder, caltech101's zip holds a tar.gz, flowers102 is a tgz plus two plain files."""
    import scipy.io
    src = tmp_path / "src"
    many_images(str(src / "cinic"), [f"{s}/{c}/0.png" for s in ("train", "valid", "test") for c in CINIC], size=32)
    many_images(str(src / "101_ObjectCategories"), [f"{c}/image_{j:04d}.jpg" for c in ("a", "b")
                                                    for j in range(1, 32)], size=2)
    many_images(str(src / "jpg"), [f"image_{i:05d}.jpg" for i in (1, 2)])
    scipy.io.savemat(str(src / "imagelabels.mat"), {"labels": np.array([[1, 2]])})
    scipy.io.savemat(str(src / "setid.mat"), {"trnid": np.array([[1]]), "valid": np.array([[2]]),
                                              "tstid": np.array([[2]])})
    with tarfile.open(src / "CINIC-10.tar.gz", "w:gz") as t:
        for s in ("train", "valid", "test"):
            t.add(src / "cinic" / s, arcname=s)
    with tarfile.open(src / "101_ObjectCategories.tar.gz", "w:gz") as t:
        t.add(src / "101_ObjectCategories", arcname="101_ObjectCategories")
    with zipfile.ZipFile(src / "caltech-101.zip", "w") as z:
        z.write(src / "101_ObjectCategories.tar.gz", "caltech-101/101_ObjectCategories.tar.gz")
    with tarfile.open(src / "102flowers.tgz", "w:gz") as t:
        t.add(src / "jpg", arcname="jpg")

    def source(name, member):
        return ((src / name).as_uri(), hashlib.md5((src / name).read_bytes()).hexdigest(), member)
    monkeypatch.setitem(common.SOURCES, "cinic10", [source("CINIC-10.tar.gz", "cinic-10")])
    monkeypatch.setitem(common.SOURCES, "caltech101", [source("caltech-101.zip", "caltech-101"),
                                                        common.SOURCES["caltech101"][1]])
    monkeypatch.setitem(common.SOURCES, "flowers102", [source("102flowers.tgz", "jpg"),
                                                        source("imagelabels.mat", None), source("setid.mat", None)])
    root = tmp_path / "data"
    assert len(common.load_split("cinic10", str(root), "valid")) == 10
    assert sorted(os.listdir(root / "cinic-10")) == ["test", "train", "valid", "valid_uint8.pt"]
    assert len(common.load_split("caltech101", str(root), "test")) == 2
    assert (root / "caltech101" / "101_ObjectCategories" / "a" / "image_0031.jpg").exists()
    assert common.load_split("flowers102", str(root), "val").labels.tolist() == [1]
    assert (root / "flowers-102" / "jpg" / "image_00002.jpg").exists()
    assert not [p for p in root.rglob("*") if p.name.startswith(".extracting") or p.suffix == ".part"]


def test_epoch_batches_are_seeded_sharded_and_resumable():
    labels = torch.arange(103) % 7
    full = common.epoch_batches(labels, 10, seed=1, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(full, common.epoch_batches(labels, 10, seed=1, epoch=2)))
    assert [len(b) for b in full] == [10] * 10 + [3] and sorted(torch.cat(full).tolist()) == list(range(103))
    assert not torch.equal(torch.cat(full), torch.cat(common.epoch_batches(labels, 10, seed=1, epoch=3)))
    assert [len(b) for b in common.epoch_batches(labels, 10, 1, 2, drop_last=True)] == [10] * 10
    shards = [common.epoch_batches(labels, 10, 1, 2, rank=r, world=2) for r in range(2)]
    for j, batch in enumerate(shards[0]):  # the two ranks' slices make up each global batch of the padded order
        assert len(batch) == len(shards[1][j]) and not set(batch.tolist()) & set(shards[1][j].tolist()) or j == 10
    assert sum(len(b) for s in shards for b in s) == 104  # padded by wrapping to a multiple of the world size
    balanced = common.epoch_batches(labels, 10, 1, 2, samples_per_class=2)
    assert len(balanced) == 10 and all((labels[b].view(5, 2)[:, 0] == labels[b].view(5, 2)[:, 1]).all() for b in balanced)


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
    reflect = common.random_crop_flip(x, padding=2, padding_mode="reflect")  # CIFAR-10 (WRN) padding: no zeros
    assert torch.isin(reflect.flatten(), xf.flatten()).all()


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
    files = common.load_split("folder", str(tmp_path), "all")
    out, lab = common.embed(lambda x: x.mean((2, 3)), files, "cpu", batch_size=2, workers=0,
                            transform=common.eval_transform(16, 12))
    assert out.shape == (3, 3) and lab.tolist() == [0, 0, 0]
    ds = common.ImageFiles(files.paths, files.labels, common.TwoViews(common.moco_v2_transform(12),
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
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as z:  # SOP / Tiny-ImageNet ship zips; '..' inside a name is legal
        z.writestr("top/a..b.txt", "dots")
        z.writestr("top/sub/c.txt", "sub")
    common.extract(str(tmp_path / "z.zip"), str(tmp_path / "dl"), "top")
    assert (tmp_path / "dl" / "top" / "a..b.txt").read_text() == "dots"
    assert (tmp_path / "dl" / "top" / "sub" / "c.txt").read_text() == "sub"


def test_a_dropped_download_resumes_and_an_archive_that_fails_to_extract_is_deleted(tmp_path, monkeypatch):
    """CINIC-10 publishes no md5. A connection closed before Content-Length bytes: one line, the .part kept, and the
    rerun resumes it (a Range request). An archive that does not extract (a server without Content-Length that stopped
    early): one line naming it, the archive and the half-extracted folder deleted, and the rerun downloads it anew."""
    import http.server
    import shutil
    import threading
    src = tmp_path / "src"
    many_images(str(src), [f"{s}/{c}/0.png" for s in ("train", "valid", "test") for c in CINIC], size=32)
    with tarfile.open(tmp_path / "CINIC-10.tar.gz", "w:gz") as t:
        for s in ("train", "valid", "test"):
            t.add(src / s, arcname=s)
    payload, modes, ranges = (tmp_path / "CINIC-10.tar.gz").read_bytes(), [], []

    class Host(http.server.BaseHTTPRequestHandler):  # HTTP/1.0: the connection closes after each answer
        def do_GET(self):  # modes: "drop" (Content-Length, half the bytes), "quiet" (no Content-Length, half), "ok"
            mode, asked = modes.pop(0), self.headers["Range"]
            ranges.append(asked)
            start = int(asked[6:-1]) if asked and mode == "ok" else 0
            self.send_response(206 if start else 200)
            if mode != "quiet":
                self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            self.wfile.write(payload[start:] if mode == "ok" else payload[:len(payload) // 2])

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Host)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/CINIC-10.tar.gz"
    monkeypatch.setitem(common.SOURCES, "cinic10", [(url, None, "cinic-10")])
    root, archive = tmp_path / "data", tmp_path / "data" / "CINIC-10.tar.gz"
    try:
        modes[:] = ["drop"]
        with pytest.raises(common.DatasetError, match=r"download of .*CINIC-10.tar.gz stopped at .* of .* MiB .*run "
                                                      r"again to resume") as e:
            common.load_split("cinic10", str(root), "valid")
        assert "\n" not in str(e.value) and not archive.exists()
        assert (root / "CINIC-10.tar.gz.part").read_bytes() == payload[:len(payload) // 2]
        modes[:] = ["ok"]
        assert len(common.load_split("cinic10", str(root), "valid")) == 10   # resumed from the .part
        assert ranges == [None, f"bytes={len(payload) // 2}-"] and archive.read_bytes() == payload
        shutil.rmtree(root)
        common.load_split.cache_clear()
        modes[:] = ["quiet"]
        with pytest.raises(common.DatasetError, match=r"cannot extract .*CINIC-10.tar.gz .*deleted it, run again") as e:
            common.load_split("cinic10", str(root), "valid")
        assert "\n" not in str(e.value) and sorted(os.listdir(root)) == []  # no archive, no half-extracted folder
        modes[:] = ["ok"]
        common.load_split.cache_clear()
        assert len(common.load_split("cinic10", str(root), "valid")) == 10 and ranges[-1] is None
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_never_replaces_a_users_dataset_folder(tmp_path, monkeypatch):
    (tmp_path / "tiny-imagenet-200").mkdir()
    (tmp_path / "tiny-imagenet-200" / "notes.txt").write_text("mine")  # an incomplete folder: no wnids.txt
    monkeypatch.setattr(common, "download_url", lambda *a, **k: pytest.fail("downloaded over an existing folder"))
    with pytest.raises(common.DatasetError, match="wnids.txt"):
        common.load_split("tinyimagenet", str(tmp_path), "train", download=True)
    assert (tmp_path / "tiny-imagenet-200" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# s2sd.py: losses against per-anchor re-derivations, end-to-end runs, eval round trip, resume

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


def test_losses_and_miner_stay_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 32, generator=g), dim=1) for n in (8, 8, 64))
    emb, y = F.normalize(torch.randn(24, 128, generator=g), dim=1), torch.arange(24) % 6
    exact = isd.isd_loss(q, k, queue, 0.1, 0.01), isd.moco_loss(q, k, queue, 0.2)
    torch.manual_seed(3)
    trip = s2sd.distance_weighted_triplets(emb, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = isd.isd_loss(q, k, queue, 0.1, 0.01), isd.moco_loss(q, k, queue, 0.2)
        torch.manual_seed(3)
        trip_bf16 = s2sd.distance_weighted_triplets(emb, y)
    for a, b in zip(exact, under):
        assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-6, atol=1e-7), (a, b)
    assert all(torch.equal(a, b) for a, b in zip(trip, trip_bf16))


def _s2sd_args(tmp_path, *extra):
    return s2sd.get_args(["--device", "cpu", "--save-dir", str(tmp_path), "--log-every", "1000", *extra])


# ------------------------------------------------------------------------------------------------
# spkd.py: sp_loss against Eq. 2-4 loops, model zoo, teacher formats, end-to-end, resume

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


# arch: (stages, channels of the last stage, pooled width, side of the last map at 32 px); the rest by family below
ZOO_SHAPES = {"ResNet50": (4, 2048, 2048, 4), "MobileNetV2": (4, 160, 1280, 2), "ShuffleV1": (3, 960, 960, 4),
              "ShuffleV2": (3, 464, 1024, 4), "shufflenetv2_0.5": (3, 192, 1024, 4),
              "shufflenetv2_1.0": (3, 464, 1024, 4), "shufflenetv2_2.0": (3, 976, 2048, 4),
              "resnet8x4": (3, 256, 256, 8), "resnet32x4": (3, 256, 256, 8), "wrn_16_2": (3, 128, 128, 8),
              "wrn_40_2": (3, 128, 128, 8), "wrn_16_8": (3, 512, 512, 8), "vgg8": (4, 512, 512, 4),
              "vgg13": (4, 512, 512, 4), "resnet18": (4, 512, 512, 1), "resnet34": (4, 512, 512, 1),
              "resnet50": (4, 2048, 2048, 1), "mobilenetv2_1.4": (4, 1792, 1792, 1),
              "mobilenet_0.25": (4, 256, 256, 1), "mobilenet_0.5": (4, 512, 512, 1),
              "mobilenet_1.0": (4, 1024, 1024, 1)}


@pytest.mark.parametrize("arch", list(spkd.ARCHS))
def test_spkd_zoo_shapes(arch):
    """Every network at 16, 32 and 64 px (TinyImageNet): logits, the stage outputs (RepDistiller feat[1:-1]; the last
    is feat[-2], SP's map) and the pooled feature (feat[-1]); the 224-px networks reduce 32x."""
    torch.manual_seed(0)
    m = spkd.build_model(arch, 7).eval()
    default = (4, 1280, 1280, 1) if arch.startswith("mobilenetv2") else (3, 64, 64, 8)  # resnet8..110, wrn_*_1
    stages, channels, width, side = ZOO_SHAPES.get(arch, default)
    for size in (16, 32, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            feats, pooled, logits = m(x, with_features=True)
            assert torch.equal(m(x), logits)
        assert logits.shape == (2, 7) and pooled.shape == (2, width) and len(feats) == stages
        assert feats[-1].shape[:2] == (2, channels)
        if size > 16:  # vgg: pool3 only at 64 px (RepDistiller), so its last map stays 4 x 4
            expect = 4 if arch.startswith("vgg") else side * size // 32
            assert feats[-1].shape[-1] == expect, (size, feats[-1].shape)
    if arch.startswith("wrn") or arch == "MobileNetV2":  # the WRN block3 output BEFORE the final BN-ReLU, the
        assert feats[-1].min() < 0                         # MobileNetV2 linear bottleneck: can be negative
    else:
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


# The zoo's RepDistiller networks against RepDistiller's own classes, recorded once by a scratch script that built
# both (HobbitLong/RepDistiller models/, not in this repository): the state_dict layout (keys in order, shapes) as a
# hash, and a float64 forward with deterministic weights (_zoo_fill, from each tensor's key and shape alone) on
# _ZOO_X: logits[0, :3], the sums of the logits, of the pooled feature (feat[-1]) and of the last stage (feat[-2]).
# The same script found seed-0 initialisations equal tensor for tensor and every stage output (feat[1:-1]) equal.
_ZOO_REF = {  # arch: (layout hash, tensors, logits[0, :3], logits sum, pooled sum, last stage sum, last stage shape)
    "ResNet50": ("6bcc49538a495920", 320, [-259.6464071469135, 53.46291339466735, 310.6766963746098], -350.8945813,
                 118938.9111, 1903022.578, (2, 2048, 4, 4)),
    "MobileNetV2": ("3ddc0bf2eef0b615", 320, [2.3215586234662506, -6.315431972016518, -0.8423784843606632],
                    -8.755748311, 1483.404601, -37.93855944, (2, 160, 2, 2)),
    "ShuffleV1": ("cab61113362febd3", 296, [-98.24101422860608, -24.70740966847439, 83.39176112498484], -104.0161652,
                  28589.48217, 457431.7147, (2, 960, 4, 4)),
    "ShuffleV2": ("058fe31c439534ad", 338, [-4.386702548286312, 2.3103926482070287, 0.693033116440516], -10.12952722,
                  510.4448942, 13913.56668, (2, 464, 4, 4)),
    "resnet8x4": ("9a64e9d0fa7ccafd", 62, [0.48461622613942223, -0.18056762051394343, -0.7253056807652553],
                  -2.478103149, 164.6769805, 10539.32675, (2, 256, 8, 8)),
    "wrn_16_2": ("ac7cdeda226ab2f1", 83, [-0.509101067893168, 0.48261631911157155, -0.5310496603936992], -0.921149551,
                 94.59666345, 80.12469172, (2, 128, 8, 8)),
    "vgg8": ("54ab085270b2db17", 37, [-0.9136948453265449, -0.5806152324100435, 1.0187632559774964], -1.409515907,
             29.64945668, 474.3913069, (2, 512, 4, 4)),
    "vgg13": ("7fb2ad96dd5a3228", 72, [-2.631254374339985, -0.31364683864117254, 2.5946930498751817], -4.644426394,
              80.25737259, 1284.117961, (2, 512, 4, 4)),
}
_ZOO_X = torch.sin(torch.arange(2 * 3 * 32 * 32, dtype=torch.float64) * 0.37).reshape(2, 3, 32, 32)


def _zoo_fill(model):
    """Deterministic weights from each tensor's key and shape alone: sin waves; BN variances in [0.5, 1.5]."""
    import zlib
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            phase = zlib.crc32(k.encode()) % 997 / 97.0
            wave = torch.sin(torch.arange(v.numel(), dtype=torch.float64) * 0.61 + phase).reshape(v.shape).to(v.dtype)
            if k.endswith("running_var"):
                v.copy_(1 + 0.5 * wave)
            elif v.dim() > 1:
                v.copy_(wave * (2.0 / v[0].numel()) ** 0.5 * 1.4)
            elif k.endswith("weight"):
                v.copy_(1 + 0.2 * wave)
            else:
                v.copy_(0.1 * wave)
    return model


@pytest.mark.parametrize("arch", list(_ZOO_REF))
def test_zoo_layout_and_forward_equal_repdistillers(arch):
    layout, count, first, logits_sum, pooled_sum, last_sum, last_shape = _ZOO_REF[arch]
    model = spkd.build_model(arch, 100)
    sd = model.state_dict()
    text = "".join(f"{k} {tuple(v.shape)}\n" for k, v in sd.items())
    assert len(sd) == count and hashlib.sha256(text.encode()).hexdigest()[:16] == layout
    _zoo_fill(model).double().eval()
    with torch.no_grad():
        feats, pooled, logits = model(_ZOO_X, with_features=True)
    assert logits[0, :3].tolist() == pytest.approx(first, rel=1e-6)
    assert logits.sum().item() == pytest.approx(logits_sum, rel=1e-6)
    assert pooled.sum().item() == pytest.approx(pooled_sum, rel=1e-6)
    assert feats[-1].sum().item() == pytest.approx(last_sum, rel=1e-6) and feats[-1].shape == last_shape


def test_zoo_repdistiller_keys_and_init():
    sd = spkd.build_model("ResNet50", 100).state_dict()  # RepDistiller resnetv2.py names: shortcut, linear
    assert sd["layer1.0.shortcut.0.weight"].shape == (256, 64, 1, 1) and sd["linear.weight"].shape == (100, 2048)
    assert "layer1.1.shortcut.0.weight" not in sd and sd["conv1.weight"].shape == (64, 3, 3, 3)
    sd = spkd.build_model("MobileNetV2", 100).state_dict()  # mobile_half: expansion conv even at t = 1
    assert sd["blocks.0.0.conv.0.weight"].shape == (16, 16, 1, 1) and sd["classifier.0.weight"].shape == (100, 1280)
    assert sd["conv1.0.weight"].shape == (16, 3, 3, 3) and sd["blocks.6.0.conv.7.weight"].shape == (160,)
    sd = spkd.build_model("ShuffleV1", 100).state_dict()  # 1 group on the stem output, 1x1 stem
    assert sd["layer1.0.conv1.weight"].shape == (54, 24, 1, 1) and sd["layer2.0.conv1.weight"].shape == (60, 80, 1, 1)
    assert sd["conv1.weight"].shape == (24, 3, 1, 1)
    sd, sp = spkd.build_model("ShuffleV2", 10).state_dict(), spkd.build_model("shufflenetv2_1.0", 10).state_dict()
    assert sd["layer1.0.conv5.weight"].shape == (58, 58, 1, 1) and sd["layer3.3.conv3.weight"].shape == (232, 232, 1, 1)
    assert sd["conv1.weight"].shape == (24, 3, 1, 1) and sp["conv1.weight"].shape == (24, 3, 3, 3)  # SP Table 6: 3x3
    assert [k for k in sd if sd[k].shape != sp[k].shape] == ["conv1.weight"]
    assert spkd.build_model("shufflenetv2_2.0", 10).state_dict()["layer1.0.conv2.weight"].shape == (122, 24, 1, 1)
    torch.manual_seed(0)  # init as RepDistiller: Kaiming fan_out / N(0, sqrt(2/n)) convs; ShuffleNets PyTorch default
    for arch, default in (("ResNet50", False), ("MobileNetV2", False), ("ShuffleV1", True), ("ShuffleV2", True)):
        model = spkd.build_model(arch, 100)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 4096:
                fan_in, fan_out = m.weight[0].numel(), m.weight.shape[0] * m.weight[0, 0].numel()
                expect = (1 / (3 * fan_in)) ** 0.5 if default else (2 / fan_out) ** 0.5
                assert abs(m.weight.std().item() / expect - 1) < 0.1, (arch, m)
            if isinstance(m, torch.nn.BatchNorm2d):
                assert (m.weight == 1).all() and (m.bias == 0).all()
    linear = spkd.build_model("ShuffleV1", 100).linear  # PyTorch's default: U(+-1/sqrt(fan_in))
    assert abs(linear.weight.std().item() * (3 * linear.in_features) ** 0.5 - 1) < 0.1
    cls = spkd.build_model("MobileNetV2", 100).classifier[0]
    assert abs(cls.weight.std().item() / 0.01 - 1) < 0.1 and (cls.bias == 0).all()


def test_zoo_224px_networks_match_the_sp_tables():
    """Parameter counts with 47 (DTD) / 10 (CINIC-10) classes against SP Tables 3-5 and 7 (0.1M precision)."""
    count = lambda arch, classes: sum(p.numel() for p in spkd.build_model(arch, classes).parameters()) / 1e6
    for arch, millions in (("mobilenet_0.25", 0.2), ("mobilenet_0.5", 0.8), ("mobilenet_1.0", 3.3),
                           ("mobilenetv2_0.35", 0.5), ("mobilenetv2_1.4", 4.4)):
        assert round(count(arch, 47), 1) == millions, arch
    assert round(count("mobilenetv2_1.0", 47), 1) == 2.3  # Table 5 says 2.2M; torchvision's network (2.28M)
    for arch, millions in (("shufflenetv2_0.5", 0.4), ("shufflenetv2_1.0", 1.3)):
        assert round(count(arch, 10), 1) == millions, arch
    assert round(count("shufflenetv2_2.0", 10), 2) == 5.37  # Table 6's 244 channels (Table 7 says 5.3M: see spkd.py)
    import torchvision
    tv = torchvision.models.mobilenet_v2(width_mult=1.4, num_classes=47).state_dict()
    ours = spkd.build_model("mobilenetv2_1.4", 47).state_dict()
    assert [(k, v.shape) for k, v in tv.items()] == [(k, v.shape) for k, v in ours.items()]  # torchvision's keys


def test_zoo_imagenet_weights_torchvision_lacks(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(spkd.RunError, match="mobilenetv2_0.35_imagenet.pth, or use --no-pretrained"):
        spkd.build_model("mobilenetv2_0.35", 47, pretrained=True)
    os.makedirs(tmp_path / "checkpoints")
    torch.manual_seed(1)
    source = spkd.build_model("mobilenet_0.25", 1000)  # an "ImageNet" state_dict: 1000 classes
    torch.save(source.state_dict(), tmp_path / "checkpoints" / "mobilenet_0.25_imagenet.pth")
    model = spkd.build_model("mobilenet_0.25", 47, pretrained=True)
    got, want = model.state_dict(), source.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got if not k.startswith("fc."))
    assert got["fc.weight"].shape == (47, 256)  # the classifier is re-sized, freshly initialised
    wrong = spkd.build_model("mobilenet_0.5", 1000).state_dict()  # another width under the name
    torch.save(wrong, tmp_path / "checkpoints" / "mobilenet_0.25_imagenet.pth")
    with pytest.raises(spkd.RunError, match="do not fit"):
        spkd.build_model("mobilenet_0.25", 47, pretrained=True)
    assert spkd.build_model("resnet8", 10, pretrained=True) is not None  # CIFAR networks: no ImageNet weights


# spkd.py's AT baseline (Zagoruyko & Komodakis 2017) against a per-sample re-derivation

def _at_naive(f_s, f_t):
    """Per image: a_j = mean_c A_cj^2 at each position j, a / ||a||_2; the mean over images and positions of the
    squared student - teacher difference (the AT code's at_loss; maps of equal size)."""
    b, total = f_s.shape[0], 0.0
    for i in range(b):
        a_s, a_t = (f[i].pow(2).mean(0).flatten() for f in (f_s, f_t))
        a_s, a_t = a_s / torch.sqrt((a_s * a_s).sum()), a_t / torch.sqrt((a_t * a_t).sum())
        total = total + ((a_s - a_t) ** 2).sum()
    return total / (b * f_s[0, 0].numel())


def test_spkd_at_loss_matches_per_sample_rederivation():
    g = torch.Generator().manual_seed(5)
    f_s = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    f_t = torch.randn(4, 7, 4, 4, generator=g, dtype=torch.float64)  # channel counts may differ
    a, b = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
    fast = spkd.at_loss(a, b)
    ga, gb = torch.autograd.grad(fast, (a, b))
    a2, b2 = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
    slow = _at_naive(a2, b2)
    ra, rb = torch.autograd.grad(slow, (a2, b2))
    assert fast.shape == () and fast.dtype == torch.float64 and abs(fast.item() / slow.item() - 1) < 1e-10
    assert _camd_rel(ga, ra) < 1e-10 and _camd_rel(gb, rb) < 1e-10
    # a larger map is average-pooled to the smaller one's size first (RepDistiller AT.py), on either side
    big = torch.randn(4, 5, 8, 8, generator=g, dtype=torch.float64)
    pooled = big.reshape(4, 5, 4, 2, 4, 2).mean((3, 5))
    assert spkd.at_loss(big, f_t).item() == pytest.approx(_at_naive(pooled, f_t).item(), rel=1e-10)
    assert spkd.at_loss(f_s, big).item() == pytest.approx(_at_naive(f_s, pooled).item(), rel=1e-10)
    # limits: zero for identical maps, for a scaled copy and for permuted channels (the attention is normalised)
    assert spkd.at_loss(f_s, f_s.clone()).item() == 0.0
    assert spkd.at_loss(3 * f_s, f_s[:, [2, 0, 1]]).item() == pytest.approx(0.0, abs=1e-20)
    assert spkd.at_loss(f_s.bfloat16(), f_t.bfloat16()).dtype == torch.float32


def test_spkd_step_losses_at_term_sums_the_stage_pairs():
    torch.manual_seed(0)
    student, teacher = spkd.build_model("resnet8", 10).eval(), spkd.build_model("wrn_16_1", 10).eval()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    args = argparse.Namespace(ce_weight=1.0, kd_weight=0.0, sp_weight=0.0, at_weight=1000.0, kd_T=4.0, sp_layers="last")
    out = spkd.step_losses(student, teacher, x, y, args)
    with torch.no_grad():
        fs, ft = student(x, with_features=True)[0], teacher(x, with_features=True)[0]
    assert set(out) == {"ce", "at"} and len(fs) == len(ft) == 3  # the three residual groups (SP Sec. 3.1)
    expect = 1000 * sum(_at_naive(a.double(), b.double()) for a, b in zip(fs, ft))
    assert out["at"].item() == pytest.approx(expect.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# camd.py: amd_loss / collaborative_kl against per-anchor loops, cut-off, variants, DDP, resume

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


# ------------------------------------------------------------------------------------------------
# isd.py: isd_loss against a naive loop, queue/EMA arithmetic, moco variant, k-NN rise, resume, DDP

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


# ------------------------------------------------------------------------------------------------
# The contract every script keeps (shared/SKELETON.md), one parametrised section over the four

# A few steps on digits each; camd and spkd share one 1-epoch resnet8 teacher (the same recipe -> the same cache).
TINY = {"s2sd": ["--epochs", "2", "--eval-every", "1"],
        "camd": ["--epochs", "2", "--teacher-arch", "resnet8", "--teacher-epochs", "1", "--image-size", "16",
                 "--batch-size", "128"],
        "spkd": ["--epochs", "2", "--teacher-arch", "resnet8", "--teacher-epochs", "1", "--image-size", "16",
                 "--batch-size", "128"],
        "isd": ["--epochs", "2", "--eval-every", "1", "--batch-size", "128"]}
STEPS_PER_EPOCH = {"s2sd": 901 // 40, "camd": 12, "spkd": 12, "isd": 1437 // 128}  # digits: 901 DML / 1437 train
POISON = {"s2sd": "distill", "camd": "col", "spkd": "sp", "isd": "isd"}  # a loss component of each default variant


@pytest.fixture(scope="session")
def save_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def tiny(name, save_dir, *extra):
    return [*TINY[name], "--save-dir", str(save_dir), "--log-every", "1000", *extra]


@pytest.fixture(scope="session")
def digits_runs(save_dir):
    """One tiny digits run per script -> {name: (run folder, stdout)}."""
    runs = {}
    for name, module in SCRIPTS.items():
        code, out, err = main_of(module, tiny(name, save_dir, "--run-name", f"{name}_run"))
        assert code == 0, err[-3000:]
        runs[name] = (save_dir / f"{name}_run", out)
    return runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_contract_run_leaves_files_and_eval_reproduces(name, digits_runs):
    folder, out = digits_runs[name]
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == ([0, 1, 2] if name == "isd" else [1, 2])  # 1-based (isd: 0 = untrained)
    assert rows[-1]["step"] == 2 * STEPS_PER_EPOCH[name] and rows[-1]["images_per_s"] > 0
    config = json.load(open(folder / "config.json"))
    assert config["method"] == name and config["torch"] == torch.__version__ and "git_commit" in config
    ckpt = load(folder / "model.pt")
    assert ckpt["method"] == name and set(ckpt) >= {"args", "model", "metrics", "history"}
    assert ckpt["metrics"] == {k: v for k, v in rows[-1].items() if k not in ("epoch", "step", "elapsed_s", "images_per_s")}
    last = load(folder / "last.pt")
    assert (last["epoch"], last["batch"], last["step"]) == (2, 0, 2 * STEPS_PER_EPOCH[name])
    assert "final (last epoch 2" in out and "best epoch of each metric (chosen on the test set)" in out
    code, _, err = main_of(eval_py, [str(folder / "model.pt")])
    assert code == 0, err
    again = json.load(open(folder / "eval.json"))
    again = again.get("metrics", again)
    assert all(abs(again[k] - v) <= 1e-9 for k, v in ckpt["metrics"].items()), (again, ckpt["metrics"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_contract_log_lines_are_one_based(name, save_dir, digits_runs):
    code, out, err = main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_log", "--max-steps", "3",
                                                 "--log-every", "1"))
    assert code == 0, err
    first = next(line for line in out.splitlines() if line.startswith("epoch "))
    assert first.startswith("epoch 1 step 1/3 | ")


@pytest.mark.parametrize("name", SCRIPTS)
def test_contract_resume_inside_an_epoch_equals_uninterrupted(name, save_dir, digits_runs, monkeypatch):
    total = STEPS_PER_EPOCH[name] + 3  # across an epoch end (and its evaluation)
    full, part = (tiny(name, save_dir, "--run-name", f"{name}_{k}", "--max-steps", str(total)) for k in ("full", "part"))
    assert main_of(SCRIPTS[name], full)[0] == 0
    stop_requested, calls = SCRIPTS[name].stop_requested, []
    monkeypatch.setattr(SCRIPTS[name], "stop_requested", lambda world: calls.append(1) or len(calls) >= 5)
    code, _, err = main_of(SCRIPTS[name], part)  # stopped after step 5 as by a first Ctrl-C (a preempted job)
    assert code == 130 and "the same command again continues it" in err, err
    monkeypatch.setattr(SCRIPTS[name], "stop_requested", stop_requested)
    last = save_dir / f"{name}_part" / "last.pt"
    assert (load(last)["batch"], load(last)["step"]) == (5, 5)
    code, out, err = main_of(SCRIPTS[name], part)  # the same command: continues that run, its step budget too
    assert code == 0 and f"continuing the unfinished run in {save_dir / (name + '_part')}" in out, err
    a, b = load(save_dir / f"{name}_full" / "model.pt"), load(save_dir / f"{name}_part" / "model.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "images_per_s")} for r in rows]  # noqa
    assert strip(a["history"]) == strip(b["history"]) and b["history"][-1]["step"] == total
    code, _, err = main_of(SCRIPTS[name], ["--resume", str(last)])  # a finished run is never trained further
    assert code == 2 and "finished" in err and "start a new run" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", SCRIPTS)
def test_contract_non_finite_loss_stops_with_component_and_step(name, save_dir, digits_runs, monkeypatch):
    step_losses, calls = SCRIPTS[name].step_losses, [0]
    bad_step = STEPS_PER_EPOCH[name] + 3

    def poisoned(*args, **kwargs):
        out = step_losses(*args, **kwargs)
        calls[0] += 1
        losses = out[0] if isinstance(out, tuple) else out
        if calls[0] == bad_step:
            losses[POISON[name]] = losses[POISON[name]] * float("nan")
        return out
    monkeypatch.setattr(SCRIPTS[name], "step_losses", poisoned)
    code, _, err = main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_nan"))
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert f"non-finite {POISON[name]} loss at step {bad_step}" in err
    assert f"{save_dir / (name + '_nan') / 'last.pt'} holds the last good checkpoint" in err
    assert load(save_dir / f"{name}_nan" / "last.pt")["step"] == STEPS_PER_EPOCH[name]  # the last good epoch
    assert not (save_dir / f"{name}_nan" / "model.pt").exists()
    calls[0], bad_step = 0, 2  # in the first epoch: no last.pt exists, and the message does not promise one
    code, _, err = main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_nan_early"))
    assert code == 2 and "loss at step 2; stopped (no checkpoint was written yet)" in err, err
    monkeypatch.setattr(SCRIPTS[name], "step_losses", step_losses)  # the same command again trains in that folder
    code, out, err = main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_nan_early"))
    assert code == 0 and f"{save_dir / (name + '_nan_early')}: an earlier start of these arguments left no" in out, err
    assert (save_dir / f"{name}_nan_early" / "model.pt").exists() and not (save_dir / f"{name}_nan_early-2").exists()
    args = SimpleNamespace(log_every=1, batch_size=8)  # a torchrun rank != 0 has no run folder: it names rank 0's file
    meter = SCRIPTS[name].Meter(args, dict(rank=1, dir=None, tb=None), torch.device("cpu"), 0, 4)
    with pytest.raises(SCRIPTS[name].RunError, match="step 1; stopped \\(rank 0's last.pt, if it wrote one, is the"):
        meter.add({"loss": torch.tensor(float("inf"))}, 8, 0, 1, 0.1)


@pytest.mark.parametrize("name,sig", [(n, signal.SIGINT) for n in SCRIPTS] + [(n, signal.SIGTERM) for n in SCRIPTS])
def test_contract_ctrl_c_and_sigterm_write_a_resumable_last_pt(name, sig, save_dir, digits_runs):
    argv = [f"{name}.py", *tiny(name, save_dir, "--run-name", f"{name}_{sig.name}", "--epochs", "100",
                                "--log-every", "1")]
    proc = subprocess.Popen([sys.executable, *argv], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    for line in proc.stdout:  # the first training log line of this run
        if re.match(r"epoch \d+ step \d+/", line):
            break
    proc.send_signal(sig)  # SIGTERM: what a scheduler sends on preemption (also timeout, docker stop, kill)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]  # 130 / 143
    last = save_dir / f"{name}_{sig.name}" / "last.pt"
    assert f"--resume {last}" in err and f"{sig.name}: stopping after the step in flight" in err
    assert "Traceback" not in err
    step = load(last)["step"]
    code, _, err = main_of(SCRIPTS[name], ["--resume", str(last), "--max-steps", str(step + 2)])
    assert code == 0, err
    assert load(last)["step"] == step + 2


def test_camd_teacher_folder_in_use_and_a_signal_in_the_teachers_final_evaluation(tmp_path, monkeypatch):
    import fcntl
    base = ["--teacher-arch", "resnet8", "--teacher-epochs", "1", "--image-size", "16", "--batch-size", "128",
            "--epochs", "1", "--max-steps", "2", "--save-dir", str(tmp_path), "--log-every", "1000", "--run-name", "s"]
    evaluate = camd.evaluate

    def evaluate_then_sigterm(model, args, device):  # the teacher's last evaluation: the teacher completes, then stop
        out = evaluate(model, args, device)
        if getattr(args, "cached_teacher", False):
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(camd, "evaluate", evaluate_then_sigterm)
    code, _, err = main_of(camd, base)
    (folder,) = (tmp_path / "teachers").iterdir()
    assert code == 143 and "the teacher is trained and cached; run the same command again" in err, err
    assert (folder / "model.pt").exists() and not (tmp_path / "s").exists()
    monkeypatch.setattr(camd, "evaluate", evaluate)
    os.remove(folder / "model.pt")
    os.remove(folder / "last.pt")  # as a teacher run in its first epoch looks to another process
    with open(folder / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = main_of(camd, base)
        assert code == 2 and f"{folder} is in use by another process" in err and folder.exists(), err


def test_camd_sigterm_while_the_teacher_trains_leaves_a_resumable_teacher(tmp_path):
    argv = ["camd.py", "--teacher-arch", "resnet8", "--teacher-epochs", "100", "--image-size", "16", "--log-every", "1",
            "--save-dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, *argv], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    for line in proc.stdout:  # the teacher's first log line
        if re.match(r"epoch \d+ step \d+/", line):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    (teacher,) = (tmp_path / "teachers").iterdir()
    assert load(teacher / "last.pt")["step"] >= 1 and not (teacher / "model.pt").exists()


def test_contract_ctrl_c_while_the_imports_run_exits_130_quietly():
    proc = subprocess.Popen([sys.executable, "s2sd.py", "--max-steps", "1"], cwd=HERE, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # torch's import takes seconds
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_contract_a_second_signal_stops_at_once_as_does_one_outside_training():
    s2sd.STATE.update(signal=0, training=True)
    try:
        s2sd.on_signal(signal.SIGTERM, None)  # the first: noted, the step in flight goes on
        assert s2sd.STATE["signal"] == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="a second SIGINT"):
            s2sd.on_signal(signal.SIGINT, None)
        s2sd.STATE.update(signal=0, training=False)
        with pytest.raises(KeyboardInterrupt):  # outside training: at once
            s2sd.on_signal(signal.SIGTERM, None)
        assert s2sd.STATE["signal"] == signal.SIGTERM
        assert s2sd.on_signal(signal.SIGTERM, None) is None  # a run already stopping ignores repeats (torchrun's)
        s2sd.STATE.update(signal=0, training=True)
        s2sd.on_signal(signal.SIGTERM, None)
        assert s2sd.on_signal(signal.SIGTERM, None) is None  # the same signal again at once: a duplicate (Slurm +
        with pytest.raises(KeyboardInterrupt, match="a second SIGTERM"):  # torchrun forwarding), but 2 s later: a second
            s2sd.STATE["at"] -= 3
            s2sd.on_signal(signal.SIGTERM, None)
    finally:
        s2sd.STATE.update(signal=0, training=False)


def test_contract_resume_keeps_the_step_budget_and_a_signal_in_the_final_evaluation_is_answered(save_dir, monkeypatch):
    argv = tiny("s2sd", save_dir, "--run-name", "s2sd_budget", "--max-steps", "30")
    stop_requested, calls = s2sd.stop_requested, []
    monkeypatch.setattr(s2sd, "stop_requested", lambda world: calls.append(1) or len(calls) >= 3)
    assert main_of(s2sd, argv)[0] == 130
    monkeypatch.setattr(s2sd, "stop_requested", stop_requested)
    code, out, err = main_of(s2sd, tiny("s2sd", save_dir, "--run-name", "s2sd_budget", "--max-steps", "5"))
    assert code == 0 and f"this run writes to {save_dir / 's2sd_budget'}-2" in out, err  # another budget: another run
    evaluate, seen = s2sd.evaluate, []

    def evaluate_then_ctrl_c(*args):  # a Ctrl-C during the final evaluation (after epoch 1's): said, the run finishes
        out = evaluate(*args)
        if len(seen) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        seen.append(1)
        return out
    monkeypatch.setattr(s2sd, "evaluate", evaluate_then_ctrl_c)
    code, out, err = main_of(s2sd, ["--resume", str(save_dir / "s2sd_budget" / "last.pt")])  # no --max-steps given
    assert code == 0 and "SIGINT: stopping after the step in flight" in err, err
    assert "SIGINT came after the last step: the run is complete" in err
    assert load(save_dir / "s2sd_budget" / "model.pt")["history"][-1]["step"] == 30  # not the preset's 6 epochs


def test_contract_one_process_per_run_folder_and_stale_temporary_files(save_dir, monkeypatch):
    import fcntl
    argv = tiny("s2sd", save_dir, "--run-name", "s2sd_lock", "--max-steps", "30")
    stop_requested, calls = s2sd.stop_requested, []
    monkeypatch.setattr(s2sd, "stop_requested", lambda world: calls.append(1) or len(calls) >= 3)
    assert main_of(s2sd, argv)[0] == 130
    monkeypatch.setattr(s2sd, "stop_requested", stop_requested)
    folder = save_dir / "s2sd_lock"
    (folder / "last.pt.tmp99999").write_bytes(b"half a file")  # left by a process killed while writing
    (folder / "2024").write_text("a user's file, not ours")
    with open(folder / ".lock", "a") as held:  # another process is training this run right now
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = main_of(s2sd, ["--resume", str(folder / "last.pt")])
        assert code == 2 and f"{folder} is in use by another process" in err
        code, out, err = main_of(s2sd, argv)  # the same command: not this folder (taken), a fresh one
        assert code == 0 and f"this run writes to {folder}-2" in out, err
    code, out, err = main_of(s2sd, argv)  # released: the same command continues the unfinished run
    assert code == 0 and f"continuing the unfinished run in {folder}" in out, err
    assert not (folder / "last.pt.tmp99999").exists() and (folder / "model.pt").exists() and (folder / "2024").exists()


def test_lock_on_a_file_system_without_locks_and_a_bug_in_torch_save(tmp_path, monkeypatch, capsys):
    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(s2sd.fcntl, "flock", no_locks)
    assert s2sd.lock(str(tmp_path)) == str(tmp_path)  # NFS without lockd: a note, not "in use by another process"
    assert "this file system cannot lock" in capsys.readouterr().out
    monkeypatch.setattr(torch, "save", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug, not a full disk")))
    with pytest.raises(RuntimeError, match="a bug"):  # a genuine bug keeps its traceback
        s2sd.atomic_save({"x": 1}, str(tmp_path / "last.pt"))
    assert os.listdir(tmp_path) == [".lock"]


def test_atomic_save_on_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    path = tmp_path / "last.pt"
    torch.save({"step": 1}, path)
    for text in (False, True):
        os.symlink("/dev/full", f"{path}.tmp{os.getpid()}")  # every write there fails with ENOSPC
        with pytest.raises(s2sd.RunError, match=r"cannot write .*last.pt .*MiB free there\); a previous one is intact"):
            s2sd.atomic_save("text" if text else {"step": 2, "x": torch.zeros(10000)}, str(path), text=text)
        assert not os.path.lexists(f"{path}.tmp{os.getpid()}") and load(path) == {"step": 1}


def test_isd_two_process_stop_is_agreed_by_all_ranks(tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop after the same step, rank 0 writes last.pt, nobody hangs; the same
    command then continues the run."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "isd.py",
            "--batch-size", "64", "--queue-size", "256", "--epochs", "100", "--eval-every", "0", "--log-every", "1",
            "--save-dir", str(tmp_path), "--run-name", "ddp"]
    proc = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if re.match(r"epoch \d+ step \d+/", line):
            break
    ranks = {}
    for pid in os.listdir("/proc"):  # torchrun's workers: RANK in their environment
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(tmp_path).encode() in open(f"/proc/{pid}/cmdline", "rb").read() and b"TORCHELASTIC_RUN_ID" in b"".join(env):
            ranks.update({int(e[5:]): int(pid) for e in env if e.startswith(b"RANK=")})
    os.kill(ranks[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    step = load(tmp_path / "ddp" / "last.pt")["step"]
    assert f"wrote {tmp_path / 'ddp' / 'last.pt'} after step {step}" in err, err[-3000:]
    assert 'isd.py", line' not in err  # no traceback of ours (torchrun prints its own on a worker's exit code 143)
    r = subprocess.run(argv[:6] + ["--resume", str(tmp_path / "ddp" / "last.pt"), "--max-steps", str(step + 2)],
                       cwd=HERE, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and f"resumed {tmp_path / 'ddp' / 'last.pt'}" in r.stdout, r.stderr[-3000:]
    assert load(tmp_path / "ddp" / "last.pt")["step"] == step + 2


@pytest.mark.parametrize("name", SCRIPTS)
def test_contract_ctrl_c_before_training_exits_130_without_traceback(name, save_dir, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(SCRIPTS[name], "load_data", interrupted)
    code, _, err = main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_early"))
    assert code == 130 and "outside a training step" in err and "Traceback" not in err


@pytest.mark.parametrize("name", SCRIPTS)
def test_contract_runs_without_git_on_path(name, save_dir, digits_runs, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git (and nothing else) on PATH
    code, _, err = main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_nogit", "--max-steps", "2"))
    assert code == 0, err
    assert json.load(open(save_dir / f"{name}_nogit" / "config.json"))["git_commit"] is None


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records every scalar."""
    scalars = []

    def __init__(self, log_dir):
        self.log_dir = log_dir

    def add_scalar(self, tag, value, step):
        FakeWriter.scalars.append((tag, float(value), step))

    def close(self):
        pass


@pytest.mark.parametrize("name", SCRIPTS)
def test_contract_tensorboard_present_and_absent(name, save_dir, digits_runs, monkeypatch):
    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeWriter.scalars = []
    code, _, err = main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_tb", "--max-steps", "3",
                                               "--log-every", "1"))
    assert code == 0, err
    tags = {tag for tag, _, _ in FakeWriter.scalars}
    assert {"train/lr", "train/images_per_s", f"train/{POISON[name]}"} <= tags and any(t.startswith("eval/") for t in tags)
    FakeWriter.scalars = []
    assert main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_notb", "--max-steps", "2",
                                       "--no-tensorboard"))[0] == 0 and not FakeWriter.scalars
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed: import fails
    assert main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_notb2", "--max-steps", "2"))[0] == 0
    code, _, err = main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_notb3", "--tensorboard"))
    assert code == 2 and "pip install tensorboard" in err


def test_real_tensorboard_event_files_when_installed(save_dir, digits_runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    code, _, err = main_of(s2sd, tiny("s2sd", save_dir, "--run-name", "s2sd_realtb", "--max-steps", "3", "--log-every", "1"))
    assert code == 0, err
    events = [f for f in os.listdir(save_dir / "s2sd_realtb") if f.startswith("events.")]
    acc = EventAccumulator(str(save_dir / "s2sd_realtb" / events[0]))
    acc.Reload()
    assert {"train/dml", "train/lr", "train/images_per_s", "eval/R@1", "eval/NMI"} <= set(acc.Tags()["scalars"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_contract_bf16_autocast_path_runs_on_cpu(name, save_dir, digits_runs):
    code, out, err = main_of(SCRIPTS[name], tiny(name, save_dir, "--run-name", f"{name}_bf16", "--amp", "--max-steps", "3",
                                                 "--log-every", "1"))
    assert code == 0, err
    assert json.load(open(save_dir / f"{name}_bf16" / "config.json"))["amp"] is True
    assert all(math.isfinite(float(v)) for v in load(save_dir / f"{name}_bf16" / "model.pt")["metrics"].values())


def test_contract_a_taken_run_name_gets_a_fresh_folder(save_dir, digits_runs):
    code, out, _ = main_of(s2sd, tiny("s2sd", save_dir, "--run-name", "s2sd_run", "--max-steps", "2"))
    assert code == 0 and f"note: {save_dir / 's2sd_run'} holds another run" in out
    assert (save_dir / "s2sd_run-2" / "model.pt").exists() and load(save_dir / "s2sd_run" / "last.pt")["step"] == 44


def _bad_input_cases(tmp):
    afile = tmp / "a_file"
    afile.write_text("x")
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "junk.pt").write_bytes(os.urandom(300))
    torch.save({"method": "s2sd", "args": {}, "model": {}, "metrics": {}}, tmp / "model_like.pt")
    torch.save({"method": "someone_else", "args": {}, "model": {}}, tmp / "foreign.pt")
    os.symlink(tmp / "nowhere", tmp / "dangling")  # a --save-dir that is a broken link: once an endless loop
    cases = [(["--save-dir", str(tmp / "dangling")], "--save-dir"), (["--batch-size", "0"], "--batch-size"),
             (["--batch-size", "1"], "--batch-size"),
             (["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"), (["--log-every", "0"], "--log-every"),
             (["--max-steps", "0"], "--max-steps"), (["--workers", "-1"], "--workers"),
             (["--eval-every", "-1"], "--eval-every"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"),
             (["--lr", "fast"], "--lr"), (["--weight-decay", "-1"], "--weight-decay"), (["--seed", "-1"], "--seed"),
             (["--image-size", "0"], "--image-size"), (["--device", "tpu"], "--device"), (["--device", "mps"], "mps"),
             (["--dataset", "imagenet5"], "--dataset"), (["--data-root", str(afile)], "--data-root"),
             (["--save-dir", str(afile)], "--save-dir"), (["--run-name", "../escape"], "--run-name"),
             (["--run-name", str(tmp / "abs")], "--run-name"), (["--resume", str(tmp / "missing.pt")], "no such file"),
             (["--resume", str(tmp)], "a folder; give the last.pt"), (["--resume", str(tmp / "empty.pt")], "not a readable"),
             (["--resume", str(tmp / "junk.pt")], "not a readable"), (["--resume", str(tmp / "foreign.pt")], "not a checkpoint of"),
             (["--resume", str(tmp / "junk.pt"), "--run-name", "x"], "do not go with --resume"),
             (["--epochs"], "--epochs"), (["--no-such-flag"], "unrecognized")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda"))
    return cases


@pytest.mark.parametrize("name", SCRIPTS)
def test_contract_bad_input_is_one_line_and_exit_2(name, tmp_path):
    for flags, needle in _bad_input_cases(tmp_path):
        where = [] if "--resume" in flags or "--save-dir" in flags else ["--save-dir", str(tmp_path / "runs")]
        code, out, err = main_of(SCRIPTS[name], [*where, *flags])
        assert code == 2, (flags, err)
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (flags, err)
        assert needle in err, (flags, needle, err)
    if name == "s2sd":  # a model.pt given to --resume: says to use last.pt
        code, _, err = main_of(s2sd, ["--resume", str(tmp_path / "model_like.pt")])
        assert code == 2 and "last.pt" in err


def test_contract_bad_input_in_a_real_process():
    r = run_script("camd.py", "--batch-size", "0")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _blocks(start, end, files):
    texts = {}
    for f in files:
        src = open(os.path.join(HERE, f)).read()
        assert src.count(start) == 1 and src.count(end) == 1, f
        texts[f] = src[src.index(start):src.index(end)]
    return texts


@pytest.mark.parametrize("block,end,files", [
    ("run bookkeeping", "bookkeeping", ["s2sd.py", "camd.py", "spkd.py", "isd.py"]),
    ("zoo, data, teacher", "zoo, data, teacher", ["camd.py", "spkd.py"]),
    ("data parallel", "data parallel", ["camd.py", "isd.py"])])
def test_shared_blocks_are_the_same_text(block, end, files):
    bar = "# " + "=" * 96
    texts = _blocks(f"{bar} {block}\n", f"{bar} end of {end}", files)
    first = texts[files[0]]
    assert len(first.splitlines()) > 30
    for f, text in texts.items():
        assert text == first, f"the {block} block of {f} differs from {files[0]}'s"


def test_method_files_import_without_side_effects():
    for name in SCRIPTS:
        r = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = ['x', '--bogus']; import {name}"], cwd=HERE,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout == "", (name, r.stderr)


# ------------------------------------------------------------------------------------------------
# s2sd.py end to end: variants, presets, image files

@pytest.mark.parametrize("variant,loss", [("baseline", "multisimilarity"), ("dsd", "multisimilarity"),
                                          ("msd", "margin"), ("msdf", "rmargin"), ("msdfa", "multisimilarity")])
def test_s2sd_variants_and_losses_run_on_digits(tmp_path, variant, loss):
    feat = ["--feat-delay", "2"] if variant.startswith("msdf") else []  # refused where there is no Eq. 6
    code, out, err = main_of(s2sd, ["--variant", variant, "--loss", loss, "--max-steps", "4", *feat,
                                    "--save-dir", str(tmp_path), "--run-name", "r", "--log-every", "4"])
    assert code == 0, err
    ck = load(tmp_path / "r" / "model.pt")
    assert len(ck["args"]["target_dims"]) == {"baseline": 0, "dsd": 1}.get(variant, 4)
    assert 0 <= ck["metrics"]["R@1"] <= 100 and {"NMI", "MAP@R", "R@8"} <= set(ck["metrics"])
    columns = {"baseline": ["dml"], "dsd": ["dml", "aux_dml", "distill"], "msd": ["dml", "aux_dml", "distill"]}
    assert re.search(" ".join(f"{c} [0-9.]+" for c in columns.get(variant, ["dml", "aux_dml", "distill", "feat_distill"])), out)


def test_s2sd_presets_follow_the_paper():
    cub, sop = s2sd.get_args(["--dataset", "cub"]), s2sd.get_args(["--dataset", "sop"])
    assert (cub.distill_weight, cub.feat_weight, cub.variant, cub.loss) == (50.0, 50.0, "msdfa", "multisimilarity")
    assert (sop.distill_weight, sop.feat_weight, sop.variant, sop.loss) == (5.0, 5.0, "msdf", "margin")  # gamma = 5
    assert [s2sd.get_args(["--dataset", d]).rho_p for d in ("cub", "cars", "sop")] == [0.4, 0.35, 0.15]
    assert (cub.lr, cub.batch_size, cub.samples_per_class, cub.embed_dim, cub.feat_delay) == (1e-5, 112, 2, 128, 1000)
    assert s2sd.get_args(["--dataset", "cars", "--variant", "dsd"]).target_dims == [2048]
    assert s2sd.get_args(["--dataset", "cub", "--variant", "baseline"]).beta_lr == 5e-4
    # Table 1's baseline rows come from Revisiting-DML's runs: SOP 100 epochs (CUB / CARS and S2SD itself: 150)
    assert [s2sd.get_args(["--dataset", "sop", "--variant", v]).epochs for v in ("baseline", "msdf")] == [100, 150]
    assert s2sd.get_args(["--dataset", "sop", "--variant", "baseline", "--epochs", "7"]).epochs == 7
    for flags in (["--variant", "baseline", "--distill-weight", "5"], ["--variant", "msd", "--feat-weight", "1"],
                  ["--loss", "multisimilarity", "--margin-beta", "1"], ["--loss", "margin", "--rho-p", "0.3"]):
        code, _, err = main_of(s2sd, flags)  # a flag that does nothing in the chosen setting: refused
        assert code == 2 and f"{flags[2]} does nothing with" in err, (flags, err)
    code, _, err = main_of(s2sd, ["--variant", "dsd", "--target-dims", "8", "16"])
    assert code == 2 and "dsd" in err
    for flags in (["--embed-dim", "0"], ["--target-dims", "0"], ["--samples-per-class", "0"],
                  ["--samples-per-class", "1"], ["--batch-size", "41"],
                  ["--batch-size", "2000"], ["--rho-p", "1.5"], ["--crop-scale", "0"]):
        code, _, err = main_of(s2sd, flags)
        assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, (flags, err)


def test_s2sd_help_names_each_presets_value():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        s2sd.get_args(["--help"])
    text = " ".join(out.getvalue().split())
    assert "digits 6" in text and "cub 150" in text and "(default: None)" not in text
    assert "sop 5.0" in text  # --distill-weight on SOP


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_a_description_that_names_its_default(name):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        SCRIPTS[name].get_args(["--help"])
    text = out.getvalue()
    assert "(default: None)" not in text and "--dataset" in text
    flags = re.findall(r"^  (--[a-z0-9-]+)(.*)$", text, flags=re.M)
    assert len(flags) > 25 and all(rest.strip() for _, rest in flags if not rest.strip().startswith("{")), flags
    assert all(a.help for a in _parser_actions(SCRIPTS[name]) if a.dest != "help"), name


def _parser_actions(module):
    seen = []
    parse = module.Parser.parse_args
    module.Parser.parse_args = lambda self, argv=None, namespace=None: seen.append(self) or parse(self, argv, namespace)
    try:
        module.get_args([])
    finally:
        module.Parser.parse_args = parse
    return seen[0]._actions


def test_s2sd_best_epoch_is_taken_per_metric():
    run = {"history": [dict(epoch=1, step=1, **{"R@1": 50.0, "NMI": 60.0}), dict(epoch=2, step=2, **{"R@1": 55.0, "NMI": 58.0})],
           "tb": None, "dir": "x", "t0": time.time()}
    meter = s2sd.Meter(argparse.Namespace(log_every=1, batch_size=1), run, torch.device("cpu"), 0, 2)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        s2sd.print_summary(run, meter)
    assert "R@1 55.00 (epoch 2)  NMI 60.00 (epoch 1)" in out.getvalue()


def test_s2sd_image_files_path_on_cub_fixture(tmp_path):
    make_cub(str(tmp_path / "data"), size=40, per_class=2)  # exercises the DataLoader + eval_transform path
    code, out, err = main_of(s2sd, ["--dataset", "cub", "--data-root", str(tmp_path / "data"), "--arch", "smallcnn",
                                    "--no-pretrained", "--image-size", "16", "--workers", "0", "--batch-size", "8",
                                    "--max-steps", "2", "--embed-dim", "8", "--target-dims", "16", "32",
                                    "--save-dir", str(tmp_path), "--run-name", "c"])
    assert code == 0, err
    ck = load(tmp_path / "c" / "model.pt")
    assert ck["args"]["in_channels"] == 3 and 0 <= ck["metrics"]["R@1"] <= 100


def test_s2sd_cub_without_data_or_weights_is_one_line(tmp_path):
    os.makedirs(tmp_path / "data" / "CUB_200_2011" / "images")  # half-extracted: no download attempt
    code, _, err = main_of(s2sd, ["--dataset", "cub", "--data-root", str(tmp_path / "data"), "--save-dir", str(tmp_path)])
    assert code == 2 and "cub" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# spkd.py / camd.py: the shared teacher, the CIFAR-10 padding, variants, DDP

def test_spkd_and_camd_share_one_teacher_and_cache_only_finished_ones(tmp_path, monkeypatch):
    base = ["--teacher-arch", "resnet8", "--teacher-epochs", "1", "--image-size", "16", "--batch-size", "128",
            "--epochs", "1", "--max-steps", "2", "--save-dir", str(tmp_path), "--log-every", "1000"]
    add = spkd.Meter.add

    def interrupt_teacher(self, losses, images, epoch, step, lr):  # a Ctrl-C during the teacher's third step
        add(self, losses, images, epoch, step, lr)
        if step == 3 and "teachers" in str(self.run["dir"]):
            spkd.STATE["signal"] = signal.SIGINT
    monkeypatch.setattr(spkd.Meter, "add", interrupt_teacher)
    code, _, err = main_of(spkd, base + ["--run-name", "s"])
    folder = next((tmp_path / "teachers").iterdir())
    assert code == 130 and f"the teacher was stopped ({folder / 'last.pt'} holds it)" in err  # the hint continues
    assert "run the same command again: it continues the teacher, then trains the student" in err  # the whole run
    assert (folder / "last.pt").exists() and not (folder / "model.pt").exists()  # nothing cached half-trained
    code, _, err = main_of(spkd, ["--resume", str(folder / "last.pt")])  # would finish the teacher as the headline
    assert code == 2 and len(err.strip().splitlines()) == 1 and "run the student's command again" in err, err
    monkeypatch.setattr(spkd.Meter, "add", add)
    code, out, err = main_of(spkd, base + ["--run-name", "s"])
    assert code == 0 and f"resumed {folder / 'last.pt'}" in out, err
    assert (folder / "model.pt").exists() and load(folder / "model.pt")["history"][-1]["epoch"] == 1
    assert (tmp_path / "s" / "model.pt").exists() and out.index("teacher: training") < out.index(f"teacher: {folder}")
    code, out, err = main_of(eval_py, [str(folder / "model.pt"), "--device", "cpu"])  # eval.py reads a cached teacher
    assert code == 0 and "top1" in out, err
    code, out, err = main_of(camd, base + ["--run-name", "c"])  # camd.py finds spkd.py's teacher of the same recipe
    assert code == 0, err
    assert f"teacher: {folder / 'model.pt'}" in out and "teacher: training" not in out
    assert len(os.listdir(tmp_path / "teachers")) == 1
    good = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(b"corrupt")
    code, _, err = main_of(camd, base + ["--run-name", "c2"])
    assert code == 2 and f"delete {folder} (the teacher is then trained again)" in err
    assert str(folder / "model.pt") in err
    ck = torch.load(io.BytesIO(good), weights_only=True)  # a cached teacher that no longer fits (another network)
    torch.save(dict(ck, model=camd.build_model("resnet14", 10).state_dict()), folder / "model.pt")
    code, _, err = main_of(camd, base + ["--run-name", "c2"])
    assert code == 2 and "does not fit" in err and f"delete {folder}" in err, err
    os.remove(folder / "model.pt")  # the other script's interrupted teacher: trained again, not "not a checkpoint of"
    torch.save({"method": "spkd", "args": {}, "model": {}}, folder / "last.pt")
    code, out, err = main_of(camd, base + ["--run-name", "c3"])
    assert code == 0 and "holds no run this script can resume" in out and (folder / "model.pt").exists(), err


def test_spkd_cifar10_pads_by_reflection_cifar100_by_zeros(monkeypatch):
    assert spkd.get_args(["--dataset", "cifar10"]).pad_mode == "reflect"
    assert spkd.get_args(["--dataset", "cifar100"]).pad_mode == "constant" == camd.get_args(["--dataset", "cifar100"]).pad_mode
    seen = []
    monkeypatch.setattr(common, "random_crop_flip", lambda x, p, mode: seen.append((p, mode)) or x.float())
    split = common.Split("x", torch.zeros(8, dtype=torch.long), 2, (0.5,) * 3, (0.5,) * 3,
                         images=torch.zeros(8, 3, 32, 32, dtype=torch.uint8))
    args = spkd.get_args(["--dataset", "cifar10", "--batch-size", "4"])
    data = spkd.train_data(args, split, torch.device("cpu"))
    assert len(list(spkd.train_batches(args, data, 0, 0, torch.device("cpu")))) == 2 and seen == [(4, "reflect")] * 2


def test_spkd_recipe_and_baselines():
    a = spkd.get_args(["--dataset", "cifar10"])
    assert (a.teacher_arch, a.student_arch, a.epochs, a.batch_size, a.lr, a.nesterov, a.lr_milestones, a.lr_decay,
            a.sp_weight, a.weight_decay) == ("wrn_40_2", "wrn_16_2", 200, 128, 0.1, True, [60, 120, 160], 0.2, 3000.0, 5e-4)
    b = spkd.get_args(["--dataset", "cifar100"])
    assert (b.epochs, b.batch_size, b.lr, b.lr_milestones, b.teacher_epochs) == (240, 64, 0.05, [150, 180, 210], 240)
    for flags in (["--teacher-path", "/nonexistent.pth"], ["--sp-weight", "-1"], ["--lr-decay", "2"]):
        code, _, err = main_of(spkd, flags)
        assert code == 2 and len(err.strip().splitlines()) == 1, (flags, err)


def test_camd_presets_follow_the_paper():
    a = camd.get_args(["--dataset", "cifar100"])  # Sec. IV-A and RepDistiller train_student.py
    assert (a.teacher_arch, a.student_arch, a.epochs, a.batch_size, a.lr, a.lr_milestones, a.lr_decay, a.weight_decay,
            a.momentum, a.gamma, a.tau, a.kd_alpha, a.pad_mode, a.variant) == (
        "resnet32x4", "resnet8x4", 240, 64, 0.05, [150, 180, 210], 0.1, 5e-4, 0.9, 80.0, 4.0, 0.9, "constant", "camd")
    b = camd.get_args(["--dataset", "imagenet"])
    assert (b.teacher_arch, b.student_arch, b.gamma, b.lr, b.weight_decay, b.batch_size) == (
        "resnet34", "resnet18", 30.0, 0.1, 1e-4, 256)
    c = camd.get_args(["--dataset", "tinyimagenet"])
    assert c.crop_padding == 8
    cifar_teacher = camd.get_args(["--dataset", "imagenet", "--teacher-arch", "resnet32x4"])
    with pytest.raises(camd.RunError, match="no ImageNet weights"):  # was: a random teacher, silently
        camd.get_teacher(cifar_teacher, torch.device("cpu"), 0, 1)


def test_teacher_cache_key_is_the_whole_recipe(tmp_path, monkeypatch):
    data = write_folder_dataset(tmp_path / "data")
    folder = lambda module, *flags: module.teacher_folder(module.get_args(["--dataset", "folder", "--data-root",
                                                                           str(data), *flags]))
    base = folder(camd)
    assert camd.get_args(["--dataset", "folder"]).pretrained and base == folder(spkd)  # one teacher for both scripts
    for flags in (["--no-pretrained"], ["--teacher-epochs", "3"], ["--seed", "1"], ["--lr", "0.5"],
                  ["--train-subset", "5"]):
        assert folder(camd, *flags) != base, flags
    import shutil
    shutil.copytree(data, tmp_path / "moved")  # keyed on what the teacher learns from, not on where it lies
    assert camd.teacher_folder(camd.get_args(["--dataset", "folder", "--data-root", str(tmp_path / "moved")])) == base
    write_image(data / "train" / "cow" / "0.png")  # a new class, then a new image: new teachers
    common.load_split.cache_clear()
    with_cow = folder(camd)
    write_image(data / "train" / "cow" / "1.png", seed=1)
    common.load_split.cache_clear()
    assert len({base, with_cow, folder(camd)}) == 3
    orig = common.load_split  # dtd: each of the ten splits trains its own teacher (same classes and sizes)
    monkeypatch.setattr(common, "load_split", lambda name, root, split, **kw: orig(
        "folder", str(tmp_path / "moved" if split.endswith("2") else data), split.rstrip("0123456789"), **kw))
    dtd = lambda k: spkd.teacher_folder(spkd.get_args(["--dataset", "dtd", "--data-root", str(tmp_path),
                                                       "--split", str(k)]))
    assert dtd(1) != dtd(2)


def test_s2sd_image_size_reaches_in_memory_data():
    args = s2sd.get_args(["--image-size", "16"])  # digits: 8 px natively
    assert s2sd.load_data(args, "train").images.shape[-1] == 16 == s2sd.load_data(args, "test").images.shape[-1]
    syn = s2sd.get_args(["--dataset", "synthetic", "--image-size", "32"])
    assert s2sd.load_data(syn, "train").images.shape[-1] == 32 == s2sd.load_data(syn, "test").images.shape[-1]


def test_s2sd_train_subset_of_a_file_dataset(tmp_path):
    data = write_folder_dataset(tmp_path / "data")
    args = s2sd.get_args(["--dataset", "folder", "--data-root", str(data), "--train-subset", "4", "--batch-size", "4"])
    sub = s2sd.load_data(args, "train")
    assert len(sub) == 4 and len(sub.paths) == 4 and sub.images is None and sub.classes == ["cat", "dog"]
    assert set(sub.paths) <= set(common.load_split("folder", str(data), "train").paths)


def test_teacher_checkpoint_formats(tmp_path):
    torch.manual_seed(0)
    src = spkd.build_model("wrn_16_1", 10).eval()
    x = torch.randn(3, 3, 32, 32)
    shared = {"epoch": 240, "model": src.state_dict(), "accuracy": 71.5, "optimizer": {"state": {}},
              "opt": argparse.Namespace(model="wrn_16_1")}  # a non-tensor object: needs the trusted-pickle path
    formats = {"shared": shared, "bare": {"module." + k: v for k, v in src.state_dict().items()},
               "repo": {"method": "spkd", "args": {"student_arch": "wrn_16_1"}, "model": src.state_dict(), "metrics": {}}}
    for module in (spkd, camd):
        for name, obj in formats.items():
            torch.save(obj, tmp_path / f"{name}.pt")
            t = module.load_teacher(str(tmp_path / f"{name}.pt"), "wrn_16_1", 10).eval()
            with torch.no_grad():
                assert torch.equal(t(x), src(x)), name
        for path, arch, classes in (("shared.pt", "wrn_16_2", 10), ("bare.pt", "wrn_16_1", 100)):
            with pytest.raises(module.RunError, match="does not fit"):
                module.load_teacher(str(tmp_path / path), arch, classes)
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        with pytest.raises(module.RunError, match="unreadable"):
            module.load_teacher(str(tmp_path / "junk.pt"), "wrn_16_1", 10)


@pytest.fixture(scope="module")
def camd_teacher(tmp_path_factory):
    """A resnet8 'teacher' state_dict on disk (random weights, digits classes): loading is what is tested."""
    path = tmp_path_factory.mktemp("teacher") / "teacher_sd.pt"
    torch.manual_seed(0)
    torch.save(camd.build_model("resnet8", 10).state_dict(), path)
    return str(path)


CAMD_TINY = ["--image-size", "16", "--teacher-arch", "resnet8", "--student-arch", "resnet8", "--batch-size", "32",
             "--epochs", "1", "--log-every", "1"]


def test_camd_drops_a_last_batch_of_one_image(tmp_path, camd_teacher):
    assert camd.epoch_length(41, 8) == (5, True) and camd.epoch_length(42, 8) == (6, False)
    assert camd.epoch_length(41, 8, world=2) == (5, True) and camd.epoch_length(43, 8, world=2) == (6, False)
    code, out, err = main_of(camd, CAMD_TINY[:-4] + ["--batch-size", "4", "--train-subset", "9", "--epochs", "2",
                                                     "--teacher-path", camd_teacher, "--save-dir", str(tmp_path)])
    assert code == 0, err  # 9 = 2 x 4 + 1: the BatchNorm1d of the embedding block never sees a batch of one
    assert load(next(tmp_path.glob("*/last.pt")))["step"] == 4


@pytest.mark.parametrize("extra", [["--variant", "amd_b", "--no-detach-weights"], ["--variant", "amd_e"],
                                   ["--embed-layers", "3"],  # Table V's deeper embedding block
                                   ["--variant", "kd"], ["--variant", "ce"],
                                   ["--variant", "camd_kd", "--weights", "fixed", "--mining", "all", "--no-stopgrad"]])
def test_camd_variants_and_ablations_run(tmp_path, camd_teacher, extra):
    i = CAMD_TINY.index("--teacher-arch")  # ce has no teacher: its flags would be refused
    flags = CAMD_TINY[:i] + CAMD_TINY[i + 2:] if "ce" in extra else CAMD_TINY + ["--teacher-path", camd_teacher]
    code, out, err = main_of(camd, flags + ["--max-steps", "2", "--save-dir", str(tmp_path), "--run-name", "r"] + extra)
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and all(math.isfinite(rows[-1][k]) for k in ("top1", "Rank-1", "Rank-2"))
    ck = load(tmp_path / "r" / "model.pt")
    assert set(ck["metrics"]) == {"top1", "Rank-1", "Rank-2"}
    assert set(ck["model"]) == set(camd.build_model("resnet8", 10).state_dict())  # the deployable student only


def test_camd_bad_inputs(tmp_path, camd_teacher):
    torch.save(camd.build_model("resnet14", 10).state_dict(), tmp_path / "r14.pt")
    for extra, msg in ((["--variant", "amd_b", "--teacher-arch", "resnet8x4", "--student-arch", "resnet8",
                         "--teacher-path", camd_teacher], "amd_b needs equal"),
                       (["--teacher-path", str(tmp_path / "r14.pt")], "does not fit"),
                       (["--gamma", "0"], "--gamma"), (["--variant", "vanilla"], "--variant"),
                       (["--vanilla"], "unrecognized")):
        code, _, err = main_of(camd, CAMD_TINY + ["--save-dir", str(tmp_path)] + extra)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_camd_and_spkd_refuse_flags_that_do_nothing(tmp_path, camd_teacher):
    """A flag given on the command line that the chosen setting ignores: one line, exit 2 (a preset's value is fine)."""
    for module, flags, msg in (
            (camd, ["--variant", "kd", "--gamma", "10"], "--gamma does nothing with --variant kd (no L_amd)"),
            (camd, ["--variant", "ce", "--mining", "all"], "--mining does nothing with --variant ce"),
            (camd, ["--variant", "kd", "--weights", "fixed"], "--weights does nothing"),
            (camd, ["--variant", "ce", "--no-detach-weights"], "--detach-weights does nothing"),
            (camd, ["--variant", "amd_e", "--tau", "2"], "--tau does nothing with --variant amd_e (no KL term)"),
            (camd, ["--variant", "amd_b", "--no-stopgrad"], "--stopgrad does nothing with --variant amd_b (no L_c)"),
            (camd, ["--kd-beta", "2"], "--kd-beta does nothing with --variant camd (camd_kd only)"),
            (camd, ["--variant", "camd_kd", "--kd-alpha", "0.5"], "--kd-alpha does nothing with --variant camd_kd"),
            (camd, ["--variant", "ce", "--teacher-arch", "resnet8"], "--teacher-arch does nothing with --variant ce"),
            (camd, ["--variant", "ce", "--teacher-epochs", "3"], "--teacher-epochs does nothing with --variant ce"),
            (camd, ["--weights", "fixed", "--detach-weights"], "--detach-weights does nothing with --weights fixed"),
            (camd, ["--teacher-path", camd_teacher, "--teacher-epochs", "3"], "--teacher-epochs does nothing with "
                                                                               "--teacher-path"),
            (camd, ["--dataset", "imagenet", "--crop-padding", "8"], "--crop-padding does nothing on imagenet's"),
            (camd, ["--pretrained"], "--pretrained does nothing for CIFAR networks"),
            (spkd, ["--sp-weight", "0", "--ce-weight", "0"], "all 0: nothing to train"),
            (spkd, ["--kd-T", "8"], "--kd-T does nothing without --kd-weight"),
            (spkd, ["--sp-weight", "0", "--kd-weight", "1", "--sp-layers", "all"], "--sp-layers does nothing without"),
            (spkd, ["--split", "2"], "--split does nothing on digits (dtd only)"),
            (spkd, ["--sp-weight", "0", "--teacher-path", camd_teacher], "--teacher-path does nothing without a "
                                                                          "teacher term"),
            (spkd, ["--dataset", "dtd", "--pad-mode", "constant"], "--pad-mode does nothing on dtd's image files")):
        code, _, err = main_of(module, flags + ["--save-dir", str(tmp_path)])
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (flags, err)
    camd.get_args(["--variant", "kd", "--kd-alpha", "0.5", "--tau", "2"])  # what the variant uses is accepted
    camd.get_args(["--variant", "camd_kd", "--kd-beta", "2", "--gamma", "10", "--no-stopgrad", "--mining", "all"])
    camd.get_args(["--variant", "ce"])  # the preset's gamma, tau, teacher ... are not the user's flags
    kd = spkd.get_args(["--dataset", "cinic10", "--sp-weight", "0", "--kd-weight", "0.6", "--ce-weight", "0.4"])
    assert kd.kd_T == 16.0  # Sec. 3.3's T, from the preset


def test_camd_tables_2_and_3_settings():
    """Sec. IV-A: the RepDistiller recipe, lr 0.01 for MobileNet / ShuffleNet (student, or a teacher trained here)."""
    for teacher, student in (("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2")):
        a = camd.get_args(["--dataset", "cifar100", "--teacher-arch", teacher, "--student-arch", student])
        assert (a.lr, a.teacher_lr, a.gamma, a.epochs, a.batch_size) == (0.01, 0.05, 80.0, 240, 64), student
    a = camd.get_args(["--dataset", "cifar100", "--teacher-arch", "ResNet50", "--student-arch", "vgg8"])
    assert (a.lr, a.teacher_lr) == (0.05, 0.05)
    a = camd.get_args(["--dataset", "cifar100", "--student-arch", "MobileNetV2", "--lr", "0.03"])  # --lr wins
    assert (a.lr, a.teacher_lr) == (0.03, 0.03)
    t = camd.get_args(["--dataset", "tinyimagenet"])  # Table III's first pair; resnet32x4 -> resnet8x4 is not in it
    assert (t.teacher_arch, t.student_arch, t.image_size, t.crop_padding, t.lr, t.gamma) == ("vgg13", "vgg8", 64, 8,
                                                                                               0.05, 80.0)
    t = camd.get_args(["--dataset", "tinyimagenet", "--teacher-arch", "wrn_40_2", "--student-arch", "ShuffleV1"])
    assert (t.lr, t.teacher_lr) == (0.01, 0.05)
    assert camd.get_args(["--student-arch", "MobileNetV2"]).lr == 0.05  # digits: our preset, not the paper's recipe
    s = spkd.get_args(["--dataset", "cifar100", "--teacher-arch", "ShuffleV1", "--student-arch", "resnet8"])
    assert (s.lr, s.teacher_lr) == (0.05, 0.01)  # RepDistiller train_teacher.py: lr 0.01 for a ShuffleV1 teacher


def _small_test_split(monkeypatch, n=64, **rename):
    """common.load_split with test splits cut to their first n images (fast evaluation); `rename` maps a dataset
    name to another (a dataset this machine lacks -> digits)."""
    orig = common.load_split

    def load(name, root="./data", split="train", **kw):
        out = orig(rename.get(name, name), root, split, **kw)
        return out if split == "train" else out.subset(torch.arange(min(n, len(out))))
    monkeypatch.setattr(common, "load_split", load)


@pytest.mark.parametrize("teacher,student,size", [("ResNet50", "MobileNetV2", 16), ("resnet8x4", "ShuffleV1", 16),
                                                  ("resnet8x4", "ShuffleV2", 32)])
def test_camd_table_2_networks_train(tmp_path, monkeypatch, teacher, student, size):
    _small_test_split(monkeypatch)
    code, out, err = main_of(camd, ["--teacher-arch", teacher, "--student-arch", student, "--teacher-epochs", "0",
                                    "--image-size", str(size), "--batch-size", "16", "--epochs", "1", "--max-steps",
                                    "2", "--save-dir", str(tmp_path), "--run-name", "r", "--log-every", "1"])
    assert code == 0, err
    row = json.loads(open(tmp_path / "r" / "metrics.jsonl").readline())
    assert " amd " in out and " col " in out and math.isfinite(row["top1"]) and row["step"] == 2
    assert set(load(tmp_path / "r" / "model.pt")["model"]) == set(camd.build_model(student, 10).state_dict())


def test_spkd_cinic10_preset_runs_at_and_sp_on_shufflenetv2(tmp_path):
    a = spkd.get_args(["--dataset", "cinic10"])  # SP Sec. 3.3, Table 7 row 1
    assert (a.teacher_arch, a.student_arch, a.epochs, a.batch_size, a.lr, a.nesterov, a.lr_milestones, a.lr_decay,
            a.sp_weight, a.kd_T, a.at_weight) == ("shufflenetv2_1.0", "shufflenetv2_0.5", 140, 96, 0.01, True,
                                                  [100, 120], 0.1, 2000.0, 16.0, 0.0)
    many_images(str(tmp_path / "data" / "cinic-10"), [f"{s}/{c}/{j}.png" for s in ("train", "valid", "test")
                                                      for c in CINIC for j in range(2)], size=32)  # its real layout
    code, out, err = main_of(spkd, ["--dataset", "cinic10", "--data-root", str(tmp_path / "data"), "--at-weight", "30",
                                    "--teacher-epochs", "0", "--batch-size", "16", "--epochs", "1", "--max-steps",
                                    "2", "--save-dir", str(tmp_path), "--run-name", "c", "--log-every", "1"])  # AT+SP
    assert code == 0, err
    assert " sp " in out and " at " in out
    cfg = json.load(open(tmp_path / "c" / "config.json"))
    assert (cfg["at_weight"], cfg["sp_weight"], cfg["pad_mode"], cfg["num_classes"]) == (30.0, 2000.0, "reflect", 10)
    code, out, err = main_of(spkd, ["--dataset", "cinic10", "--data-root", str(tmp_path / "data"), "--sp-weight", "0",
                                    "--at-weight", "50", "--teacher-epochs", "0", "--batch-size", "16", "--epochs", "1",
                                    "--max-steps", "2", "--save-dir", str(tmp_path), "--run-name", "at"])  # AT alone
    assert code == 0 and load(tmp_path / "at" / "model.pt")["args"]["at_weight"] == 50.0, err


def test_spkd_dtd_fine_tunes_on_the_chosen_split(tmp_path, monkeypatch):
    base, classes = tmp_path / "data" / "dtd" / "dtd", ["banded", "blotchy", "braided"]  # DTD's real layout
    many_images(str(base / "images"), [f"{c}/{c}_{j:04d}.jpg" for c in classes for j in range(6)], size=40)
    (base / "labels").mkdir()
    for k in range(1, 11):
        for s, js in (("train", (0, 1, 2)), ("val", (3,)), ("test", (4, 5))):
            (base / "labels" / f"{s}{k}.txt").write_text("".join(f"{c}/{c}_{j:04d}.jpg\n" for c in classes for j in js))
    data, seen, sizes = tmp_path / "data", [], []
    load, transform = common.load_split, common.eval_transform
    monkeypatch.setattr(common, "load_split", lambda name, root, split, **kw: seen.append((name, split)) or load(
        name, root, split, **kw))
    monkeypatch.setattr(common, "eval_transform", lambda resize, crop, **kw: sizes.append((resize, crop)) or transform(
        resize, crop, **kw))
    base = ["--dataset", "dtd", "--split", "3", "--data-root", str(data), "--teacher-arch", "mobilenetv2_0.35",
            "--student-arch", "mobilenet_0.25", "--teacher-epochs", "0", "--image-size", "32", "--batch-size", "4",
            "--workers", "0", "--epochs", "1", "--max-steps", "2", "--save-dir", str(tmp_path), "--log-every", "1"]
    code, out, err = main_of(spkd, base + ["--no-pretrained", "--run-name", "d"])
    assert code == 0, err
    assert ("dtd", "train3") in seen and ("dtd", "test3") in seen and sizes[-1] == ((36, 36), 32)  # 256 x 256 -> 224
    cfg = json.load(open(tmp_path / "d" / "config.json"))  # SP Sec. 3.2
    assert (cfg["lr"], cfg["nesterov"], cfg["lr_milestones"], cfg["epochs"], cfg["split"]) == (0.01, True, [30], 1, 3)
    assert spkd.get_args(["--dataset", "dtd"]).pretrained and spkd.get_args(["--dataset", "dtd"]).epochs == 60
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no ImageNet weights for 0.25: one line
    code, _, err = main_of(spkd, base + ["--run-name", "p"])
    assert code == 2 and "mobilenet_0.25_imagenet.pth" in err and len(err.strip().splitlines()) == 1, err


def _camd_ddp_worker(rank, world, init, seed, queue):
    """One rank of the global-batch mining check: each rank holds its half of a fixed global batch."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(seed)
    t, s, y = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    mine = slice(rank * 6, rank * 6 + 6)
    s_mine = s[mine].clone().requires_grad_()
    loss = camd.amd_loss(camd.gather(t[mine], world), camd.gather(s_mine, world, grad=True), camd.gather(y[mine], world),
                         80.0)
    loss.backward()
    queue.put((rank, loss.item(), s_mine.grad.numpy()))  # numpy: pickled by value (the worker exits first)
    dist.destroy_process_group()


def test_camd_mines_the_global_batch_under_ddp(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_camd_ddp_worker, args=(r, 2, init, 7, queue)) for r in range(2)]
    [p.start() for p in procs]
    results = sorted(queue.get(timeout=120) for _ in procs)
    [p.join(timeout=60) for p in procs]
    g = torch.Generator().manual_seed(7)
    t, s, y = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    s = s.clone().requires_grad_()
    ref = camd.amd_loss(t, s, y, 80.0)
    ref.backward()
    for rank, value, grad in results:  # the same loss on every rank; DDP averages the two ranks' gradients
        assert abs(value - ref.item()) < 1e-6
        assert torch.allclose(torch.from_numpy(grad) / 2, s.grad[rank * 6:rank * 6 + 6], atol=1e-6)


def test_camd_two_process_cpu_ddp_run(tmp_path, camd_teacher):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "camd.py",
                        *CAMD_TINY, "--teacher-path", camd_teacher, "--max-steps", "2", "--save-dir", str(tmp_path),
                        "--run-name", "ddp"], capture_output=True, text=True, timeout=300, cwd=HERE,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("final (last epoch") == 1  # rank-0 logging only
    assert set(load(tmp_path / "ddp" / "model.pt")["metrics"]) == {"top1", "Rank-1", "Rank-2"}


@pytest.mark.parametrize("script", ["s2sd.py", "spkd.py"])
def test_torchrun_refused_by_single_process_scripts(script):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                        "--max-steps", "1"], capture_output=True, text=True, timeout=300, cwd=HERE,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and "start it with python, not torchrun" in r.stderr


# ------------------------------------------------------------------------------------------------
# isd.py end to end: recipes, MoCo-v2, ShuffleBN, the teacher's k-NN, unbalanced data, folders, DDP

def test_isd_recipes_and_moco_v2_settings():
    a = isd.get_args(["--dataset", "imagenet", "--recipe", "r18"])
    assert (a.arch, a.tau_s, a.tau_t, a.ema, a.head, a.teacher_view, a.lr, a.lr_schedule) == \
        ("resnet18", 0.02, 0.02, 0.999, "r18", "strong", 0.01, "step")
    assert a.lr_milestones == [140, 180] and a.queue_size == 128000 and a.batch_size == 256 and not a.cifar_stem
    b = isd.get_args(["--dataset", "imagenet", "--recipe", "r50", "--tau-t", "0.02"])
    assert (b.arch, b.tau_s, b.tau_t, b.ema, b.head, b.teacher_view, b.lr, b.lr_schedule) == \
        ("resnet50", 0.1, 0.02, 0.99, "r50", "weak", 0.05, "cosine")
    m = isd.model_from_args(b)
    assert m.student.predictor[0].in_features == 512 and m.student.predictor[0].out_features == 4096
    assert m.queue.shape == (128000, 512)
    moco = isd.get_args(["--dataset", "imagenet", "--variant", "moco", "--arch", "resnet50"])
    assert (moco.tau_s, moco.ema, moco.head, moco.teacher_view, moco.lr, moco.lr_schedule, moco.queue_size) == \
        (0.2, 0.999, "moco", "strong", 0.03, "cosine", 65536)
    mm = isd.model_from_args(moco)
    assert isinstance(mm.student.predictor, torch.nn.Identity) and mm.queue.shape[1] == 128
    assert not any(isinstance(x, torch.nn.BatchNorm1d) for x in mm.student.proj.modules())
    assert [type(x).__name__ for x in mm.student.proj] == ["Linear", "ReLU", "Linear"]
    assert mm.student.proj[0].in_features == mm.student.proj[0].out_features == 2048
    c = isd.get_args(["--dataset", "cifar10"])
    assert c.cifar_stem and c.queue_size == 4096 and c.bn_splits == 8
    r = isd.model_from_args(c)
    assert r.student.backbone.conv1.kernel_size == (3, 3) and isinstance(r.student.backbone.maxpool, torch.nn.Identity)
    assert isinstance(r.student.backbone.bn1, isd.SplitBatchNorm)


def test_isd_queue_fifo_and_wraparound():
    model = isd.ISD(argparse.Namespace(arch="small", cifar_stem=True, bn_splits=1, head="r18", queue_size=5))
    model.queue.zero_()
    keys = torch.arange(1, 8 * 128 + 1, dtype=torch.float32).view(8, 128)[:7]
    for chunk, labels in ((keys[:2], [0, 1]), (keys[2:4], [2, 3]), (keys[4:7], [4, 5, 6])):  # the last wraps
        isd.enqueue(model, chunk, torch.tensor(labels))
    assert int(model.queue_ptr) == 2 and model.queue_labels.tolist() == [5, 6, 2, 3, 4]
    assert torch.equal(model.queue, keys[[5, 6, 2, 3, 4]])  # the oldest entries were overwritten first


def test_isd_purity_counts_teacher_top5_same_label():
    queue, queue_labels = torch.eye(6), torch.tensor([1, 1, 1, 2, 2, -1])
    k = F.normalize(torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 0, 0, 5, 4, 3]]), dim=1)
    assert abs(isd.purity(k, torch.tensor([1, -1]), queue, queue_labels) - 3 / 5) < 1e-6  # the labelled key only


def _isd_small(**kw):
    return argparse.Namespace(**{**dict(arch="small", cifar_stem=True, bn_splits=1, head="r50", queue_size=64,
                                        ema=0.5, seed=0, variant="isd", tau_s=0.1, tau_t=0.01), **kw})


def test_isd_ema_update_arithmetic_and_order():
    torch.manual_seed(3)
    args = _isd_small()
    model = isd.ISD(args)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.normal_()
    t0 = [p.clone() for p in model.teacher.parameters()]
    s0 = [p.clone() for p in [*model.student.backbone.parameters(), *model.student.proj.parameters()]]
    bn_t = model.teacher.backbone[1].running_mean.clone()
    model.momentum_update(0.9)
    for t, a, b in zip(model.teacher.parameters(), t0, s0):
        assert torch.allclose(t, 0.9 * a + 0.1 * b, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.teacher.backbone[1].running_mean, bn_t)  # buffers are not averaged
    assert all(not p.requires_grad for p in model.teacher.parameters())
    ref = isd.ISD(args)  # step_losses: the teacher is updated BEFORE it embeds x_t
    ref.load_state_dict(model.state_dict())
    ref.momentum_update(0.5)
    x = torch.randn(4, 3, 16, 16)
    model.train(), ref.train()
    _, k = isd.step_losses(model.student, model, (x, x), 0, args)
    with torch.no_grad():
        ref_k = isd.teacher_keys(ref.teacher, x, 0 * 1_000_003 + 0, 1)
    assert torch.allclose(k, ref_k, atol=1e-6)


def test_isd_shuffle_bn_one_process():
    torch.manual_seed(0)
    teacher = isd.ISD(_isd_small(bn_splits=4, head="moco")).teacher  # (the heads' BatchNorm1d is not split)
    x = torch.randn(16, 3, 16, 16)
    teacher.eval()  # eval mode: BN uses running statistics -> the shuffle changes nothing
    with torch.no_grad():
        plain = F.normalize(teacher(x), dim=1)
    assert torch.allclose(isd.teacher_keys(teacher, x, seed=3, world=1), plain, atol=1e-6)
    teacher.train()  # train mode: the keys differ only through the split-BN group statistics
    shuffled = isd.teacher_keys(teacher, x, seed=3, world=1)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    groups = [perm[g::4] for g in range(4)]  # SplitBatchNorm group g = samples at positions g, g+4, ... of the batch
    plain_bn = isd.ISD(_isd_small(bn_splits=1, head="moco")).teacher
    plain_bn.load_state_dict(teacher.state_dict())
    plain_bn.train()
    with torch.no_grad():
        by_group = torch.zeros_like(shuffled)
        for idx in groups:  # plain BN on each group on its own = what 4 GPUs would compute
            by_group[idx] = F.normalize(plain_bn(x[idx]), dim=1)
    assert torch.allclose(shuffled, by_group, atol=1e-5)
    assert not torch.allclose(shuffled, F.normalize(plain_bn(x), dim=1), atol=1e-3)


def _isd_shuffle_worker(rank, world, init, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    teacher = isd.ISD(_isd_small()).teacher
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mine = x[rank * 4:rank * 4 + 4]
    out = {}
    for mode in ("eval", "train"):
        teacher.train(mode == "train")
        out[mode] = isd.teacher_keys(teacher, mine, seed=5, world=world).numpy()
    queue.put((rank, out))
    dist.destroy_process_group()


def test_isd_shuffle_bn_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_isd_shuffle_worker, args=(r, 2, f"file://{tmp_path / 'rdv'}", queue)) for r in range(2)]
    [p.start() for p in procs]
    results = dict(queue.get(timeout=120) for _ in procs)
    [p.join(timeout=60) for p in procs]
    torch.manual_seed(0)
    teacher = isd.ISD(_isd_small()).teacher
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        teacher.eval()
        plain = F.normalize(teacher(x), dim=1)
        teacher.train()
        ref = torch.zeros(8, plain.shape[1])
        for r in range(2):  # rank r embeds the shuffled slice perm[4r:4r+4] with its own BN statistics
            idx = perm[r * 4:r * 4 + 4]
            ref[idx] = F.normalize(teacher(x[idx]), dim=1)
    got_eval = torch.cat([torch.from_numpy(results[0]["eval"]), torch.from_numpy(results[1]["eval"])])
    got_train = torch.cat([torch.from_numpy(results[0]["train"]), torch.from_numpy(results[1]["train"])])
    assert torch.allclose(got_eval, plain, atol=1e-6) and torch.allclose(got_train, ref, atol=1e-5)


def test_isd_teacher_knn_uses_the_students_bn_statistics():
    args = isd.get_args(["--max-steps", "1"])
    args.num_classes = 10
    model = isd.ISD(args)
    with torch.no_grad():  # different running statistics in student and teacher
        for m in model.teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(5.0)
    out = isd.embeddings(model, args, torch.device("cpu"))
    assert torch.allclose(out["emb"], out["teacher_emb"], atol=1e-5)  # same weights, the student's statistics


def test_isd_unbalanced_subset_and_small_class_metrics(tmp_path):
    args = isd.get_args(["--unbalanced", "--seed", "3"])
    train, gallery, test = (isd.load_data(args, s) for s in ("train", "gallery", "test"))
    large, small = isd.unbalanced_classes(args, 10)
    assert len(large) == 2 and len(small) == 8 and sorted(large + small) == list(range(10))  # 8 of 38 -> 2 of 10
    counts = torch.bincount(train.labels, minlength=10)
    full = torch.bincount(gallery.labels, minlength=10)
    assert all(counts[c] == full[c] for c in large)  # large classes keep every image
    assert all(counts[c] == max(1, round(int(full[c]) * 100 / 1300)) for c in small)
    assert len(test) == 360 and len(gallery) == 1437  # evaluation stays balanced (all images of the classes)
    assert isd.unbalanced_classes(isd.get_args(["--unbalanced", "--seed", "4"]), 10) != (large, small)
    code, out, err = main_of(isd, ["--unbalanced", "--max-steps", "2", "--save-dir", str(tmp_path), "--run-name", "u",
                                   "--eval-every", "0", "--batch-size", "32", "--queue-size", "64"])
    assert code == 0, err
    assert {"knn1_small", "knn20_small", "knn1"} <= set(load(tmp_path / "u" / "model.pt")["metrics"])


def test_isd_official_subset_file(tmp_path):
    wnids = ["n01", "n02", "n03"]
    lines = ["class names : "] + wnids + ["Train Images: "]
    for split in ("train", "val"):
        for w in wnids + ["n04"]:
            for j in range(3 if w == "n01" or split == "val" else 1):
                write_image(str(tmp_path / "imagenet" / split / w / f"{w}_{j}.JPEG"), j)
                if split == "train" and w != "n04":
                    lines.append(f"/train/{w}/{w}_{j}.JPEG")
    (tmp_path / "D1.txt").write_text("\n".join(lines) + "\n")
    args = argparse.Namespace(subset_file=str(tmp_path / "D1.txt"), data_root=str(tmp_path))
    got_wnids, paths, labels = isd.read_subset_file(args.subset_file, args.data_root)
    assert got_wnids == wnids and labels == [0, 0, 0, 1, 2] and all(os.path.isfile(p) for p in paths)
    (tmp_path / "bad.txt").write_text("nothing\n")
    with pytest.raises(isd.RunError, match="D<n>.txt"):
        isd.read_subset_file(str(tmp_path / "bad.txt"), str(tmp_path))
    for line in ("/train/n09/n09_0.JPEG", "n01_0.JPEG"):  # an unlisted class; not a /train/<wnid>/<file> path
        (tmp_path / "bad.txt").write_text("\n".join(["class names :", "n01", "Train Images:", line]) + "\n")
        with pytest.raises(isd.RunError, match="not /train/<a listed class>"):
            isd.read_subset_file(str(tmp_path / "bad.txt"), str(tmp_path))
    # a list whose wnids are not sorted: labels are the dataset's class numbers, looked up by name
    (tmp_path / "D2.txt").write_text("\n".join(["class names :", "n03", "n01", "Train Images:", "/train/n03/n03_0.JPEG",
                                                "/train/n01/n01_0.JPEG", "/train/n01/n01_1.JPEG"]) + "\n")
    full = common.load_split("folder", str(tmp_path / "imagenet"), "train")  # all four classes, as ImageNet's loader
    monkey = pytest.MonkeyPatch()
    monkey.setattr(common, "load_split", lambda *a, **k: full)
    try:
        args = isd.get_args(["--dataset", "imagenet", "--data-root", str(tmp_path), "--subset-file", str(tmp_path / "D2.txt")])
        train = isd.load_data(args, "train")
        assert [full.classes[i] for i in train.labels.tolist()] == ["n03", "n01", "n01"]
        (tmp_path / "D3.txt").write_text("class names :\nn09\nTrain Images:\n/train/n09/x.JPEG\n")
        with pytest.raises(isd.RunError, match="n09 is not in"):
            isd.load_data(isd.get_args(["--dataset", "imagenet", "--data-root", str(tmp_path),
                                        "--subset-file", str(tmp_path / "D3.txt")]), "train")
    finally:
        monkey.undo()


def test_isd_unlabeled_folder_uses_the_dataloader_path(tmp_path):
    for i in range(12):
        write_image(str(tmp_path / "imgs" / f"{i}.png"), i, size=40)
    code, out, err = main_of(isd, ["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--image-size", "32",
                                   "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--epochs", "1",
                                   "--max-steps", "1", "--save-dir", str(tmp_path), "--run-name", "f", "--arch", "resnet18"])
    assert code == 0, err
    ck = load(tmp_path / "f" / "last.pt")
    assert ck["step"] == 1 and int(ck["model"]["queue_ptr"]) == 8
    assert load(tmp_path / "f" / "model.pt")["metrics"] == {}  # no labels: no k-NN monitor


def test_isd_features_for_the_linear_probe():
    args = isd.get_args([])
    model = isd.ISD(args)
    plain, labels = isd.features(model, args, torch.device("cpu"), "train")
    torch.manual_seed(0)
    aug1, _ = isd.features(model, args, torch.device("cpu"), "train", augment=True)
    torch.manual_seed(0)
    aug2, _ = isd.features(model, args, torch.device("cpu"), "train", augment=True)
    assert plain.shape == (1437, 128) and torch.equal(aug1, aug2) and not torch.allclose(aug1, plain)


def test_isd_two_process_cpu_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "isd.py",
                        "--batch-size", "64", "--queue-size", "256", "--epochs", "1", "--max-steps", "3",
                        "--eval-every", "0", "--save-dir", str(tmp_path), "--run-name", "ddp"],
                       capture_output=True, text=True, timeout=300, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(tmp_path / "ddp" / "last.pt")
    assert ck["step"] == 3 and int(ck["model"]["queue_ptr"]) == (3 * 64) % 256  # keys of BOTH ranks were enqueued
    assert (ck["model"]["queue_labels"] >= 0).sum().item() == 3 * 64 and ck["args"]["bn_splits"] == 1
    assert (tmp_path / "ddp" / "model.pt").exists()


def test_isd_bad_inputs():
    for flags, msg in ((["--queue-size", "16", "--batch-size", "64"], "--queue-size"), (["--tau-s", "0"], "--tau-s"),
                       (["--bn-splits", "3"], "--bn-splits"), (["--ema", "1"], "--ema"),
                       (["--arch", "small", "--dataset", "imagenet"], "--arch small"),
                       (["--subset-file", "/nonexistent"], "--subset-file"),
                       (["--dataset", "folder", "--data-root", "/nonexistent/isd"], "folder")):
        code, _, err = main_of(isd, flags)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (flags, err)
    with pytest.MonkeyPatch.context() as mp:  # under torchrun, each process's share is split into the BN groups
        mp.setenv("WORLD_SIZE", "4")
        with pytest.raises(isd.RunError, match="4 process"):
            isd.get_args(["--bn-splits", "8", "--batch-size", "40"])


def test_isd_unbalanced_runs_take_table4_recipe_unless_flags_say_otherwise(tmp_path):
    (tmp_path / "D1.txt").write_text("class names :\nn01\nTrain Images:\n/train/n01/n01_0.JPEG\n")
    for flags in (["--subset-file", str(tmp_path / "D1.txt")], ["--unbalanced"]):  # Sec. 3.2: 400 ep., K 8192, cosine
        a = isd.get_args(["--dataset", "imagenet", *flags])
        assert (a.epochs, a.queue_size, a.lr_schedule, a.unbalanced) == (400, 8192, "cosine", True)
        assert (a.recipe, a.arch, a.lr, a.tau_s, a.tau_t, a.ema, a.head) == ("r18", "resnet18", 0.01, 0.02, 0.02, 0.999, "r18")
        m = isd.get_args(["--dataset", "imagenet", "--variant", "moco", *flags])
        assert (m.epochs, m.queue_size, m.lr_schedule, m.lr, m.tau_s, m.head) == (400, 8192, "cosine", 0.03, 0.2, "moco")
        own = isd.get_args(["--dataset", "imagenet", *flags, "--epochs", "100", "--queue-size", "4096",
                            "--lr-schedule", "step"])  # explicit flags win
        assert (own.epochs, own.queue_size, own.lr_schedule, own.lr_milestones) == (100, 4096, "step", [70, 90])
    assert isd.get_args(["--dataset", "imagenet"]).epochs == 200  # the balanced recipe is untouched
    for variant in ("isd", "moco"):  # small presets: 2x the epochs, K / N = 8192 / 13,400 on the subset's N images
        a = isd.get_args(["--unbalanced", "--variant", variant])
        n = len(isd.load_data(a, "train"))
        assert (a.epochs, a.lr_schedule, a.queue_size) == (2 * isd.PRESETS["digits"]["epochs"], "cosine",
                                                           round(8192 * n / 13400)) and a.batch_size <= a.queue_size < n
    assert isd.get_args(["--unbalanced", "--queue-size", "300"]).queue_size == 300


def test_isd_bn_groups_follow_the_official_gpu_counts(monkeypatch):
    def splits(*flags):
        return isd.get_args(["--dataset", "imagenet", *flags]).bn_splits
    # batch 256 over 2 GPUs (train_isd.py, README), 4 (run_isd_plus.sh), 8 (MoCo): groups of 128, 64, 32 images
    assert (splits("--recipe", "r18"), splits("--recipe", "r50"), splits("--variant", "moco")) == (2, 4, 8)
    assert splits("--recipe", "r50", "--batch-size", "512") == 8 and splits("--recipe", "r18", "--batch-size", "64") == 1
    assert splits("--recipe", "r50", "--batch-size", "250") == 1  # 250 / 64 -> 3 groups do not divide 250: one group
    assert splits("--recipe", "r50", "--bn-splits", "2") == 2  # the flag wins
    assert isd.get_args(["--dataset", "cifar10"]).bn_splits == isd.get_args([]).bn_splits == 8  # the MoCo CIFAR demo
    model = isd.ISD(isd.get_args(["--dataset", "imagenet", "--recipe", "r50"]))
    assert {m.splits for m in model.student.backbone.modules() if isinstance(m, isd.SplitBatchNorm)} == {4}
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: each rank's share is one group
    assert splits("--recipe", "r50") == 1


def test_isd_folder_without_test_folder_holds_out_a_fifth_of_each_class(tmp_path):
    sizes = {"a": 10, "b": 7, "c": 2}
    for name, n in sizes.items():
        for i in range(n):
            write_image(str(tmp_path / "lab" / name / f"{i}.png"), i, size=16)
    code, out, err = main_of(isd, ["--dataset", "folder", "--data-root", str(tmp_path / "lab"), "--image-size", "12",
                                   "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--epochs", "1",
                                   "--save-dir", str(tmp_path), "--run-name", "h", "--arch", "resnet18"])
    assert code == 0, err
    assert out.count("note:") == 1 and "a fixed fifth of each class" in out
    assert {"knn1", "knn20", "teacher/knn1"} <= set(load(tmp_path / "h" / "model.pt")["metrics"])
    args = isd.get_args(["--dataset", "folder", "--data-root", str(tmp_path / "lab")])
    train, gallery, test = (isd.load_data(args, s) for s in ("train", "gallery", "test"))
    assert len(train) == 19 and sorted(gallery.paths + test.paths) == sorted(train.paths)  # a partition of all images
    assert torch.bincount(test.labels, minlength=3).tolist() == [2, 1, 0]  # round(n / 5), one left in the gallery
    again = isd.load_data(isd.get_args(["--dataset", "folder", "--data-root", str(tmp_path / "lab"), "--seed", "5"]),
                          "test")
    assert again.paths == test.paths  # a fixed split (seed 0), whatever the run's seed
    os.rename(tmp_path / "lab", tmp_path / "only_train")  # DIR/train alone: the same split of DIR/train
    os.makedirs(tmp_path / "lab")
    os.rename(tmp_path / "only_train", tmp_path / "lab" / "train")
    common.load_split.cache_clear()
    assert [os.path.basename(p) for p in isd.load_data(args, "test").paths] == [os.path.basename(p) for p in test.paths]
    for i in range(10):
        write_image(str(tmp_path / "flat" / f"{i}.png"), i, size=16)
    code, out, err = main_of(isd, ["--dataset", "folder", "--data-root", str(tmp_path / "flat"), "--image-size", "12",
                                   "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--epochs", "2",
                                   "--eval-every", "1", "--save-dir", str(tmp_path), "--run-name", "f"])
    assert code == 0, err
    assert "no class folders, so no k-NN" in out and out.count("eval ") == 0  # no empty metric lines
    assert "final (last epoch 2, step 2; the headline): no metrics (no labelled test data)" in out
    assert load(tmp_path / "f" / "model.pt")["args"]["eval_every"] == 0


def test_isd_hidden_folders_are_no_classes(tmp_path):
    for i in range(3):
        write_image(str(tmp_path / f"{i}.png"), i)
    os.makedirs(tmp_path / ".ipynb_checkpoints")
    assert isd.folder_layout(str(tmp_path)) == ("all", None)  # flat and unlabeled: no k-NN, as without the folder
    os.makedirs(tmp_path / "cats")
    assert isd.folder_layout(str(tmp_path)) == ("all", "holdout")


def test_isd_image_size_floor_and_flags_moco_cannot_use(tmp_path):
    from PIL import Image
    image = Image.new("RGB", (40, 40))
    with pytest.raises(RuntimeError):  # the real bound: MoCo-v2's 23-px blur pads 11 px by reflection
        torch.manual_seed(0)
        [common.moco_v2_transform(11)(image) for _ in range(20)]
    assert common.moco_v2_transform(12)(image).shape == (3, 12, 12)
    write_folder_dataset(tmp_path / "data")
    for size, code_wanted in (("11", 2), ("12", 0)):
        code, _, err = main_of(isd, ["--dataset", "folder", "--data-root", str(tmp_path / "data"), "--image-size", size,
                                     "--batch-size", "4", "--queue-size", "8", "--workers", "0", "--max-steps", "1",
                                     "--eval-every", "0", "--save-dir", str(tmp_path), "--run-name", f"s{size}"])
        assert code == code_wanted and (code == 0 or ("--image-size 11" in err and len(err.strip().splitlines()) == 1))
    code, _, err = main_of(isd, ["--image-size", "8", "--max-steps", "1", "--eval-every", "0", "--save-dir",
                                 str(tmp_path), "--run-name", "d8"])  # in memory: no blur, the flag's floor runs
    assert code == 0, err
    for flags, name in ((["--tau-t", "0.2"], "--tau-t"), (["--head", "r18"], "--head"), (["--head", "r50"], "--head"),
                        (["--teacher-view", "weak"], "--teacher-view")):
        code, _, err = main_of(isd, ["--variant", "moco", *flags])
        assert code == 2 and name in err and "--variant moco" in err and len(err.strip().splitlines()) == 1, err
    a = isd.get_args(["--variant", "moco", "--head", "moco", "--teacher-view", "strong"])  # MoCo-v2's own values
    assert (a.head, a.teacher_view, a.tau_t) == ("moco", "strong", 0.2)  # tau_t from the recipe: not refused
    assert isd.get_args(["--tau-t", "0.05", "--head", "moco"]).tau_t == 0.05  # ISD may use them (and MoCo's head)


# ------------------------------------------------------------------------------------------------
# eval.py: reproduces every script's metrics, exports embeddings, draws retrievals and curves, the ISD linear
# probe, and one line with exit code 2 for every bad checkpoint, embeddings file or flag

evalpy = eval_py
BOOKKEEPING = ("epoch", "step", "elapsed_s", "images_per_s")
METHODS = tuple(SCRIPTS)


@pytest.fixture(scope="session")
def trained(digits_runs):
    """trained(method) -> the run folder of the contract section's tiny digits run of that script."""
    return lambda method: digits_runs[method][0]


@pytest.fixture(scope="session")
def evaluated(trained, tmp_path_factory):
    """evaluated(method): eval.py once on that run's model.pt with --export and --show-retrievals 3."""
    out, done = tmp_path_factory.mktemp("eval_out"), {}

    def get(method):
        if method not in done:
            run = trained(method)
            files = {k: out / f"{method}.{k}" for k in ("npz", "png", "json")}
            metrics = evalpy.main([str(run / "model.pt"), "--export", str(files["npz"]), "--show-retrievals", "3",
                                   "--out", str(files["png"]), "--json", str(files["json"])])
            done[method] = dict(run=run, metrics=metrics, **files)
        return done[method]
    return get


def write_folder_dataset(root):
    """A tiny --dataset folder tree: train/ and test/, 2 classes x 3 PNGs (40 x 30 px, a colour per class)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, base in (("cat", (200, 60, 40)), ("dog", (40, 80, 200))):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(3):
                pixels = np.clip(np.array(base) + rng.integers(-40, 40, (30, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """An s2sd run on a folder dataset of image files (small CNN at 32 px, no DataLoader workers)."""
    root = tmp_path_factory.mktemp("eval_folder")
    data = write_folder_dataset(root / "data")
    importlib.import_module("s2sd").main(
        ["--dataset", "folder", "--data-root", str(data), "--arch", "smallcnn", "--no-pretrained", "--image-size", "32",
         "--batch-size", "4", "--workers", "0", "--epochs", "1", "--save-dir", str(root), "--run-name", "f",
         "--log-every", "100"])
    return root / "f"


def expect_error(capsys, argv, *needles):
    """eval.py with argv: exit code 2, one 'error: ' line on stderr naming each needle, no traceback."""
    with pytest.raises(SystemExit) as exc:
        evalpy.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def logged(run):
    ckpt = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    return {k: v for k, v in ckpt["metrics"].items() if k not in BOOKKEEPING}


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("method", METHODS)
def test_eval_reproduces_logged_metrics_exactly(evaluated, method):
    e = evaluated(method)
    names = {"s2sd": {"R@1", "R@2", "R@4", "R@8", "MAP@R", "NMI"}, "camd": {"top1", "Rank-1", "Rank-2"},
             "spkd": {"top1", "Rank-1", "Rank-2"}, "isd": {"knn1", "knn20", "knn200w", "purity"}}[method]
    want = logged(e["run"])
    assert names <= set(e["metrics"]) and set(e["metrics"]) == set(want)
    assert {k: e["metrics"][k] for k in want} == want  # exactly, not approximately
    assert json.loads(e["json"].read_text()) == e["metrics"]


def test_eval_refuses_camd_last_pt_with_a_hint(trained, capsys):
    expect_error(capsys, [trained("camd") / "last.pt"], "do not fit", "use the run's model.pt")


def test_eval_table_and_default_json(trained, capsys, tmp_path):
    run = trained("s2sd")
    evalpy.main([str(run / "model.pt")])
    out = capsys.readouterr().out
    assert "eval.py" in out and "run log" in out and "R@1" in out
    assert json.loads((run / "eval.json").read_text()) == logged(run)
    (run / "eval.json").unlink()
    assert evalpy.main([str(run)]) == logged(run) and (run / "eval.json").exists()  # the run folder: its model.pt
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "last.pt").write_bytes((run / "last.pt").read_bytes())
    expect_error(capsys, [tmp_path / "unfinished"], "model.pt does not exist; that run is unfinished (its command")


def edited(tmp_path, run, name, change):
    """A copy of run's model.pt edited in place by change(ckpt) (its return value is ignored)."""
    ckpt = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, tmp_path / name)
    return tmp_path / name


def test_bad_checkpoints_give_one_line(trained, tmp_path, capsys):
    run = trained("s2sd")
    good = (run / "model.pt").read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(good[:len(good) // 2])
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "text.pt").write_bytes(b"not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save(torch.load(run / "model.pt", weights_only=True)["model"], tmp_path / "bare.pt")

    def ck(name, change):
        return edited(tmp_path, run, name, change)

    def args(name, **values):  # saved arguments changed (None: removed)
        def change(c):
            for k, v in values.items():
                c["args"].pop(k) if v is None else c["args"].update({k: v})
        return ck(name, change)

    def weights(name, change):
        return ck(name, lambda c: change(c["model"]))
    cases = [
        (tmp_path / "missing.pt", ["does not exist"]),
        (tmp_path, [f"{tmp_path / 'model.pt'} does not exist"]),  # a folder: its model.pt (none here)
        (tmp_path / "empty.pt", ["empty"]),
        (tmp_path / "truncated.pt", ["cannot read checkpoint"]),
        (tmp_path / "random.pt", ["cannot read checkpoint"]),
        (tmp_path / "text.pt", ["cannot read checkpoint"]),
        (tmp_path / "list.pt", ["not a checkpoint", "list"]),
        (tmp_path / "tensor.pt", ["not a checkpoint", "Tensor"]),
        (tmp_path / "bare.pt", ["lacks method, args, model", "bare state_dict"]),
        (ck("nomodel.pt", lambda c: c.pop("model")), ["lacks model"]),
        (ck("noargs.pt", lambda c: c.pop("args")), ["lacks args"]),
        (ck("os.pt", lambda c: c.update(method="os")), ["'os'", "not one of s2sd, camd, spkd, isd"]),
        (ck("num.pt", lambda c: c.update(method=3)), ["method 3"]),
        (ck("other.pt", lambda c: c.update(method="isd")), ["different version of isd.py"]),
        (ck("argslist.pt", lambda c: c.update(args=[1, 2])), ["'args' is a list"]),
        (args("old.pt", embed_dim=None), ["embed_dim", "different version of s2sd.py"]),
        (args("derived.pt", in_channels=None), ["in_channels", "different version"]),
        (args("dim.pt", embed_dim=16), ["do not fit", "mis-shaped", "embed.weight"]),
        (weights("miss.pt", lambda m: m.pop("embed.bias")), ["do not fit", "1 missing", "embed.bias"]),
        (weights("extra.pt", lambda m: m.update(extra=torch.zeros(1))), ["do not fit", "1 unexpected", "extra"]),
        (ck("notsd.pt", lambda c: c.update(model=[1])), ["not a state_dict"]),
        (weights("notensor.pt", lambda m: m.update({"embed.bias": 1.0})), ["not a state_dict"]),
    ]
    for path, needles in cases:
        expect_error(capsys, [path], path, *needles)


def test_bad_checkpoint_arguments_of_other_methods(trained, tmp_path, capsys):
    """Values outside the method's own argparse choices, model_from_args' RunError, a missing run-time argument."""
    run = trained("camd")
    bad = edited(tmp_path, run, "arch.pt", lambda c: c["args"].update(student_arch="resnet999"))
    expect_error(capsys, [bad], bad, "do not build a camd model", "resnet999")
    nc = edited(tmp_path, run, "nc.pt", lambda c: c["args"].pop("num_classes"))
    expect_error(capsys, [nc], nc, "num_classes", "different version of camd.py")
    camd = importlib.import_module("camd")
    args = camd.get_args([])
    args.student_arch, args.num_classes = "resnet999", 10
    with pytest.raises(camd.RunError):
        camd.model_from_args(args)

    def refuses(args):  # a RunError from model_from_args itself
        raise camd.RunError(f"cannot build {args.student_arch} here")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(camd, "model_from_args", refuses)
        expect_error(capsys, [run / "model.pt"], "model.pt", "do not build a camd model", "cannot build resnet8")
    run = trained("isd")
    arch = edited(tmp_path, run, "isdarch.pt", lambda c: c["args"].update(arch="vit"))
    expect_error(capsys, [arch], arch, "do not build", "vit")
    queue = edited(tmp_path, run, "queue.pt", lambda c: c["args"].update(queue_size=256))
    expect_error(capsys, [queue], queue, "do not fit", "queue")


def test_an_isd_folder_checkpoint_reads_without_notes_about_the_working_folder(trained, tmp_path, capsys,
                                                                             monkeypatch):
    """read_checkpoint takes the script's defaults with the run's --data-root and keeps their notes to itself: isd's
    'no class folders, so no k-NN' was printed for every folder checkpoint when ./data held no class folders."""
    data = write_folder_dataset(tmp_path / "mine")
    ckpt = edited(tmp_path, trained("isd"), "folder.pt", lambda c: c["args"].update(dataset="folder",
                                                                                    data_root=str(data)))
    monkeypatch.chdir(tmp_path)  # ./data: absent
    _, _, args = evalpy.read_checkpoint(str(ckpt))
    assert args.data_root == str(data) and capsys.readouterr().out == ""


def test_eval_args_that_only_some_datasets_have_and_spkd_on_its_own_dtd_split(trained, tmp_path, capsys,
                                                                              monkeypatch):
    """camd / spkd's EVAL_ARGS (shared: + "split" for spkd): a key only a preset gives (synthetic_n) is required where
    the run's dataset has it; spkd's DTD checkpoint evaluates on its saved --split, with or without --dataset dtd;
    --dtd-split and another transfer dataset are refused."""
    assert "synthetic_n" in camd.EVAL_ARGS and "split" in spkd.EVAL_ARGS and "split" not in camd.EVAL_ARGS
    evalpy.read_checkpoint(str(trained("camd") / "model.pt"))  # no --split, no synthetic_n: nothing lacks
    run = trained("spkd")
    nosplit = edited(tmp_path, run, "nosplit.pt", lambda c: c["args"].pop("split"))
    expect_error(capsys, [nosplit], nosplit, "split", "different version of spkd.py")
    synthetic = edited(tmp_path, run, "synthetic.pt", lambda c: c["args"].update(dataset="synthetic"))
    expect_error(capsys, [synthetic], synthetic, "synthetic_n", "different version of spkd.py")
    base = tmp_path / "dtd" / "dtd"  # torchvision's layout; split k tests image k % 3 of each class
    many_images(str(base / "images"), [f"{c}/{c}_{j}.jpg" for c in ("banded", "dotted", "zigzagged") for j in range(3)])
    (base / "labels").mkdir()
    for k in range(1, 11):
        for s, j in (("train", (k + 1) % 3), ("val", (k + 2) % 3), ("test", k % 3)):
            (base / "labels" / f"{s}{k}.txt").write_text("".join(f"{c}/{c}_{j}.jpg\n" for c in ("banded", "dotted",
                                                                                                  "zigzagged")))
    dtd = edited(tmp_path, run, "dtd.pt", lambda c: c["args"].update(dataset="dtd", split=2, data_root=str(tmp_path)))
    real, asked = common.load_split, []
    monkeypatch.setattr(common, "load_split", lambda name, root, split, **kw: asked.append(split) or real(
        name, root, split, **kw))
    own = evalpy.main([str(dtd), "--json", str(tmp_path / "a.json")])
    assert asked == ["test2"] and {"top1", "Rank-1"} <= set(own)
    assert evalpy.main([str(dtd), "--dataset", "dtd", "--json", str(tmp_path / "b.json")]) == own
    expect_error(capsys, [dtd, "--dataset", "dtd", "--dtd-split", "3"], "--dtd-split", "--linear-probe")
    expect_error(capsys, [dtd, "--dataset", "pets"], "--dataset pets", "ISD's transfer", "its own data")


def test_bad_data_and_device_overrides(trained, folder_run, tmp_path, capsys):
    ckpt = trained("s2sd") / "model.pt"
    expect_error(capsys, [ckpt, "--dataset", "imagenet", "--data-root", tmp_path / "none"], "imagenet", ckpt)
    for method in METHODS:  # random benchmark images (camd / spkd / isd crashed on its missing size arguments)
        expect_error(capsys, [trained(method) / "model.pt", "--dataset", "synthetic"], "nothing to evaluate", method)
    expect_error(capsys, [folder_run / "model.pt", "--data-root", tmp_path / "moved"], "moved", "model.pt")
    expect_error(capsys, [ckpt, "--linear-probe"], "ISD's protocol", "s2sd")
    if not torch.cuda.is_available():
        expect_error(capsys, [ckpt, "--device", "cuda"], "--device cuda", "no such device")
    if not torch.backends.mps.is_available():
        expect_error(capsys, [ckpt, "--device", "mps"], "--device mps")


def test_bad_flag_combinations(tmp_path, capsys):
    ck, npz = tmp_path / "model.pt", tmp_path / "e.npz"
    expect_error(capsys, [], "exactly one of")
    expect_error(capsys, [ck, "--embeddings", npz], "exactly one of")
    expect_error(capsys, ["--embeddings", npz, "--export", tmp_path / "x.npz"], "--export needs a CHECKPOINT")
    expect_error(capsys, ["--embeddings", npz, "--linear-probe"], "--linear-probe needs a CHECKPOINT")
    expect_error(capsys, [ck, "--out", tmp_path / "m.json"], "--json")
    expect_error(capsys, [ck, "--show-retrievals", "2", "--out", tmp_path / "x.txt"], ".png")
    expect_error(capsys, [ck, "--show-retrievals", "0"], "--show-retrievals", ">= 1")
    expect_error(capsys, [ck, "--device", "tpu"], "--device")
    expect_error(capsys, [ck, "--linear-probe", "fast"], "--linear-probe")


# ------------------------------------------------------------------------------------------------ embeddings files
@pytest.mark.parametrize("method", METHODS)
def test_export_round_trip(evaluated, method, tmp_path):
    """--export's file read back with --embeddings gives the checkpoint's own embedding metrics."""
    e = evaluated(method)
    data = np.load(e["npz"])
    assert data["emb"].ndim == 2 and data["emb"].dtype == np.float32 and len(data["labels"]) == len(data["emb"])
    assert np.allclose(np.linalg.norm(data["emb"], axis=1), 1, atol=1e-5)
    back = evalpy.main(["--embeddings", str(e["npz"]), "--json", str(tmp_path / "back.json")])
    m = e["metrics"]
    if method == "s2sd":
        names = ("R@1", "R@2", "R@4", "R@8", "MAP@R", "NMI")
        assert {k: back[k] for k in names} == {k: m[k] for k in names}
    elif method in ("camd", "spkd"):
        assert "logits" in data.files
        assert (back["R@1"], back["R@2"]) == (m["Rank-1"], m["Rank-2"])
    else:
        assert {"train_emb", "train_labels", "teacher_emb"} <= set(data.files)
        assert {k: back[k] for k in ("knn1", "knn20", "knn200w")} == {k: m[k] for k in ("knn1", "knn20", "knn200w")}
    assert json.loads((tmp_path / "back.json").read_text()) == back


def test_export_of_a_file_dataset_has_paths(folder_run, tmp_path):
    metrics = evalpy.main([str(folder_run / "model.pt"), "--export", str(tmp_path / "f.npz"),
                           "--json", str(tmp_path / "f.json")])
    data = np.load(tmp_path / "f.npz")
    assert len(data["paths"]) == len(data["emb"]) == 6 and all(os.path.isfile(p) for p in data["paths"])
    folders = [os.path.basename(os.path.dirname(p)) for p in data["paths"]]
    assert folders == [str(data["classes"][y]) for y in data["labels"]]
    back = evalpy.main(["--embeddings", str(tmp_path / "f.npz"), "--json", str(tmp_path / "b.json")])
    assert {k: back[k] for k in metrics} == metrics


def test_embeddings_file_metrics(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(120, 6, generator=g), dim=1)
    labels = torch.arange(120) % 10
    train = F.normalize(torch.randn(200, 6, generator=g), dim=1)
    train_labels = torch.arange(200) % 10
    np.savez(tmp_path / "e.npz", emb=emb.numpy(), labels=labels.numpy(), train_emb=train.numpy(),
             train_labels=train_labels.numpy())
    out = evalpy.main(["--embeddings", str(tmp_path / "e.npz")])
    assert out == json.loads((tmp_path / "e_eval.json").read_text())
    assert out == {**common.retrieval_metrics(emb, labels), **common.knn_metrics(train, train_labels, emb, labels)}
    # other class ids in the same order (negative, huge, floats that are whole numbers) give the same numbers
    ids = np.array([-7, 3, 5, 6, 7, 8, 9, 11, 42, 10**9])
    np.savez(tmp_path / "ids.npz", emb=emb.numpy(), labels=ids[labels.numpy()].astype(np.float64),
             train_emb=train.numpy(), train_labels=ids[train_labels.numpy()])
    again = evalpy.main(["--embeddings", str(tmp_path / "ids.npz"), "--no-nmi"])
    assert "NMI" not in again and again == {k: v for k, v in out.items() if k != "NMI"}
    np.savez(tmp_path / "raw.npz", emb=3 * emb.numpy(), labels=labels.numpy())
    capsys.readouterr()
    raw = evalpy.main(["--embeddings", str(tmp_path / "raw.npz"), "--no-nmi"])
    assert "not L2-normalised" in capsys.readouterr().out and raw["R@1"] == out["R@1"]
    assert evalpy.main(["--embeddings", str(tmp_path / "raw.npz"), "--no-nmi", "--l2-normalize"])["R@1"] == out["R@1"]


def test_bad_embeddings_files_give_one_line(tmp_path, capsys):
    emb = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1).numpy()
    labels = np.array([0, 0, 1, 1, 2, 2])

    def npz(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name
    (tmp_path / "random.npz").write_bytes(b"\x93NUMPY garbage" * 20)
    with open(tmp_path / "single.npz", "wb") as f:
        np.save(f, emb)
    nan, inf = emb.copy(), emb.copy()
    nan[2, 1], inf[4, 0] = np.nan, np.inf
    cases = [
        (tmp_path / "missing.npz", ["does not exist"]),
        (tmp_path, ["is a folder"]),
        (tmp_path / "random.npz", ["cannot read"]),
        (tmp_path / "single.npz", ["single .npy array"]),
        (npz("nolabels.npz", emb=emb), ["lacks array 'labels'"]),
        (npz("noemb.npz", labels=labels), ["lacks array 'emb'"]),
        (npz("notrainlabels.npz", emb=emb, labels=labels, train_emb=emb), ["lacks array 'train_labels'"]),
        (npz("empty.npz", emb=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64)), ["'emb' is empty"]),
        (npz("emptylabels.npz", emb=emb, labels=np.zeros(0, np.int64)), ["'labels' is empty"]),
        (npz("flat.npz", emb=emb.ravel(), labels=labels), ["'emb' must be 2-D"]),
        (npz("labels2d.npz", emb=emb, labels=labels[:, None]), ["'labels' must be 1-D"]),
        (npz("short.npz", emb=emb, labels=labels[:5]), ["5 entries", "6 rows"]),
        (npz("nan.npz", emb=nan, labels=labels), ["NaN or inf", "1 of 6 rows"]),
        (npz("inf.npz", emb=inf, labels=labels), ["NaN or inf"]),
        (npz("strlabels.npz", emb=emb, labels=np.array(list("aabbcc"))), ["integer class ids"]),
        (npz("floatlabels.npz", emb=emb, labels=labels + 0.5), ["non-integer"]),
        (npz("stremb.npz", emb=np.array([["a", "b"]] * 6), labels=labels), ["numeric"]),
        (npz("oneclass.npz", emb=emb, labels=np.zeros(6, np.int64)), ["at least 2"]),
        (npz("width.npz", emb=emb, labels=labels, train_emb=emb[:, :3], train_labels=labels), ["3 columns", "4"]),
        (npz("trainlen.npz", emb=emb, labels=labels, train_emb=emb, train_labels=labels[:4]), ["'train_labels'"]),
        (npz("trainnan.npz", emb=emb, labels=labels, train_emb=nan, train_labels=labels), ["'train_emb'", "NaN"]),
    ]
    np.savez(tmp_path / "object.npz", emb=np.array([emb[0], "x"], dtype=object), labels=labels)
    cases.append((tmp_path / "object.npz", ["cannot read array 'emb'"]))
    for path, needles in cases:
        expect_error(capsys, ["--embeddings", path], path, *needles)


# ------------------------------------------------------------------------------------------------ pictures
def grid_size(queries, k, tile=64):
    """(width, height) of eval.py's retrieval picture: label column, query, k neighbours; a legend line on top."""
    cell = tile + 2 * max(2, tile // 16) + 2
    return 2 * cell + (k + 1) * cell + 2, 18 + queries * cell + 2


def test_nearest_matches_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    emb = torch.randint(0, 3, (40, 3), generator=g).float()  # integer points: many exactly tied distances
    query = torch.tensor([0, 5, 17, 39])
    got = evalpy.nearest(query, emb, emb, 6, exclude_self=True)
    for row, q in zip(got.tolist(), query.tolist()):
        d = ((emb - emb[q]) ** 2).sum(1).tolist()
        assert row == sorted((i for i in range(len(emb)) if i != q), key=lambda i: (d[i], i))[:6]
    gallery = torch.randint(0, 3, (25, 3), generator=g).float()
    got = evalpy.nearest(query, emb, gallery, 30, exclude_self=False)
    assert got.shape == (4, 25)
    for row, q in zip(got.tolist(), query.tolist()):
        d = ((gallery - emb[q]) ** 2).sum(1).tolist()
        assert row == sorted(range(25), key=lambda i: (d[i], i))


def frame_colours(png, queries, k, tile=64):
    """The frame colour of each tile of the picture: [queries][k + 1] RGB tuples."""
    from PIL import Image
    im = np.asarray(Image.open(png).convert("RGB"))
    cell = tile + 2 * max(2, tile // 16) + 2
    top = [18 + 2 + r * cell + 1 for r in range(queries)]  # inside the top edge of each row's frames
    mid = [2 * cell + 2 + c * cell + cell // 2 for c in range(k + 1)]  # each tile's centre column
    return [[tuple(int(v) for v in im[y, x]) for x in mid] for y in top]


@pytest.mark.parametrize("method", ["s2sd", "isd"])
def test_show_retrievals_digits(evaluated, method):
    """A PNG of the expected size; query frames grey, neighbour frames green exactly where the labels agree."""
    from PIL import Image
    e = evaluated(method)
    assert Image.open(e["png"]).size == grid_size(3, 8)
    data = np.load(e["npz"])
    emb, labels = torch.from_numpy(data["emb"]), torch.from_numpy(data["labels"])
    if method == "isd":  # gallery = the train split
        gallery, g_labels, exclude = torch.from_numpy(data["train_emb"]), torch.from_numpy(data["train_labels"]), False
    else:
        gallery, g_labels, exclude = emb, labels, True
    query = torch.randperm(len(emb), generator=torch.Generator().manual_seed(0))[:3]  # --seed 0
    nn = evalpy.nearest(query, emb, gallery, 8, exclude)
    for r, row in enumerate(frame_colours(e["png"], 3, 8)):
        assert row[0][0] == row[0][1] == row[0][2]  # grey
        for c, colour in enumerate(row[1:]):
            same = bool(g_labels[nn[r, c]] == labels[query[r]])
            assert (colour[1] > 150 > colour[0]) if same else (colour[0] > 150 > colour[1]), (r, c, colour, same)


def test_show_retrievals_file_dataset(folder_run, tmp_path):
    from PIL import Image
    out = tmp_path / "pics" / "r.png"
    evalpy.main([str(folder_run / "model.pt"), "--show-retrievals", "4", "--topk", "3", "--out", str(out)])
    assert Image.open(out).size == grid_size(4, 3)
    evalpy.main([str(folder_run / "model.pt"), "--show-retrievals", "50", "--topk", "9", "--tile", "32"])
    assert Image.open(folder_run / "retrievals.png").size == grid_size(6, 5, 32)  # 6 test images: 6 queries, top-5


def test_plot_curves_with_matplotlib(trained, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    run = trained("s2sd")
    evalpy.main(["--plot", str(run), "--out", str(tmp_path / "c.png")])
    assert Image.open(tmp_path / "c.png").size == (1380, 330)  # 3 panels (Recall@k, MAP@R, NMI) at 100 dpi
    evalpy.main(["--plot", str(run / "metrics.jsonl")])
    assert (run / "curves.png").is_file()


def test_plot_without_matplotlib(trained, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    err = expect_error(capsys, ["--plot", trained("s2sd"), "--out", tmp_path / "c.png"])
    assert err.strip() == "error: --plot needs matplotlib (pip install matplotlib)"
    assert not (tmp_path / "c.png").exists()


def test_plot_bad_run_folders(tmp_path, capsys):
    (tmp_path / "norun").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.jsonl").write_text('{"epoch": 1, "R@1": 50.0}\n{"epoch": 2, "R@1": \n')
    expect_error(capsys, ["--plot", tmp_path / "missing"], "no such run folder")
    expect_error(capsys, ["--plot", tmp_path / "norun"], "no metrics.jsonl")
    expect_error(capsys, ["--plot", tmp_path / "empty"], "is empty")
    expect_error(capsys, ["--plot", tmp_path / "broken"], "line 2")
    expect_error(capsys, ["--plot", tmp_path / "norun", "--out", tmp_path / "c.txt"], ".png")


# ------------------------------------------------------------------------------------------------ ISD linear probe
def toy_blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    centres = 4 * torch.eye(16)[:4]
    return centres[labels] + 0.5 * torch.randn(n, 16, generator=g), labels


def test_linear_probe_on_separable_toy_data():
    x, y = toy_blobs(400, 0)
    tx, ty = toy_blobs(200, 1)
    out = evalpy.linear_probe(x, y, tx, ty, epochs=8, batch_size=64)
    assert out["last"] >= 99 and out["best"] >= out["last"] and 1 <= out["best_epoch"] <= 8
    assert len(out["history"]) == 8 and out["history"][-1] == out["last"]
    assert evalpy.linear_probe(x, y, tx, ty, epochs=8, batch_size=64) == out  # deterministic for a seed
    assert evalpy.linear_probe(x, y, tx, ty, epochs=8, batch_size=64, seed=1)["history"] != out["history"]
    # unlabelled (-1) train items are left out; the class count comes from the labels
    partly = torch.where(torch.arange(400) < 40, -1, y)
    assert evalpy.linear_probe(x, partly, tx, ty, epochs=8, batch_size=64)["last"] > 95


def test_linear_probe_schedule_and_fresh_features():
    x, y = toy_blobs(64, 0)
    out = evalpy.linear_probe(x, y, x, y, epochs=40)  # eval_linear.py: x0.1 at epochs 15 and 30 of 40
    assert out["lrs"] == pytest.approx([0.01] * 15 + [0.001] * 15 + [0.0001] * 10)
    assert evalpy.linear_probe(x, y, x, y, epochs=10)["lrs"] == pytest.approx([0.01] * 4 + [0.001] * 4 + [0.0001] * 2)
    for epochs, lrs in ((1, [0.01]), (2, [0.01, 0.001]), (3, [0.01, 0.001, 0.0001])):  # a milestone 0 would
        assert evalpy.linear_probe(x, y, x, y, epochs=epochs)["lrs"] == pytest.approx(lrs)  # start at 0.001
    seen = []

    def fresh(epoch):  # the official protocol: new (augmented) features every epoch
        seen.append(epoch)
        return x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(epoch))
    evalpy.linear_probe(fresh, y, x, y, epochs=5, center_features=x)
    assert seen == [0, 1, 2, 3, 4]
    seen.clear()  # without center_features: those of epoch 0 standardise (the docstring's default)
    assert evalpy.linear_probe(fresh, y, x, y, epochs=5)["history"] == \
        evalpy.linear_probe(fresh, y, x, y, epochs=5, center_features=fresh(0))["history"]


def test_isd_linear_probe_official_and_cached(trained, tmp_path, monkeypatch):
    """Official: centre-crop train + test features once, then fresh augmented train features each of the checkpoint's
    probe_epochs, torch seeded with --seed + epoch before each; cached: no augmentation."""
    isd = importlib.import_module("isd")
    run, calls, real = trained("isd"), [], isd.features

    def recording(model, args, device, split, augment=False):
        calls.append((len(split), augment, torch.initial_seed()))  # the gallery split (1,437 images) or test (360)
        return real(model, args, device, split, augment)
    monkeypatch.setattr(isd, "features", recording)
    ckpt = edited(tmp_path, run, "p3.pt", lambda c: c["args"].update(probe_epochs=3))
    out = evalpy.main([str(ckpt), "--linear-probe", "--seed", "5", "--json", str(tmp_path / "p.json")])
    out = {k: v for k, v in out.items() if k.startswith("linear")}
    assert [c[:2] for c in calls] == [(1437, False), (360, False)] + [(1437, True)] * 3
    assert [c[2] for c in calls[2:]] == [5, 6, 7]
    assert set(out) == {"linear", "linear_best", "linear_best_epoch"} and 0 < out["linear"] <= out["linear_best"] <= 100
    calls.clear()
    cached = evalpy.main([str(run / "model.pt"), "--linear-probe", "cached", "--probe-epochs", "5",
                          "--json", str(tmp_path / "c.json")])
    cached = {k: v for k, v in cached.items() if k.startswith("linear")}
    assert [c[:2] for c in calls] == [(1437, False), (360, False)]
    assert set(cached) == {"linear_cached", "linear_cached_best", "linear_cached_best_epoch"}
    assert 30 < cached["linear_cached"] <= 100


def test_linear_probe_standardises_as_eval_linear_py():
    """eval_linear.py's Normalize + FullBatchNorm: (x / |x| - mean) / sqrt(var + 1e-5), mean and var (unbiased) of the
    L2-normalised centre-crop train features; a feature without spread is scaled by 1 / sqrt(1e-5), not by 1e8."""
    g = torch.Generator().manual_seed(0)
    center, x = torch.rand(50, 6, generator=g, dtype=torch.float64), torch.rand(7, 6, generator=g, dtype=torch.float64)
    unit, xu = (v.numpy() / np.linalg.norm(v.numpy(), axis=1, keepdims=True) for v in (center, x))
    want = (xu - unit.mean(0)) / np.sqrt(unit.var(0, ddof=1) + 1e-5)
    assert np.allclose(evalpy.full_batch_norm(center)(x).numpy(), want, atol=1e-5)
    flat = evalpy.full_batch_norm(torch.ones(8, 3))(torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(flat, (torch.tensor([1.0, 0, 0]) - 3 ** -0.5) / 1e-5 ** 0.5)


def test_logistic_regression_matches_scikit_learn():
    """mean CE + l2 / 2 ||W||^2 (bias free) = scikit-learn's multinomial LogisticRegression with C = 1 / (l2 N); the
    optimum does not depend on the starting point (warm starts along the grid)."""
    from sklearn.linear_model import LogisticRegression
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    x[:, :3] += 1.5 * torch.eye(3, dtype=torch.float64)[y]
    for l2 in (1e-2, 1e-1, 1.0):
        w, b = evalpy.logistic_regression(x, y, l2, 3)
        sk = LogisticRegression(C=1 / (l2 * 60), tol=1e-12, max_iter=100000).fit(x.numpy(), y.numpy())
        assert np.allclose(w.numpy(), sk.coef_, atol=1e-4)
        assert np.allclose((b - b.mean()).numpy(), sk.intercept_ - sk.intercept_.mean(), atol=1e-4)
        start = (torch.randn(3, 5, generator=g, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
        assert torch.allclose(evalpy.logistic_regression(x, y, l2, 3, start)[0], w, atol=1e-4)


def test_l2_selection_picks_the_validation_best_on_a_toy_problem():
    """Imbalanced train (90 / 10 / 10): a weak l2 puts the class 0 / 1 boundary near the train margin's middle (0),
    a strong one pushes it past the minority class; validation points at 0.15 (class 0) and 0.45 (class 1) are all
    right only in between. Every score equals scikit-learn's, and the choice is the strongest l2 among the best."""
    from sklearn.linear_model import LogisticRegression
    x = torch.zeros(110, 2, dtype=torch.float64)
    x[:90, 0], x[90:100, 0], x[100:, 1] = torch.linspace(-1.5, -0.5, 90), torch.linspace(0.5, 1.5, 10), 3.5
    y = torch.tensor([0] * 90 + [1] * 10 + [2] * 10)
    vx = torch.tensor([[0.15, 0], [0.15, 0], [0.45, 0], [0.45, 0], [0, 3.5]], dtype=torch.float64)
    vy = torch.tensor([0, 0, 1, 1, 2])
    l2, (w, b), scores = evalpy.select_l2((x, y), (vx, vy), 3, per_class=False)
    assert sorted(scores) == pytest.approx(list(evalpy.L2_GRID))
    for value, score in scores.items():
        sk = LogisticRegression(C=1 / (value * 110), tol=1e-12, max_iter=100000).fit(x.numpy(), y.numpy())
        assert score == pytest.approx(100 * (sk.predict(vx.numpy()) == vy.numpy()).mean()), value
    assert scores[l2] == 100 and max(v for v, s in scores.items() if s == 100) == l2 and 1e-3 < l2 < 1e-1
    assert scores[1e-6] < 100 and scores[float(evalpy.L2_GRID[-1])] < 100  # the choice matters at both ends
    assert torch.allclose(w, evalpy.logistic_regression(x, y, l2, 3)[0], atol=1e-3)  # warm start: the same fit


def test_mean_per_class_accuracy_and_held_out_split():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((50, 7, 3, 20))])
    pred = torch.where(torch.rand(len(labels), generator=g) < 0.7, labels, torch.randint(0, 4, (len(labels),), generator=g))
    assert evalpy.accuracy(pred, labels) == pytest.approx(100 * accuracy_score(labels, pred))
    assert evalpy.accuracy(pred, labels, per_class=True) == pytest.approx(100 * balanced_accuracy_score(labels, pred))
    assert set(evalpy.MEAN_PER_CLASS) == {"aircraft", "pets", "caltech101", "flowers102"}  # BYOL Table 10
    counts = torch.bincount(labels[evalpy.held_out(labels, 5, seed=0)])
    assert counts.tolist() == [5, 5, 3, 5]  # a count per class (at most the class)
    mask = evalpy.held_out(labels, 0.2, seed=0)
    assert torch.bincount(labels[mask]).tolist() == [10, 1, 1, 4] and torch.equal(mask, evalpy.held_out(labels, 0.2, 0))
    assert not torch.equal(mask, evalpy.held_out(labels, 0.2, seed=1))


def colour_split(name, per_class, seed, size=16):
    """An in-memory labelled Split: one colour per class (+ noise), `per_class` images of each class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    base = torch.tensor([[220, 40, 40], [40, 200, 60], [50, 60, 220], [200, 200, 40]])[labels]
    images = (base[:, :, None, None] + torch.randint(-40, 40, (len(labels), 3, size, size), generator=g)).clamp(0, 255)
    return common.Split(name, labels, len(per_class), (0.5,) * 3, (0.25,) * 3, images=images.to(torch.uint8))


def test_linear_transfer_end_to_end_on_fixture_datasets(trained, tmp_path, monkeypatch, capsys):
    """--linear-probe --dataset X: BYOL's protocol on the digits ISD checkpoint's backbone. Caltech-101: 5 images of
    each class held out of train for validation, mean per-class accuracy; DTD: the creators' val split of --dtd-split
    k, top-1."""
    requested = []

    def fixture(name, root="./data", split="train", **kw):
        requested.append((name, split))
        kind = split[:-1] if name == "dtd" else split
        return colour_split(name, {"train": (24, 12, 30, 9), "val": (5, 5, 5, 5)}.get(kind, (10, 10, 10, 10)),
                            seed=len(requested))
    monkeypatch.setattr(common, "load_split", fixture)
    ckpt = trained("isd") / "model.pt"
    out = evalpy.main([str(ckpt), "--linear-probe", "--dataset", "caltech101", "--json", str(tmp_path / "c.json")])
    assert requested == [("caltech101", "train"), ("caltech101", "test")]
    assert set(out) == {"linear_caltech101", "linear_caltech101_l2"} and out["linear_caltech101"] >= 90
    assert out["linear_caltech101_l2"] in evalpy.L2_GRID and json.loads((tmp_path / "c.json").read_text()) == out
    text = capsys.readouterr().out
    assert "55 train + 20 validation images" in text and "mean per-class accuracy" in text
    requested.clear()
    out = evalpy.main([str(ckpt), "--linear-probe", "--dataset", "dtd", "--dtd-split", "3", "--json",
                       str(tmp_path / "d.json")])
    assert requested == [("dtd", "train3"), ("dtd", "test3"), ("dtd", "val3")] and out["linear_dtd"] >= 90
    text = capsys.readouterr().out
    assert "75 train + 20 validation images" in text and "top-1" in text


def test_linear_transfer_through_the_real_loaders_and_class_disjoint_data_refused(trained, tmp_path, monkeypatch,
                                                                                  capsys):
    """Caltech-101 in torchvision's layout through common.load_split and BYOL's file transform (a Compose: shorter side
    to --image-size, bicubic, centre crop, ImageNet mean / std): 30 train images of each class, 5 of them held out,
    the rest test. Pets' fixture is too small to hold 20 of each class out: one line. CUB (DML: its test classes are
    not its training classes) is refused for ISD's transfer and its k-NN alike."""
    isd = importlib.import_module("isd")
    make_transfer_fixtures(str(tmp_path / "data"))
    real, seen = isd.features, []

    def recording(model, args, device, split, augment=False, transform=None):
        seen.append((len(split), split.paths is not None, type(transform).__name__))
        return real(model, args, device, split, augment, transform)
    monkeypatch.setattr(isd, "features", recording)
    ckpt = trained("isd") / "model.pt"
    out = evalpy.main([str(ckpt), "--linear-probe", "--dataset", "caltech101", "--data-root", str(tmp_path / "data"),
                       "--json", str(tmp_path / "c.json")])
    assert seen == [(90, True, "Compose"), (9, True, "Compose")]
    assert set(out) == {"linear_caltech101", "linear_caltech101_l2"} and 0 <= out["linear_caltech101"] <= 100
    assert "75 train + 15 validation images" in capsys.readouterr().out
    expect_error(capsys, [ckpt, "--linear-probe", "--dataset", "pets", "--data-root", tmp_path / "data"],
                 "--dataset pets", "too few labelled train images")
    for argv in (["--linear-probe", "--dataset", "cub"], ["--dataset", "cub"]):
        expect_error(capsys, [ckpt, *argv], "--dataset cub", "test classes are not its training classes")


def test_label_fraction_trains_on_the_subset_and_scores_the_full_val_set(trained, tmp_path, monkeypatch):
    isd = importlib.import_module("isd")
    real, requested, seen = common.load_split, [], []

    def imagenet(name, root="./data", split="train", **kw):  # digits, standing in for ImageNet
        requested.append(split)
        out = real("digits", root, "test" if split == "val" else "train", image_size=16, channels=3)
        return out.subset(torch.arange(100)) if split == "train_1pct" else out
    monkeypatch.setattr(common, "load_split", imagenet)
    features = isd.features
    monkeypatch.setattr(isd, "features", lambda model, args, device, split, *rest: (
        seen.append(split if isinstance(split, str) else len(split)) or features(model, args, device, split, *rest)))
    ckpt = edited(tmp_path, trained("isd"), "imagenet.pt", lambda c: c["args"].update(dataset="imagenet"))
    out = evalpy.main([str(ckpt), "--linear-probe", "cached", "--label-fraction", "1", "--probe-epochs", "3",
                       "--json", str(tmp_path / "l.json")])
    assert {"linear_cached_1pct", "linear_cached_1pct_best", "knn1"} <= set(out)
    assert requested[-2:] == ["train_1pct", "val"] and seen[-2:] == [100, 360]  # the subset; all 360 val images


def test_linear_probe_bad_combinations(trained, capsys):
    isd_ck, s2sd_ck = trained("isd") / "model.pt", trained("s2sd") / "model.pt"
    expect_error(capsys, [s2sd_ck, "--linear-probe", "--dataset", "pets"], "ISD's protocol", "s2sd")
    expect_error(capsys, [isd_ck, "--dataset", "pets"], "--dataset pets", "add --linear-probe")
    expect_error(capsys, [isd_ck, "--label-fraction", "1"], "--label-fraction", "--linear-probe")
    expect_error(capsys, [isd_ck, "--linear-probe", "--label-fraction", "1"], "ImageNet's", "digits")
    expect_error(capsys, [isd_ck, "--linear-probe", "--label-fraction", "10", "--dataset", "pets"], "drop --dataset")
    expect_error(capsys, [isd_ck, "--linear-probe", "--label-fraction", "5"], "--label-fraction")
    expect_error(capsys, [isd_ck, "--linear-probe", "cached", "--dataset", "pets"], "'cached'")
    expect_error(capsys, [isd_ck, "--linear-probe", "--dataset", "pets", "--probe-epochs", "3"], "--probe-epochs")
    expect_error(capsys, [isd_ck, "--linear-probe", "--dataset", "pets", "--dtd-split", "2"], "--dtd-split")
    expect_error(capsys, [isd_ck, "--linear-probe", "--dataset", "pets", "--data-root", "/nonexistent"], "pets")


@pytest.mark.parametrize("method", METHODS)
def test_old_checkpoints_get_training_only_arguments_filled(method, trained, tmp_path, capsys):
    """A model.pt holding only EVAL_ARGS still reproduces the logged metrics (a note names what was filled); one
    lacking an EVAL_ARGS entry is refused, naming it."""
    module, run = SCRIPTS[method], trained(method)
    saved = load(run / "model.pt")["args"]
    have = [k for k in module.EVAL_ARGS if k in saved]  # camd / spkd: synthetic_n only on synthetic runs
    assert set(module.EVAL_ARGS) - set(have) <= {"synthetic_n"}
    bare = edited(tmp_path, run, "bare.pt", lambda c: c.update(args={k: c["args"][k] for k in have}))
    assert evalpy.main([str(bare), "--json", str(tmp_path / "e.json")]) == logged(run)
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "epochs" in note[0] and "filled with" in note[0]
    for key in have:
        lacking = edited(tmp_path, run, f"no_{key}.pt", lambda c: c["args"].pop(key))
        expect_error(capsys, [lacking], lacking, key, f"different version of {method}.py")


def test_unlabelled_folder_export_and_retrievals(tmp_path, capsys):
    """isd on a flat folder of images (no labels): --export writes every image's embedding and path, labels -1;
    --show-retrievals frames every neighbour in the one neutral colour."""
    for i in range(10):
        write_image(str(tmp_path / "imgs" / f"{i}.png"), i, size=40)
    code, _, err = main_of(isd, ["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--image-size", "32",
                                 "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--epochs", "1",
                                 "--max-steps", "1", "--save-dir", str(tmp_path), "--run-name", "f"])
    assert code == 0, err
    out = evalpy.main([str(tmp_path / "f" / "model.pt"), "--export", str(tmp_path / "e.npz"), "--show-retrievals",
                       "3", "--topk", "4", "--out", str(tmp_path / "r.png")])
    data = np.load(tmp_path / "e.npz")
    assert out == {} and (data["labels"] == -1).all() and data["emb"].shape == (10, 512)
    assert np.allclose(np.linalg.norm(data["emb"], axis=1), 1, atol=1e-5)
    assert sorted(os.path.basename(p) for p in data["paths"]) == sorted(f"{i}.png" for i in range(10))
    from PIL import Image
    assert Image.open(tmp_path / "r.png").size == grid_size(3, 4)
    for row in frame_colours(tmp_path / "r.png", 3, 4):
        assert row[0][0] == row[0][1] == row[0][2] and set(row[1:]) == {evalpy.FRAMES["neutral"]}
    expect_error(capsys, ["--embeddings", tmp_path / "e.npz"], "every label is -1", "at least 2")


def test_eval_ctrl_c_exits_130_with_one_line(trained):
    """While torch loads (numpy is in): exit 130 and nothing on stderr; while evaluating: exit 130, one line."""
    def start(*argv, importtime=False):
        return subprocess.Popen([sys.executable, *["-X", "importtime"] * importtime, "eval.py", *argv], cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    proc = start(str(trained("isd") / "model.pt"), importtime=True)
    for line in proc.stderr:  # -X importtime: a line per module, once it is loaded
        if re.search(r"\|\s+numpy$", line):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and out == "" and not [e for e in err.splitlines() if "import time:" not in e], err
    proc = start(str(trained("isd") / "model.pt"), "--linear-probe", "--probe-epochs", "100000", "--json", os.devnull)
    for line in proc.stdout:
        if line.startswith("linear probe"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "interrupted (Ctrl-C)\n", err


def test_boolean_metrics_and_fp32_evaluation(tmp_path, capsys, monkeypatch):
    """A boolean "collapsed" prints as COLLAPSED (not a number) beside the run log's and goes to JSON as is; eval.py
    evaluates with TF32 off (cuDNN convolutions default to it) and gives a caller in Python its settings back."""
    evalpy.report({"R@1": 50.0, "collapsed": True}, str(tmp_path / "m.json"), {"R@1": 49.5, "collapsed": False})
    out = capsys.readouterr().out
    assert re.search(r"collapsed\s+COLLAPSED\s+no", out) and re.search(r"R@1\s+50\.00\s+49\.50\s+\+0\.5", out)
    assert json.loads((tmp_path / "m.json").read_text()) == {"R@1": 50.0, "collapsed": True}
    np.savez(tmp_path / "e.npz", emb=np.eye(4, dtype=np.float32), labels=np.array([0, 0, 1, 1]))
    real, during = common.retrieval_metrics, []
    monkeypatch.setattr(common, "retrieval_metrics", lambda *a, **k: during.append(
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)) or real(*a, **k))
    original = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    for before in ((True, True), (True, False)):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
        evalpy.main(["--embeddings", str(tmp_path / "e.npz"), "--no-nmi"])
        assert during[-1] == (False, False)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = original
