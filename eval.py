"""Evaluate a checkpoint of any method script, or a file of embeddings; draw retrievals or a run's curves.

    python eval.py runs/<run>/model.pt [--data-root /data]   # the run's metrics, recomputed, beside the logged ones
    python eval.py runs/<run>/model.pt --export emb.npz --show-retrievals 8   # + embeddings, a picture of neighbours
    python eval.py runs/<isd-run>/model.pt --linear-probe [cached] [--dataset pets | --label-fraction 1]  # ISD's
    python eval.py --embeddings emb.npz                      # arrays emb, labels [, train_emb, train_labels]
    python eval.py --plot runs/<run> --out curves.png        # metrics.jsonl curves (needs matplotlib)
Metrics (fp32, TF32 off): eval.json beside the checkpoint (or --json). Bad input: one line, exit code 2; Ctrl-C: 130.

The contract. model.pt = {"method", "args" (resolved), "model" (state_dict), "metrics", "history"}; its method file
(next to eval.py) has METHOD, RunError, get_args(argv), EVAL_ARGS (what defines the network, test data and evaluation: a
model.pt lacking one its dataset has is refused; other arguments missing take today's defaults, with a note),
model_from_args(args) (strict load, no download), load_data(args, "test" | "gallery") -> common.Split, embeddings(model,
args, device) -> {"emb" [N, D], "labels"} in load_data order ({} without a labelled test split; isd: + "train_emb",
"train_labels" of the gallery, teacher_*; camd / spkd: + "logits"), evaluate(model, args, device) -> {metric: percent,
or the boolean "collapsed"} (as logged), (isd) features(model, args, device, split, augment=False, transform=None) ->
(backbone features, labels) of "train" (the gallery), "test" or a common.Split. --export's file read back with
--embeddings gives the embedding metrics; without a labelled test split (isd on a flat folder) --export and
--show-retrievals use the gallery (labels -1). ISD's linear probes (Tables 1, 3: isd_linear_probe(); Table 2, --dataset
X: transfer_probe()) need features(); not on cub, cars, sop, whose test classes are not training classes.
"""
import argparse
import contextlib
import importlib
import json
import math
import os
import re
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads: exit 130 quietly (once loaded, main() answers it)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import numpy as np
import torch
import torch.nn.functional as F

import common

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("s2sd", "camd", "spkd", "isd")
NOT_METRICS = ("epoch", "step", "elapsed_s", "images_per_s")  # metrics.jsonl bookkeeping columns
FRAMES = {"query": (140, 140, 140), "same": (26, 178, 38), "other": (217, 26, 26), "neutral": (60, 110, 200)}  # tiles
PANELS = {r"R@\d+": "Recall@k", r"Rank-\d+": "Rank-k", r"knn\d+w?": "k-NN accuracy",
          r"knn\d+w?_small": "k-NN accuracy, small classes"}  # --plot: a metric family shares one panel


class EvalError(Exception):
    """Bad input; main() prints the message as one line and exits with code 2."""


def need(ok, message):
    """Every bad-input check of this file: EvalError(message) unless ok."""
    if not ok:
        raise EvalError(message)


def short(e, limit=160):  # the first line of an exception's message (or its type name)
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def pick_device(name):
    found = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    need(name == "auto" or found[name], f"--device {name}: there is no such device here; use --device cpu (or auto)")
    return torch.device(next(d for d, ok in found.items() if ok) if name == "auto" else name)


def atomic_write(path, write):
    """write(binary file) into path.tmp<pid>, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise EvalError(f"cannot write {path} ({e.strerror or short(e)})") from None


# ------------------------------------------------------------------------------------------------ checkpoints
def read_checkpoint(path):
    """(checkpoint dict, its method module, its saved arguments), checked: EvalError naming the file and the fault."""
    need(os.path.isfile(path), f"checkpoint {path} does not exist" + ("; that run is unfinished (its command again or "
         "--resume its last.pt finishes it)" if os.path.isfile(os.path.join(os.path.dirname(path), "last.pt")) else ""))
    need(os.path.getsize(path), f"checkpoint {path} is empty (0 bytes): an interrupted copy? Use the run's model.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # only torch.load is inside: a truncated, corrupt or foreign file fails in many ways
        raise EvalError(f"cannot read checkpoint {path}: truncated, corrupt or not a tensors-only torch checkpoint "
                        f"({short(e, 100)})") from None
    need(isinstance(ckpt, dict), f"{path} is not a checkpoint of this repository (a {type(ckpt).__name__})")
    missing = [k for k in ("method", "args", "model") if k not in ckpt]
    bare = " (it looks like a bare state_dict)" if ckpt and all(map(torch.is_tensor, ckpt.values())) else ""
    need(not missing, f"{path} is not a checkpoint of this repository: it lacks {', '.join(missing)}{bare}")
    method, saved = ckpt["method"], ckpt["args"]
    need(method in METHODS, f"{path} names method {method!r}, which is not one of {', '.join(METHODS)}")
    if HERE not in sys.path:  # only the four files next to eval.py are ever imported
        sys.path.insert(0, HERE)
    module = importlib.import_module(method)
    need(isinstance(saved, dict) and all(isinstance(k, str) for k in saved),
         f"{path}: 'args' is a {type(saved).__name__}, not a dict of argument names; not written by {method}.py")
    argv = ["--dataset", saved.get("dataset")] * (saved.get("dataset") in list(module.PRESETS))
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # notes about data: not this checkpoint's
        defaults = vars(module.get_args(argv + ["--data-root", str(saved.get("data_root", "./data"))]))
    missing = [k for k in module.EVAL_ARGS if k not in saved and  # a key only presets give: if the run's dataset has it
               (k in defaults or not any(k in preset for preset in module.PRESETS.values()))]
    need(not missing, f"{path} lacks the argument(s) {', '.join(missing)}, which define its network, test data or "
         f"evaluation: written by a different version of {method}.py")
    filled = sorted(set(defaults) - set(saved))
    if filled:  # arguments added to the script since: today's default for the run's dataset
        print(f"note: {path} predates the argument(s) {', '.join(filled)} (they change neither its network nor its "
              f"evaluation): filled with {method}.py's defaults")
    return ckpt, module, argparse.Namespace(**{**{k: defaults[k] for k in filled}, **saved})


class Checkpoint:
    """A checked checkpoint: its method module, arguments (with the overrides) and rebuilt model on the device."""

    def __init__(self, a):
        self.path = path = a.checkpoint
        ckpt, self.module, self.args = read_checkpoint(path)
        self.method = method = self.module.METHOD
        self.trained_on = self.args.dataset
        need(a.dataset != "synthetic" or self.trained_on == "synthetic",
             f"--dataset synthetic: random images for benchmarks, nothing to evaluate {path} on")
        vars(self.args).update({k: getattr(a, k) for k in ("dataset", "data_root", "workers")  # the overrides
                                if getattr(a, k) is not None})
        self.device = pick_device(a.device)
        self.args.device = self.device.type
        try:
            model = self.module.model_from_args(self.args)
        except self.module.RunError as e:
            raise EvalError(f"{path}: its arguments do not build a {method} model: {e}") from None
        state, own = ckpt["model"], model.state_dict()
        need(isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()),
             f"{path}: 'model' is not a state_dict (a dict of tensors)")
        bad = {"missing": [k for k in own if k not in state], "unexpected": [k for k in state if k not in own],
               "mis-shaped": [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)} here" for k in own
                              if k in state and state[k].shape != own[k].shape]}
        misfit = f"weights in {path} do not fit the {method} model rebuilt from its arguments: "
        need(not any(bad.values()), misfit + ", ".join(f"{len(v)} {what} (e.g. {v[0]})" for what, v in bad.items() if v)
             + (" (a last.pt holds the training network; use the run's model.pt)" if "optimizer" in ckpt else ""))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # e.g. a dtype that cannot be copied
            raise EvalError(misfit + short(e)) from None
        self.model = model.to(self.device).eval()
        logged, references = ckpt.get("metrics"), ckpt.get("references")
        self.logged = {k: v for k, v in logged.items() if k not in NOT_METRICS} if isinstance(logged, dict) else {}
        self.references = references if isinstance(references, dict) else {}

    def call(self, fn, *extra):
        """fn(model, args, device, *extra) with data errors turned into one line about this checkpoint."""
        try:
            return fn(self.model, self.args, self.device, *extra)
        except common.DatasetError as e:
            raise EvalError(f"{e} (evaluating {self.path}; --data-root / --dataset point elsewhere)") from None
        except RuntimeError as e:
            if self.args.dataset == self.trained_on:  # the data the model was trained on: a genuine bug
                raise
            raise EvalError(f"{self.path} was trained on {self.trained_on} and cannot run on --dataset "
                            f"{self.args.dataset}: {short(e)}") from None

    def split(self, name):
        out = self.call(lambda model, args, device: self.module.load_data(args, name))
        need(out is not None, f"{self.path}: dataset {self.args.dataset} has no labelled {name} split")
        return out


# ------------------------------------------------------------------------------------------------ embeddings files
def npz_array(data, name, path, rows=None, width=None):
    """Array `name` of an open .npz, checked: float32 [N, D] embeddings, or (rows given) int64 [rows] class ids."""
    try:
        x = np.asarray(data[name])
    except KeyError:
        raise EvalError(f"{path} lacks array '{name}' (expected emb, labels [, train_emb, train_labels]; has "
                        f"{', '.join(data.files) or 'none'})") from None
    except Exception as e:  # only the read is inside: a corrupt or pickled member fails in many ways
        raise EvalError(f"cannot read array '{name}' of {path}: {short(e, 100)}") from None
    kind = x.dtype.kind
    need(x.size, f"{path}: array '{name}' is empty (shape {x.shape})")
    if rows is not None:
        need(x.ndim == 1, f"{path}: '{name}' must be 1-D [N], got shape {x.shape}")
        need(len(x) == rows, f"{path}: '{name}' has {len(x)} entries but '{name[:-6]}emb' has {rows} rows")
        need(kind in "iub" or (kind == "f" and np.isfinite(x).all() and (x == np.round(x)).all()),
             f"{path}: '{name}' must hold integer class ids, got {'non-integer floats' if kind == 'f' else x.dtype}")
        return x.astype(np.int64)
    need(x.ndim == 2, f"{path}: '{name}' must be 2-D [N, D], got shape {x.shape}")
    need(width in (None, x.shape[1]), f"{path}: '{name}' has {x.shape[1]} columns but emb has {width}")
    need(kind in "fiub", f"{path}: '{name}' must be numeric, got dtype {x.dtype}")
    bad = int((~np.isfinite(x.astype(np.float32))).any(1).sum())
    need(not bad, f"{path}: '{name}' has NaN or inf in {bad} of {len(x)} rows")
    return x.astype(np.float32)


def run_embeddings(a):
    """common.retrieval_metrics of an .npz's (emb, labels) and, given train_emb / train_labels, common.knn_metrics."""
    path, device = a.embeddings, pick_device(a.device)
    need(not os.path.isdir(path), f"embeddings file {path} is a folder, not an .npz file")
    need(os.path.isfile(path), f"embeddings file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # only np.load is inside
        raise EvalError(f"cannot read {path}: not an .npz file ({short(e, 100)})") from None
    need(isinstance(data, np.lib.npyio.NpzFile), f"{path} is a single .npy array, not an .npz of arrays (np.savez)")
    with data:
        emb = npz_array(data, "emb", path)
        labels = npz_array(data, "labels", path, len(emb))
        gallery = "train_emb" in data.files or "train_labels" in data.files
        train_emb = npz_array(data, "train_emb", path, width=emb.shape[1]) if gallery else None
        train_labels = npz_array(data, "train_labels", path, len(train_emb)) if gallery else None
    classes, norms = len(np.unique(labels)), np.linalg.norm(emb, axis=1)
    unlabelled = " (every label is -1: unlabelled images)" if (labels < 0).all() else ""
    need(classes > 1, f"{path}: 'labels' has {classes} class{unlabelled}; retrieval metrics need at least 2")
    if a.l2_normalize:
        emb, train_emb = (x if x is None else x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                          for x in (emb, train_emb))
    elif np.abs(norms - 1).max() > 1e-3:
        print(f"note: the rows of emb are not L2-normalised (norms {norms.min():.3g}..{norms.max():.3g}); "
              f"neighbours are by Euclidean distance (--l2-normalize: by cosine)")

    def tensor(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)
    metrics = common.retrieval_metrics(tensor(emb), tensor(labels), with_nmi=not a.no_nmi)
    if gallery:  # k-NN votes index by class id: map the ids in order onto 0..C-1 (same votes, same tie-breaking)
        ids = np.unique(np.concatenate([train_labels, labels]))
        metrics.update(common.knn_metrics(tensor(train_emb), tensor(np.searchsorted(ids, train_labels)), tensor(emb),
                                          tensor(np.searchsorted(ids, labels))))
    report(metrics, a.json or os.path.splitext(path)[0] + "_eval.json")
    return metrics


# ------------------------------------------------------------------------------------------------ retrieval picture
def nearest(query_idx, query_emb, gallery_emb, k, exclude_self):
    """[len(query_idx), k] gallery indices nearest to query_emb[query_idx] (Euclidean; ties to the lower index, as
    common's metrics); exclude_self drops gallery item i for query i (test set = gallery)."""
    q, g = query_emb[query_idx].float(), gallery_emb.float()
    d = torch.addmm((g * g).sum(1)[None, :], q, g.T, alpha=-2)  # ||q - g||^2 - ||q||^2
    if exclude_self:
        d[torch.arange(len(query_idx), device=d.device), query_idx.to(d.device)] = float("inf")
    k = min(k, g.shape[0] - (1 if exclude_self else 0))
    return torch.sort(d, dim=1, stable=True).indices[:, :k]


def tiles(split, indices, tile):
    """PIL tile x tile images of split[indices]: tensors (grey -> RGB; whole-factor upscale unblurred) or files."""
    from PIL import Image, ImageOps
    if split.images is None:
        return [ImageOps.fit(common.open_rgb(split.paths[i]), (tile, tile), Image.BICUBIC) for i in indices.tolist()]
    x = split.images[indices].float() / (255 if split.images.dtype == torch.uint8 else 1)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
    (h, w), crisp = x.shape[-2:], tile % x.shape[-2] == 0 and tile % x.shape[-1] == 0  # 8, 16, 32 px -> 64: crisp
    x = F.interpolate(x, size=(tile, tile), mode="nearest-exact" if crisp else "bilinear",
                      antialias=not crisp and (h > tile or w > tile))
    return [Image.fromarray(im) for im in (x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)]


def show_retrievals(ck, out, test, gallery, a, path):
    """Seeded random test queries to `path`, a row each: [class name | query (grey frame) | its top-k as the metrics
    rank them (isd: in the gallery), framed green (same class), red or (no labels) blue]; cell = tile + 2 frame + 2."""
    from PIL import Image, ImageDraw, ImageFont
    exclude = gallery is None  # the test set is its own gallery: skip the query itself
    gallery, emb, labels = test if exclude else gallery, out["emb"].cpu(), out["labels"].cpu()
    g_emb, g_labels = (emb, labels) if exclude else (out["train_emb"].cpu(), out["train_labels"].cpu())
    assert len(emb) == len(test) and len(g_emb) == len(gallery), f"{ck.method}.embeddings: {len(emb)} / " \
        f"{len(g_emb)} rows for {len(test)} test / {len(gallery)} gallery images (not in load_data order): a bug"
    need(len(g_emb) > exclude, f"{ck.path}: the gallery has no image to retrieve")
    query = torch.randperm(len(emb), generator=torch.Generator().manual_seed(a.seed))[:a.show_retrievals]
    nn = nearest(query, emb, g_emb, a.topk, exclude)
    (n, k), frame, known = nn.shape, max(2, a.tile // 16), bool((labels >= 0).any())
    cell = a.tile + 2 * frame + 2
    canvas = Image.new("RGB", ((k + 3) * cell + 2, 18 + n * cell + 2), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: the fixed bitmap font
        font = small = ImageFont.load_default()
    where = f"query (grey) and its top-{k} {'in the test set' if exclude else 'in the train split'}"
    legends = [f"{where}: green = same class, red = another class", "green = same class, red = other"] if known \
        else [f"{where} (no labels)"]
    draw.text((4, 2), next((t for t in legends if draw.textlength(t, font=small) <= canvas.width - 8), legends[-1]),
              fill="black", font=small)
    for r, y in enumerate(labels[query].tolist()):
        colours = [FRAMES["query"]] + [FRAMES[("same" if s else "other") if known else "neutral"]
                                       for s in g_labels[nn[r]] == y]
        for c, (im, colour) in enumerate(zip(tiles(test, query[r:r + 1], a.tile) + tiles(gallery, nn[r], a.tile),
                                             colours)):
            x, top = (c + 2) * cell + 2, 18 + r * cell + 2
            draw.rectangle((x, top, x + cell - 3, top + cell - 3), fill=colour)
            canvas.paste(im, (x + frame, top + frame))
        name = str(test.classes[y]) if test.classes and 0 <= y < len(test.classes) else f"class {y}" * known
        while len(name) > 1 and draw.textlength(name, font=font) > 2 * cell - 8:
            name = name[:-2] + "\u2026"
        top = 20 + r * cell + (cell - 2) // 2 - 14
        draw.text((4, top), name, fill="black", font=font)
        draw.text((4, top + 16), f"{'test' if known else 'image'} #{int(query[r])}", fill=(90, 90, 90), font=small)
    atomic_write(path, lambda f: canvas.save(f, "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"))
    hits = (g_labels[nn] == labels[query][:, None]).float().mean().item()
    print(f"wrote {path}: {n} queries x top-{k}{f' ({100 * hits:.1f}% same class)' * known}, "
          f"{canvas.width}x{canvas.height} px")


# ------------------------------------------------------------------------------------------------ ISD linear probes
def full_batch_norm(center):
    """eval_linear.py's Normalize + FullBatchNorm: x -> (x / |x| - mean) * inv_std, inv_std = 1 / sqrt(var + 1e-5), mean
    and var (unbiased, torch.var_mean) of the L2-normalised centre-crop train features `center`."""
    var, mean = torch.var_mean(F.normalize(center.float(), dim=1), dim=0)
    inv_std = 1.0 / torch.sqrt(var + 1e-5)
    return lambda x: (F.normalize(x.float(), dim=1) - mean) * inv_std


def linear_probe(train_features, train_labels, test_features, test_labels, epochs, center_features=None,
                 num_classes=None, lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=256, seed=0):
    """eval_linear.py's classifier (shared/notes/isd.md) on train_features [N, D] (cached) or epoch (0-based) -> fresh
    augmented [N, D] (official), center_features (default train_features, a function's epoch 0) for full_batch_norm;
    SGD, seeded order, lr x0.1 at 3/8 and 3/4 of the epochs (15, 30 of 40; epoch 1 always at lr), labels < 0 left out
    -> {"last", "best", "best_epoch" (1-based, chosen on the test set), "history", "lrs"}, accuracies in percent."""
    fetch = train_features if callable(train_features) else (lambda epoch: train_features)
    center = fetch(0) if center_features is None else center_features
    prepare, dev = full_batch_norm(center), center.device
    keep = (train_labels >= 0).to(dev)
    y_train, y_test, test_x = train_labels.to(dev)[keep], test_labels.to(dev), prepare(test_features.to(dev))
    num_classes = num_classes or int(max(y_train.max().item(), y_test.max().item())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(center.shape[1], num_classes).to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, round(epochs * f)) for f in (15 / 40, 30 / 40)], 0.1)
    order_gen, history, lrs = torch.Generator().manual_seed(seed), [], []
    for epoch in range(epochs):
        x = prepare(fetch(epoch).to(dev))[keep]
        lrs.append(opt.param_groups[0]["lr"])
        for idx in torch.randperm(len(x), generator=order_gen).to(dev).split(batch_size):
            loss = F.cross_entropy(head(x[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            history.append(100 * common.topk_accuracy(head(test_x), y_test, ks=(1,))[1])
    best = max(range(epochs), key=lambda e: history[e])
    return {"last": history[-1], "best": history[best], "best_epoch": best + 1, "history": history, "lrs": lrs}


def isd_linear_probe(ck, mode, epochs, seed, fraction=None):
    """ISD's linear layer on the frozen backbone (eval_linear.py) -> {"linear", "linear_best", "linear_best_epoch"}
    (official: seed + epoch seeds each epoch's augmented train features) or {"linear_cached", ...}; fraction 1 | 10
    (Table 3, "linear_1pct" ...): on SimCLR's ImageNet subset only (epochs: neither paper nor code says), val scored."""
    train, test = ([common.load_split("imagenet", ck.args.data_root, s) for s in (f"train_{fraction}pct", "val")]
                   if fraction else [ck.split("gallery"), ck.split("test")])  # the run's own: EvalError if unlabelled
    (center, train_y), (test_x, test_y) = (ck.call(ck.module.features, split, False) for split in (train, test))
    need(bool((train_y >= 0).any() and (test_y >= 0).any()), f"{ck.path}: --linear-probe needs labelled data")

    def augmented(epoch):
        torch.manual_seed(seed + epoch)
        return ck.call(ck.module.features, train, True)[0]
    name = ("linear" if mode == "official" else "linear_cached") + (f"_{fraction}pct" if fraction else "")
    print(f"linear probe ({mode}): {epochs} epochs, {len(center)} train / {len(test_x)} test images")
    out = linear_probe(augmented if mode == "official" else center, train_y, test_x, test_y, epochs,
                       center_features=center, seed=seed)  # num_classes: from the labels
    return {name: out["last"], f"{name}_best": out["best"], f"{name}_best_epoch": out["best_epoch"]}


OWN_VAL = ("aircraft", "dtd", "flowers102")  # BYOL App. D.1: the creators' validation split, else held out of train:
HELD_OUT = {"sun397": 10, "pets": 20, "caltech101": 5, "food101": 75,  # per class (D.1; Food-101: Table 10's 7,575)
            "stanfordcars": 0.2}  # of each class (Table 10: 1,650 of 8,144); other datasets: 10% of each class
TRANSFER = OWN_VAL + tuple(HELD_OUT)  # ISD Table 2 (+ BYOL's Aircraft) besides CIFAR: for --linear-probe --dataset
MEAN_PER_CLASS = ("aircraft", "pets", "caltech101", "flowers102")  # BYOL Table 10; top-1 for the others
L2_GRID = np.logspace(-6, 5, 45)  # BYOL App. D.2


def accuracy(pred, labels, per_class=False):
    """Top-1 in percent, or (per_class) the mean over the classes present of each class's top-1 (BYOL Table 10)."""
    hit, (ids, which) = (pred == labels).float(), labels.unique(return_inverse=True)
    per = torch.zeros(len(ids), device=hit.device).index_add_(0, which, hit) / which.bincount()
    return 100 * (per if per_class else hit).mean().item()


def logistic_regression(x, y, l2, num_classes, start=None, max_iter=1000):
    """(W [C, D], b [C]) minimising mean CE(x W^T + b, y) + l2 / 2 ||W||^2 (scikit-learn's LogisticRegression, C = 1 /
    (l2 N)) by full-batch L-BFGS (max_iter ours) from `start` (default 0): convex, W unique: the start saves time."""
    start = start or (x.new_zeros(num_classes, x.shape[1]), x.new_zeros(num_classes))
    w, b = (t.clone().requires_grad_() for t in start)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(torch.addmm(b, x, w.T), y) + l2 / 2 * w.square().sum()
        loss.backward()
        return loss
    opt.step(objective)
    return w.detach(), b.detach()


def select_l2(train, val, num_classes, per_class, grid=L2_GRID):
    """Fits on train per l2, strongest first, each from the last -> (best l2 on val (ties: stronger), fit, scores)."""
    scores, best, fit = {}, None, None
    for l2 in sorted(map(float, grid), reverse=True):
        fit = logistic_regression(*train, l2, num_classes, fit)
        scores[l2] = accuracy(torch.addmm(fit[1], val[0], fit[0].T).argmax(1), val[1], per_class)
        best = (l2, fit) if best is None or scores[l2] > scores[best[0]] else best
    return (*best, scores)


def held_out(labels, share, seed):
    """A seeded bool mask of `share` images of each class (a count, or a fraction of the class when < 1)."""
    g, mask = torch.Generator().manual_seed(seed), torch.zeros(len(labels), dtype=torch.bool)
    for idx in (torch.nonzero(labels == c).squeeze(1) for c in labels.unique().tolist()):
        mask[idx[torch.randperm(len(idx), generator=g)[:share if share >= 1 else round(share * len(idx))]]] = True
    return mask


def transfer_probe(ck, dtd_split, seed):
    """ISD Table 2 ("we follow [BYOL] setting"), BYOL App. D.2 / Kornblith et al. 2019: logistic regression on the
    unaugmented centre crop's features (files: shorter side to --image-size, bicubic, ImageNet mean / std; SimCLR B.8),
    its l2 the best of L2_GRID on validation data (OWN_VAL, else HELD_OUT of train), refit on train + validation, scored
    once on test (MEAN_PER_CLASS, else top-1). Ours: no feature scaling, in-memory images resized whole (bicubic, own
    mean / std). Deviations: CIFAR, Cars hold out part of each class (BYOL: 5,000 / 5,067 / 1,650 random images); a
    CIFAR-sized run is probed at its own size (BYOL: 224 px) -> {"linear_<name>": %, "linear_<name>_l2": l2}."""
    from torchvision import transforms as T
    name, root, size = ck.args.dataset, ck.args.data_root, ck.args.image_size  # files: BYOL App. D.2, SimCLR B.8
    files = T.Compose([T.Resize(size, T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                       T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])

    def features(split):  # of the centre crop, unaugmented; DTD: the official split --dtd-split of 10
        data = common.load_split(name, root, f"{split}{dtd_split if name == 'dtd' else ''}", channels=3)
        return ck.call(ck.module.features, data, False, files if data.images is None else lambda u: common.normalize(
            u if u.shape[-1] == size else F.interpolate(u / 255.0, (size, size), mode="bicubic", antialias=True)
            .clamp(0, 1), data.mean, data.std))
    (x, y), (tx, ty) = features("train"), features("test")
    held = None if name in OWN_VAL else held_out(y.cpu(), HELD_OUT.get(name, 0.1), seed).to(y.device)
    (x, y), (vx, vy) = ((x, y), features("val")) if held is None else ((x[~held], y[~held]), (x[held], y[held]))
    need(len(y) and len(vy) and y.min() >= 0, f"--dataset {name}: too few labelled train images to hold some out")
    per_class, classes = name in MEAN_PER_CLASS, int(max(y.max(), vy.max(), ty.max())) + 1
    l2, fit, scores = select_l2((x, y), (vx, vy), classes, per_class)
    w, b = logistic_regression(torch.cat([x, vx]), torch.cat([y, vy]), l2, classes, fit)
    print(f"linear transfer to {name}: {len(y)} train + {len(vy)} validation images (l2 {l2:.1e}: {scores[l2]:.2f}%), "
          f"{len(ty)} test images; {'mean per-class accuracy' if per_class else 'top-1'}")
    return {f"linear_{name}": accuracy(torch.addmm(b, tx, w.T).argmax(1), ty, per_class), f"linear_{name}_l2": l2}


# ------------------------------------------------------------------------------------------------ curves
def plot_curves(run, out=None):
    """A run's metrics.jsonl curves, a panel per metric family (PANELS), to `out` (default: curves.png in the run)."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    out = out or os.path.join(os.path.dirname(path) or ".", "curves.png")
    need(os.path.exists(run), f"--plot {run}: no such run folder")
    need(os.path.isfile(path), f"--plot {run}: no metrics.jsonl in it (a run folder holds one once it has evaluated)")
    rows = []
    try:
        with open(path) as f:
            for i, line in ((i, line) for i, line in enumerate(f, 1) if line.strip()):
                rows.append(json.loads(line))
                need(isinstance(rows[-1], dict), f"{path} line {i}: not a metrics row (not a JSON object)")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read {path} ({short(e, 80)})") from None
    except ValueError as e:  # json.loads
        raise EvalError(f"{path} line {i}: not a metrics row ({short(e, 80)})") from None
    need(rows, f"{path} is empty: the run has not evaluated yet")
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise EvalError("--plot needs matplotlib (pip install matplotlib)") from None
    series, panels = {}, {}
    for r, row in enumerate(rows):
        x = row.get("epoch", r + 1)
        for k, v in row.items() if isinstance(x, (int, float)) else ():
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, []).append((x, v))
    need(series, f"{path} has no metric columns to plot")
    for name in series:  # teacher/<metric> beside <metric>
        base = name.removeprefix("teacher/")
        panels.setdefault(next((p for rx, p in PANELS.items() if re.fullmatch(rx, base)), base), []).append(name)
    cols = min(3, len(panels))
    fig = Figure(figsize=(4.6 * cols, 3.3 * math.ceil(len(panels) / cols)), constrained_layout=True)
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    for ax, (panel, names) in zip(axes, panels.items()):
        bases = list(dict.fromkeys(n.removeprefix("teacher/") for n in names))
        for name in names:  # a teacher's curve: dashed, in its student metric's colour
            ax.plot(*zip(*series[name]), "--" if name.startswith("teacher/") else "-", marker="o", markersize=3,
                    label=name, color=f"C{bases.index(name.removeprefix('teacher/')) % 10}")
        ax.set(title=panel, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(path))) + " (metrics.jsonl, test-set metrics in %)")
    atomic_write(out, lambda f: fig.savefig(f, dpi=100, format=os.path.splitext(out)[1][1:].lower()))
    print(f"wrote {out}: {len(series)} metrics of {len(rows)} evaluations in {len(panels)} panels")


# ------------------------------------------------------------------------------------------------ command line
def cell(v):  # a table entry: a number to 2 decimals, a boolean ("collapsed") as COLLAPSED / no, else -
    return ("COLLAPSED" if v else "no") if isinstance(v, bool) else f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def report(metrics, path, logged=None, notes=None):
    """The metrics beside the logged ones (a table on stdout), then atomically to `path` as JSON."""
    logged, notes = logged or {}, notes or {}
    print(f"{'metric':<24}{'eval.py':>10}{'run log':>10}{'diff':>10}")
    for name, value, ref in ((k, v, logged.get(k)) for k, v in metrics.items() if not k.endswith(("epoch", "_l2"))):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, ref))
        diff = "=" if value == ref else f"{value - ref:+.2g}" if numbers else ""
        print(f"{name:<24}{cell(value):>10}{cell(ref):>10}{diff:>10}{notes.get(name, '')}")
    atomic_write(path, lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))
    print(f"wrote {path}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's complaints: one line and exit 2, like every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def get_args(argv):
    p = Parser(description="Evaluate a checkpoint of s2sd / camd / spkd / isd or an embeddings file; draw pictures.")
    p.add_argument("checkpoint", nargs="?", help="a run's model.pt (or its folder)",
                   type=lambda path: os.path.join(path, "model.pt") if os.path.isdir(path) else path)
    p.add_argument("--embeddings", metavar="FILE.npz", help="evaluate arrays emb, labels [, train_emb, train_labels]")
    p.add_argument("--plot", metavar="RUN", help="draw runs/<run>/metrics.jsonl (needs matplotlib) to --out")
    p.add_argument("--dataset", choices=list(dict.fromkeys(common.DATASETS + TRANSFER)), help="evaluate on another "
                   "dataset than the saved one (--linear-probe: the linear transfer to it)")
    p.add_argument("--data-root", help="where the data are now (default: the saved --data-root)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="default auto")
    p.add_argument("--workers", type=int, help="DataLoader workers for image files (default: the saved value)")
    p.add_argument("--export", metavar="FILE.npz", help="write the evaluated embeddings (+ test image paths) there")
    p.add_argument("--show-retrievals", type=int, metavar="N", help="draw N random test queries and their top-k")
    p.add_argument("--topk", type=int, default=8, help="neighbours per query in the picture (default 8)")
    p.add_argument("--tile", type=int, default=64, help="pixels per image in the picture (default 64, at least 16)")
    p.add_argument("--linear-probe", nargs="?", const="official", choices=["official", "cached"],
                   help="isd: the linear protocol (official: augmented features each epoch; cached: fast)")
    p.add_argument("--probe-epochs", type=int, help="linear probe epochs (default: the checkpoint's probe_epochs)")
    p.add_argument("--label-fraction", type=int, choices=[1, 10], help="imagenet: the probe on a 1%% or 10%% subset")
    p.add_argument("--dtd-split", type=int, choices=range(1, 11), help="--dataset dtd: the official split (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the picture's queries and the probe (default 0)")
    p.add_argument("--no-nmi", action="store_true", help="--embeddings: skip NMI (k-means)")
    p.add_argument("--l2-normalize", action="store_true", help="--embeddings: L2-normalise the rows (rank by cosine)")
    p.add_argument("--json", metavar="FILE", help="metrics JSON (default: eval.json / <name>_eval.json beside input)")
    p.add_argument("--out", metavar="FILE", help="the picture of --show-retrievals (.png/.jpg; default "
                   "retrievals.png beside the checkpoint) or --plot (.png/.pdf/.svg; default curves.png in the run)")
    a = p.parse_args(argv)
    for flag, low in dict(workers=0, show_retrievals=1, topk=1, tile=16, probe_epochs=1, seed=0).items():
        if getattr(a, flag) is not None and getattr(a, flag) < low:
            p.error(f"argument --{flag.replace('_', '-')}: must be >= {low}, got {getattr(a, flag)}")
    modes = [m for m, v in (("CHECKPOINT", a.checkpoint), ("--embeddings", a.embeddings), ("--plot", a.plot)) if v]
    orphans = [f"--{k.replace('_', '-')}" for k in ("dataset", "data_root", "workers", "export", "show_retrievals",
               "linear_probe", "probe_epochs", "label_fraction", "dtd_split") if getattr(a, k) is not None]
    allowed = (".png", ".pdf", ".svg", ".jpg", ".jpeg") if a.plot is not None else (".png", ".jpg", ".jpeg")
    for bad, message in (
            (len(modes) != 1, f"give exactly one of CHECKPOINT, --embeddings FILE or --plot RUN (got "
                              f"{' and '.join(modes) or 'none'})"),
            (a.checkpoint is None and orphans, f"{', '.join(orphans)} needs a CHECKPOINT"),
            (a.embeddings is None and (a.no_nmi or a.l2_normalize), "--no-nmi / --l2-normalize are for --embeddings"),
            (a.out is not None and a.plot is None and a.show_retrievals is None,
             "--out names a picture (--show-retrievals, --plot); the metrics JSON goes to --json"),
            (a.plot is not None and a.json is not None, "--plot writes no metrics; drop --json"),
            (a.label_fraction and not a.linear_probe, "--label-fraction trains the linear probe: add --linear-probe"),
            (a.label_fraction and a.dataset not in (None, "imagenet"), "--label-fraction: ImageNet's; drop --dataset"),
            (a.dtd_split and (a.dataset != "dtd" or not a.linear_probe), "--dtd-split is for --linear-probe on dtd"),
            (a.out is not None and not a.out.lower().endswith(allowed), f"--out {a.out}: use a {' / '.join(allowed)} "
                                                                        f"file name")):
        if bad:
            p.error(message)
    return a


def run_checkpoint(a):
    """A checkpoint's metrics (+ --linear-probe) beside the logged ones, --export, --show-retrievals; eval.json."""
    ck, folder = Checkpoint(a), os.path.dirname(os.path.abspath(a.checkpoint))
    name, ssl = ck.args.dataset, hasattr(ck.module, "features")  # ssl: ISD, evaluated by k-NN and linear probes
    transfer = a.linear_probe and name != ck.trained_on  # Table 2 (and no evaluation on the training data)
    for bad, message in (
            (a.linear_probe and not ssl, f"--linear-probe: ISD's protocol; {a.checkpoint} is a {ck.method} checkpoint"),
            (a.label_fraction and ck.trained_on != "imagenet", f"--label-fraction: ImageNet's; a {ck.trained_on} run"),
            (ssl and name in ("cub", "cars", "sop"), f"--dataset {name}: its test classes are not its training classes"
                                                     f" (DML), and ISD's k-NN and linear probes need the same classes"),
            (transfer and (a.linear_probe != "official" or a.probe_epochs is not None),
             f"--dataset {name}: the linear transfer is BYOL's L-BFGS protocol, without 'cached' and --probe-epochs"),
            (name in TRANSFER and not transfer and name != ck.trained_on, f"--dataset {name}: " + ("add --linear-probe "
             "(ISD's linear transfer)" if ssl else f"ISD's transfer; {a.checkpoint} evaluates on its own data only"))):
        need(not bad, message)
    print(f"{a.checkpoint}: {ck.method}, dataset {name} ({ck.args.data_root}), device {ck.device}")
    metrics, notes = (transfer_probe(ck, a.dtd_split or 1, a.seed) if transfer else ck.call(ck.module.evaluate)), {}
    if not metrics:
        print(f"note: {ck.method}.evaluate gives no metrics on {ck.args.dataset} (no labelled test split)")
    if a.linear_probe and not transfer:
        probe = isd_linear_probe(ck, a.linear_probe, a.probe_epochs or ck.args.probe_epochs, a.seed, a.label_fraction)
        metrics.update(probe)
        best = next(k for k in probe if k.endswith("_best"))
        notes[best] = f"  (epoch {probe[best + '_epoch']}, chosen on the test set)"
    if a.export or a.show_retrievals:
        out = ck.call(ck.module.embeddings)
        if out:
            test, gallery = ck.split("test"), (ck.split("gallery") if "train_emb" in out else None)
        else:  # no labelled test split (isd on a flat folder): the gallery's backbone features, its labels or -1
            emb, labels = ck.call(ck.module.features, "train")
            out, test, gallery = {"emb": F.normalize(emb, dim=1), "labels": labels}, ck.split("gallery"), None
    if a.export:  # + image paths of file datasets, class names
        arrays = {k: v.detach().cpu().numpy() for k, v in out.items() if torch.is_tensor(v)}
        arrays.update({key: np.array([os.path.abspath(p) for p in split.paths]) for key, split in
                       (("paths", test), ("train_paths", gallery)) if split is not None and split.paths is not None})
        arrays.update({"classes": np.array([str(c) for c in test.classes])} if test.classes else {})
        atomic_write(a.export, lambda f: np.savez(f, **arrays))
        print(f"wrote {a.export} ({', '.join(f'{k} {tuple(v.shape)}' for k, v in arrays.items())})")
    if a.show_retrievals:
        show_retrievals(ck, out, test, gallery, a, a.out or os.path.join(folder, "retrievals.png"))
    for label, ref in ck.references.items():
        print(f"{label} (logged): " + "  ".join(f"{k} {cell(v)}" for k, v in ref.items() if cell(v) != "-"))
    report(metrics, a.json or os.path.join(folder, "eval.json"), ck.logged, notes)
    return metrics


def main(argv=None):
    """The metrics (a dict) of a checkpoint or embeddings file; bad input: one line, exit 2; Ctrl-C: exit 130."""
    a, tf32 = get_args(argv), (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 (cuDNN's default: TF32)
    try:
        if a.plot is not None:
            return plot_curves(a.plot, a.out) or {}
        return run_checkpoint(a) if a.checkpoint is not None else run_embeddings(a)
    except (EvalError, common.DatasetError,  # and the RunError of each method file loaded by then:
            *(getattr(sys.modules.get(m), "RunError", EvalError) for m in METHODS)) as e:  # a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    finally:  # a caller in Python gets its own settings back
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is a KeyboardInterrupt for main()
    main()
