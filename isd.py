"""ISD: Self-Supervised Learning by Iterative Similarity Distillation.

Tejankar, Koohpayegani, Pillai, Favaro, Pirsiavash -- ICCV 2021. https://arxiv.org/abs/2012.09259
Official code: https://github.com/UMBCvision/ISD (train_isd.py = ResNet-18 "v1", train_isd_plus.py = ResNet-50).

Idea: a student (backbone + predictor MLP) and its EMA teacher. The teacher embeds a query view and a
queue of past teacher embeddings (anchors); softmax over query-anchor cosine similarities gives a soft
"neighbourhood" distribution. The student embeds another view of the query and is trained to reproduce
that distribution over the same anchors (KL). MoCo is the special case of a one-hot target on the
query's own key (`--variant moco`, same file, for the paper's ISD-vs-MoCo comparison).

Usage:
    python isd.py                                          # digits, CPU, well under a minute
    python isd.py --dataset cifar10 [--variant moco]       # ResNet-18 (CIFAR stem); MoCo from the same code
    python isd.py --dataset imagenet --data-root /data --recipe r18   # (or r50) the paper's two recipes
    python isd.py --dataset folder --data-root /my/images  # your own (unlabeled) ImageFolder / flat folder
    python isd.py --dataset synthetic --max-steps 30       # speed benchmark (add --image-size 224)
    torchrun --nproc_per_node=4 isd.py --dataset imagenet ...;  python eval.py runs/<run>/model.pt --linear-probe

Implementation details:
 1. q = normalize(predictor(proj_s(backbone_s(x_s)))), k = normalize(proj_t(backbone_t(x_t))) without grad
    (official ISD.forward). Anchors are ONLY queue entries, no positive column (Sec. 2).
 2. Loss (Sec. 2): KL(p_t || p_s), p_t = softmax(k Q^T / tau_t), p_s = softmax(q Q^T / tau_s), summed over
    the K anchors, batch mean: official KLD = kl_div(log_softmax, softmax, 'batchmean'); no T^2; fp32.
 3. Teacher = copy of the student, updated BEFORE its forward pass each step (official, inside forward):
    theta_t <- m theta_t + (1 - m) theta_s over parameters only; BN statistics stay separate; both train mode.
 4. Queue (MoCo's memory bank): K x D random rows, L2-normalised; ring buffer with a pointer (K need not
    divide B); keys gathered from all ranks, enqueued AFTER the loss; saved in last.pt with their labels.
 5. Recipe r18 (Sec. 3.1, run_isd.sh): tau_s = tau_t = 0.02, m 0.999, no projection, predictor Linear(512,512,
    no bias)-BN-ReLU-Linear(512,512), strong/strong views, SGD lr 0.01 x0.2 at epochs 140, 180 of 200.
 6. Recipe r50 (Sec. 3.1, train_isd_plus.py): tau_s 0.1, tau_t 0.01, m 0.99, projection MLP(D, 2D, D/4) on BOTH
    encoders, predictor MLP(D/4, 2D, D/4), weak teacher / strong student view (Table 5), cosine lr 0.05.
    Both: SGD momentum 0.9, wd 1e-4 on all parameters, batch 256, K 128,000, 200 epochs (Sec. 3).
 7. Views: strong = MoCo-v2 (RRC 0.2-1, jitter 0.4/0.4/0.4/0.1 p 0.8, gray p 0.2, blur p 0.5, flip); weak =
    RRC + flip. 224 px: common.moco_v2_transform in DataLoader workers; <= 96 px: common's batched on-device ops.
 8. Monitoring (Fig. 4): k-NN of student AND teacher backbone features (no heads, eval mode, unaugmented,
    L2-normalised; gallery = train split): 1-NN and 20-NN (paper's tables) and weighted 200-NN (T 0.1).
    Purity (train_isd_plus.py): fraction of the teacher's top-5 queue anchors sharing the query's label.
 9. Multi-GPU: DDP on the student, teacher updated identically on every rank, keys and labels all-gathered
    before enqueueing (MoCo); --batch-size is the global batch; rank 0 logs and saves.

Deviations:
 - Queue init rows L2-normalised as in train_isd_plus.py (train_isd.py normalises columns; gone after K/B steps).
 - No ShuffleBN (official shuffles the key batch across DataParallel GPUs); each rank's BN sees its shard.
 - ImageNet-100 / folder / CIFAR / STL-10 / digits settings are ours (the paper has none): see PRESETS.
 - ResNet-50 uses adaptive average pooling (official hard-codes a 7x7 pool, i.e. 224 px only).
 - --variant moco uses tau_s and the recipe's heads. On-device views (<= 96 px): no blur, fixed jitter order.

Measured results (ours; 2 shared CPU cores, torch 2.15, seed 0; no GPU was available to this work):
 - `python isd.py` (digits, 15 epochs, idle machine, 8.8 s wall): student kNN-1/20/200w 92.2/87.2/70.3
   untrained -> 96.1/93.3/79.2 (teacher 95.8/93.9/80.0); `eval.py --linear-probe` 95.6.
 - ResNet-18 step on this CPU (loaded, min of 3 interleaved reps): 32 px CIFAR stem, batch 256: 7.0 s = 37 img/s,
   batched on-device augmentation 0.3-6% of the step; 224 px, batch 32: 1.84 s = 17 img/s, augmentation ~6%;
   the PIL MoCo-v2 pipeline costs 13 ms per image (two views) per worker. Idle machine, `--dataset synthetic
   --synthetic-n 3072 --max-steps 12 --log-every 3 --eval-every 0`: ISD 43.2 vs --variant moco 44.4 img/s
   (+2.7%); loss alone (B 256, D 512, fwd+bwd, loaded) K 16384: 434 vs 181 ms, K 128000: 2.2 vs 1.3 s.
 - Paper (Table 1, ImageNet, 200 ep.): ResNet-18 53.8 linear / 41.5 1-NN / 46.6 20-NN; ResNet-50 69.8/59.2/62.0.
"""
import argparse
import copy
import datetime
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

# Values are the paper's where it gives them (Sec. 3.1, official run_isd*.sh); "ours" otherwise.
RECIPES = {
    "r18": dict(tau_s=0.02, tau_t=0.02,  # Sec. 3.1 ResNet-18: same temperature 0.02
                ema=0.999,  # Sec. 3.1 ResNet-18: m = 0.999
                projection=False,  # Sec. 3.1: "We do not have any projection layer for ResNet18"
                teacher_view="strong",  # Sec. 3.1: augmentations of [10, 9, 18] for both views
                lr=0.01, lr_schedule="step"),  # Sec. 3.1: lr 0.01, x0.2 at epochs 140 and 180
    "r50": dict(tau_s=0.1, tau_t=0.01,  # Sec. 3.1 ResNet-50
                ema=0.99,  # Sec. 2 / 3.1: m = 0.99 for ResNet-50
                projection=True,  # train_isd_plus.py: MLP(2048, 4096, 512) on both encoders
                teacher_view="weak",  # Table 5: weak teacher / strong student is best
                lr=0.05, lr_schedule="cosine"),  # Sec. 3.1: cosine, initial lr 0.05
}
PRESETS = {
    # Sec. 3: batch 256, 200 epochs, wd 1e-4, K 128K; eval every 10 epochs as in Fig. 4.
    "imagenet": dict(recipe=None, image_size=224, epochs=200, batch_size=256, weight_decay=1e-4,
                     queue_size=128000, workers=16, eval_every=10, log_every=100),
    # ours: ImageNet-100 has ~126.7K images, so K = 16384 (Fig. 3: 16K is on par with 128K).
    "imagenet100": dict(recipe=None, image_size=224, epochs=200, batch_size=256, weight_decay=1e-4,
                        queue_size=16384, workers=16, eval_every=10, log_every=100),
    # ours: ResNet-18 CIFAR stem, r50 recipe (weak/strong, like ReSSL), wd 5e-4 and K 4096 as in ReSSL's CIFAR runs.
    **{name: dict(recipe="r50", arch="resnet18", image_size=32, epochs=200, batch_size=256, weight_decay=5e-4,
                  queue_size=4096, workers=0, eval_every=10, log_every=50) for name in ("cifar10", "cifar100")},
    # ours: SSL on train+unlabeled (105K images, 96 px), K 16384.
    "stl10": dict(recipe="r50", arch="resnet18", image_size=96, epochs=200, batch_size=256,
                  weight_decay=5e-4, queue_size=16384, workers=0, eval_every=10, log_every=50),
    # ours: any ImageFolder (or flat folder) of images; k-NN monitor only when <root>/val has labels.
    "folder": dict(recipe=None, image_size=224, epochs=200, batch_size=256, weight_decay=1e-4,
                   queue_size=16384, workers=8, eval_every=10, log_every=100),
    # ours: the offline CPU demo -- 3-layer CNN at 16 px, K 512 (well below the 1437 train images), m 0.9
    # (11 steps/epoch: 0.99 makes the teacher ~9 epochs old), crops >= 80% of an 8x8 digit (our 10-epoch
    # sweep: m 0.99 or min-scale 0.2-0.6 stay near the untrained net's k-NN).
    "digits": dict(recipe="r50", arch="small", image_size=16, epochs=15, batch_size=128, lr=0.05, ema=0.9,
                   weight_decay=5e-4, queue_size=512, workers=0, eval_every=5, log_every=50, min_scale=0.8),
    # benchmark only: paper batch 256, 32 px (or --image-size 224); k-NN only at the end.
    "synthetic": dict(recipe="r18", arch="resnet18", image_size=32, epochs=1, batch_size=256, weight_decay=1e-4,
                      queue_size=4096, workers=0, eval_every=0, log_every=10),
}
TENSOR_FORM = ("digits", "synthetic", "cifar10", "cifar100", "stl10")


class ConfigError(Exception):
    """Bad flags or checkpoint: main() prints it on one line and exits 2."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description="ISD (ICCV 2021) self-supervised training")
    g = p.add_argument_group("experiment")
    g.add_argument("--dataset", default="digits", help=f"one of {sorted(PRESETS)}")
    g.add_argument("--data-root", default="./data", help="dataset folder (folder: the image folder itself)")
    g.add_argument("--epochs", type=int, default=None, help="default: preset (paper 200)")
    g.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch; default: preset (paper 256)")
    g.add_argument("--lr", type=float, default=None, help="default: recipe (r18 0.01, r50 0.05; Sec. 3.1)")
    g.add_argument("--weight-decay", type=float, default=None, help="default: preset (paper 1e-4)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers (file-form data); preset")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: CUDA only")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile backbones")
    g.add_argument("--eval-every", type=int, default=None, help="k-NN monitor every N epochs (0: only at the end)")
    g.add_argument("--log-every", type=int, default=None, help="log line every N steps")
    g.add_argument("--save-dir", default="runs")
    g.add_argument("--run-name", default=None, help="default: isd_<dataset>_<variant>_s<seed>")
    g.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (smoke tests)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--resume", default=None, help="path to last.pt")
    g.add_argument("--image-size", type=int, default=None, help="train/eval resolution; default: preset")
    g.add_argument("--synthetic-n", type=int, default=512, help="synthetic: images per split (test: n/4)")
    m = p.add_argument_group("method")
    m.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="r18 / r50 settings of Sec. 3.1; default: preset (imagenet/folder: by --arch)")
    m.add_argument("--variant", default="isd", choices=["isd", "moco"], help="moco: one-hot target (Sec. 2)")
    m.add_argument("--arch", default=None, choices=["resnet18", "resnet50", "small"], help="default: preset/recipe")
    m.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 conv1, no max-pool; default: on for image size <= 96")
    m.add_argument("--tau-s", type=float, default=None, help="student temperature; recipe (0.02 / 0.1)")
    m.add_argument("--tau-t", type=float, default=None, help="teacher temperature; recipe (0.02 / 0.01)")
    m.add_argument("--ema", type=float, default=None, help="teacher momentum m; recipe (0.999 / 0.99)")
    m.add_argument("--queue-size", type=int, default=None, help="K anchors; preset (paper 128000)")
    m.add_argument("--projection", action=argparse.BooleanOptionalAction, default=None,
                   help="MLP(D, 2D, D/4) head on both encoders; recipe (r18 off, r50 on)")
    m.add_argument("--teacher-view", default=None, choices=["strong", "weak"], help="recipe (r18 strong, r50 weak)")
    m.add_argument("--lr-schedule", default=None, choices=["step", "cosine"], help="recipe")
    m.add_argument("--lr-milestones", type=int, nargs="*", default=None,
                   help="step schedule epochs (x0.2); default 0.7 and 0.9 of --epochs (140, 180 of 200)")
    m.add_argument("--min-scale", type=float, default=None, help="RandomResizedCrop min scale; 0.2 (MoCo-v2)")
    return p.parse_args(argv)


def resolve(args):
    """Fill None flags: explicit flag > dataset preset > recipe. Raises ConfigError on bad combos."""
    if args.dataset not in PRESETS:
        raise ConfigError(f"unknown dataset '{args.dataset}' (choose from {', '.join(sorted(PRESETS))})")
    pre = PRESETS[args.dataset]
    if args.arch is None:
        args.arch = pre.get("arch") or ("resnet50" if args.recipe == "r50" else "resnet18")
    if args.recipe is None:
        args.recipe = pre["recipe"] or ("r50" if args.arch == "resnet50" else "r18")
    for key, val in list(pre.items()) + list(RECIPES[args.recipe].items()):
        if getattr(args, key, None) is None and key not in ("recipe", "arch"):
            setattr(args, key, val)
    args.min_scale = 0.2 if args.min_scale is None else args.min_scale  # MoCo-v2 RRC scale (0.2, 1)
    if args.cifar_stem is None:
        args.cifar_stem = args.image_size <= 96
    if args.lr_milestones is None:
        args.lr_milestones = [round(0.7 * args.epochs), round(0.9 * args.epochs)]  # 140, 180 of 200
    if args.run_name is None:
        args.run_name = f"isd_{args.dataset}_{args.variant}_s{args.seed}"
    if args.dataset not in TENSOR_FORM and args.arch == "small":
        raise ConfigError("--arch small is for small tensor-form datasets (digits, synthetic, cifar, stl10)")
    for k in ("epochs", "batch_size", "queue_size", "image_size"):
        if getattr(args, k) <= 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be positive")
    if args.batch_size > args.queue_size:
        raise ConfigError(f"--queue-size {args.queue_size} must be >= the global --batch-size {args.batch_size}")
    if not (0.0 <= args.ema < 1.0) or args.tau_s <= 0 or args.tau_t <= 0:
        raise ConfigError("need 0 <= --ema < 1 and positive --tau-s / --tau-t")
    return args


# ----------------------------------------------------------------------------------------------- models
def build_backbone(arch, cifar_stem):
    """Backbone without classifier -> (module mapping [B,3,H,W] to [B,D], D)."""
    if arch == "small":  # ours: ~0.1M-param CNN so the digits demo fits in a minute on 2 CPU cores
        def block(i, o, s):
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        net = nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return net, 128
    net = getattr(torchvision.models, arch)(weights=None)  # adaptive avg-pool: any resolution
    if cifar_stem:  # 3x3 stride-1 conv1 and no max-pool for 32-96 px inputs
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def mlp(i, h, o, first_bias=True):
    """Linear-BN-ReLU-Linear (official get_mlp; the r18 predictor has no bias in the first Linear)."""
    return nn.Sequential(nn.Linear(i, h, bias=first_bias), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
                         nn.Linear(h, o))


class ISD(nn.Module):
    """Student (backbone_s, proj_s, predictor) and EMA teacher (backbone_t, proj_t)."""

    def __init__(self, arch="resnet18", cifar_stem=True, projection=False):
        super().__init__()
        self.backbone_s, dim = build_backbone(arch, cifar_stem)
        if projection:  # train_isd_plus.py: proj MLP(D, 2D, D/4), predictor MLP(D/4, 2D, D/4)
            self.proj_s, self.predictor = mlp(dim, 2 * dim, dim // 4), mlp(dim // 4, 2 * dim, dim // 4)
            self.out_dim = dim // 4
        else:  # train_isd.py (ResNet-18): no projection, predictor Linear(D, D, no bias)-BN-ReLU-Linear(D, D)
            self.proj_s, self.predictor = nn.Identity(), mlp(dim, dim, dim, first_bias=False)
            self.out_dim = dim
        self.backbone_t, self.proj_t = copy.deepcopy(self.backbone_s), copy.deepcopy(self.proj_s)
        for p in self.teacher_params():
            p.requires_grad_(False)

    def student_params(self):  # the EMA'd part of the student (the predictor has no teacher copy)
        return list(self.backbone_s.parameters()) + list(self.proj_s.parameters())

    def teacher_params(self):
        return list(self.backbone_t.parameters()) + list(self.proj_t.parameters())

    @torch.no_grad()
    def momentum_update(self, m):
        """theta_t <- m theta_t + (1 - m) theta_s over parameters only (Sec. 2); BN buffers stay separate."""
        t = self.teacher_params()
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, self.student_params(), alpha=1.0 - m)

    def forward(self, x_s, x_t, m):
        """x_s, x_t: [B,3,H,W] student / teacher views -> (q, k) [B,out_dim] L2-normalised, k without grad."""
        q = F.normalize(self.predictor(self.proj_s(self.backbone_s(x_s))).float(), dim=1)
        with torch.no_grad():
            self.momentum_update(m)  # official: update the teacher BEFORE its forward pass
            k = F.normalize(self.proj_t(self.backbone_t(x_t)).float(), dim=1)
        return q, k


# ----------------------------------------------------------------------------------------------- losses
def isd_loss(q, k, queue, tau_s, tau_t):
    """ISD loss (Sec. 2): batch-mean KL(softmax(k Q^T / tau_t) || softmax(q Q^T / tau_s)).

    q: [B,D] student queries, k: [B,D] teacher keys, queue: [K,D] anchors; all L2-normalised.
    Returns a scalar; gradient flows into q only (official KLD with reduction='batchmean').
    """
    # METHOD: the teacher's soft neighbourhood over the anchors is the student's target.
    dt = torch.promote_types(q.dtype, torch.float32)  # fp32 (or fp64) logits even under bf16 autocast
    queue = queue.detach().to(dt)
    sim_q = (q.to(dt) @ queue.t()) / tau_s
    sim_k = (k.detach().to(dt) @ queue.t()) / tau_t
    return F.kl_div(F.log_softmax(sim_q, dim=1), F.softmax(sim_k, dim=1), reduction="batchmean")


def moco_loss(q, k, queue, tau):
    """MoCo InfoNCE (Sec. 2, "one can convert our method to MoCo"): cross-entropy with target 0 over
    [q.k, q Q^T] / tau. q, k: [B,D], queue: [K,D], L2-normalised; no gradient into k or the queue."""
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, queue = q.to(dt), k.detach().to(dt), queue.detach().to(dt)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1)
    return F.cross_entropy(logits / tau, torch.zeros(len(q), dtype=torch.long, device=q.device))


@torch.no_grad()
def enqueue(queue, queue_labels, ptr, keys, labels):
    """FIFO ring buffer: write keys [B,D] (and labels [B]) at rows ptr..ptr+B-1 (mod K); return new ptr."""
    idx = (ptr + torch.arange(len(keys), device=queue.device)) % len(queue)
    queue[idx] = keys.to(queue.dtype)
    queue_labels[idx] = labels.to(queue_labels.dtype)
    return (ptr + len(keys)) % len(queue)


@torch.no_grad()
def purity(k, queue, labels, queue_labels, top=5):
    """Sum over labelled queries of the fraction of the teacher's top-5 anchors with the same label, and
    the number of labelled queries (train_isd_plus.py's diagnostic; sampled, not run every step)."""
    nn_idx = (k.float() @ queue.t()).topk(top, dim=1).indices
    match = (queue_labels[nn_idx] == labels[:, None]).float().mean(1)
    has = labels >= 0
    return (match * has).sum(), has.sum()


# ----------------------------------------------------------------------------------------------- data
def two_views(x, args, mean, std):
    """Batched on-device views of uint8 [B,C,H,W]: (strong student view, teacher view), normalised."""
    def view(strong):
        v = common.random_hflip(common.random_resized_crop(x, args.image_size, scale=(args.min_scale, 1.0)))
        if strong:  # MoCo-v2 strong view without blur (Sec. 3.1; blur dropped at <= 96 px)
            v = common.random_grayscale(common.color_jitter(v, 0.4, 0.4, 0.4, 0.1, p=0.8), p=0.2)
        return common.normalize(v, mean, std)
    return view(True), view(args.teacher_view == "strong")


def _split_names(args):
    """(ssl train split, k-NN gallery split, k-NN query split) for args.dataset."""
    return {"stl10": ("train+unlabeled", "train", "test"), "imagenet": ("train", "train", "val"),
            "imagenet100": ("train", "train", "val")}.get(args.dataset, ("train", "train", "test"))


@functools.lru_cache(maxsize=4)
def _load(dataset, root, split, image_size, synthetic_n):
    if dataset == "folder":  # <root>/train + <root>/val if present, else <root> alone (no monitor)
        sub = os.path.join(root, {"train": "train", "test": "val"}[split])
        if split == "test" and not os.path.isdir(sub):
            return None
        return common.load_split("folder", root=sub if os.path.isdir(sub) else root)
    n = synthetic_n if split == "train" else synthetic_n // 4  # synthetic only
    return common.load_split(dataset, root=root, split=split, image_size=image_size,  # resized once if needed
                             channels=3 if dataset == "digits" else None, synthetic_size=(n, 10, image_size))


def load(args, split):
    return _load(args.dataset, args.data_root, split, args.image_size, args.synthetic_n)


# ----------------------------------------------------------------------------------------------- eval
def model_from_args(args):
    """Rebuild the ISD module saved in model.pt from its resolved arguments (no downloads)."""
    return ISD(args.arch, args.cifar_stem, args.projection)


@torch.no_grad()
def _embed(model, args, device, split):
    """Student and teacher backbone features (L2-normalised) of an unaugmented split, and its labels."""
    model.eval()
    dev = torch.device(device)
    cl = dev.type == "cuda" if args.channels_last is None else args.channels_last
    tf = None if split.images is not None else common.eval_transform(round(args.image_size * 256 / 224),
                                                                     args.image_size)

    def fn(x):
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        with torch.autocast("cuda", torch.bfloat16, enabled=args.amp and dev.type == "cuda"):
            return model.backbone_s(x).float(), model.backbone_t(x).float()
    s, t, y = common.embed(fn, split, dev, batch_size=256, workers=args.workers, transform=tf)
    return F.normalize(s, dim=1), F.normalize(t, dim=1), y


def features(model, args, device, split):
    """eval.py --linear-probe: (L2-normalised student backbone features [N,D], labels [N]) of 'train'/'test'."""
    names = _split_names(args)
    s, _, y = _embed(model, args, device, load(args, names[1] if split == "train" else names[2]))
    return s, y


def evaluate(model, args, device):
    """k-NN of student and teacher ('teacher/' prefix): knn1, knn20, knn200w (%). {} without labels."""
    _, gal_name, qry_name = _split_names(args)
    gal, qry = load(args, gal_name), load(args, qry_name)
    if qry is None or bool((gal.labels < 0).all()) or bool((qry.labels < 0).all()):
        return {}
    gs, gt, gy = _embed(model, args, device, gal)
    qs, qt, qy = _embed(model, args, device, qry)
    out = common.knn_metrics(gs, gy, qs, qy)
    out.update({"teacher/" + k: v for k, v in common.knn_metrics(gt, gy, qt, qy).items()})
    return out


# ----------------------------------------------------------------------------------------------- training
def _gather(t, world):
    """Concatenate a tensor from all ranks along dim 0 (MoCo's concat_all_gather; no gradient)."""
    if world == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def _save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written checkpoint


def _resume(args, model, opt, queue, queue_labels, rank):
    try:
        ck = torch.load(args.resume, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable / truncated / not a torch file
        raise ConfigError(f"cannot read checkpoint {args.resume}: {str(e).splitlines()[0]}")
    if not isinstance(ck, dict) or ck.get("method") != "isd" or "optimizer" not in ck:
        raise ConfigError(f"{args.resume} is not an isd.py last.pt checkpoint")
    for key in ("dataset", "arch", "cifar_stem", "projection", "queue_size", "image_size", "batch_size", "variant"):
        if ck["args"].get(key) != getattr(args, key):
            raise ConfigError(f"{args.resume} was trained with --{key.replace('_', '-')} {ck['args'].get(key)}, "
                              f"this run has {getattr(args, key)}")
    try:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        queue.copy_(ck["queue"])
        queue_labels.copy_(ck["queue_labels"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"{args.resume} does not match this model: {str(e).splitlines()[0]}")
    torch.set_rng_state(ck["rng_cpu"][rank % len(ck["rng_cpu"])])
    if ck.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(ck["rng_cuda"][rank % len(ck["rng_cuda"])])
    return ck["queue_ptr"], ck["epoch"], ck["batch_in_epoch"], ck["step"], ck["best"]


def train(args):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available() or dev == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {dev} requested but not available")
    device = torch.device(f"cuda:{local}" if dev == "cuda" else dev)
    main0, cuda, bl = rank == 0, device.type == "cuda", args.batch_size // world
    if args.batch_size % world:
        raise ConfigError(f"--batch-size {args.batch_size} is not divisible by {world} processes")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # long timeout: the other ranks wait at a barrier while rank 0 runs the k-NN monitor
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    log = print if main0 else (lambda *a, **k: None)
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if cuda:
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    log("config: " + json.dumps(vars(args), sort_keys=True))

    # data: tensor form lives on the device (batched augmentation); file form goes through DataLoader workers
    split = load(args, _split_names(args)[0])
    sampler = torch.utils.data.DistributedSampler(range(len(split.labels)), num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // bl  # drop_last, as the official loader
    labelled = bool((split.labels >= 0).any())  # purity diagnostic only where labels exist
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {args.batch_size} exceeds the {len(split.labels)} training images")
    if split.images is not None:
        images, labels = common.to_device(split, device)
    else:
        ep_indices = []  # refilled in place each epoch: this rank's DistributedSampler share, minus done batches
        views = common.two_views(common.moco_v2_transform(args.image_size, strong=True),  # (student, teacher)
                                 common.moco_v2_transform(args.image_size, strong=args.teacher_view == "strong"))
        ds = common.ImageFiles(split.paths, split.labels, views)
        loader = common.make_loader(ds, bl, shuffle=False, workers=args.workers, drop_last=True, sampler=ep_indices)

    # model, queue, optimizer: identical on every rank (same seed), then per-rank augmentation streams
    torch.manual_seed(args.seed)
    model = ISD(args.arch, args.cifar_stem, args.projection).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    queue = F.normalize(torch.randn(args.queue_size, model.out_dim), dim=1).to(device)  # Sec. 2 memory bank
    queue_labels = torch.full((args.queue_size,), -1, dtype=torch.long, device=device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=0.9,
                          weight_decay=args.weight_decay)  # Sec. 3: SGD momentum 0.9, wd on all parameters
    torch.manual_seed(args.seed + 1000 * rank)
    ptr, start_epoch, skip, step, best = 0, 0, 0, 0, None
    if args.resume:
        ptr, start_epoch, skip, step, best = _resume(args, model, opt, queue, queue_labels, rank)
        log(f"resumed {args.resume}: epoch {start_epoch}, batch {skip}, step {step}")
    if args.compile:  # in place: state_dict keys stay unprefixed
        model.backbone_s.compile(), model.backbone_t.compile()
    net = nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None) if world > 1 else model

    run_dir = os.path.join(args.save_dir, args.run_name)
    if main0:
        os.makedirs(run_dir, exist_ok=True)
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        cfg = dict(vars(args), torch=torch.__version__, torchvision=torchvision.__version__, world_size=world,
                   device_name=torch.cuda.get_device_name(device) if cuda else dev, git_commit=git or None)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        if not args.resume:
            open(os.path.join(run_dir, "metrics.jsonl"), "w").close()

    def lr_at(epoch):
        if args.lr_schedule == "cosine":  # official util.adjust_learning_rate, per epoch, no warm-up
            return args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
        return args.lr * 0.2 ** sum(epoch >= m for m in args.lr_milestones)  # x0.2 at 140, 180 (Sec. 3.1)

    def checkpoint(epoch, batch):  # everything --resume needs; all ranks call it (RNG states are gathered)
        mine = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
        rngs = [mine] * world
        if world > 1:
            dist.all_gather_object(rngs, mine)
        if main0:
            _save(dict(method="isd", args=vars(args), model=model.state_dict(), optimizer=opt.state_dict(),
                       queue=queue, queue_labels=queue_labels, queue_ptr=ptr, epoch=epoch, batch_in_epoch=batch,
                       step=step, best=best, rng_cpu=[r[0] for r in rngs],
                       rng_cuda=[r[1] for r in rngs] if cuda else None), os.path.join(run_dir, "last.pt"))

    t_begin, ep_stats, train_s, train_imgs = time.time(), [0.0, 0.0, 0.0, 0], 0.0, 0
    metrics = {}

    def run_eval(epoch):
        nonlocal best, metrics
        if main0:
            t = time.time()
            metrics = evaluate(model, args, device)
            loss = ep_stats[0] / max(ep_stats[3], 1)
            pur = 100.0 * ep_stats[1] / ep_stats[2] if ep_stats[2] else None
            line = dict(epoch=epoch, step=step, **metrics, loss=loss if ep_stats[3] else None, purity=pur,
                        elapsed_s=round(time.time() - t_begin, 2),
                        images_per_s=round(train_imgs / train_s, 1) if train_s else None)
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
            log(f"eval epoch {epoch} step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in metrics.items())
                + (f" purity {pur:.1f}" if pur is not None else "") + f" ({time.time() - t:.1f}s)")
            if metrics and (best is None or metrics["knn200w"] > best["knn200w"]):
                best = dict(metrics, epoch=epoch)
        model.train()
        if world > 1:
            dist.barrier()

    acc = torch.zeros(4, device=device)  # loss sum, purity sum, labelled queries, steps (since last log)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    interval = {"t": time.time(), "step": step}
    amp = torch.autocast("cuda", torch.bfloat16, enabled=args.amp and cuda)

    def flush(epoch, force_log):
        nonlocal train_s, train_imgs
        bad = first_bad.clone()
        if world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if int(bad) >= 0:
            raise ConfigError(f"non-finite {args.variant} loss at step {int(bad)} (last.pt keeps the last good epoch)")
        vals = acc.tolist()
        acc.zero_()
        ep_stats[:] = [a + b for a, b in zip(ep_stats, vals)]
        dt, ds = time.time() - interval["t"], step - interval["step"]
        if ds > 0 and interval["step"] > 0:  # steady state: the first interval (warm-up) is not counted
            train_s, train_imgs = train_s + dt, train_imgs + ds * args.batch_size
        if force_log and ds > 0 and vals[3]:
            eta = (args.epochs * steps_per_epoch - step) * dt / ds
            pur = f" purity {100 * vals[1] / vals[2]:.1f}" if vals[2] else ""
            log(f"epoch {epoch} step {step} loss {vals[0] / vals[3]:.4f}{pur} lr {opt.param_groups[0]['lr']:.4g} "
                f"{ds * args.batch_size / dt:.0f} img/s eta {eta / 60:.1f} min")
        interval.update(t=time.time(), step=step)

    if start_epoch == 0 and skip == 0 and step == 0 and (args.eval_every or 0) > 0:
        run_eval(0)  # the untrained network's k-NN (Fig. 4 starts here)
    interval.update(t=time.time(), step=step)
    epoch, batch = start_epoch, skip
    try:
        for epoch in range(start_epoch, args.epochs):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch)
            sampler.set_epoch(epoch)
            if split.images is not None:
                order = torch.tensor(list(sampler)[:steps_per_epoch * bl], device=device).view(steps_per_epoch, bl)
            else:
                ep_indices[:] = list(sampler)[skip * bl:]
                it = iter(loader)
            ep_stats[:] = [0.0, 0.0, 0.0, 0]
            for batch in range(skip, steps_per_epoch):
                if split.images is not None:
                    idx = order[batch]
                    y = labels[idx]
                    x_s, x_t = two_views(images[idx], args, split.mean, split.std)
                else:
                    (x_s, x_t), y = next(it)
                    x_s, x_t, y = (t.to(device, non_blocking=True) for t in (x_s, x_t, y))
                if args.channels_last:
                    x_s, x_t = (x.contiguous(memory_format=torch.channels_last) for x in (x_s, x_t))
                with amp:
                    q, k = net(x_s, x_t, args.ema)  # teacher EMA-updated inside, before its forward
                # METHOD: student mimics the teacher's similarity distribution over the queue anchors
                if args.variant == "isd":
                    loss = isd_loss(q, k, queue, args.tau_s, args.tau_t)
                else:
                    loss = moco_loss(q, k, queue, args.tau_s)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    ld = loss.detach()
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(ld), step + 1, first_bad)
                    # purity (diagnostic) is sampled before each log and at epoch end: no B x K search per step
                    sample = labelled and ((step + 1) % args.log_every == 0 or batch + 1 == steps_per_epoch)
                    ps, pc = purity(k, queue, y, queue_labels) if sample else (ld * 0, ld * 0)
                    acc += torch.stack([ld, ps, pc.float(), torch.ones_like(ld)])
                    ptr = enqueue(queue, queue_labels, ptr, _gather(k, world), _gather(y, world))  # after the loss
                step += 1
                if step % args.log_every == 0:
                    flush(epoch, True)
                if args.max_steps and step >= args.max_steps:
                    break
            skip = 0
            flush(epoch, False)
            stopped = bool(args.max_steps and step >= args.max_steps)
            done = batch + 1 == steps_per_epoch
            if done and ((args.eval_every and (epoch + 1) % args.eval_every == 0) or epoch + 1 == args.epochs):
                run_eval(epoch + 1)
            elif stopped:
                run_eval(epoch + (batch + 1) / steps_per_epoch)
            checkpoint(epoch + 1, 0) if done else checkpoint(epoch, batch + 1)
            interval.update(t=time.time(), step=step)
            if stopped:
                break
    except KeyboardInterrupt:
        checkpoint(epoch, batch)  # the interrupted step may be half done; resumable, not bit-exact
        log(f"interrupted: wrote {os.path.join(run_dir, 'last.pt')} (resume with --resume)")
        sys.exit(130)

    if not metrics and start_epoch >= args.epochs:  # resumed a finished run: measure it again
        run_eval(args.epochs)
    if main0:
        _save(dict(method="isd", args=vars(args), model=model.state_dict(), metrics=metrics),
              os.path.join(run_dir, "model.pt"))
        peak = (torch.cuda.max_memory_allocated(device) / 2**20 if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        log("final (last epoch): " + " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        if best:
            log(f"best epoch (chosen on the test set) {best['epoch']}: "
                + " ".join(f"{k} {v:.2f}" for k, v in best.items() if k != "epoch"))
        rate = f"{train_imgs / train_s:.1f} img/s" if train_s else "not measured (no step after the first log interval)"
        log(f"steady-state {rate}, peak memory {peak:.0f} MiB "
            f"({'cuda allocated' if cuda else 'max RSS'}), wall {time.time() - t_begin:.1f}s, saved {run_dir}")
    if world > 1:
        dist.destroy_process_group()


def main(argv=None):
    try:
        train(resolve(get_args(argv)))
    except (ConfigError, common.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
