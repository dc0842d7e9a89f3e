"""S2SD: Simultaneous Similarity-based Self-Distillation for Deep Metric Learning.

Roth, Milbich, Ommer, Cohen, Ghassemi. ICML 2021. https://arxiv.org/abs/2009.08348
Official code: https://github.com/MLforHealth/S2SD (criteria/s2sd.py), built on
https://github.com/Confusezius/Revisiting_Deep_Metric_Learning_PyTorch (criteria, batchminer).

Idea: train, next to the low-dimensional base embedding z that is evaluated, K higher-dimensional
auxiliary embeddings t_k (MLP heads on the same backbone features) with the same DML loss, and distill
each auxiliary space's batch similarity matrix into the base space's with a row-wise KL divergence
(Eq. 3). Optionally also distill from the normalised backbone features (Eq. 6). Test cost = baseline.

Usage:
    python s2sd.py                                   # offline digits preset (CPU, < 1 minute)
    python s2sd.py --dataset cub --data-root ./data  # released CUB setting (MS + MSDFA, d=128)
    python s2sd.py --dataset sop --embed-dim 512     # Table 2 dimension (margin + MSDF)
    python s2sd.py --dataset cars --variant baseline # plain Multisimilarity baseline
    python s2sd.py --dataset synthetic --max-steps 20  # throughput at 224 px, batch 112
    python eval.py runs/<run>/model.pt               # re-evaluate a saved model

Implementation details (numbers refer to the paper; "notes" = shared/notes/s2sd.md, "code" = official code):
 1. Backbone: torchvision ResNet-50, IMAGENET1K_V1 weights; every BatchNorm2d stays in eval mode
    (frozen running stats, trainable affine with weight decay), Sec. 4.2 and code resnet50_frozen_normalize.
 2. Base embedding: GAP(layer4) = u (2048-d) -> Linear(2048, d) -> L2-normalise; d = 128 (512 for Table 2).
 3. Auxiliary ("target") spaces g_k: Linear(2048, d_k) -> ReLU -> Linear(d_k, d_k) -> L2-normalise, d_k in
    {512, 1024, 1536, 2048} (MSD, Eq. 5) or {2048} (DSD, Eq. 4); input u is NOT detached, so the aux DML
    losses also train the backbone (Sec. 4.2; code target_nets).
 4. Similarities D = cosine Gram matrices of the normalised vectors, B x B, diagonal included (Sec. 3.2).
 5. Eq. 3 as in the code: KL_k = T^2 * sum_i KL(softmax(D^g_k[i]/T) || softmax(D^f[i]/T)) / B, with the
    teacher D^g_k detached (the dagger in Eq. 3) -> `similarity_kl`.
 6. Eq. 5: L = 1/2 [L_dml(z) + mean_k L_dml(t_k)] + w * mean_k KL_k; each branch has its OWN loss instance
    (own margin betas, own miner using that branch's dimension), code target_criteria.
 7. Eq. 6 (MSDF): + feat_w * KL(f || z) with f = normalise(u).detach(), switched on once the optimizer
    step counter reaches 1000 (Sec. 4.2 "n = 1000 iterations"; code feat_distill_delay).
 8. "A" variants (MSDFA, Sec. 3.4): branches and feature distillation read u_A = GAP + GMP (a sum,
    code pool_aggr); the evaluated base embedding keeps plain GAP.
 9. Multisimilarity (Wang et al. 2019) exactly as Revisiting-DML criteria/multisimilarity.py: alpha 2,
    beta 40, lambda 0.5, eps 0.1; mining against the UN-mined sets (keep neg if s + eps > min pos, keep pos
    if s - eps < max neg), anchors with an empty mined set skipped, mean over surviving anchors.
10. Margin loss (SOP setting): m = 0.2, one learnable beta per training class (init 1.2; R-Margin 0.6),
    distance-weighted negatives (Wu et al. 2017) on detached distances clamped at 0.5, uniform positives;
    loss divided by #triplets with an active hinge. R-Margin: with p = 0.2 an anchor's triplet becomes
    (a, a, positive), i.e. it is pushed from a same-class sample (code rho_distance miner).
11. Optimisation (code parameters.py, Sample_Runs.sh): Adam lr 1e-5 everywhere, coupled weight decay 4e-4
    on backbone + embedding only, no schedule, 150 epochs, batch 112 = 56 classes x 2 drawn with
    replacement (common.class_balanced_batches), floor(N/112) batches per epoch. Betas train at the base
    lr inside S2SD and at 5e-4 for a plain margin baseline (code criterion.lr).
12. Presets: CUB/CARS = Multisimilarity + MSDFA, w = 50, feat_w = 50; SOP = Margin + MSDF, w = 50,
    feat_w = 5 (the paper's "gamma = 5 on SOP" is the feature weight in the released runs); T = 1.

Deviations (from the paper's prose, or from the official code; all chosen to follow notes/s2sd.md):
 - Weight decay 4e-4 (code default, notes) where Sec. 4.2 says 4e-5.
 - Eq. 3 writes KL(student, teacher) with a garbled definition and sums rows; we use the code's
   KL(teacher || student) * T^2 / B. Eq. 6 reuses gamma; the code (and we) use separate w and feat_w, and
   on SOP w = 50 with feat_w = 5 instead of the paper's "gamma = 5".
 - The code's criterion crashes when no MS anchor survives; we return a graph-connected zero. Anchors
   without a negative are skipped by the margin miner (the code crashes). The distance-weighted
   log-density is stabilised by its max over negatives only and 1 - d^2/4 is clamped at 1e-8 (the code
   gives NaN for antipodal pairs); the sampled distribution is otherwise identical.
 - bf16 autocast on CUDA (code: fp32); losses/KL are computed in fp32 inside autocast.
 - Table 2 used an LR schedule (Sec. 4.1); we implement none (Table 1 protocol), so d=512 runs are
   Table-1-style. Metrics follow shared/notes/metrics.md (query excluded by index, NMI with k = #test
   classes, MAP@R), not the code's evaluation. Headline = last epoch; the paper's tables pick the best
   epoch on the test set (reported here as "best epoch (chosen on the test set)").
 - `digits` preset (not in the paper): 3-layer CNN from scratch (trainable BN), 8x8 input, no
   augmentation, d = 32, branches {64,128,192,256} on a 128-d feature, lr 3e-4, feature delay 100.

Paper numbers (Table 1, ResNet-50, d = 128, R@1 / NMI, mean of best-epoch test results over seeds):
    paper  CUB  MS 62.80/68.55  MS+MSDFA 67.68/71.40  Margin+MSDF 67.58/71.47
    paper  CARS MS 81.68/69.43  MS+MSDFA 85.89/71.45  Margin+MSDF 85.55/71.68
    paper  SOP  MS 77.99/90.00  MS+MSDF  78.59/90.09  Margin+MSDF 79.63/90.70

Measured results (this repo; 2-core AMD EPYC CPU, torch 2.15, seed 0, 1 run each; a sanity check, not evidence):
    python s2sd.py  (digits, msdfa, 6 epochs, 132 steps; idle machine, default threads, 10.6 s wall)
      last epoch R@1 / MAP@R / NMI 93.75 / 42.32 / 43.32;  --variant baseline 89.62 / 36.41 / 38.93 (5.6 s)
    OMP_NUM_THREADS=1 python s2sd.py --variant V (loaded machine; results differ slightly with the thread count)
      dsd 89.62/32.88/35.78  msd 90.07/35.25/46.12  msdf 91.18/35.97/44.96  msdfa 92.97/39.07/45.14
    No CUB/CARS/SOP runs were possible here (no GPU, no datasets). Loss timings below: loaded machine, 1 thread.
    Loss cost, B = 112, fwd+bwd, 1 thread, median of 15: Multisimilarity 0.6-1.0 ms (a per-anchor loop as in
    the code: 32-43 ms); S2SD Eq. 5+6 on given branch outputs (5 MS + 5 KL) 16-24 ms; incl. the four branch
    MLPs from 2048-d u_A 230-310 ms. ResNet-50 fwd+bwd+Adam for 112 images at 224 px: 100-150 s (7 micro-
    batches of 16; frozen BN makes this the same compute as one batch of 112, which needs ~16 GB RAM).
"""
import argparse
import json
import math
import os
import random
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

PRESETS = {
    # Released run scripts (Sample_Runs.sh) + parameters.py of the official code; Sec. 4.2.
    "cub": dict(arch="resnet50", pretrained=True, image_size=224, epochs=150, batch_size=112,  # code --bs 112
                samples_per_class=2, lr=1e-5, weight_decay=4e-4,  # parameters.py (lr, decay)
                embed_dim=128, loss="multisimilarity", variant="msdfa",  # Sample_Runs.sh CUB
                distill_weight=50.0, feat_weight=50.0, feat_delay=1000,  # --loss_s2sd_w/feat_w/delay
                target_dims=[512, 1024, 1536, 2048], workers=6, eval_every=1, log_every=20),  # kernels 6
    "cars": dict(arch="resnet50", pretrained=True, image_size=224, epochs=150, batch_size=112,
                 samples_per_class=2, lr=1e-5, weight_decay=4e-4, embed_dim=128,
                 loss="multisimilarity", variant="msdfa",  # Sample_Runs.sh CARS196
                 distill_weight=50.0, feat_weight=50.0, feat_delay=1000,
                 target_dims=[512, 1024, 1536, 2048], workers=6, eval_every=1, log_every=20),
    "sop": dict(arch="resnet50", pretrained=True, image_size=224, epochs=150, batch_size=112,
                samples_per_class=2, lr=1e-5, weight_decay=4e-4, embed_dim=128,
                loss="margin", variant="msdf",  # Sample_Runs.sh SOP: margin + distance miner, no pool_aggr
                distill_weight=50.0, feat_weight=5.0, feat_delay=1000,  # --loss_s2sd_feat_w 5
                target_dims=[512, 1024, 1536, 2048], workers=6, eval_every=1, log_every=50),
    # Offline sanity preset (ours): digits 0-4 train / 5-9 test, small CNN, tuned for < 60 s on 2 CPU cores.
    "digits": dict(arch="smallcnn", pretrained=False, image_size=None, epochs=6, batch_size=40,
                   samples_per_class=2, lr=3e-4, weight_decay=4e-4, embed_dim=32,
                   loss="multisimilarity", variant="msdfa", distill_weight=50.0, feat_weight=50.0,
                   feat_delay=100, target_dims=[64, 128, 192, 256], workers=0, eval_every=2, log_every=50),
    # Throughput benchmark (ours): ResNet-50 at the paper's 224 px and batch 112, random images.
    "synthetic": dict(arch="resnet50", pretrained=False, image_size=224, epochs=1, batch_size=112,
                      samples_per_class=2, lr=1e-5, weight_decay=4e-4, embed_dim=128,
                      loss="multisimilarity", variant="msdfa", distill_weight=50.0, feat_weight=50.0,
                      feat_delay=1000, target_dims=[512, 1024, 1536, 2048], workers=0, eval_every=1,
                      log_every=1),
}
SYNTHETIC_SIZE = {"train": (448, 56, 224), "test": (112, 28, 224)}  # (N, classes, px): 4 train steps
VARIANTS = ("baseline", "dsd", "msd", "msdf", "msdfa")
LOSSES = ("multisimilarity", "margin", "rmargin")
ARCHS = ("resnet50", "smallcnn")
COMPONENTS = ("dml", "aux_dml", "distill", "feat_distill", "total")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e = p.add_argument_group("experiment")
    e.add_argument("--dataset", default="digits", help="cub | cars | sop | digits | synthetic (default digits)")
    e.add_argument("--data-root", default="./data", help="folder holding one folder per dataset")
    e.add_argument("--arch", default=None, help="resnet50 | smallcnn (preset: resnet50; smallcnn for digits)")
    e.add_argument("--epochs", type=int, default=None, help="training epochs (preset: 150, code n_epochs)")
    e.add_argument("--batch-size", type=int, default=None, help="batch size (preset: 112, code --bs)")
    e.add_argument("--samples-per-class", type=int, default=None, help="images per drawn class (preset 2)")
    e.add_argument("--lr", type=float, default=None, help="Adam learning rate (preset 1e-5, code)")
    e.add_argument("--weight-decay", type=float, default=None,
                   help="coupled L2 on backbone+embedding (preset 4e-4, code; paper text says 4e-5)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    e.add_argument("--workers", type=int, default=None, help="DataLoader workers for image files (preset 6)")
    e.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CUDA)")
    e.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (CUDA only)")
    e.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile")
    e.add_argument("--eval-every", type=int, default=None, help="evaluate every N epochs (preset 1; last always)")
    e.add_argument("--log-every", type=int, default=None, help="print a line every N steps")
    e.add_argument("--save-dir", default="runs")
    e.add_argument("--run-name", default=None, help="default <dataset>_<variant>_<loss>_s<seed>")
    e.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (tests/benchmarks)")
    e.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False)
    e.add_argument("--resume", default=None, help="path to a last.pt to continue from")
    e.add_argument("--no-pretrained", action="store_true", help="skip the ImageNet (IMAGENET1K_V1) weights")
    e.add_argument("--embed-dim", type=int, default=None, help="base embedding dim d (preset 128; 512: Table 2)")
    e.add_argument("--image-size", type=int, default=None,
                   help="train crop / test centre crop (preset 224, test resize 256/224 of it; Sec. 4.2)")
    m = p.add_argument_group("method")
    m.add_argument("--variant", default=None, choices=VARIANTS,
                   help="baseline | dsd | msd | msdf | msdfa (preset: msdfa CUB/CARS, msdf SOP; Sec. 4)")
    m.add_argument("--loss", default=None, choices=LOSSES, help="DML loss for base and aux spaces (preset)")
    m.add_argument("--distill-weight", type=float, default=None, help="w in Eq. 5 (preset 50, code loss_s2sd_w)")
    m.add_argument("--feat-weight", type=float, default=None, help="feat_w in Eq. 6 (preset 50; 5 on SOP)")
    m.add_argument("--temperature", type=float, default=1.0, help="T in Eq. 3 (default 1, Sec. 4.2)")
    m.add_argument("--target-dims", type=int, nargs="+", default=None,
                   help="aux dims (preset 512 1024 1536 2048; dsd uses the largest)")
    m.add_argument("--feat-delay", type=int, default=None, help="steps before Eq. 6 is on (preset 1000)")
    m.add_argument("--margin-beta", type=float, default=None, help="initial beta (1.2 margin, 0.6 rmargin)")
    m.add_argument("--rho-p", type=float, default=0.2, help="R-Margin negative->positive swap prob (0.2)")
    m.add_argument("--beta-lr", type=float, default=None,
                   help="lr of the margin betas (default: --lr inside S2SD, 5e-4 for the baseline; code)")
    m.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="keep BatchNorm in eval mode (default: on for resnet50, off for smallcnn)")
    args = p.parse_args(argv)
    if args.dataset not in PRESETS:
        raise ValueError(f"unknown dataset '{args.dataset}' (choose from {', '.join(PRESETS)})")
    for k, v in PRESETS[args.dataset].items():
        if k != "pretrained" and getattr(args, k, None) is None:
            setattr(args, k, v)
    args.pretrained = PRESETS[args.dataset]["pretrained"] and not args.no_pretrained
    if args.arch not in ARCHS:
        raise ValueError(f"unknown arch '{args.arch}' (choose from {', '.join(ARCHS)})")
    if args.batch_size % args.samples_per_class:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of --samples-per-class")
    args.in_channels = 1 if args.dataset == "digits" else 3
    args.freeze_bn = args.arch == "resnet50" if args.freeze_bn is None else args.freeze_bn
    if args.variant == "baseline":
        args.target_dims = []
    elif args.variant == "dsd":  # Sec. 4.2: one branch of d = 2048 (the largest preset dim)
        if len(args.target_dims) > 1 and "--target-dims" in (argv if argv is not None else sys.argv):
            raise ValueError("--variant dsd takes exactly one --target-dims value")
        args.target_dims = [max(args.target_dims)]
    if args.margin_beta is None:
        args.margin_beta = 0.6 if args.loss == "rmargin" else 1.2  # Revisiting-DML: R-Margin beta 0.6
    if args.beta_lr is None:
        args.beta_lr = 5e-4 if args.variant == "baseline" else args.lr  # code: criterion.lr vs S2SD opt.lr
    if args.run_name is None:
        args.run_name = (os.path.basename(os.path.dirname(os.path.abspath(args.resume))) if args.resume
                         else f"{args.dataset}_{args.variant}_{args.loss}_s{args.seed}")
    return args


# ----------------------------------------------------------------------------------------------- models
class EmbeddingNet(nn.Module):
    """x [B,C,H,W] -> (z [B,d] L2-normalised, u [B,F] = GAP, u_A [B,F] = GAP + GMP); aux heads in .aux."""

    def __init__(self, arch, embed_dim, target_dims, in_channels=3, pretrained=False, freeze_bn=True):
        super().__init__()
        if arch == "resnet50":
            r = torchvision.models.resnet50(weights="IMAGENET1K_V1" if pretrained else None)
            self.body = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
            feat = 2048
        else:  # small CNN for 8x8 digits
            def block(i, o):
                return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
            self.body = nn.Sequential(*block(in_channels, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128))
            feat = 128
        self.embed = nn.Linear(feat, embed_dim)  # fresh, default init (code last_linear)
        # Auxiliary target spaces g_k (Sec. 3.2/3.3): two-layer MLPs, no BN, default init (code target_nets).
        self.aux = nn.ModuleList(nn.Sequential(nn.Linear(feat, t), nn.ReLU(), nn.Linear(t, t)) for t in target_dims)
        self.freeze_bn = freeze_bn

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_bn:  # frozen BN statistics (Sec. 4.2); affine parameters stay trainable
            for mod in self.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.eval()
        return self

    def forward(self, x):
        fmap = self.body(x)
        u = fmap.mean((2, 3))
        u_a = u + fmap.amax((2, 3))  # "A" pooling (Sec. 3.4, code pool_aggr): a sum, same dim
        z = F.normalize(self.embed(u).float(), dim=-1)
        return z, u, u_a


def model_from_args(args):
    """The network whose state_dict is checkpoint['model']; never downloads weights."""
    return EmbeddingNet(args.arch, args.embed_dim, args.target_dims, args.in_channels, False, args.freeze_bn)


# ----------------------------------------------------------------------------------------------- losses
def _fp32(x):
    """Upcast half/bf16 to fp32 (keep fp32/fp64): Gram matrices, exp and KL in full precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def multisimilarity_loss(emb, labels, alpha=2.0, beta=40.0, lam=0.5, eps=0.1):
    """Multisimilarity loss (Wang et al. 2019) with the Revisiting-DML mining/averaging semantics.

    emb [B, D] L2-normalised, labels [B] -> scalar. Mean over anchors whose mined positive and negative
    sets are both non-empty; a graph-connected zero if none survives.
    """
    with torch.autocast(emb.device.type, enabled=False):
        x = _fp32(emb)
        s = x @ x.T  # s_ij = x_i . x_j (diagonal included, excluded from P_i below)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
        pos, neg = same & ~eye, ~same
        # METHOD: pair mining against the un-mined sets (code: min over P_i, max over N_i).
        min_pos = s.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
        max_neg = s.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)
        pos_keep = pos & (s - eps < max_neg)
        neg_keep = neg & (s + eps > min_pos)
        valid = pos_keep.any(1) & neg_keep.any(1)
        # log(1 + sum exp(a)) = logsumexp([0, a]); masked entries -> -inf contribute nothing.
        zero = s.new_zeros(len(x), 1)
        lp = torch.logsumexp(torch.cat([zero, (-alpha * (s - lam)).masked_fill(~pos_keep, float("-inf"))], 1), 1)
        ln = torch.logsumexp(torch.cat([zero, (beta * (s - lam)).masked_fill(~neg_keep, float("-inf"))], 1), 1)
        per_anchor = lp / alpha + ln / beta
        return (per_anchor * valid).sum() / valid.sum().clamp(min=1)


def similarity_kl(student, teacher, T=1.0):
    """Eq. 3 as in the code: T^2 * sum_i KL(softmax(G_t[i]/T) || softmax(G_s[i]/T)) / B.

    student [B, Ds], teacher [B, Dt], both L2-normalised; G = cosine Gram matrix; teacher detached.
    """
    with torch.autocast(student.device.type, enabled=False):
        s, t = _fp32(student), _fp32(teacher).detach()
        log_q = F.log_softmax(s @ s.T / T, dim=1)
        p = F.softmax(t @ t.T / T, dim=1)
        return F.kl_div(log_q, p, reduction="sum") * (T * T) / len(s)


@torch.no_grad()
def distance_weighted_triplets(emb, labels, rho=0.0, cutoff=0.5):
    """Distance-weighted sampling (Wu et al. 2017; code batchminer distance / rho_distance).

    emb [B, D], labels [B] -> (anchors, positives, negatives) LongTensors [A]. One triplet per anchor;
    rho > 0: with prob. rho the triplet is (a, a, random positive) (R-Margin's negative->positive swap).
    """
    x = emb.detach().float()
    n, dim = x.shape
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0).sqrt().clamp(min=cutoff)
    # log of 1/q(d), q = density of pairwise distances on the unit sphere in `dim` dimensions
    log_w = (2.0 - dim) * d.log() - (dim - 3) / 2.0 * (1.0 - 0.25 * d * d).clamp(min=1e-8).log()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    other_pos, has_neg = same & ~eye, (~same).any(1)
    has_pos = other_pos.any(1)
    w_neg = torch.softmax(log_w.masked_fill(same, float("-inf")), 1)
    w_neg = torch.where(has_neg[:, None], w_neg, eye.float())  # rows without negatives are dropped below
    neg = torch.multinomial(w_neg, 1).squeeze(1)
    pos = torch.multinomial(torch.where(has_pos[:, None], other_pos, eye).float(), 1).squeeze(1)  # self if alone
    a = torch.arange(n, device=x.device)
    if rho > 0:  # rho_distance miner: anchors need another positive; swap with prob. rho
        swap = torch.rand(n, device=x.device) < rho
        keep = has_pos & (swap | has_neg)
        pos, neg = torch.where(swap, a, pos), torch.where(swap, pos, neg)
    else:
        keep = has_neg
    return a[keep], pos[keep], neg[keep]


def margin_loss(emb, labels, beta, triplets, margin=0.2):
    """Margin loss (Wu et al. 2017) with per-class learnable beta [C]; emb [B, D] -> scalar.

    sum_t relu(d_ap - beta_y(a) + m) + relu(beta_y(a) - d_an + m), divided by #triplets with an active hinge.
    """
    with torch.autocast(emb.device.type, enabled=False):
        x = _fp32(emb)
        a, p, n = triplets
        d_ap = ((x[a] - x[p]).pow(2).sum(1) + 1e-8).sqrt()
        d_an = ((x[a] - x[n]).pow(2).sum(1) + 1e-8).sqrt()
        b = beta[labels[a]].to(x.dtype)
        lp, ln = F.relu(d_ap - b + margin), F.relu(b - d_an + margin)
        active = ((lp > 0) | (ln > 0)).sum()
        return (lp + ln).sum() / active.clamp(min=1)


def dml_loss(args, emb, labels, betas, k):
    """L_DML for loss instance k (0 = base, k >= 1 = aux branch k-1, each with its own betas)."""
    if args.loss == "multisimilarity":
        return multisimilarity_loss(emb, labels)
    trip = distance_weighted_triplets(emb, labels, rho=args.rho_p if args.loss == "rmargin" else 0.0)
    return margin_loss(emb, labels, betas[k], trip)


def s2sd_loss(args, model, z, u, u_a, labels, betas, step):
    """Eq. 3-6. z [B,d] base embedding, u/u_A [B,F] pooled features -> (total, stacked components)."""
    base = dml_loss(args, z, labels, betas, 0)
    zero = base.new_zeros(())
    if args.variant == "baseline":
        return base, torch.stack([base, zero, zero, zero, base])
    # METHOD: Eq. 5, aux spaces from u (or u_A for "A"), one DML loss each, KL from each into z.
    feats = u_a if args.variant == "msdfa" else u
    heads = model.aux
    targets = [F.normalize(_fp32(h(feats)), dim=-1) for h in heads]
    aux = torch.stack([dml_loss(args, t, labels, betas, k + 1) for k, t in enumerate(targets)]).mean()
    kl = torch.stack([similarity_kl(z, t, args.temperature) for t in targets]).mean()
    total = 0.5 * (base + aux) + args.distill_weight * kl
    feat_kl = zero
    if args.variant in ("msdf", "msdfa") and step >= args.feat_delay:  # Eq. 6 after n iterations
        feat_kl = similarity_kl(z, F.normalize(_fp32(feats), dim=-1).detach(), args.temperature)
        total = total + args.feat_weight * feat_kl
    return total, torch.stack([base, aux, kl, feat_kl, total])


# ----------------------------------------------------------------------------------------------- data / eval
def load_split(args, split):
    if args.dataset == "digits":  # zero-shot DML split: classes 0-4 train / 5-9 test
        return common.load_split("digits", args.data_root, split="dml_" + split, image_size=args.image_size)
    if args.dataset == "synthetic":
        return common.load_split("synthetic", args.data_root, split=split, synthetic_size=SYNTHETIC_SIZE[split])
    return common.load_split(args.dataset, args.data_root, split=split)


def evaluate(model, args, device):
    """Test-set retrieval metrics (percent) of the base embedding z only (test cost = baseline)."""
    split = load_split(args, "test")
    model.eval()
    use_amp = args.amp and torch.device(device).type == "cuda"

    def fn(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            return model(x)[0]

    tf = None if split.images is not None else common.eval_transform(round(args.image_size * 256 / 224),
                                                                         args.image_size)
    out = common.embed(fn, split, device, batch_size=256 if args.arch == "resnet50" else 1024,
                       workers=args.workers, transform=tf)
    return common.retrieval_metrics(out[0].float(), out[-1])


def _atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Batches:
    """Batch sampler whose list is swapped each epoch; iterated in the main process, so persistent
    DataLoader workers see the new batches."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


# ----------------------------------------------------------------------------------------------- main
def main():
    try:
        args = get_args()
        run(args)
    except (ValueError, common.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args):
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cuda:
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config = dict(vars(args), torch=torch.__version__, torchvision=torchvision.__version__,
                  device_name=torch.cuda.get_device_name(device) if cuda else args.device)
    print("config: " + json.dumps(config, sort_keys=True))
    train = load_split(args, "train")
    load_split(args, "test")  # fail early on a missing test split
    run_dir = os.path.join(args.save_dir, args.run_name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    try:
        model = EmbeddingNet(args.arch, args.embed_dim, args.target_dims, args.in_channels, args.pretrained,
                             args.freeze_bn).to(device)
    except Exception as e:  # weight download failure (offline machine)
        raise ValueError(f"could not build {args.arch} with ImageNet weights ({e}); use --no-pretrained")
    if cuda and args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_classes = int(train.labels.max()) + 1
    margin = args.loss in ("margin", "rmargin")
    betas = nn.ParameterList([nn.Parameter(torch.full((n_classes,), args.margin_beta, device=device))
                              for _ in range(1 + len(args.target_dims))] if margin else [])
    # Code: backbone + embedding with weight decay; aux heads and loss parameters without (Sec. 4.2).
    groups = [dict(params=list(model.body.parameters()) + list(model.embed.parameters()),
                   weight_decay=args.weight_decay),
              dict(params=list(model.aux.parameters()), weight_decay=0.0),
              dict(params=list(betas.parameters()), lr=args.beta_lr, weight_decay=0.0)]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=args.lr)
    fwd = torch.compile(model) if args.compile else model

    epoch, next_batch, step, history = 0, 0, 0, []
    if args.resume:
        try:
            ck = torch.load(args.resume, map_location=device, weights_only=False)
            assert ck.get("method") == "s2sd", "not an s2sd checkpoint"
            model.load_state_dict(ck["model"])
            betas.load_state_dict(ck["betas"])
            optimizer.load_state_dict(ck["optimizer"])
        except Exception as e:
            raise ValueError(f"cannot resume from {args.resume}: {str(e).splitlines()[0]}")
        epoch, next_batch, step, history = ck["epoch"], ck["next_batch"], ck["step"], ck["history"]
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        if cuda and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
        print(f"resumed from {args.resume} at epoch {epoch}, batch {next_batch}, step {step}")

    def save_last(ep, nb):
        rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
                   cuda=torch.cuda.get_rng_state(device) if cuda else None)
        _atomic_save(dict(method="s2sd", args=vars(args), model=model.state_dict(), betas=betas.state_dict(),
                          optimizer=optimizer.state_dict(), epoch=ep, next_batch=nb, step=step,
                          history=history, rng=rng), os.path.join(run_dir, "last.pt"))

    # Data: tensor datasets live on the device (batched aug); image files go through a DataLoader.
    cpb = args.batch_size // args.samples_per_class
    if train.images is not None:
        images, labels_dev = common.to_device(train, device)
        loader = None
    else:
        sampler = _Batches()
        loader = common.make_loader(common.ImageFiles(train.paths, train.labels,
                                                      common.dml_train_transform(args.image_size)),
                                    None, False, args.workers, batch_sampler=sampler)

    def batches_of(ep):
        g = torch.Generator().manual_seed(args.seed * 100003 + ep)  # epoch-seeded: resume-exact
        return common.class_balanced_batches(train.labels, cpb, args.samples_per_class, generator=g)

    def get_batch(idx):
        x = images[idx]
        if args.dataset == "synthetic":  # RandomResizedCrop + flip, as the real-image train transform
            x = common.random_hflip(common.random_resized_crop(x, args.image_size))
        return common.normalize(x, train.mean, train.std), labels_dev[idx]

    steps_per_epoch = len(batches_of(0))
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or 10**12)
    use_amp = args.amp and cuda
    comp_sum = torch.zeros(len(COMPONENTS), device=device, dtype=torch.float64)
    bad_step = torch.full((len(COMPONENTS),), -1, device=device, dtype=torch.long)
    n_logged, t_start, t_log, step_log = 0, time.time(), time.time(), step
    t_end = None
    warm_step, t_warm, clock = None, None, {"eval": 0.0}  # eval time is excluded from images/s
    final = None

    def check_finite():
        bad = (bad_step >= 0).nonzero()
        if len(bad):
            j = int(bad[0])
            print(f"error: non-finite {COMPONENTS[j]} loss at step {int(bad_step[j])}", file=sys.stderr)
            sys.exit(2)

    def do_eval(ep):
        t0 = time.time()
        with torch.random.fork_rng(devices=[device] if cuda else []):  # eval never moves the train RNG
            met = evaluate(model, args, device)
        clock["eval"] += time.time() - t0
        el = time.time() - t_start
        rec = dict(epoch=ep + 1, step=step, **met, elapsed_s=round(el, 2),
                   images_per_s=round(args.batch_size * max(step - start_step, 0) / max(el, 1e-9), 2))
        history.append(rec)
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        print("eval  epoch %d step %d  " % (ep + 1, step) + "  ".join(f"{k} {v:.2f}" for k, v in met.items()))
        return met

    start_step = step
    stop = step >= total_steps
    try:
        while epoch < args.epochs and not stop:
            all_b = batches_of(epoch)
            model.train()
            if loader is None:
                it = (get_batch(b.to(device)) for b in all_b[next_batch:])
            else:
                sampler.batches = all_b[next_batch:].tolist()
                it = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
            for x, y in it:
                if cuda and args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    z, u, u_a = fwd(x)
                    loss, comps = s2sd_loss(args, model, z, u, u_a, y, betas, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                comps = comps.detach().double()
                comp_sum += comps
                bad_step = torch.where(~torch.isfinite(comps) & (bad_step < 0), step + 1, bad_step)
                step, next_batch, n_logged = step + 1, next_batch + 1, n_logged + 1
                if warm_step is None and step - start_step == min(2, max(total_steps - start_step - 1, 1)):
                    if cuda:
                        torch.cuda.synchronize()
                    warm_step, t_warm = step, time.time() - clock["eval"]  # steady state starts here
                if step % args.log_every == 0 or step == total_steps:
                    check_finite()
                    now = time.time() - clock["eval"]
                    ips = args.batch_size * (step - step_log) / max(now - t_log, 1e-9)
                    c = (comp_sum / max(n_logged, 1)).tolist()
                    eta = (total_steps - step) * (now - t_log) / max(step - step_log, 1)
                    print(f"epoch {epoch + 1} step {step}/{total_steps} " + " ".join(
                        f"{k} {v:.4f}" for k, v in zip(COMPONENTS, c)) +
                          f" lr {args.lr:.1e} img/s {ips:.1f} eta {eta / 60:.1f}m", flush=True)
                    comp_sum.zero_()
                    n_logged, t_log, step_log = 0, now, step
                if step >= total_steps:
                    stop = True
                    if cuda:
                        torch.cuda.synchronize()
                    t_end = time.time() - clock["eval"]
                    break
            check_finite()
            if next_batch >= len(all_b):
                epoch, next_batch = epoch + 1, 0
                last = epoch == args.epochs or stop
                if last or epoch % args.eval_every == 0:
                    final = do_eval(epoch - 1)
            save_last(epoch, next_batch)
    except KeyboardInterrupt:
        save_last(epoch, next_batch)
        print(f"interrupted: wrote {os.path.join(run_dir, 'last.pt')} (continue with --resume)", file=sys.stderr)
        sys.exit(130)

    if cuda:
        torch.cuda.synchronize()
    if history and history[-1]["step"] == step:
        final = {k: history[-1][k] for k in history[-1] if k not in ("epoch", "step", "elapsed_s", "images_per_s")}
    else:
        final = do_eval(epoch - 1 if next_batch == 0 else epoch)
    _atomic_save(dict(method="s2sd", args=vars(args), model=model.state_dict(), metrics=final),
                 os.path.join(run_dir, "model.pt"))
    if warm_step is not None and step > warm_step:
        ips = args.batch_size * (step - warm_step) / ((t_end or time.time() - clock["eval"]) - t_warm)
        mem = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (cuda max allocated)" if cuda else
               f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (max RSS)")
        print(f"throughput: {ips:.1f} images/s over steps {warm_step + 1}-{step} (after warm-up); peak memory {mem}")
    best = max(history, key=lambda r: r["R@1"]) if history else None
    print("final (last epoch): " + "  ".join(f"{k} {v:.2f}" for k, v in final.items()))
    if best is not None:
        print(f"best epoch (chosen on the test set, the paper's convention): epoch {best['epoch']}  " +
              "  ".join(f"{k} {best[k]:.2f}" for k in final))
    print(f"saved {os.path.join(run_dir, 'model.pt')}")


if __name__ == "__main__":
    main()
