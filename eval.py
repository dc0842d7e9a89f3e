"""Evaluate a checkpoint of any method script, or a file of embeddings; draw retrievals or a run's curves.

    python eval.py runs/<run>/model.pt                        # the run's metrics, recomputed, beside the logged ones
    python eval.py runs/<run>/model.pt --data-root /data      # data moved since training (also --dataset, --device)
    python eval.py runs/<run>/model.pt --export emb.npz       # + the evaluated embeddings (and image paths)
    python eval.py runs/<run>/model.pt --show-retrievals 8    # + a picture of 8 queries and their top-k neighbours
    python eval.py runs/<run>/model.pt --linear-probe         # ISD: + the official linear protocol (--linear-probe cached)
    python eval.py --embeddings emb.npz                       # arrays emb, labels [, train_emb, train_labels]
    python eval.py --plot runs/<run> --out curves.png         # metrics.jsonl curves (needs matplotlib)

Metrics go to eval.json next to the checkpoint (--json elsewhere). Bad input (a missing, corrupt, foreign or edited
file, data that moved or do not fit the model, flags that do not go together) gives one line and exit code 2.

The eval contract. model.pt (torch.load(weights_only=True)) is {"method": "s2sd" | "camd" | "spkd" | "isd", "args":
{resolved arguments}, "model": state_dict, "metrics": {final metrics}, "history": [metrics.jsonl rows]}; the module it
names (one of the four files next to eval.py; nothing else is imported) has
    METHOD, RunError, get_args(argv)   its name, its bad-input error; vars(get_args([])) names every argument
    model_from_args(args)              -> nn.Module whose state_dict is "model" (strict load; never downloads)
    load_data(args, split)             -> common.Split of "test" (isd also "gallery", the k-NN gallery)
    embeddings(model, args, device)    -> {"emb" [N, D] the evaluated test embeddings in load_data order, "labels";
                                          isd also "train_emb" / "train_labels" (the gallery) and teacher_*; camd /
                                          spkd "logits"}
    evaluate(model, args, device)      -> {metric: percent}, the function the training loop calls, so the numbers
                                          here equal the logged ones
    features(model, args, device, split, augment=False)   isd: backbone features of "train" / "test" for the probe
--export writes embeddings()' arrays (+ paths of file datasets, class names); read back with --embeddings they give
the checkpoint's embedding metrics (common.retrieval_metrics / knn_metrics, the scripts' own functions).
Retrieval pictures rank neighbours as the metrics do (query excluded by index, ties to the lower index; isd: the
gallery). Linear probe (ISD eval_linear.py, shared/notes/isd.md): frozen backbone in eval mode; every epoch fresh
augmented train features (features(augment=True) after manual_seed(--seed + epoch)), L2-normalised, standardised
with the centre-crop train features' mean / std (computed once); Linear(D, C), SGD lr 0.01, momentum 0.9, wd 1e-4,
batch 256, args.probe_epochs epochs (40 on ImageNet), lr x0.1 at 15/40 and 30/40 of them. "linear" = last epoch
(the headline), "linear_best" = best epoch, chosen on the test set. "cached": centre-crop features once (fast; not
the paper's protocol).
"""
import argparse
import importlib
import json
import math
import os
import pickle
import re
import sys
import zipfile
import zlib

import numpy as np
import torch
import torch.nn.functional as F

import common

METHODS = ("s2sd", "camd", "spkd", "isd")
IMAGE_OUT = (".png", ".jpg", ".jpeg")
PLOT_OUT = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
NOT_METRICS = ("epoch", "step", "elapsed_s", "images_per_s")  # metrics.jsonl bookkeeping columns


class EvalError(Exception):
    """Bad input; main() prints the message as one line and exits with code 2."""


def short(e, limit=160):
    """The first line of an exception's message (or its type), at most `limit` characters."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def pick_device(name):
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not mps):
        raise EvalError(f"--device {name}: there is no such device on this machine; use --device cpu (or auto)")
    return torch.device(name)


def atomic_write(path, write):
    """write(file object) into path.tmp<pid>, then rename: a crash never leaves half a file. EvalError if unwritable."""
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


def write_json(obj, path):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


# ------------------------------------------------------------------------------------------------ checkpoints
def read_checkpoint(path):
    """The checkpoint dict, checked: EvalError naming the file and what is wrong with it."""
    if os.path.isdir(path):
        hint = next((f" (did you mean {os.path.join(path, n)}?)" for n in ("model.pt", "last.pt")
                     if os.path.isfile(os.path.join(path, n))), "")
        raise EvalError(f"checkpoint {path} is a folder, not a file{hint}")
    if not os.path.isfile(path):
        raise EvalError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise EvalError(f"checkpoint {path} is empty (0 bytes): an interrupted copy? Use the run's model.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EvalError(f"cannot read checkpoint {path}: not a tensors-only checkpoint of this repository, or corrupt "
                        f"({short(e, 80)})") from None
    except Exception as e:  # only torch.load is inside: a truncated or foreign file fails in many ways
        raise EvalError(f"cannot read checkpoint {path}: truncated or not a torch checkpoint "
                        f"({short(e, 100)})") from None
    if not isinstance(ckpt, dict):
        raise EvalError(f"{path} is not a checkpoint of this repository (a {type(ckpt).__name__}, expected a dict "
                        f"with method, args, model: a training script's model.pt)")
    missing = [k for k in ("method", "args", "model") if k not in ckpt]
    if missing:
        bare = ckpt and all(torch.is_tensor(v) for v in ckpt.values())
        raise EvalError(f"{path} is not a checkpoint of this repository: it lacks {', '.join(missing)}"
                        + (" (it looks like a bare state_dict)" if bare else "") + "; give a run's model.pt")
    return ckpt


def method_module(ckpt, path):
    """The method file named by the checkpoint; only the four scripts next to eval.py are ever imported."""
    method = ckpt["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise EvalError(f"{path} names method {method!r}, which is not one of {', '.join(METHODS)}")
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(method)


def checkpoint_args(ckpt, module, path):
    """argparse.Namespace of the saved arguments, checked: a dict holding every argument the method has today."""
    saved, method = ckpt["args"], module.METHOD
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise EvalError(f"{path}: 'args' is a {type(saved).__name__}, not a dict of argument names; "
                        f"not a checkpoint written by {method}.py")
    missing = sorted(set(vars(module.get_args([]))) - set(saved))
    if missing:
        raise EvalError(f"{path} lacks the argument{'s' if len(missing) > 1 else ''} {', '.join(missing[:6])}"
                        f"{' ...' if len(missing) > 6 else ''}: written by a different version of {method}.py")
    return argparse.Namespace(**saved)


def build_model(module, args, ckpt, path):
    """model_from_args + a strict load of the saved weights; EvalError naming what does not fit."""
    method = module.METHOD
    try:
        model = module.model_from_args(args)
    except module.RunError as e:
        raise EvalError(f"{path}: its arguments do not build a {method} model: {e}") from None
    except AttributeError as e:
        if getattr(e, "obj", None) is not args:  # not a missing argument: a bug, show it
            raise
        raise EvalError(f"{path} lacks the argument {e.name}, which {method}.model_from_args needs: written by a "
                        f"different version of {method}.py") from None
    state, own = ckpt["model"], model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise EvalError(f"{path}: 'model' is not a state_dict (a dict of tensors)")
    bad = {"missing": [k for k in own if k not in state], "unexpected": [k for k in state if k not in own],
           "mis-shaped": [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)} here" for k in own
                          if k in state and state[k].shape != own[k].shape]}
    if any(bad.values()):
        hint = " (a last.pt holds the training network; use the run's model.pt)" if "optimizer" in ckpt else ""
        raise EvalError(f"weights in {path} do not fit the {method} model rebuilt from its arguments: " + ", ".join(
            f"{len(v)} {what} (e.g. {v[0]})" for what, v in bad.items() if v) + hint)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied
        raise EvalError(f"weights in {path} do not fit the {method} model rebuilt from its arguments: "
                        f"{short(e)}") from None
    return model


class Checkpoint:
    """A checked checkpoint: its module, arguments (with the overrides), rebuilt model on the device."""

    def __init__(self, path, dataset=None, data_root=None, workers=None, device="auto"):
        self.path = path
        ckpt = read_checkpoint(path)
        self.module = method_module(ckpt, path)
        self.method = self.module.METHOD
        self.args = checkpoint_args(ckpt, self.module, path)
        self.trained_on = self.args.dataset
        if dataset == "synthetic" and self.trained_on != "synthetic":
            raise EvalError(f"--dataset synthetic: random images for benchmarks, nothing to evaluate {path} on")
        for key, value in (("dataset", dataset), ("data_root", data_root), ("workers", workers)):
            if value is not None:
                setattr(self.args, key, value)
        self.device = pick_device(device)
        self.args.device = self.device.type
        self.model = build_model(self.module, self.args, ckpt, path).to(self.device)
        self.model.eval()
        logged = ckpt.get("metrics")
        self.logged = {k: v for k, v in logged.items() if k not in NOT_METRICS} if isinstance(logged, dict) else {}
        self.references = ckpt.get("references") if isinstance(ckpt.get("references"), dict) else {}

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
        try:
            out = self.module.load_data(self.args, name)
        except common.DatasetError as e:
            raise EvalError(f"{e} (evaluating {self.path}; --data-root / --dataset point elsewhere)") from None
        if out is None:
            raise EvalError(f"{self.path}: dataset {self.args.dataset} has no labelled {name} split")
        return out

    def evaluate(self):
        return self.call(self.module.evaluate)

    def embeddings(self):
        out = self.call(self.module.embeddings)
        if not out:
            raise EvalError(f"{self.path}: {self.method}.embeddings gives nothing on dataset {self.args.dataset} "
                            f"(no labelled test split)")
        return out


# ------------------------------------------------------------------------------------------------ embeddings files
def _array(data, name, path):
    try:
        return np.asarray(data[name])
    except KeyError:
        raise EvalError(f"{path} lacks array '{name}' (expected emb, labels [, train_emb, train_labels]; has "
                        f"{', '.join(data.files) or 'none'})") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise EvalError(f"cannot read array '{name}' of {path}: {short(e, 100)}") from None


def _embedding_array(x, name, path, width=None):
    if x.size == 0:
        raise EvalError(f"{path}: array '{name}' is empty (shape {x.shape})")
    if x.ndim != 2:
        raise EvalError(f"{path}: '{name}' must be 2-D [N, D], got shape {x.shape}")
    if width is not None and x.shape[1] != width:
        raise EvalError(f"{path}: '{name}' has {x.shape[1]} columns but emb has {width}; both must come from the "
                        f"same model")
    if x.dtype.kind not in "fiub":
        raise EvalError(f"{path}: '{name}' must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise EvalError(f"{path}: '{name}' has NaN or inf in {bad} of {len(x)} rows")
    return x


def _label_array(y, name, path, n, of):
    if y.size == 0:
        raise EvalError(f"{path}: array '{name}' is empty (shape {y.shape})")
    if y.ndim != 1:
        raise EvalError(f"{path}: '{name}' must be 1-D [N], got shape {y.shape}")
    if len(y) != n:
        raise EvalError(f"{path}: '{name}' has {len(y)} entries but '{of}' has {n} rows")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise EvalError(f"{path}: '{name}' must hold integer class ids, got non-integer floats (e.g. "
                            f"{y[(~np.isfinite(y)) | (y != np.round(y))][0]})")
    elif y.dtype.kind not in "iub":
        raise EvalError(f"{path}: '{name}' must hold integer class ids, got dtype {y.dtype}")
    return y.astype(np.int64)


def read_embeddings(path, l2_normalize=False):
    """(emb, labels, train_emb or None, train_labels or None) as checked numpy arrays."""
    if os.path.isdir(path):
        raise EvalError(f"embeddings file {path} is a folder, not an .npz file")
    if not os.path.isfile(path):
        raise EvalError(f"embeddings file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise EvalError(f"cannot read {path}: not an .npz file ({short(e, 100)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise EvalError(f"{path} is a single .npy array, not an .npz archive with emb and labels (np.savez)")
    with data:
        emb = _embedding_array(_array(data, "emb", path), "emb", path)
        labels = _label_array(_array(data, "labels", path), "labels", path, len(emb), "emb")
        train = None
        if "train_emb" in data.files or "train_labels" in data.files:
            train_emb = _embedding_array(_array(data, "train_emb", path), "train_emb", path, emb.shape[1])
            train = train_emb, _label_array(_array(data, "train_labels", path), "train_labels", path, len(train_emb),
                                            "train_emb")
    if len(np.unique(labels)) < 2:
        raise EvalError(f"{path}: 'labels' has {len(np.unique(labels))} class; retrieval metrics need at least 2")
    if l2_normalize:
        def unit(x):
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        emb, train = unit(emb), None if train is None else (unit(train[0]), train[1])
    else:
        norms = np.linalg.norm(emb, axis=1)
        if np.abs(norms - 1).max() > 1e-3:
            print(f"note: the rows of emb are not L2-normalised (norms {norms.min():.3g}..{norms.max():.3g}); "
                  f"neighbours are by Euclidean distance (--l2-normalize: by cosine)")
    return emb, labels, *(train or (None, None))


def embedding_metrics(emb, labels, train_emb=None, train_labels=None, device="cpu", with_nmi=True):
    """common.retrieval_metrics of (emb, labels) and, given a gallery, common.knn_metrics, on numpy arrays."""
    t = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)).to(device)
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(device)
    metrics = common.retrieval_metrics(t, y, with_nmi=with_nmi)
    if train_emb is not None:
        # k-NN votes index by class id: map the ids in order onto 0..C-1 (same votes, same tie-breaking)
        ids = np.unique(np.concatenate([train_labels, labels]))
        g = torch.from_numpy(np.ascontiguousarray(train_emb, dtype=np.float32)).to(device)
        gy = torch.from_numpy(np.searchsorted(ids, train_labels)).to(device)
        metrics.update(common.knn_metrics(g, gy, t, torch.from_numpy(np.searchsorted(ids, labels)).to(device)))
    return metrics


def export_embeddings(ck, out, path):
    """module.embeddings' arrays (+ test image paths, class names) as an .npz that --embeddings reads back."""
    arrays = {k: v.detach().cpu().numpy() for k, v in out.items() if torch.is_tensor(v)}
    test = ck.split("test")
    if test.paths is not None:
        arrays["paths"] = np.array([os.path.abspath(p) for p in test.paths])
    if "train_emb" in out:
        gallery = ck.split("gallery")
        if gallery.paths is not None:
            arrays["train_paths"] = np.array([os.path.abspath(p) for p in gallery.paths])
    if test.classes:
        arrays["classes"] = np.array([str(c) for c in test.classes])
    atomic_write(path, lambda f: np.savez(f, **arrays))
    print(f"wrote {path} ({', '.join(f'{k} {tuple(v.shape)}' for k, v in arrays.items())})")


# ------------------------------------------------------------------------------------------------ retrieval picture
def nearest(query_idx, query_emb, gallery_emb, k, exclude_self):
    """[len(query_idx), k] gallery indices nearest to query_emb[query_idx], by Euclidean distance, ties to the lower
    index (common's metrics order); exclude_self drops gallery item i for query i (test set = gallery)."""
    q, g = query_emb[query_idx].float(), gallery_emb.float()
    d = torch.addmm((g * g).sum(1)[None, :], q, g.T, alpha=-2)  # ||q - g||^2 - ||q||^2
    if exclude_self:
        d[torch.arange(len(query_idx), device=d.device), query_idx.to(d.device)] = float("inf")
    k = min(k, g.shape[0] - (1 if exclude_self else 0))
    return torch.sort(d, dim=1, stable=True).indices[:, :k]


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tile_images(split, indices, tile):
    """float [len(indices), 3, tile, tile] in [0, 1]: tensor images (grey -> RGB; upscaled by a whole factor without
    blur, else bilinear, antialiased when shrinking) or image files (centre square, resized)."""
    out = []
    if split.images is not None:
        x = split.images[indices].float() / 255 if split.images.dtype == torch.uint8 else split.images[indices].float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        h, w = x.shape[-2:]
        if tile % h == 0 and tile % w == 0:  # 8, 16, 32 px -> 64: crisp pixels
            return F.interpolate(x, size=(tile, tile), mode="nearest-exact")
        return F.interpolate(x, size=(tile, tile), mode="bilinear", antialias=h > tile or w > tile,
                             align_corners=False).clamp(0, 1)
    from PIL import Image, ImageOps
    for i in indices.tolist():
        path = split.paths[i]
        try:
            with Image.open(path) as im:
                im = ImageOps.fit(im.convert("RGB"), (tile, tile), Image.BICUBIC)
        except (OSError, SyntaxError, ValueError) as e:
            raise common.DatasetError(f"unreadable image {path} ({short(e, 80)}); delete or replace it") from None
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def _framed(images, colors, frame):
    """images [B, 3, T, T] inside a `frame`-px border of colors [B, 3] -> [B, 3, T + 2 frame, T + 2 frame]."""
    b, _, t, _ = images.shape
    out = colors[:, :, None, None].expand(b, 3, t + 2 * frame, t + 2 * frame).clone()
    out[:, :, frame:frame + t, frame:frame + t] = images
    return out


RETRIEVAL_COLORS = {"query": (0.55, 0.55, 0.55), "same": (0.10, 0.70, 0.15), "other": (0.85, 0.10, 0.10)}


def retrieval_grid(query_split, gallery_split, query_idx, neighbours, query_labels, gallery_labels, tile=64,
                   gallery_name="in the test set"):
    """The picture as float [3, H, W]: per query a row [class name | query (grey frame) | its k neighbours, framed
    green (same class) or red]; a legend line on top. H = 18 + n (cell + 2) + 2, W = 2 (cell + 2) + (k + 1) (cell + 2)
    + 2 with cell = tile + 2 frame, frame = max(2, tile // 16)."""
    import torchvision.utils as vutils
    from PIL import Image, ImageDraw
    n, k = neighbours.shape
    frame = max(2, tile // 16)
    cell, pad, header = tile + 2 * frame, 2, 18
    color = {name: torch.tensor(c) for name, c in RETRIEVAL_COLORS.items()}
    rows = []
    for r in range(n):
        same = gallery_labels[neighbours[r]] == query_labels[query_idx[r]]
        colors = torch.stack([color["query"]] + [color["same"] if s else color["other"] for s in same.tolist()])
        images = torch.cat([_tile_images(query_split, query_idx[r:r + 1], tile),
                            _tile_images(gallery_split, neighbours[r], tile)])
        rows.append(_framed(images, colors, frame))
    grid = vutils.make_grid(torch.cat(rows), nrow=k + 1, padding=pad, pad_value=1.0)  # [3, n (cell + 2) + 2, ...]
    label_w = 2 * (cell + pad)
    canvas = Image.new("RGB", (label_w + grid.shape[2], header + grid.shape[1]), "white")
    canvas.paste(Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)), (label_w, header))
    draw, font, small = ImageDraw.Draw(canvas), _font(13), _font(11)
    legend = next(t for t in (f"query (grey) and its top-{k} {gallery_name}: green = same class, red = another class",
                              f"query (grey), top-{k}: green = same class, red = other", "green = same class")
                  if draw.textlength(t, font=small) <= canvas.width - 8 or t == "green = same class")
    draw.text((4, 2), legend, fill="black", font=small)
    names = query_split.classes
    for r in range(n):
        y = int(query_labels[query_idx[r]])
        name = str(names[y]) if names and 0 <= y < len(names) else f"class {y}"
        while len(name) > 1 and draw.textlength(name, font=font) > label_w - 8:
            name = name[:-2] + "\u2026"
        top = header + pad + r * (cell + pad) + cell // 2 - 14
        draw.text((4, top), name, fill="black", font=font)
        draw.text((4, top + 16), f"test #{int(query_idx[r])}", fill=(90, 90, 90), font=small)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def show_retrievals(ck, out, count, topk, seed, path, tile=64):
    """Write the retrieval picture of `count` seeded random test queries to `path`."""
    import torchvision.utils as vutils
    test = ck.split("test")
    if "train_emb" in out:  # isd: the k-NN gallery (train split), nothing to exclude
        gallery, g_emb, g_labels, exclude = ck.split("gallery"), out["train_emb"], out["train_labels"], False
    else:
        gallery, g_emb, g_labels, exclude = test, out["emb"], out["labels"], True
    emb, labels = out["emb"].cpu(), out["labels"].cpu()
    g_emb, g_labels = g_emb.cpu(), g_labels.cpu()
    if len(emb) != len(test) or len(g_emb) != len(gallery):
        raise RuntimeError(f"{ck.method}.embeddings: {len(emb)} / {len(g_emb)} rows for {len(test)} test / "
                           f"{len(gallery)} gallery images (contract: load_data order)")
    if len(g_emb) - exclude < 1:
        raise EvalError(f"{ck.path}: the gallery has no image to retrieve")
    query_idx = torch.randperm(len(emb), generator=torch.Generator().manual_seed(seed))[:count]
    neighbours = nearest(query_idx, emb, g_emb, topk, exclude)
    picture = retrieval_grid(test, gallery, query_idx, neighbours, labels, g_labels, tile,
                             "in the train split" if not exclude else "in the test set")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        vutils.save_image(picture, path)
    except OSError as e:
        raise EvalError(f"cannot write {path} ({e.strerror or short(e)})") from None
    hits = (g_labels[neighbours] == labels[query_idx][:, None]).float().mean().item()
    print(f"wrote {path}: {len(query_idx)} queries x top-{neighbours.shape[1]} ({100 * hits:.1f}% same class), "
          f"{picture.shape[2]}x{picture.shape[1]} px")


# ------------------------------------------------------------------------------------------------ ISD linear probe
def probe_milestones(epochs):
    """eval_linear.py's lr steps (x0.1 at 15 and 30 of 40 epochs), scaled to `epochs`."""
    return [round(epochs * 15 / 40), round(epochs * 30 / 40)]


def linear_probe(train_features, train_labels, test_features, test_labels, epochs, center_features=None,
                 num_classes=None, lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=256, seed=0):
    """A linear classifier on frozen features (ISD eval_linear.py); returns accuracies in percent.

    train_features: [N, D] (the same features every epoch: the cached probe) or a callable epoch (0-based) -> [N, D]
    (fresh augmented features each epoch: the official protocol; then center_features [N, D], the centre-crop train
    features, is required). Every feature is L2-normalised, then standardised with the mean / std of the L2-normalised
    center_features (default: train_features), computed once. Linear(D, C), SGD(lr, momentum, weight_decay), batches of
    `batch_size` in a seeded order, lr x0.1 at probe_milestones(epochs). Items with label < 0 are left out of training.
    Returns {"last", "best", "best_epoch" (1-based), "history" (test accuracy per epoch), "lrs" (lr per epoch)}.
    """
    if callable(train_features) and center_features is None:
        raise ValueError("linear_probe: a callable train_features needs center_features (the centre-crop features)")
    fetch = train_features if callable(train_features) else (lambda epoch: train_features)
    center = F.normalize((train_features if center_features is None else center_features).float(), dim=1)
    mean, std = center.mean(0), center.std(0).clamp_min(1e-8)

    def prepare(x):
        return (F.normalize(x.float(), dim=1) - mean) / std
    dev = center.device
    keep = (train_labels >= 0).to(dev)
    y_train, y_test = train_labels.to(dev)[keep], test_labels.to(dev)
    test_x = prepare(test_features.to(dev))
    num_classes = num_classes or int(max(y_train.max().item(), y_test.max().item())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(center.shape[1], num_classes)
    head = head.to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, probe_milestones(epochs), 0.1)
    order_gen = torch.Generator().manual_seed(seed)
    history, lrs = [], []
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


def isd_linear_probe(ck, mode, epochs, seed):
    """{"linear", "linear_best", "linear_best_epoch"} (official) or {"linear_cached", ...} of an isd checkpoint."""
    module, model, args = ck.module, ck.model, ck.args
    ck.split("gallery"), ck.split("test")  # EvalError when the dataset has no labelled split
    center, train_y = ck.call(module.features, "train", False)
    test_x, test_y = ck.call(module.features, "test", False)
    if bool((train_y < 0).all()) or bool((test_y < 0).all()):
        raise EvalError(f"{ck.path}: --linear-probe needs labelled train and test splits of {args.dataset}")

    def augmented(epoch):
        torch.manual_seed(seed + epoch)
        return ck.call(module.features, "train", True)[0]
    num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    name = "linear" if mode == "official" else "linear_cached"
    what = "official: augmented train features every epoch" if mode == "official" else "cached centre-crop features"
    print(f"linear probe ({what}): {epochs} epochs, lr x0.1 at {probe_milestones(epochs)}, {len(center)} train / "
          f"{len(test_x)} test, {num_classes} classes")
    out = linear_probe(augmented if mode == "official" else center, train_y, test_x, test_y, epochs,
                       center_features=center, num_classes=num_classes, seed=seed)
    model.eval()
    return {name: out["last"], f"{name}_best": out["best"], f"{name}_best_epoch": out["best_epoch"]}


# ------------------------------------------------------------------------------------------------ curves
def metric_panel(name):
    """The panel of a metrics.jsonl column: R@k / Rank-k / k-NN families share one (teacher/ beside the student)."""
    base = name.removeprefix("teacher/")
    if re.fullmatch(r"R@\d+", base):
        return "Recall@k"
    if re.fullmatch(r"Rank-\d+", base):
        return "Rank-k"
    if re.fullmatch(r"knn\d+w?", base):
        return "k-NN accuracy"
    if re.fullmatch(r"knn\d+w?_small", base):
        return "k-NN accuracy, small classes"
    return base


def read_metrics_jsonl(run):
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.exists(run):
        raise EvalError(f"--plot {run}: no such run folder")
    if not os.path.isfile(path):
        raise EvalError(f"--plot {run}: no metrics.jsonl in it (a run folder holds one once it has evaluated)")
    rows = []
    try:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    rows.append((i, row))
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read {path} ({short(e, 80)})") from None
    except ValueError as e:
        raise EvalError(f"{path} line {i}: not a metrics row ({short(e, 80)})") from None
    if not rows:
        raise EvalError(f"{path} is empty: the run has not evaluated yet")
    return path, [row for _, row in rows]


def plot_curves(run, out):
    """Each metric of metrics.jsonl over epochs, one panel per metric family; needs matplotlib."""
    path, rows = read_metrics_jsonl(run)
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise EvalError("--plot needs matplotlib (pip install matplotlib)") from None
    series = {}
    for r, row in enumerate(rows):
        x = row.get("epoch", r + 1)
        for k, v in row.items() if isinstance(x, (int, float)) else ():
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, []).append((x, v))
    if not series:
        raise EvalError(f"{path} has no metric columns to plot")
    panels = {}
    for name in series:
        panels.setdefault(metric_panel(name), []).append(name)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.3 * nrows), constrained_layout=True)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (panel, names) in zip(axes, panels.items()):
        bases = list(dict.fromkeys(n.removeprefix("teacher/") for n in names))
        for name in names:  # a teacher's curve: dashed, in its student metric's colour
            xs, ys = zip(*series[name])
            ax.plot(xs, ys, "--" if name.startswith("teacher/") else "-", marker="o", markersize=3, label=name,
                    color=f"C{bases.index(name.removeprefix('teacher/')) % 10}")
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(path))) + " (metrics.jsonl, test-set metrics in %)")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise EvalError(f"cannot write {out} ({e.strerror or short(e)})") from None
    print(f"wrote {out}: {len(series)} metrics of {len(rows)} evaluations in {len(panels)} panels")


# ------------------------------------------------------------------------------------------------ command line
def print_table(metrics, logged, notes=None):
    notes = notes or {}
    print(f"{'metric':<24}{'eval.py':>10}{'run log':>10}{'diff':>10}")
    for name, value in metrics.items():
        if name.endswith("_best_epoch"):
            continue
        ref = logged.get(name)
        known = isinstance(ref, (int, float)) and not isinstance(ref, bool)
        diff = "" if not known else "=" if value == ref else f"{value - ref:+.2g}"
        ref_text = f"{ref:10.2f}" if known else f"{'-':>10}"
        print(f"{name:<24}{value:10.2f}{ref_text}{diff:>10}{notes.get(name, '')}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's complaints: one line and exit 2, like every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def whole(low):
    """argparse type: a whole number >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def get_args(argv):
    p = Parser(description="Evaluate a checkpoint of s2sd.py / camd.py / spkd.py / isd.py, or an embeddings file; "
                           "draw retrievals or a run's curves.")
    p.add_argument("checkpoint", nargs="?", help="a run's model.pt (or last.pt)")
    p.add_argument("--embeddings", metavar="FILE.npz", help="evaluate arrays emb, labels [, train_emb, train_labels]")
    p.add_argument("--plot", metavar="RUN", help="draw runs/<run>/metrics.jsonl (needs matplotlib) to --out")
    g = p.add_argument_group("checkpoint")
    g.add_argument("--dataset", choices=common.DATASETS, help="evaluate on another dataset than the saved one")
    g.add_argument("--data-root", help="where the data are now (default: the saved --data-root)")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="default auto")
    g.add_argument("--workers", type=whole(0), help="DataLoader workers for image files (default: the saved value)")
    g.add_argument("--export", metavar="FILE.npz", help="write the evaluated embeddings (+ test image paths) there")
    g.add_argument("--show-retrievals", type=whole(1), metavar="N", help="draw N random test queries and their "
                   "nearest neighbours to --out (default <checkpoint folder>/retrievals.png)")
    g.add_argument("--topk", type=whole(1), default=8, help="neighbours per query in the picture (default 8)")
    g.add_argument("--tile", type=whole(16), default=64, help="pixels per image in the picture (default 64)")
    g.add_argument("--linear-probe", nargs="?", const="official", choices=["official", "cached"],
                   help="isd checkpoints: the linear protocol (official: augmented features each epoch; cached: fast; "
                   "give the checkpoint first)")
    g.add_argument("--probe-epochs", type=whole(1), help="linear probe epochs (default: the checkpoint's probe_epochs)")
    g.add_argument("--seed", type=whole(0), default=0, help="seeds the picture's queries and the probe (default 0)")
    e = p.add_argument_group("embeddings file")
    e.add_argument("--no-nmi", action="store_true", help="skip NMI (k-means)")
    e.add_argument("--l2-normalize", action="store_true", help="L2-normalise the rows first (rank by cosine)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="metrics JSON (default: eval.json next to the checkpoint, "
                   "<name>_eval.json next to an embeddings file)")
    o.add_argument("--out", metavar="FILE", help="the picture of --show-retrievals (.png/.jpg) or --plot "
                   "(.png/.pdf/.svg)")
    args = p.parse_args(argv)
    modes = [m for m, v in (("CHECKPOINT", args.checkpoint), ("--embeddings", args.embeddings), ("--plot", args.plot))
             if v is not None]
    if len(modes) != 1:
        p.error(f"give exactly one of CHECKPOINT, --embeddings FILE or --plot RUN "
                f"(got {' and '.join(modes) or 'none'})")
    if args.checkpoint is None:
        for flag in ("dataset", "data_root", "workers", "export", "show_retrievals", "linear_probe", "probe_epochs"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} needs a CHECKPOINT")
    if args.embeddings is None and (args.no_nmi or args.l2_normalize):
        p.error("--no-nmi / --l2-normalize are for --embeddings")
    picture = args.plot is not None or args.show_retrievals is not None
    if args.out is not None and not picture:
        p.error("--out names a picture (--show-retrievals, --plot); the metrics JSON goes to --json")
    if args.plot is not None and args.json is not None:
        p.error("--plot writes no metrics; drop --json")
    allowed = PLOT_OUT if args.plot is not None else IMAGE_OUT
    if args.out is not None and not args.out.lower().endswith(allowed):
        p.error(f"--out {args.out}: use a {' / '.join(allowed)} file name")
    return args


def bad_input():
    """The exceptions main() reports as one line: its own, common's, and the RunError of every loaded method file."""
    return (EvalError, common.DatasetError,
            *(sys.modules[m].RunError for m in METHODS if m in sys.modules and hasattr(sys.modules[m], "RunError")))


def run_checkpoint(a):
    ck = Checkpoint(a.checkpoint, a.dataset, a.data_root, a.workers, a.device)
    folder = os.path.dirname(os.path.abspath(a.checkpoint))
    if a.linear_probe and not hasattr(ck.module, "features"):
        raise EvalError(f"--linear-probe is ISD's protocol; {a.checkpoint} is a {ck.method} checkpoint")
    print(f"{a.checkpoint}: {ck.method}, dataset {ck.args.dataset} ({ck.args.data_root}), device {ck.device}")
    metrics, notes = ck.evaluate(), {}
    if not metrics:
        print(f"note: {ck.method}.evaluate gives no metrics on {ck.args.dataset} (no labelled test split)")
    if a.linear_probe:
        probe = isd_linear_probe(ck, a.linear_probe, a.probe_epochs or getattr(ck.args, "probe_epochs", 40), a.seed)
        metrics.update(probe)
        name = "linear" if a.linear_probe == "official" else "linear_cached"
        notes[f"{name}_best"] = f"  (epoch {probe[f'{name}_best_epoch']}, chosen on the test set)"
    if a.export or a.show_retrievals:
        out = ck.embeddings()
        if a.export:
            export_embeddings(ck, out, a.export)
        if a.show_retrievals:
            show_retrievals(ck, out, a.show_retrievals, a.topk, a.seed, a.out or os.path.join(folder, "retrievals.png"),
                            a.tile)
    for label, ref in ck.references.items():
        print(f"{label} (logged): " + "  ".join(f"{k} {v:.2f}" for k, v in ref.items() if isinstance(v, (int, float))))
    print_table(metrics, ck.logged, notes)
    path = a.json or os.path.join(folder, "eval.json")
    write_json(metrics, path)
    print(f"wrote {path}")
    return metrics


def main(argv=None):
    """Returns the metrics (a dict) of a checkpoint or embeddings file; bad input: one line on stderr, exit 2."""
    a = get_args(sys.argv[1:] if argv is None else argv)
    try:
        if a.plot is not None:
            folder = a.plot if os.path.isdir(a.plot) else os.path.dirname(a.plot) or "."
            plot_curves(a.plot, a.out or os.path.join(folder, "curves.png"))
            return {}
        if a.embeddings is not None:
            device = pick_device(a.device)
            metrics = embedding_metrics(*read_embeddings(a.embeddings, a.l2_normalize), device=device,
                                        with_nmi=not a.no_nmi)
            print_table(metrics, {})
            path = a.json or os.path.splitext(a.embeddings)[0] + "_eval.json"
            write_json(metrics, path)
            print(f"wrote {path}")
            return metrics
        return run_checkpoint(a)
    except bad_input() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
