"""ISD: Self-Supervised Learning by Iterative Similarity Distillation (and its MoCo-v2 baseline).

Tejankar, Koohpayegani, Pillai, Favaro, Pirsiavash -- ICCV 2021. https://arxiv.org/abs/2012.09259
Official code: https://github.com/UMBCvision/ISD (train_isd.py: ResNet-18, train_isd_plus.py: ResNet-50).

Idea: an EMA teacher's softmax over the similarities of a query view to a queue of past teacher embeddings (anchors)
is a soft "neighbourhood" that the student (backbone + predictor MLP), seeing another view, reproduces over the same
anchors (KL). The paper's baseline MoCo-v2 (Chen et al. 2020) classifies the query's own key against the queue:
--variant moco is MoCo-v2 itself (its own heads, temperature, momentum, views), not ISD with a switch flipped.

Usage:
    python isd.py                                          # digits, CPU, well under a minute
    python isd.py --dataset cifar10 [--variant moco]       # ResNet-18 (CIFAR stem)
    python isd.py --dataset imagenet --data-root /data --recipe r18   # (or r50) the paper's two recipes
    python isd.py --dataset imagenet --subset-file D1.txt [--variant moco]   # Table 4 (detail 9)
    python isd.py --dataset folder --data-root DIR         # your own images (detail 10)
    torchrun --nproc_per_node=4 isd.py --dataset imagenet ...;  python eval.py runs/<run>/model.pt --linear-probe

Implementation details (the algorithm: step_losses(); file names: the official code):
 1. q = normalize(predictor(proj_s(backbone_s(x_s)))), k = normalize(proj_t(backbone_t(x_t))), no grad (ISD.forward).
    Loss (Sec. 2): KL(softmax(k Q^T / tau_t) || softmax(q Q^T / tau_s)) over the K queue anchors only (no positive
    column), batch mean (official KLD: kl_div(log_softmax, softmax, 'batchmean')); no T^2; fp32.
 2. Teacher = copy of the student, moved BEFORE its forward pass each step (official, inside forward): theta_t <- m
    theta_t + (1 - m) theta_s over parameters only; BN statistics stay separate; both in train mode.
 3. Queue (MoCo's memory bank): K x D random L2-normalised rows; a ring buffer (K need not divide B) fed AFTER the loss
    with all ranks' keys (torchrun: a DDP student, the same teacher update on every rank); buffers: in last.pt too.
 4. ShuffleBN (MoCo builder.py; ISD: DataParallel): keys shuffled across ranks (one process: the --bn-splits BN groups
    of both backbones) and back: BN never pairs a key with its query. Group = images per GPU of the official runs (batch
    256): r18 128 (2 GPUs, README), r50 64 (4, run_isd_plus.sh), MoCo 32 (8); small presets: 8 groups (MoCo CIFAR demo).
 5. r18 (Sec. 3.1 "ResNet-18 experiments": tau_s = tau_t 0.02, K 128K, m 0.999, lr 0.01 x0.2 at 140, 180): no
    projection, predictor Linear(512, 512, no bias)-BN-ReLU-Linear(512, 512), MoCo-v2 views. r50 (Sec. 3.1 "ResNet-50
    experiments", train_isd_plus.py): projection MLP(D, 2D, D/4) on BOTH encoders, predictor MLP(D/4, 2D, D/4), teacher
    view weak, student strong (text; code default weak/strong = key/query; Table 5's best row, 59.2 / 62.0 as Table 1,
    is labelled the other way). Both: SGD momentum 0.9, wd 1e-4 on all parameters, batch 256, 200 epochs; RECIPES.
 6. MoCo-v2 (notes/isd.md): projection Linear(D, D)-ReLU-Linear(D, 128) without BN, no predictor, logits [q.k, q Q^T]
    / tau, positive in column 0, both views strong; RECIPES. Refused: --tau-t, --head r18 / r50, --teacher-view weak.
 7. Views: strong = MoCo-v2 (RRC 0.2-1, jitter 0.4/0.4/0.4/0.1 p 0.8, gray p 0.2, blur p 0.5, flip); weak = RRC +
    flip. Files: moco_v2_transform in workers, >= 12 px (the 23-px blur pads 11 px); in memory: on-device, no blur.
 8. Evaluation (fp32, eval mode, unaugmented L2-normalised backbone features, no heads; gallery = the train split):
    1-NN / 20-NN majority vote (the paper's tables), weighted 200-NN; the teacher as eval_knn.py builds it (teacher
    weights, the STUDENT's BN statistics); purity (train_isd_plus.py): the share of a teacher key's top-5 queue anchors
    with its label, over a fixed 1,024 gallery images. Linear probe (eval_linear.py): eval.py --linear-probe.
 9. Unbalanced (Sec. 3.2, Table 4): --unbalanced (8 of 38 seeded classes keep all images, the rest 100 / 1300; scaled
    to the dataset) or --subset-file (official D1..D10.txt); NN on the balanced test set against ALL train images of
    those classes, all and small (knn*_small) classes. Recipe, ISD and MoCo ("400 epochs with a memory bank size of
    8192 and cosine learning schedule"): 2x the preset's epochs, cosine, K 8192 (ImageNet) else 8192 N / 13,400 for N
    images (Fashion-MNIST: 9,596); explicit flags win; lr, tau, m are not stated (no released script): RECIPES.
10. --dataset folder, DIR = --data-root: DIR/train + DIR/test (or val): gallery + queries; DIR/train or DIR/<class>/:
    SSL on all, k-NN queries a fixed (seed 0) fifth of each class, gallery the rest; flat DIR: no labels, no k-NN.

Deviations:
 - Queue init rows L2-normalised as train_isd_plus.py (train_isd.py normalises columns; gone after K/B steps).
 - One process: split BN in both backbones only (the heads' BatchNorm1d sees the batch; DataParallel splits them).
 - ResNet-50 uses adaptive average pooling (official: a 7x7 pool, 224 px only). bf16 autocast on CUDA (--no-amp).
 - ImageNet-100 / folder / CIFAR / STL-10 / digits / fashionmnist settings are ours (the paper has none): PRESETS.
   On digits / fashionmnist ISD and MoCo share the preset's lr and momentum (tuned for few steps per epoch).
Paper (Table 1 rows "ISD", "MoCo-V2 [20] [11] 256 200"; linear / 1-NN / 20-NN): R18 ISD 53.8 / 41.5 / 46.6, MoCo-v2
51.0 / 37.7 / 42.1; R50 ISD 69.8 / 59.2 / 62.0, MoCo-v2 67.5 linear. Table 4 "Mean" (NN, all 38 / 30 rare classes): ISD
58.03 / 56.33, MoCo 57.12 / 53.75. Measured: README "Results" (Fashion-MNIST; ImageNet: not yet measured)."""
import argparse
import collections
import contextlib
import copy
import datetime
import errno
import fcntl
import itertools
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

if __name__ == "__main__":  # Ctrl-C while torch imports: exit 130, no traceback (then main() takes over)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

METHOD, DATA_PARALLEL = "isd", True
RECIPES = {  # the method's own settings; a dataset preset's lr / ema (small datasets) come before them
    "r18": dict(tau_s=0.02, tau_t=0.02, ema=0.999, head="r18", teacher_view="strong",  # Sec. 3.1 ResNet-18
                lr=0.01, lr_schedule="step", queue_size=128000),  # Sec. 3.1: lr 0.01, x0.2 at 140, 180; K 128K
    "r50": dict(tau_s=0.1, tau_t=0.01, ema=0.99, head="r50", teacher_view="weak",  # Sec. 3.1 ResNet-50 and
                lr=0.05, lr_schedule="cosine", queue_size=128000),  # train_isd_plus.py weak/strong --cos
    "moco": dict(tau_s=0.2, tau_t=0.2, ema=0.999, head="moco", teacher_view="strong",  # MoCo-v2 (notes/isd.md)
                 lr=0.03, lr_schedule="cosine", queue_size=65536),  # main_moco.py --mlp --aug-plus --cos
}
# Sec. 3.1: batch 256, 200 epochs, wd 1e-4; evaluated every 10 epochs as Fig. 4; eval_linear.py: a 40-epoch probe
_BIG = dict(image_size=224, epochs=200, batch_size=256, weight_decay=1e-4, workers=16, eval_every=10, log_every=100,
            probe_epochs=40)
_SMALL = dict(_BIG, recipe="r50", arch="resnet18", image_size=32, weight_decay=5e-4, workers=0, log_every=50)
PRESETS = {
    "imagenet": dict(_BIG),
    "imagenet100": dict(_BIG, queue_size=16384),  # ours: K 16K (Fig. 3: on par with 128K)
    # ours: ResNet-18 with the CIFAR stem, the r50 recipe (weak/strong, like ReSSL), wd 5e-4, K 4096 (ReSSL CIFAR).
    "cifar10": dict(_SMALL, queue_size=4096), "cifar100": dict(_SMALL, queue_size=4096),
    "stl10": dict(_SMALL, image_size=96, queue_size=16384),  # ours: SSL on train+unlabeled (105K images, 96 px)
    "folder": dict(_BIG, queue_size=16384, workers=8),  # ours; the k-NN monitor: detail 10
    # ours, the offline demo: K 512 (well below the 1,437 images), m 0.9 (11 steps per epoch: 0.99 makes the teacher
    # ~9 epochs old), crops >= 80% of an 8x8 digit; the probe scaled to 10 epochs.
    "digits": dict(_SMALL, arch="small", image_size=16, epochs=15, batch_size=128, lr=0.05, ema=0.9, queue_size=512,
                   eval_every=5, min_scale=0.8, probe_epochs=10),
    # ours, ~3.5 minutes per run on 2 CPU cores: a fixed random 20,000 of the 60,000 training images (k-NN gallery: all
    # 60,000), m 0.99 (78 steps per epoch), crops >= 50%, evaluated at the end only; the probe scaled to 10 epochs.
    "fashionmnist": dict(_SMALL, arch="small", image_size=28, epochs=8, batch_size=256, lr=0.05, ema=0.99,
                         queue_size=4096, eval_every=0, min_scale=0.5, train_subset=20000, probe_epochs=10),
    # benchmark only: the paper's batch 256 at 32 px (or --image-size 224); k-NN only at the end.
    "synthetic": dict(_SMALL, recipe="r18", weight_decay=1e-4, queue_size=4096, epochs=1, eval_every=0, log_every=10,
                      synthetic_n=512),
}
TENSOR_FORM = ("digits", "fashionmnist", "synthetic", "cifar10", "cifar100", "stl10")


# ------------------------------------------------------------------------------------------------ arguments
def get_args(argv=None):
    p = Parser(description="ISD (Tejankar et al., ICCV 2021) self-supervised learning, and its MoCo-v2 baseline")
    experiment_args(p)
    add = p.add_argument_group("method").add_argument
    add("--variant", choices=["isd", "moco"], help="isd, or moco = MoCo-v2 with its own settings (default isd)")
    add("--recipe", choices=["r18", "r50"], help="Sec. 3.1's R18 / R50 recipe (default: by --arch)" + preset("recipe"))
    add("--arch", choices=["resnet18", "resnet50", "small"], help="backbone (default: by --recipe)" + preset("arch"))
    add("--cifar-stem", action=argparse.BooleanOptionalAction, help="3x3 stride-1 conv1, no max-pool (default <=96 px)")
    add("--head", choices=["r18", "r50", "moco"], help="projection / predictor heads (default: the recipe's)")
    add("--tau-s", type=number(float, 0, low_open=True), help="student temperature (MoCo: tau; recipe)")
    add("--tau-t", type=number(float, 0, low_open=True), help="teacher temperature (recipe)")
    add("--ema", type=number(float, 0, 0.999999), help="teacher momentum m (recipe)" + preset("ema"))
    add("--queue-size", type=number(int, 1), help="K anchors (recipe)" + preset("queue_size"))
    add("--teacher-view", choices=["strong", "weak"], help="teacher augmentation (recipe)")
    add("--lr-schedule", choices=["step", "cosine"], help="recipe: step = x0.2 at the milestones")
    add("--lr-milestones", type=number(int, 1), nargs="*", help="step schedule epochs (default: 0.7, 0.9 x --epochs)")
    add("--min-scale", type=number(float, 0, 1, low_open=True), help="RandomResizedCrop min scale (default 0.2, "
        "MoCo-v2)" + preset("min_scale"))
    add("--bn-splits", type=number(int, 1), help="one process: ShuffleBN's split-BN groups (default: batch / 128 r18, "
        "/ 64 r50, / 32 moco as the official runs; 8 small-image presets, MoCo's CIFAR demo; 1 under torchrun)")
    add("--train-subset", type=number(int, 1), help="train on a fixed random N images" + preset("train_subset"))
    add("--unbalanced", action=argparse.BooleanOptionalAction, help="Table 4: a seeded long-tailed subset of labelled "
        "data, and Table 4's recipe: 2x the epochs, K 8192 (off ImageNet scaled to the subset), cosine (default off)")
    add("--subset-file", help="imagenet: an official unbalanced_dataset/D<n>.txt class and image list (+ --unbalanced)")
    add("--probe-epochs", type=number(int, 1), help="eval.py probe epochs (x0.1 at 3/8, 3/4)" + preset("probe_epochs"))
    add("--synthetic-n", type=number(int, 4), help="synthetic: images per split" + preset("synthetic_n"))
    args, world = p.parse_args(argv), int(os.environ.get("WORLD_SIZE", 1))
    given = {k for k, v in vars(args).items() if v is not None}  # typed by the user (presets and recipes fill later)
    args = resolve_args(args)
    if args.resume is None:  # the recipe's values for what neither the flags nor the dataset preset set
        args.arch = args.arch or ("resnet50" if args.recipe == "r50" else "resnet18")
        args.recipe = "moco" if args.variant == "moco" else args.recipe or ("r50" if args.arch == "resnet50" else "r18")
        args.variant = args.variant or "isd"
        vars(args).update({k: v for k, v in RECIPES[args.recipe].items() if getattr(args, k) is None})
    for key, fits, reason in (("tau_t", None, "MoCo-v2 has one temperature, --tau-s"),
                           ("head", "moco", "ISD's heads hold its predictor; MoCo-v2 has its own (--head moco)"),
                           ("teacher_view", "strong", "MoCo-v2 augments the query and the key alike (strong)")):
        if args.variant == "moco" and key in given and getattr(args, key) != fits:
            raise RunError(f"--{key.replace('_', '-')} {getattr(args, key)} does not apply to --variant moco: {reason}")
    if args.dataset not in TENSOR_FORM and args.image_size < 12:  # detail 7 (in memory: no blur, any size runs)
        raise RunError(f"--image-size {args.image_size}: image files get MoCo-v2's 23-px GaussianBlur: use >= 12")
    if args.dataset not in TENSOR_FORM and args.arch == "small":
        raise RunError("--arch small is for the small-image datasets (digits, fashionmnist, synthetic, cifar, stl10)")
    if args.subset_file and (args.dataset != "imagenet" or not os.path.isfile(args.subset_file)):
        raise RunError(f"--subset-file {args.subset_file}: needs --dataset imagenet and an existing D<n>.txt file")
    args.min_scale = 0.2 if args.min_scale is None else args.min_scale
    args.cifar_stem = args.image_size <= 96 if args.cifar_stem is None else args.cifar_stem
    args.unbalanced = bool(args.unbalanced or args.subset_file)
    if args.unbalanced and args.resume is None:  # detail 9: Table 4's recipe where no flag sets it
        args.epochs = args.epochs if "epochs" in given else 2 * args.epochs  # 400 = 2 x the recipes' 200
        args.lr_schedule = args.lr_schedule if "lr_schedule" in given else "cosine"
        if "queue_size" not in given:  # ImageNet: 8192; elsewhere K / N = 8192 / 13,400 (one key per image at most)
            args.queue_size = 8192 if args.dataset in ("imagenet", "imagenet100") else max(
                args.batch_size, round(8192 * len(load_data(args, "train")) / 13400))
    args.lr_milestones = args.lr_milestones or [round(0.7 * args.epochs), round(0.9 * args.epochs)]
    group = {"r18": 128, "r50": 64, "moco": 32}[args.recipe]  # detail 4: the official runs' images per GPU
    args.bn_splits = args.bn_splits or (1 if world > 1 else 8 if args.dataset in TENSOR_FORM else
                                        math.gcd(args.batch_size, max(1, args.batch_size // group)))
    if args.batch_size % (world * args.bn_splits) or args.batch_size > args.queue_size:
        raise RunError(f"--batch-size {args.batch_size} must divide by {world} process(es) x --bn-splits "
                       f"{args.bn_splits} and be at most --queue-size {args.queue_size}")
    query = folder_layout(args.data_root)[1] if args.dataset == "folder" else "test"
    if query != "test" and int(os.environ.get("RANK", 0)) == 0:  # detail 10, said once at the start
        print(f"note: {args.data_root}: " + ("no test/ or val/ folder: k-NN queries = a fixed fifth of each class "
              "(seed 0), gallery = the rest; SSL on all, labels unused" if query else "no class folders, so no k-NN"))
    args.eval_every = args.eval_every if query else 0  # no labels: only the closing evaluation (empty)
    args.run_name = args.run_name or f"isd_{args.dataset}_{args.variant}{'_unbalanced' * args.unbalanced}_s{args.seed}"
    return args


# ------------------------------------------------------------------------------------------------ model
class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with the training statistics of `splits` groups of the batch, as `splits` GPUs compute them (the
    MoCo CIFAR demo's one-GPU ShuffleBN); running statistics = the groups' mean; BatchNorm2d's state_dict."""

    def __init__(self, num_features, splits=1):
        super().__init__(num_features)
        self.splits = splits

    def forward(self, x):
        s = self.splits
        if not self.training or s == 1:
            return super().forward(x)
        n, c, h, w = x.shape  # [n, c] -> [n / s, s c]: group g holds the samples i with i mod s == g
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, c * s, h, w), mean, var, self.weight.repeat(s), self.bias.repeat(s), True,
                           self.momentum, self.eps)
        self.running_mean.copy_(mean.view(s, c).mean(0))
        self.running_var.copy_(var.view(s, c).mean(0))
        return out.reshape(n, c, h, w)


def build_backbone(arch, cifar_stem, bn_splits=1):
    """Backbone without classifier -> (module mapping [B, 3, H, W] to [B, D], D)."""
    def norm(c):
        return SplitBatchNorm(c, bn_splits)
    if arch == "small":  # ours: a ~0.1M-parameter CNN, so the offline demos fit in minutes on 2 CPU cores
        def block(i, o, s):
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), norm(o), nn.ReLU(inplace=True)]
        return nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten()), 128
    if arch not in ("resnet18", "resnet50"):
        raise RunError(f"unknown --arch {arch} (choose from resnet18, resnet50, small)")
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm)  # adaptive avg-pool: any resolution
    if cifar_stem:  # 3x3 stride-1 conv1 and no max-pool for 32-96 px inputs
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    dim, net.fc = net.fc.in_features, nn.Identity()
    return net, dim


def heads(head, dim):
    """(projection, predictor, out dim), details 5-6: train_isd.py (r18), train_isd_plus.py's get_mlp, MoCo's --mlp."""
    def mlp(i, h, o, bias=True):
        return nn.Sequential(nn.Linear(i, h, bias=bias), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, o))
    if head == "moco":
        return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 128)), nn.Identity(), 128
    if head == "r50":
        return mlp(dim, 2 * dim, dim // 4), mlp(dim // 4, 2 * dim, dim // 4), dim // 4
    return nn.Identity(), mlp(dim, dim, dim, bias=False), dim


class ISD(nn.Module):
    """student = predictor(proj(backbone(x))), teacher = its momentum copy without the predictor; buffers: the queue of
    K past teacher keys, their labels (-1 = unknown; only for the purity diagnostic) and the write pointer."""

    def __init__(self, args):
        super().__init__()
        backbone, dim = build_backbone(args.arch, args.cifar_stem, args.bn_splits)
        proj, predictor, out_dim = heads(args.head, dim)
        self.student = nn.Sequential(collections.OrderedDict(backbone=backbone, proj=proj, predictor=predictor))
        self.teacher = copy.deepcopy(nn.Sequential(collections.OrderedDict(backbone=backbone, proj=proj)))
        self.teacher.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(args.queue_size, out_dim), dim=1))
        self.register_buffer("queue_labels", torch.full((args.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, m):
        """Detail 2 (Sec. 2): theta_t <- m theta_t + (1 - m) theta_s over parameters only."""
        student = [*self.student.backbone.parameters(), *self.student.proj.parameters()]
        torch._foreach_mul_(list(self.teacher.parameters()), m)
        torch._foreach_add_(list(self.teacher.parameters()), student, alpha=1.0 - m)


# ------------------------------------------------------------------------------------------------ METHOD: losses
def isd_loss(q, k, queue, tau_s, tau_t):
    """Detail 1: batch-mean KL(softmax(k Q^T / tau_t) || softmax(q Q^T / tau_s)) -> scalar, gradient into q only.
    q: [B, D] student queries, k: [B, D] teacher keys, queue: [K, D] anchors; all L2-normalised."""
    dt = torch.promote_types(q.dtype, torch.float32)  # fp32 (or fp64) logits: autocast off, or it recasts to bf16
    with torch.autocast(q.device.type, enabled=False):
        queue = queue.detach().to(dt)
        sim_q = (q.to(dt) @ queue.t()) / tau_s
        sim_k = (k.detach().to(dt) @ queue.t()) / tau_t  # / 0.01: bf16 rounding would move logits by up to 0.2
        return F.kl_div(F.log_softmax(sim_q, dim=1), F.softmax(sim_k, dim=1), reduction="batchmean")


def moco_loss(q, k, queue, tau):
    """MoCo's InfoNCE (He et al. 2020, moco/builder.py): cross-entropy with target 0 over [q.k, q Q^T] / tau, the
    query's own key as the positive. q, k: [B, D], queue: [K, D], L2-normalised; no gradient into k or the queue."""
    dt = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):  # fp32 logits, positive and negatives alike
        q, k, queue = q.to(dt), k.detach().to(dt), queue.detach().to(dt)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1)
        return F.cross_entropy(logits / tau, torch.zeros(len(q), dtype=torch.long, device=q.device))


@torch.no_grad()
def enqueue(model, keys, labels):
    """FIFO ring buffer: keys [B, D] (and their labels) into rows ptr .. ptr + B - 1 (mod K); no host sync."""
    idx = (model.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(model.queue)
    model.queue[idx] = keys.to(model.queue.dtype)
    model.queue_labels[idx] = labels
    model.queue_ptr.copy_((model.queue_ptr + len(keys)) % len(model.queue))


@torch.no_grad()
def purity(keys, labels, queue, queue_labels, top=5):
    """Detail 8: the mean share of each labelled (>= 0) key's top-5 queue anchors that carry its label."""
    match = (queue_labels[(keys.float() @ queue.T).topk(top, dim=1).indices] == labels[:, None]).float().mean(1)
    return match[labels >= 0].mean().item() if bool((labels >= 0).any()) else float("nan")


@torch.no_grad()
def teacher_keys(teacher, x, seed, world):
    """Detail 4 (moco/builder.py _batch_shuffle_ddp / _batch_unshuffle_ddp): one seeded permutation of all ranks' key
    batch, the same on every rank; each rank embeds its slice; keys back in input order -> L2-normalised [B, D]."""
    rank = dist.get_rank() if world > 1 else 0
    x_all = gather(x, world)
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed)).to(x.device)
    k_all = gather(teacher(x_all[perm.view(world, -1)[rank]]), world)  # k_all[j] = key of x_all[perm[j]]
    return F.normalize(k_all[torch.argsort(perm)].view(world, len(x), -1)[rank].float(), dim=1)


def step_losses(net, model, views, step, args, world=1):
    """The algorithm of one step -> ({variant: loss}, this rank's teacher keys, to be enqueued after the step)."""
    x_s, x_t = views
    q = F.normalize(net(x_s).float(), dim=1)  # student: predictor(proj(backbone(x_s)))
    with torch.no_grad():
        model.momentum_update(args.ema)  # official: the teacher moves BEFORE its forward pass
        k = teacher_keys(model.teacher, x_t, args.seed * 1_000_003 + step, world)
    if args.variant == "moco":  # MoCo-v2: the query's own key is the positive, the queue the negatives
        return {"moco": moco_loss(q, k, model.queue, args.tau_s)}, k
    # METHOD: the student reproduces the teacher's similarity distribution over the queue anchors (Sec. 2)
    return {"isd": isd_loss(q, k, model.queue, args.tau_s, args.tau_t)}, k


def lr_factor(args, epoch):
    """Per epoch: cosine without warm-up (official util.adjust_learning_rate) or x0.2 at each milestone (Sec. 3.1)."""
    if args.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    return 0.2 ** sum(epoch >= m for m in args.lr_milestones)


# ------------------------------------------------------------------------------------------------ data and evaluation
def unbalanced_classes(args, num_classes):
    """Table 4's classes: 38 (or all, if fewer) drawn with --seed, 8 of 38 large, the rest small -> (large, small)."""
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(args.seed)).tolist()[:38]
    large = max(1, round(len(order) * 8 / 38))
    return sorted(order[:large]), sorted(order[large:])


def read_subset_file(path, root):
    """An official unbalanced_dataset/D<n>.txt -> (wnids, image paths, labels = indices into wnids)."""
    lines = [line.strip() for line in open(path)]
    if "class names :" not in lines or "Train Images:" not in lines:
        raise RunError(f"--subset-file {path}: not an official D<n>.txt ('class names :' ... 'Train Images:')")
    wnids = lines[lines.index("class names :") + 1:lines.index("Train Images:")]
    files = [line for line in lines[lines.index("Train Images:") + 1:] if line]  # /train/<wnid>/<file>
    bad = next((f for f in files if len(f.split("/")) < 4 or f.split("/")[2] not in wnids), None)
    if bad is not None:
        raise RunError(f"--subset-file {path}: image {bad!r} is not /train/<a listed class>/<file>")
    paths = [os.path.join(root, "imagenet", f.lstrip("/")) for f in files]
    return wnids, paths, [wnids.index(f.split("/")[2]) for f in files]


def folder_layout(root):
    """--dataset folder (detail 10) -> (training split, k-NN queries): DIR/train + DIR/test or val: ('train', 'test');
    DIR/train alone or DIR/<class>/: ('train' or 'all', 'holdout'); a flat DIR (no labels): ('all', None)."""
    found = [d for d in ("train", "test", "val") if os.path.isdir(os.path.join(root, d))]
    if "train" in found:
        return "train", "test" if len(found) > 1 else "holdout"
    classes = os.path.isdir(root) and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root))
    return "all", "holdout" if classes else None


def load_data(args, split):
    """'train' (what SSL trains on), 'gallery' (the balanced k-NN gallery) or 'test' (k-NN queries) as a common.Split;
    None without labels. Detail 9: --unbalanced / --subset-file restrict all three to the study's classes, and
    'train' to the large classes' every image and the small ones' 100 / 1300 of theirs."""
    base, query = "train", {"imagenet": "val", "imagenet100": "val"}.get(args.dataset, "test")
    if args.dataset == "folder":
        base, query = folder_layout(args.data_root)
    name = {"train": "train+unlabeled" if args.dataset == "stl10" else base, "gallery": base,
            "test": base if query == "holdout" else query}[split]
    if name is None:
        return None
    kw = dict(image_size=args.image_size, channels=3) if args.dataset in TENSOR_FORM else {}
    if args.dataset == "synthetic":
        kw["synthetic_size"] = (args.synthetic_n // (4 if split == "test" else 1), 10, args.image_size)
    out = common.load_split(args.dataset, args.data_root, name, **kw)
    if query == "holdout" and split != "train":  # detail 10: a fixed fifth of each class (>= 1 left in the gallery)
        g, test = torch.Generator().manual_seed(0), torch.zeros(len(out), dtype=torch.bool)
        for c in range(out.num_classes):
            idx = torch.nonzero(out.labels == c).squeeze(1)
            test[idx[torch.randperm(len(idx), generator=g)[:min(len(idx) - 1, round(len(idx) / 5))]]] = True
        out = out.subset(torch.nonzero(test == (split == "test")).squeeze(1))
    if args.subset_file:
        wnids, paths, labels = read_subset_file(args.subset_file, args.data_root)
        missing = sorted(set(wnids) - set(out.classes))
        if missing:
            raise RunError(f"--subset-file {args.subset_file}: class {missing[0]} is not in the {split} split")
        pick = [out.classes.index(w) for w in wnids]  # in the file's order, as read_subset_file's labels
        if split == "train":
            return common.Split(out.name, torch.tensor([pick[i] for i in labels]), out.num_classes, out.mean, out.std,
                                paths=paths, classes=out.classes)
        return out.subset(torch.nonzero(torch.isin(out.labels, torch.tensor(pick))).squeeze(1))
    if args.unbalanced:
        large, small = unbalanced_classes(args, out.num_classes)
        g, keep = torch.Generator().manual_seed(args.seed), []
        for c in large + small:
            idx = torch.nonzero(out.labels == c).squeeze(1)
            n = len(idx) if c in large or split != "train" else max(1, round(len(idx) * 100 / 1300))
            keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
        return out.subset(torch.cat(keep).sort().values)
    return common.random_subset(out, args.train_subset) if split == "train" and args.train_subset else out


def train_batches(args, data, epoch, skip, device, rank=0, world=1):
    """This epoch's ((student view, teacher view), labels) on the device from batch `skip` on (a seeded permutation,
    drop_last as the official loader, each rank its slice); batch j seeded by seed_step: a resumed epoch repeats."""
    batches = common.epoch_batches(data["split"].labels, args.batch_size, args.seed, epoch, rank, world, drop_last=True)
    if "loader" in data:  # image files: both views made by DataLoader workers
        for j, (views, y) in enumerate(common.loader_batches(data["loader"], batches[skip:], device,
                                                             (args.seed, epoch, rank), skip), skip):
            seed_step(args, epoch * len(batches) + j, rank)
            yield views, y
        return
    for j, b in enumerate(batches[skip:], skip):
        seed_step(args, epoch * len(batches) + j, rank)
        x = data["images"][b.to(device)]
        views = view(x, args, True, data["split"]), view(x, args, args.teacher_view == "strong", data["split"])
        yield views, data["labels"][b.to(device)]


def view(x, args, strong, split):
    """Detail 7 on the device: uint8 [B, C, H, W] -> RandomResizedCrop + flip (+ MoCo-v2's colour ops if strong)."""
    v = common.random_hflip(common.random_resized_crop(x, args.image_size, scale=(args.min_scale, 1.0)))
    if strong:
        v = common.random_grayscale(common.color_jitter(v, 0.4, 0.4, 0.4, 0.1, p=0.8), p=0.2)
    return common.normalize(v, split.mean, split.std)


EVAL_ARGS = ("dataset", "image_size", "synthetic_n", "unbalanced", "subset_file", "seed", "arch", "cifar_stem", "head",
             "queue_size")  # eval.py: the arguments that define the network, the test data and the evaluation
model_from_args = ISD  # eval.py contract: model_from_args(args) -> the module saved in model.pt (no downloads)


def eval_transform(args, split, augment=False):
    """The evaluation input (None = normalise only), or eval_linear.py's RandomResizedCrop + flip when augment (small
    images: the crop scale of the SSL views, ours; files: the official 0.08-1)."""
    if split.images is not None:
        return (lambda u: view(u, args, False, split)) if augment else None
    return common.dml_train_transform(args.image_size) if augment else \
        common.eval_transform(round(args.image_size * 256 / 224), args.image_size)


@torch.no_grad()
def features(model, args, device, split, augment=False, transform=None):
    """eval.py --linear-probe: (student backbone features [N, D], labels [N]) of 'train' (the gallery split), 'test'
    or a common.Split (eval.py's transfer and few-label probes), in eval mode; augment draws a fresh RandomResizedCrop
    + flip of every image (eval_linear.py); transform replaces the input pipeline (eval.py's transfer probe: BYOL's)."""
    model.eval()
    data = split if isinstance(split, common.Split) else load_data(args, "gallery" if split == "train" else "test")
    return common.embed(model.student.backbone, data, device, workers=args.workers,
                        transform=transform or eval_transform(args, data, augment))


@torch.no_grad()
def embeddings(model, args, device):
    """eval.py contract (detail 8): L2-normalised backbone features of the test split ("emb", "labels") and of the
    gallery ("train_emb", "train_labels"), of the student and ("teacher_" ...) the teacher; {} without labels."""
    gallery, test = load_data(args, "gallery"), load_data(args, "test")
    if test is None or bool((gallery.labels < 0).all()) or bool((test.labels < 0).all()):
        return {}
    model.eval()
    teacher = copy.deepcopy(model.teacher.backbone)  # with the student's BN running statistics (eval_knn.py)
    for t, s in zip(teacher.buffers(), model.student.backbone.buffers()):
        t.copy_(s)
    out = {}
    for prefix, split in (("train_", gallery), ("", test)):
        s, t, y = common.embed(lambda x: (model.student.backbone(x), teacher(x)), split, device, workers=args.workers,
                               transform=eval_transform(args, split))
        out.update({prefix + "emb": F.normalize(s, dim=1), "teacher_" + prefix + "emb": F.normalize(t, dim=1),
                    prefix + "labels": y})
    return out


def evaluate(model, args, device):
    """k-NN of the student and ('teacher/') the teacher: knn1, knn20, knn200w (%); purity of the queue; unbalanced runs
    also knn1_small / knn20_small (the small classes' test images only). {} without labelled splits."""
    out = embeddings(model, args, device)
    if not out:
        return {}
    metrics = common.knn_metrics(out["train_emb"], out["train_labels"], out["emb"], out["labels"])
    if args.unbalanced:  # k-NN accuracy on the small classes too (Table 4)
        test = load_data(args, "test")
        if args.subset_file:  # small = fewer than half the largest class's images (a listed class with none: small)
            wnids, _, labels = read_subset_file(args.subset_file, args.data_root)
            counts = torch.bincount(torch.tensor(labels), minlength=len(wnids))
            small = [test.classes.index(w) for w, n in zip(wnids, counts) if n < counts.max() / 2]
        else:
            small = unbalanced_classes(args, test.num_classes)[1]
        mask = torch.isin(out["labels"], torch.tensor(small, device=out["labels"].device))
        for k in (1, 20):
            metrics[f"knn{k}_small"] = 100 * common.knn_accuracy(out["train_emb"], out["train_labels"],
                                                                 out["emb"][mask], out["labels"][mask], k=k)
    metrics.update({"teacher/" + k: v for k, v in common.knn_metrics(
        out["teacher_train_emb"], out["train_labels"], out["teacher_emb"], out["labels"]).items()})
    if bool((model.queue_labels >= 0).any()):  # the queue's purity for (up to) 1,024 gallery images' teacher keys
        sub = common.random_subset(load_data(args, "gallery"), 1024)  # fixed: file datasets are sorted by class
        keys, labels = common.embed(model.teacher, sub, device, workers=args.workers,
                                    transform=eval_transform(args, sub))
        metrics["purity"] = 100 * purity(F.normalize(keys, dim=1), labels, model.queue, model.queue_labels)
    return metrics


# ------------------------------------------------------------------------------------------------ training
def run(args):
    device, rank, world = setup(args)
    if args.batch_size % world:
        raise RunError(f"--batch-size {args.batch_size} does not divide into {world} processes")
    split = load_data(args, "train")
    load_data(args, "test")  # a missing test split fails now, not after the first epoch
    if len(split) < args.batch_size:
        raise RunError(f"--batch-size {args.batch_size} is larger than the {len(split)} training images")
    if split.images is not None:  # small images live on the device as uint8; views are made there
        data = dict(split=split, images=split.images.to(device), labels=split.labels.to(device))
    else:  # image files: the two views (student strong, teacher strong or weak) in DataLoader workers
        views = common.TwoViews(common.moco_v2_transform(args.image_size, True, (args.min_scale, 1.0)),
                                common.moco_v2_transform(args.image_size, args.teacher_view == "strong", (args.min_scale, 1.0)))
        data = dict(split=split, loader=common.make_loader(common.ImageFiles(split.paths, split.labels, views), args.workers))
    run_ = start_run(args, device, rank)
    model = ISD(args).to(device, memory_format=memory_format(args, device))  # identical on every rank (same seed)
    optimizer = torch.optim.SGD(model.student.parameters(), lr=args.lr, momentum=0.9,  # Sec. 3: SGD 0.9, wd on all
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(args, epoch))
    epoch, batch, step = resume(args, run_, model, optimizer, scheduler)
    net = data_parallel(torch.compile(model.student) if args.compile else model.student, device, world)
    with training():  # a first SIGINT / SIGTERM stops after the step in flight, with a last.pt
        meter = train(args, model, net, optimizer, scheduler, data, run_, device, epoch, batch, step, rank, world)
    if rank == 0:
        save_checkpoint(args, run_, "model.pt", model, metrics=final_metrics(run_))
        print_summary(run_, meter)
    if world > 1:
        dist.barrier()  # the other ranks wait for rank 0's last evaluation


def train(args, model, net, optimizer, scheduler, data, run, device, epoch, batch, step, rank, world):
    steps_per_epoch = len(data["split"]) // args.batch_size  # drop_last (official loader)
    total = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    meter = Meter(args, run, device, step, total)
    if step == 0 and args.eval_every and rank == 0:  # METHOD: the untrained network's k-NN (Fig. 4 starts there)
        log_eval(run, meter, 0, 0, evaluate(model, args, device))
    while epoch < args.epochs and step < total:
        model.train()
        for views, y in train_batches(args, data, epoch, batch, device, rank, world):
            with autocast(args, device):
                views = [v.contiguous(memory_format=memory_format(args, device)) for v in views]
                losses, keys = step_losses(net, model, views, step, args, world)  # METHOD
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            enqueue(model, gather(keys, world), gather(y, world))  # METHOD: after the loss, keys of all ranks (Sec. 2)
            step, batch = step + 1, batch + 1
            meter.add(losses, len(y) * world, epoch, step, optimizer.param_groups[0]["lr"])
            if step >= total or stop_requested(world):
                break
        meter.check()
        if batch == steps_per_epoch:  # the epoch is complete
            epoch, batch = epoch + 1, 0
            scheduler.step()
            if rank == 0 and ((args.eval_every and epoch % args.eval_every == 0) or epoch == args.epochs or step >= total):
                with meter.paused():  # the other ranks wait in their next collective
                    log_eval(run, meter, epoch, step, evaluate(model, args, device))
        with meter.paused():
            save_checkpoint(args, run, "last.pt", model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            epoch=epoch, batch=batch, step=step)
        if stop_requested(world) and step < total:  # all ranks take the same decision
            stop(run, step, world)
    if rank == 0 and (not run["history"] or run["history"][-1]["step"] != step):  # stopped in an epoch
        log_eval(run, meter, epoch + 1 if batch else epoch, step, evaluate(model, args, device))
    return meter


# ================================================================================================ data parallel
# The same text in camd.py and isd.py (test_smoke.py checks): edit both copies together.
class GatherWithGrad(torch.autograd.Function):
    """all_gather (equal slices) whose backward hands each rank the gradient of its own slice summed over ranks, so
    a loss of the gathered batch computed on every rank gets DDP's gradient of the single-device loss."""

    @staticmethod
    def forward(ctx, t):
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(t, world, grad=False):
    """`t` of all ranks concatenated along dim 0, in rank order (MoCo's concat_all_gather); grad: differentiable."""
    if world == 1:
        return t
    if grad:
        return GatherWithGrad.apply(t)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def data_parallel(model, device, world):
    """DDP around the trained module under torchrun (identical initial weights: every rank seeds the same)."""
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
# ================================================================================================ end of data parallel


# ================================================================================================ run bookkeeping
# The same text in s2sd.py, camd.py, spkd.py and isd.py (test_smoke.py checks): edit the four copies together.
# As cleanRL says of its shared blocks: try not to modify it. What the method does is all above this line.
class RunError(Exception):
    """Bad input, or a run that cannot go on: main() prints the message as one line and exits with 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own complaints: one line and exit 2, like every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def number(kind, low, high=math.inf, low_open=False):
    """argparse type: an int or float in [low, high] ((low, high] with low_open); nan and inf refused."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not ((low < value) if low_open else (low <= value)) or not value <= high or value == math.inf:
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}"
                                             + (f" and <= {high}" if high < math.inf else "") + f", got {text}")
        return value
    return parse


def preset(key):
    """' (preset: digits 6, cub 150)': what each --dataset preset gives `key`, for a help string."""
    given = [f"{name} {values[key]}" for name, values in PRESETS.items() if values.get(key) is not None]
    return f" (preset: {', '.join(given)})" if given else ""


DEFAULTS = dict(dataset="digits", data_root="./data", seed=0, device="auto", workers=4, channels_last=True,
                compile=False, eval_every=1, log_every=50, save_dir="runs", deterministic=False)
EXPERIMENT_FLAGS = [  # flag, argparse type (bool: --x/--no-x), help; none has an argparse default (resolve_args)
    ("--dataset", list(PRESETS), "the data and the preset that goes with it (default digits: offline, ~1 min on CPU)"),
    ("--data-root", str, "folder with one folder per dataset; --dataset folder: your image folder (default ./data)"),
    ("--epochs", number(int, 1), "training epochs"), ("--batch-size", number(int, 2), "global batch size"),
    ("--lr", number(float, 0, low_open=True), "learning rate"), ("--weight-decay", number(float, 0), "weight decay"),
    ("--image-size", number(int, 8), "training resolution in pixels"),
    ("--seed", number(int, 0), "seeds the weights, the data order and every augmentation (default 0)"),
    ("--device", ["auto", "cuda", "mps", "cpu"], "default auto: cuda, else mps, else cpu"),
    ("--workers", number(int, 0), "DataLoader workers for image files (small images stay on the device; default 4)"),
    ("--amp", bool, "bf16 autocast in training (default: on with CUDA); --no-amp = the papers' fp32; eval is fp32"),
    ("--channels-last", bool, "channels_last memory format on CUDA (default on; no effect elsewhere)"),
    ("--compile", bool, "torch.compile the trained network (default off)"),
    ("--eval-every", number(int, 0), "evaluate every N epochs; 0 = only at the end (default 1)"),
    ("--log-every", number(int, 1), "a log line every N steps (default 50)"),
    ("--save-dir", str, "where run folders go (default runs)"),
    ("--run-name", str, "run folder under --save-dir (default from the flags; a taken name gets -2, -3, ...)"),
    ("--max-steps", number(int, 1), "stop after N optimizer steps in all (smoke tests, benchmarks; default none)"),
    ("--deterministic", bool, "deterministic kernels and no cudnn.benchmark (default off)"),
    ("--resume", str, "a run's last.pt: continue it in its folder, flags not given taken from it (rerunning the same "
                      "command continues its unfinished run by itself)"),
    ("--tensorboard", bool, "TensorBoard logs in the run folder (default: on when tensorboard is installed)")]
RESUME_MAY_CHANGE = ("resume", "max_steps", "device", "workers", "log_every", "data_root", "tensorboard", "compile",
                     "amp")  # amp: a CUDA run resumed on a CPU may take --no-amp
STATE = dict(signal=0, at=0.0, training=False, group=None, locks=[])  # a stop signal and when; torchrun's CPU group


def experiment_args(p):
    g = p.add_argument_group("experiment")
    for flag, kind, text in EXPERIMENT_FLAGS:
        text += preset(flag[2:].replace("-", "_"))
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            g.add_argument(flag, **({"choices": kind} if isinstance(kind, list) else {"type": kind}), help=text)


def resolve_args(args):
    """Fill each flag not given from --resume's checkpoint (its step budget too), else the --dataset preset, else
    DEFAULTS; refuse a given flag that contradicts the checkpoint, and resuming a finished run."""
    if args.resume is not None:
        if args.run_name is not None or args.save_dir is not None:
            raise RunError("--run-name and --save-dir do not go with --resume: a resumed run stays in its own folder")
        if os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(args.resume)), "model.pt")):
            raise RunError(f"--resume {args.resume}: that run is finished (it has a model.pt) and is never trained "
                           "further or overwritten; to train longer, start a new run (e.g. with a larger --epochs)")
        for key, saved in load_checkpoint(args.resume)["args"].items():
            given = getattr(args, key, None)
            if given is None:
                setattr(args, key, saved)
            elif key not in RESUME_MAY_CHANGE and json.dumps(given) != json.dumps(saved):
                raise RunError(f"--resume {args.resume} was trained with --{key.replace('_', '-')} {saved}, not "
                               f"{given}: drop the flag to continue that run, or start a new one")
    for key, value in {**DEFAULTS, **PRESETS[args.dataset or DEFAULTS["dataset"]]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, json.loads(json.dumps(value)))  # a copy: presets hold lists
    if args.run_name is not None and (os.path.basename(args.run_name) != args.run_name or args.run_name in ("", ".", "..")):
        raise RunError(f"--run-name {args.run_name}: must be a plain folder name (it is created inside --save-dir)")
    return args


def setup(args):
    """Device, torchrun's process group (where the script supports it), seed, backend flags -> (device, rank, world)."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if world > 1 and not DATA_PARALLEL:
        raise RunError(f"{METHOD}.py trains on one process: start it with python, not torchrun")
    kind = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not torch.backends.mps.is_available()):
        raise RunError(f"--device {kind}: there is no such device on this machine; use --device cpu (or auto)")
    device = torch.device(f"cuda:{local}" if kind == "cuda" else kind)
    if kind == "cuda":  # no TF32 (cuDNN's default is on): --no-amp is the papers' fp32 and evaluation exact fp32
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = not args.deterministic, False
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)
    if world > 1 and not dist.is_initialized():  # (a teacher trained first runs setup twice)
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
        # the stop flag's group: a CPU all-reduce (the other ranks wait in it for rank 0's evaluation: 2 h too)
        STATE["group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
    args.amp = kind == "cuda" if args.amp is None else args.amp
    torch.manual_seed(args.seed)
    return device, rank, world


def seed_step(args, step, rank=0):
    """Step `step` (0-based: epoch e, batch j -> e * batches per epoch + j) draws its randomness (views, sampling) from
    its own seed: a resumed run takes exactly the steps of the uninterrupted one, and every rank draws its own views."""
    torch.manual_seed(((args.seed * 1_000_003 + step) * 1_009 + rank) % 2**63)


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)


def memory_format(args, device):
    return torch.channels_last if args.channels_last and device.type == "cuda" else torch.contiguous_format


def why(error):
    """The first line of an exception's message (its type when the message is empty), for a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def atomic_save(obj, path, text=False):
    """Write a temporary file, then rename: the previous file stays intact whatever happens (text: obj is a str)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if text:
            with open(tmp, "w") as f:
                f.write(obj)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk (torch.save: "unexpected pos", "file write failed"), no access
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and "pos" not in str(e) and "write" not in str(e):
            raise  # not a failed write: a bug, with its traceback
        free = shutil.disk_usage(os.path.dirname(path)).free / 2**20
        raise RunError(f"cannot write {path} ({why(e)}; {free:.0f} MiB free there); a previous one is intact") from None


def start_run(args, device, rank):
    """The run folder (rank 0; --resume's own or run_folder's), locked against a second process; config.json and
    TensorBoard there."""
    run = dict(dir=None, history=[], tb=None, t0=time.time(), rank=rank)
    if rank == 0:
        run["dir"] = lock(os.path.dirname(os.path.abspath(args.resume))) if args.resume else run_folder(args)
    if dist.is_initialized():  # every rank resumes what rank 0 chose
        chosen = [args.resume]
        dist.broadcast_object_list(chosen, group=STATE["group"])
        args.resume = chosen[0]
    if rank != 0:
        return run
    for name in os.listdir(run["dir"]):  # what a process killed while writing left behind (kill -9, a full disk)
        if name.rpartition(".tmp")[1] and name.rpartition(".tmp")[2].isdigit():
            os.remove(os.path.join(run["dir"], name))
    git = shutil.which("git") and subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                 cwd=os.path.dirname(os.path.abspath(__file__)))
    config = dict(vars(args), method=METHOD, torch=torch.__version__, torchvision=torchvision.__version__,
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                  git_commit=git.stdout.strip() if git and git.returncode == 0 else None)
    print("config: " + json.dumps(config, sort_keys=True), flush=True)
    atomic_save(json.dumps(config, indent=1, sort_keys=True), os.path.join(run["dir"], "config.json"), text=True)
    if args.tensorboard is not False:
        try:
            from torch.utils.tensorboard import SummaryWriter
            run["tb"] = SummaryWriter(run["dir"])
        except ImportError:
            if args.tensorboard:
                raise RunError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    return run


def run_folder(args):
    """The first of --run-name, name-2, name-3, ... under --save-dir that is new (then created), holds an unfinished
    run of these same arguments (then continued: rerunning a preempted command goes on where it stopped) or what a
    start of them left before its first checkpoint (then reused); never a finished run's folder nor one in use."""
    base = os.path.join(args.save_dir, args.run_name)
    for path in (base if i == 1 else f"{base}-{i}" for i in itertools.count(1)):
        try:
            os.makedirs(path)  # atomic: two runs started at once with one name still get two folders
        except FileExistsError:
            try:  # an unfinished run: last.pt, a config.json of these arguments (the step budget too), no model.pt
                with open(os.path.join(path, "config.json")) as f:
                    saved = json.load(f)
                same = all(json.dumps(v) == json.dumps(saved.get(k)) for k, v in vars(args).items()
                           if k == "max_steps" or k not in RESUME_MAY_CHANGE)
                if same and lock(path):  # RunError if another process runs it; what is there is then ours to judge
                    kept = [n for n in ("last.pt", "model.pt") if os.path.isfile(os.path.join(path, n))]
                    if kept == ["last.pt"]:
                        args.resume = os.path.join(path, "last.pt")
                        print(f"continuing the unfinished run in {path} (same arguments; --run-name NAME starts anew)")
                        return path
                    if not kept:  # a start that failed before its first checkpoint (no weights, bad data, kill -9)
                        print(f"note: {path}: an earlier start of these arguments left no checkpoint; training there")
                        return path
            except (OSError, ValueError, RunError):
                pass
            continue
        except OSError as e:  # no permission, or a file or a dangling link in the way
            raise RunError(f"--save-dir {args.save_dir}: cannot create a run folder there ({e.strerror})") from None
        if path != base:
            print(f"note: {base} holds another run; this run writes to {path}")
        return lock(path)


def lock(path):
    """path, once this process holds path/.lock (until it ends); RunError if another one does."""
    try:
        STATE["locks"].append(open(os.path.join(path, ".lock"), "a"))
        fcntl.flock(STATE["locks"][-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:  # BlockingIOError: locked; or no permission, or a file system without locks
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            print(f"note: {path}: this file system cannot lock ({why(e)}); one process per run folder, please")
            return path
        raise RunError(f"{path} is in use by another process ({why(e)}); wait for it to finish") from None
    return path


def load_checkpoint(path, keys=("method", "args", "model", "optimizer", "scheduler", "epoch", "batch", "step")):
    """A checkpoint of this script, checked before use: RunError naming the file and what is wrong."""
    if not os.path.isfile(path):
        raise RunError(f"--resume {path}: " + ("a folder; give the last.pt inside it" if os.path.isdir(path) else "no such file"))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # only torch.load is inside: a foreign or corrupt file fails in many ways (Index, Memory...)
        raise RunError(f"--resume {path}: not a readable checkpoint ({why(e)})")
    if not isinstance(ckpt, dict) or ckpt.get("method") != METHOD:
        raise RunError(f"--resume {path}: not a checkpoint of {METHOD}.py")
    missing = [k for k in keys if k not in ckpt] + ([] if isinstance(ckpt.get("args"), dict) else ["args"])
    if missing:
        raise RunError(f"--resume {path}: lacks {', '.join(missing)} (resume from a run's last.pt, not its model.pt)")
    return ckpt


def resume(args, run, model, optimizer, scheduler):
    """Load --resume's last.pt into the model, optimizer and schedule; returns (epoch, batch, step) to go on from."""
    if args.resume is None:
        return 0, 0, 0
    ckpt = load_checkpoint(args.resume)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RunError(f"--resume {args.resume} does not fit this model: {why(e)}")
    run["history"] = list(ckpt.get("history", []))
    print(f"resumed {args.resume} at epoch {ckpt['epoch'] + 1}, batch {ckpt['batch']}, step {ckpt['step']}")
    return ckpt["epoch"], ckpt["batch"], ckpt["step"]


def final_metrics(run):
    """The last evaluation's metrics, without its bookkeeping fields (model.pt's "metrics")."""
    return {k: v for k, v in run["history"][-1].items() if k not in ("epoch", "step", "elapsed_s", "images_per_s")}


def save_checkpoint(args, run, name, model, **state):
    """last.pt (all --resume needs; randomness is re-derived from seed and step) or model.pt (eval.py's contract)."""
    if run["dir"] is not None:
        atomic_save(dict(method=METHOD, args=vars(args), model=model.state_dict(), history=run["history"], **state),
                    os.path.join(run["dir"], name))


class Meter:
    """Loss sums stay on the device, read at log steps and checkpoints (a non-finite term: named with its 1-based
    step); images/s (.rate) = images after the warm-up steps over their time up to the last log step, paused() (eval,
    checkpoints) excluded: the one number on stdout, in metrics.jsonl and in TensorBoard."""

    def __init__(self, args, run, device, step, total):
        self.args, self.run, self.device, self.total = args, run, device, total
        self.warm = step + max(1, min(10, (total - step) // 5))  # the first steps compile, allocate, warm caches
        self.sums = self.bad = self.t_warm = self.rate = None
        self.count, self.images, self.t_paused = 0, 0, 0.0

    def add(self, losses, images, epoch, step, lr):
        """After each optimizer step: {name: 0-dim loss}, images in the global batch, 0-based epoch, 1-based step."""
        values = torch.stack([v.detach().float() for v in losses.values()])
        if self.sums is None:
            self.names, self.sums, self.bad = list(losses), torch.zeros_like(values), torch.full_like(values, -1)
        self.sums += values
        self.bad = torch.where((self.bad < 0) & ~torch.isfinite(values), float(step), self.bad)
        self.count += 1
        if step == self.warm:
            self.t_warm, self.t_paused, self.images = self.sync(), 0.0, 0
        elif self.t_warm is not None:
            self.images += images
        if step % self.args.log_every == 0 or step == self.total:
            self.check()
            if self.images:  # the steady-state rate, taken here: time spent after this step never counts
                self.rate = self.images / max(self.sync() - self.t_warm - self.t_paused, 1e-9)
            mean = dict(zip(self.names, (self.sums / self.count).tolist()))
            eta = f" | eta {(self.total - step) * self.args.batch_size / self.rate / 60:.1f} min" if self.rate else ""
            if self.run["rank"] == 0:
                print(f"epoch {epoch + 1} step {step}/{self.total} | " + " ".join(f"{n} {v:.4f}" for n, v in
                      mean.items()) + f" | lr {lr:.3g} | {self.rate or 0:.1f} img/s{eta}", flush=True)
            tensorboard(self.run, "train/", {**mean, "lr": lr, "images_per_s": self.rate or 0}, step)
            self.sums.zero_()
            self.count = 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.time()

    def check(self):
        """Host sync: RunError at the first non-finite loss component, naming it and its 1-based step."""
        if self.bad is not None and bool((self.bad >= 0).any()):
            step, name = min((s, n) for s, n in zip(self.bad.tolist(), self.names) if s >= 0)
            last = os.path.join(self.run["dir"] or ".", "last.pt")
            kept = (f"{last} holds the last good checkpoint" if os.path.isfile(last) else "no checkpoint was written yet"
                    if self.run["rank"] == 0 else "rank 0's last.pt, if it wrote one, is the last good checkpoint")
            raise RunError(f"non-finite {name} loss at step {step:.0f}; stopped ({kept})")

    @contextlib.contextmanager
    def paused(self):
        """Time inside (evaluation, checkpoints) is not training time."""
        start = self.sync()
        yield
        self.t_paused += self.sync() - start


def tensorboard(run, prefix, values, step):
    for name, value in values.items() if run["tb"] else ():
        run["tb"].add_scalar(prefix + name, value, step)


def log_eval(run, meter, epoch, step, metrics):
    """One evaluation (1-based epoch): a line on stdout, a row in metrics.jsonl (rewritten atomically), TensorBoard."""
    run["history"].append(dict(epoch=epoch, step=step, **metrics, elapsed_s=round(time.time() - run["t0"], 1),
                               images_per_s=None if meter.rate is None else round(meter.rate, 1)))
    if metrics:  # (none: unlabelled data)
        print(f"eval  epoch {epoch} step {step} | {shown(metrics)}", flush=True)
    if run["dir"] is not None:
        atomic_save("".join(json.dumps(r) + "\n" for r in run["history"]), os.path.join(run["dir"], "metrics.jsonl"),
                    text=True)
    tensorboard(run, "eval/", metrics, step)


def shown(metrics):
    """'R@1 90.12  NMI 49.00' (percent); a boolean metric "collapsed" (every test embedding nearly one point, as a
    diverged model gives) is said in words: its numbers are chance, not a result."""
    return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if not isinstance(v, bool)) + "".join(
        f"  | {k.upper()}: every test embedding is (nearly) one point" for k, v in metrics.items() if v is True)


def print_summary(run, meter, references=()):
    """The headline (the last evaluation), each metric's best epoch (chosen on the test set), speed, memory."""
    last, rows = run["history"][-1], run["history"]
    names = [k for k, v in final_metrics(run).items() if not isinstance(v, bool)]
    for label, metrics in references:
        print(f"{label}: {shown(metrics)}")
    print(f"final (last epoch {last['epoch']}, step {last['step']}; the headline): "
          + (shown(final_metrics(run)) or "no metrics (no labelled test data)"))
    best = {k: max((r for r in rows if k in r), key=lambda r: r[k]) for k in names}
    if best:
        print("best epoch of each metric (chosen on the test set): "
              + "  ".join(f"{k} {best[k][k]:.2f} (epoch {best[k]['epoch']})" for k in names))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (30 if sys.platform == "darwin" else 20)  # B / KiB
    memory = (f"{torch.cuda.max_memory_allocated(meter.device) / 2**30:.2f} GiB (CUDA, max allocated)" if
              meter.device.type == "cuda" else f"{rss:.2f} GiB (max RSS)")
    rate = f"{meter.rate:.1f} images/s (steady state)" if meter.rate else "not measured (too few steps)"
    print(f"throughput {rate}, peak memory {memory}, wall {time.time() - run['t0']:.1f} s; run folder {run['dir']}")
    if run["tb"]:
        run["tb"].close()


def on_signal(signum, frame):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption, timeout, docker stop). Inside training(), the first one
    lets the step in flight finish and last.pt be written (stop_requested); a second one (not the same signal within
    2 s: a duplicate delivery), or one outside training, stops at once. main() exits with 128 + the signal."""
    repeat = signum == STATE["signal"] and time.time() - STATE["at"] < 2  # torchrun forwards what Slurm sends all
    if torch.utils.data.get_worker_info() is not None or (STATE["signal"] and not STATE["training"]) or repeat:
        return  # DataLoader workers inherit this handler (the main process decides); a stopping run ignores repeats
    if STATE["training"] and not STATE["signal"]:
        STATE["signal"], STATE["at"] = signum, time.time()
        print(f"\n{signal.Signals(signum).name}: stopping after the step in flight (again: at once)", file=sys.stderr)
        return
    STATE["signal"] = STATE["signal"] or signum
    raise KeyboardInterrupt(f"a second {signal.Signals(signum).name}: stopped at once" if STATE["training"] else "")


@contextlib.contextmanager
def training():
    STATE["training"] = True
    try:
        yield
    finally:
        STATE["training"] = False
    if STATE["signal"]:  # it came during the final evaluation: the run is complete (not stopped)
        print(f"{signal.Signals(STATE['signal']).name} came after the last step: the run is complete", file=sys.stderr)


def stop_requested(world):
    """Whether to stop after this step. Under torchrun every rank gets the same answer at the same step (one
    all-reduce of the flags on a CPU group), so all stop together and rank 0 writes one consistent last.pt."""
    if world == 1:
        return STATE["signal"] != 0
    flag = torch.tensor(STATE["signal"])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=STATE["group"])
    STATE["signal"] = STATE["signal"] or int(flag)  # (a signal that came during the all-reduce counts next time)
    return int(flag) != 0


def stop(run, step, world):
    """After last.pt is written on a stop signal: the ranks wait for rank 0's file, then the run ends (ignoring later
    signals, such as torchrun's to the other ranks once one has exited)."""
    STATE["training"] = False
    if world > 1:
        dist.barrier(group=STATE["group"])
    last = os.path.join(run["dir"] or ".", "last.pt")
    raise KeyboardInterrupt(f"wrote {last} after step {step}; the same command again continues it (or --resume {last})")


def main(argv=None):
    """Bad input: one line, exit 2. SIGINT / SIGTERM: exit 130 / 143 (a resumable last.pt once training has begun)."""
    STATE["signal"], previous = 0, [signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)]
    try:
        run(get_args(argv))
    except (RunError, common.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"interrupted: {str(e) or 'outside a training step (a last.pt in the run folder, if any, resumes it)'}",
                  file=sys.stderr)
        sys.exit(128 + (STATE["signal"] or signal.SIGINT))
    finally:
        for s, h in zip((signal.SIGINT, signal.SIGTERM), previous):
            signal.signal(s, h)
        while STATE["locks"]:
            STATE["locks"].pop().close()
        if dist.is_initialized():
            dist.destroy_process_group()
# ================================================================================================ end of bookkeeping


if __name__ == "__main__":
    main()
