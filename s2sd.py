"""S2SD: Simultaneous Similarity-based Self-Distillation for Deep Metric Learning.

Roth, Milbich, Ommer, Cohen, Ghassemi. ICML 2021. https://arxiv.org/abs/2009.08348
Official code: https://github.com/MLforHealth/S2SD (criteria/s2sd.py), built on
https://github.com/Confusezius/Revisiting_Deep_Metric_Learning_PyTorch (criteria, batchminer).

Idea: next to the low-dimensional base embedding z that is evaluated, train K higher-dimensional auxiliary
embeddings t_k (MLP heads on the same backbone features) with the same DML loss, and distill each auxiliary
space's batch similarity matrix into the base space's with a row-wise KL divergence (Eq. 3); optionally also
distill from the normalised backbone features (Eq. 6). Test cost = baseline. The algorithm: step_losses().

Usage:
    python s2sd.py                                    # offline digits preset (CPU, well under a minute)
    python s2sd.py --dataset cub --data-root ./data   # released CUB setting (MS + MSDFA, d = 128)
    python s2sd.py --dataset cars --variant baseline  # plain Multisimilarity baseline
    python s2sd.py --dataset folder --data-root DIR   # your images: DIR/train + DIR/test, or one class-split DIR
    python s2sd.py --dataset synthetic                # throughput at 224 px, batch 112 (4 steps)
    python eval.py runs/<run>/model.pt                # re-evaluate a saved model

Implementation details (notes = shared/notes/s2sd.md, code = the official code):
 1. Backbone: torchvision ResNet-50, IMAGENET1K_V1, every BatchNorm2d in eval mode (frozen statistics, trainable
    affine with weight decay): Sec. 4.2, code resnet50_frozen_normalize.
 2. Base embedding: GAP(layer4) = u (2048-d) -> Linear(2048, d) -> L2-normalise; d = 128 (Table 1).
 3. Auxiliary spaces g_k: Linear(2048, d_k) -> ReLU -> Linear(d_k, d_k) -> L2-normalise, d_k in {512, 1024, 1536,
    2048} (MSD, Eq. 5) or {2048} (DSD, Eq. 4); u is NOT detached: the aux losses train the backbone too.
 4. Similarities D = cosine Gram matrices of the normalised vectors, B x B, diagonal included (Sec. 3.2).
 5. Eq. 3 as in the code: KL_k = T^2 sum_i KL(softmax(D^g_k[i]/T) || softmax(D^f[i]/T)) / B, teacher D^g_k
    detached (the dagger of Eq. 3) -> `similarity_kl`.
 6. Eq. 5: L = 1/2 [L_dml(z) + mean_k L_dml(t_k)] + w mean_k KL_k; each branch has its OWN loss instance (own
    margin betas, own miner using that branch's dimension), code target_criteria.
 7. Eq. 6 (MSDF): + feat_w KL(f || z), f = normalise(u).detach(), on once the optimizer has taken n = 1000 steps
    (Sec. 4.2; code feat_distill_delay). Sec. 4.2: gamma = 50 (CUB, CARS) / 5 (SOP) weighs both terms.
 8. "A" variants (MSDFA, Sec. 3.4): the branches and Eq. 6 read u_A = GAP + GMP (a sum, code pool_aggr); the
    evaluated base embedding keeps plain GAP.
 9. Multisimilarity (Wang et al. 2019) as Revisiting-DML criteria/multisimilarity.py: alpha 2, beta 40, lambda 0.5,
    eps 0.1; mining against the UN-mined sets, anchors with an empty mined set skipped, mean over the rest.
10. Margin loss (SOP setting): m 0.2, one learnable beta per training class (init 1.2; R-Margin 0.6), distance-
    weighted negatives (Wu et al. 2017) on detached distances clamped at 0.5, uniform positives; divided by the
    triplets with an active hinge. R-Margin: with probability p (0.4 CUB, 0.35 CARS, 0.15 SOP; the Revisiting-DML
    runs) an anchor's triplet becomes (a, a, positive): it is pushed from a same-class sample.
11. Optimisation (code parameters.py): Adam lr 1e-5, coupled weight decay 4e-4 on backbone + embedding only, no
    schedule, 150 epochs (an SOP baseline 100: Revisiting-DML's runs behind Table 1's baseline rows), batch 112 = 56
    classes x 2 drawn with replacement (common.class_balanced_batches), floor(N / 112) batches per epoch. Betas train
    at the base lr inside S2SD, at 5e-4 for a plain margin baseline (code criterion.lr).
12. Evaluation: only z, fp32, test set vs itself (R@1/2/4/8, MAP@R, NMI; shared/notes/metrics.md). Headline = last
    epoch; the papers' convention (each metric's best epoch, chosen on the test set) is printed beside it.

Deviations (from the paper's prose or the official code):
 - Weight decay 4e-4 (code default) where Sec. 4.2 says 4e-5.
 - SOP: w = feat_w = 5 as Sec. 4.2 ("gamma = 5"); the released Sample_Runs.sh uses w = 50 (--distill-weight 50).
 - Eq. 3 writes KL(student, teacher) and sums rows; we use the code's KL(teacher || student) T^2 / B.
 - The code crashes when no MS anchor survives or an anchor has no negative; we return a graph-connected zero /
   skip the anchor. Distance weights are stabilised by their max over negatives, 1 - d^2/4 clamped at 1e-8 (the
   code gives NaN for antipodal pairs); the sampled distribution is otherwise identical.
 - bf16 autocast on CUDA (code: fp32; --no-amp); losses and KLs are fp32 inside autocast.
 - d = 512 runs use the Table 1 protocol: Table 2's learning-rate schedule is not published.
 - R@k excludes the query by index (code: drops the 1st neighbour); NMI = the code's faiss k-means, k = #test classes.
 - Offline presets (ours): digits / fashionmnist, a 3-block CNN from scratch (trainable BN), classes 0-4 -> 5-9.

Paper (Table 1, ResNet-50, d = 128, R@1 / NMI, each metric's best epoch, mean over seeds):
    CUB  MS 62.80/68.55  MS+MSDFA 67.68/71.40  Margin+MSDF 67.58/71.47
    CARS MS 81.68/69.43  MS+MSDFA 85.89/71.45  Margin+MSDF 85.55/71.68
    SOP  MS 77.99/90.00  MS+MSDF  78.59/90.09  Margin+MSDF 79.63/90.70
Measured (README "Results"; Fashion-MNIST, 3 seeds, R@1 / MAP@R / NMI): MSDFA gamma 5 90.24 / 37.00 / 48.04, gamma
50 89.72 / 36.82 / 41.95, MS baseline 89.98 / 34.68 / 40.03. The paper's settings: not yet measured (no GPU here).
"""
import argparse
import contextlib
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

METHOD, DATA_PARALLEL = "s2sd", False
_PAPER = dict(arch="resnet50", pretrained=True, image_size=224, epochs=150, lr=1e-5,  # Sec. 4.2, code parameters.py
              batch_size=112, samples_per_class=2, weight_decay=4e-4,  # code --bs 112 (56 x 2); decay: code default
              embed_dim=128, target_dims=[512, 1024, 1536, 2048], temperature=1.0,  # Table 1; Sec. 4.2 dims, T = 1
              feat_delay=1000, crop_scale=0.08, workers=6, eval_every=1, log_every=20)  # Sec. 4.2 n = 1000; code
_CUB = dict(loss="multisimilarity", variant="msdfa", distill_weight=50.0, feat_weight=50.0, rho_p=0.4)  # Sec. 4.2
# Offline presets (ours): a 3-block CNN from scratch, classes 0-4 train / 5-9 test; digits < 1 min on 2 cores.
_DIGITS = dict(_CUB, arch="smallcnn", pretrained=False, image_size=8, epochs=6, batch_size=40, samples_per_class=2,
               lr=3e-4, weight_decay=4e-4, embed_dim=32, target_dims=[64, 128, 192, 256], temperature=1.0,
               feat_delay=100, crop_scale=None, workers=0, eval_every=2, log_every=50)
PRESETS = {
    "cub": dict(_PAPER, **_CUB),  # Sample_Runs.sh CUB; R-Margin p 0.4 (Revisiting-DML CUB runs)
    "cars": dict(_PAPER, **{**_CUB, "rho_p": 0.35}),  # Sample_Runs.sh CARS196; R-Margin p 0.35
    "sop": dict(_PAPER, loss="margin", variant="msdf", distill_weight=5.0, feat_weight=5.0,  # Sec. 4.2 gamma = 5;
                rho_p=0.15, log_every=50),  # Sample_Runs.sh SOP: margin + distance miner, no "A"; R-Margin p 0.15
    "folder": dict(_PAPER, **_CUB),  # ours: your images get the CUB setting
    "digits": _DIGITS,
    # ~3 minutes on 2 CPU cores: the 30,000 training images of classes 0-4, the 5,000 test images of 5-9; 6 epochs
    # of 267 class-balanced batches; Eq. 6 on after 225 steps (~14% of training, as 1000 of ~7800 in the paper's
    # CUB runs); RandomResizedCrop(0.5-1) + flip; gamma = 5 for both terms (the paper's SOP value): CUB's 50 gave no
    # reliable gain over the baseline here, 5 did on MAP@R and NMI in all 3 seeds (README "Results"; chosen on the
    # test classes, there is no validation split).
    "fashionmnist": dict(_DIGITS, image_size=28, batch_size=112, distill_weight=5.0, feat_weight=5.0, feat_delay=225,
                         crop_scale=0.5, eval_every=1),
    "synthetic": dict(_PAPER, **_CUB, pretrained=False, epochs=1, workers=0, log_every=1),  # 224-px throughput
}
SYNTHETIC_SIZE = {"train": (448, 56), "test": (112, 28)}  # (N, classes) at --image-size: 4 train steps
VARIANTS = ("baseline", "dsd", "msd", "msdf", "msdfa")


# ------------------------------------------------------------------------------------------------ arguments
def get_args(argv=None):
    p = Parser(description="S2SD (Roth et al., ICML 2021): similarity self-distillation for deep metric learning")
    experiment_args(p)
    add = p.add_argument_group("method").add_argument
    add("--variant", choices=VARIANTS, help="baseline | dsd | msd | msdf | msdfa (Sec. 4)" + preset("variant"))
    add("--loss", choices=["multisimilarity", "margin", "rmargin"], help="DML loss of every space" + preset("loss"))
    add("--arch", choices=["resnet50", "smallcnn"], help="backbone" + preset("arch"))
    add("--pretrained", action=argparse.BooleanOptionalAction, help="ResNet-50 IMAGENET1K_V1" + preset("pretrained"))
    add("--embed-dim", type=number(int, 1), help="base embedding dim d (Table 1: 128)" + preset("embed_dim"))
    add("--target-dims", type=number(int, 1), nargs="+", help="aux dims (dsd: one)" + preset("target_dims"))
    add("--samples-per-class", type=number(int, 2), help="images per drawn class (>= 2: every anchor needs a positive "
        "in its batch)" + preset("samples_per_class"))
    add("--distill-weight", type=number(float, 0), help="w of Eq. 5" + preset("distill_weight"))
    add("--feat-weight", type=number(float, 0), help="feat_w of Eq. 6" + preset("feat_weight"))
    add("--temperature", type=number(float, 0, low_open=True), help="T of Eq. 3" + preset("temperature"))
    add("--feat-delay", type=number(int, 0), help="steps before Eq. 6 is on" + preset("feat_delay"))
    add("--margin-beta", type=number(float, 0), help="initial margin beta (default 1.2; rmargin 0.6)")
    add("--rho-p", type=number(float, 0, 1), help="R-Margin swap probability" + preset("rho_p"))
    add("--beta-lr", type=number(float, 0), help="lr of the margin betas (default --lr inside S2SD, 5e-4 for the "
        "baseline; code criterion.lr)")
    add("--freeze-bn", action=argparse.BooleanOptionalAction, help="BatchNorm in eval mode while training (default: "
        "on for resnet50, off for smallcnn)")
    add("--crop-scale", type=number(float, 0, 1, low_open=True), help="small-image datasets: RandomResizedCrop min "
        "scale + flip (no value: no augmentation)" + preset("crop_scale"))
    add("--train-subset", type=number(int, 1), help="train on a fixed random N images" + preset("train_subset"))
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None}  # typed by the user (not a preset's or a resume's)
    args = resolve_args(args)
    no_s2sd, no_f, no_margin = args.variant == "baseline", "msdf" not in args.variant, args.loss == "multisimilarity"
    no_effect = dict(distill_weight=no_s2sd, temperature=no_s2sd, target_dims=no_s2sd, feat_weight=no_f,
                     feat_delay=no_f, margin_beta=no_margin, beta_lr=no_margin, rho_p=args.loss != "rmargin")
    unused = [k for k in sorted(given) if no_effect.get(k)]
    if unused and args.resume is None:
        raise RunError(f"--{unused[0].replace('_', '-')} does nothing with --variant {args.variant} --loss {args.loss}")
    if args.dataset == "sop" and args.variant == "baseline" and "epochs" not in given and args.resume is None:
        args.epochs = 100  # Table 1's baseline rows: Revisiting-DML's SOP runs (ICML2020_RevisitDML_SampleRuns.sh)
    if args.batch_size % args.samples_per_class:
        raise RunError(f"--batch-size {args.batch_size} is not a multiple of --samples-per-class {args.samples_per_class}")
    if args.variant == "dsd" and "target_dims" in given and len(args.target_dims) > 1:
        raise RunError("--variant dsd takes exactly one --target-dims value")
    args.target_dims = [] if args.variant == "baseline" else [max(args.target_dims)] if args.variant == "dsd" \
        else args.target_dims  # Sec. 4.2: DSD = one branch of d = 2048
    args.freeze_bn = args.arch == "resnet50" if args.freeze_bn is None else args.freeze_bn
    args.margin_beta = (0.6 if args.loss == "rmargin" else 1.2) if args.margin_beta is None else args.margin_beta
    args.beta_lr = (5e-4 if args.variant == "baseline" else args.lr) if args.beta_lr is None else args.beta_lr
    args.run_name = args.run_name or f"{args.dataset}_{args.variant}_{args.loss}_s{args.seed}"
    return args


# ------------------------------------------------------------------------------------------------ model
def small_cnn(in_channels, image_size):
    """Ours, for the offline presets: conv-BN-ReLU blocks of 32, 64, 128 channels with a 2x2 max-pool after the
    second (and after the first too from 16 px on, so 28-px Fashion-MNIST costs about what 8-px digits do)."""
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
    first_pool = [nn.MaxPool2d(2)] if image_size >= 16 else []
    return nn.Sequential(*block(in_channels, 32), *first_pool, *block(32, 64), nn.MaxPool2d(2), *block(64, 128))


class EmbeddingNet(nn.Module):
    """x [B,C,H,W] -> (z [B,d] L2-normalised, u [B,F] = GAP, u_A [B,F] = GAP + GMP). Training-only parts: the aux
    heads g_k (.aux) and, for the margin losses, one learnable beta per training class and loss instance (.betas)."""

    def __init__(self, args, pretrained=False):
        super().__init__()
        if args.arch not in ("resnet50", "smallcnn"):
            raise RunError(f"unknown --arch {args.arch} (choose from resnet50, smallcnn)")
        if args.arch == "resnet50":
            r = torchvision.models.resnet50(weights="IMAGENET1K_V1" if pretrained else None)
            self.body, feat = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4), 2048
        else:
            self.body, feat = small_cnn(args.in_channels, args.image_size), 128
        self.embed = nn.Linear(feat, args.embed_dim)  # fresh, default init (code last_linear)
        # Auxiliary target spaces g_k (Sec. 3.2/3.3): two-layer MLPs, no BN, default init (code target_nets).
        self.aux = nn.ModuleList(nn.Sequential(nn.Linear(feat, t), nn.ReLU(), nn.Linear(t, t)) for t in args.target_dims)
        margin = args.loss in ("margin", "rmargin")
        self.betas = nn.ParameterList(nn.Parameter(torch.full((args.num_classes,), args.margin_beta))
                                      for _ in range(1 + len(args.target_dims)) if margin)
        self.freeze_bn = args.freeze_bn

    def train(self, mode=True):
        super().train(mode)
        for mod in self.modules() if self.freeze_bn else ():  # frozen BN statistics (Sec. 4.2), trainable affine
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()
        return self

    def forward(self, x):
        fmap = self.body(x)
        u = fmap.mean((2, 3))
        u_a = u + fmap.amax((2, 3))  # "A" pooling (Sec. 3.4, code pool_aggr): a sum, same dim
        return F.normalize(self.embed(u).float(), dim=-1), u, u_a


# ------------------------------------------------------------------------------------------------ METHOD: losses
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
    with torch.autocast(x.device.type, enabled=False):  # fp32: (2 - dim) log d magnifies bf16's distance error
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
    """L_DML for loss instance k (0 = base, k >= 1 = aux branch k - 1, each with its own betas)."""
    if args.loss == "multisimilarity":
        return multisimilarity_loss(emb, labels)
    trip = distance_weighted_triplets(emb, labels, rho=args.rho_p if args.loss == "rmargin" else 0.0)
    return margin_loss(emb, labels, betas[k], trip)


def step_losses(model, x, labels, step, args):
    """The algorithm of one step: {name: weighted term}; their sum is Eq. 5 (+ Eq. 6). step = steps taken so far."""
    z, u, u_a = model(x)
    base = dml_loss(args, z, labels, model.betas, 0)
    if args.variant == "baseline":
        return {"dml": base}
    # METHOD: Eq. 5, aux spaces from u (u_A for "A"), one DML loss each, KL from each space into z
    feats = u_a if args.variant == "msdfa" else u
    targets = [F.normalize(_fp32(head(feats)), dim=-1) for head in model.aux]
    aux = torch.stack([dml_loss(args, t, labels, model.betas, k + 1) for k, t in enumerate(targets)]).mean()
    kl = torch.stack([similarity_kl(z, t, args.temperature) for t in targets]).mean()
    out = {"dml": 0.5 * base, "aux_dml": 0.5 * aux, "distill": args.distill_weight * kl}
    if args.variant in ("msdf", "msdfa"):  # Eq. 6 from step n = feat_delay on (zero before, same log columns)
        f = F.normalize(_fp32(feats), dim=-1).detach()
        out["feat_distill"] = args.feat_weight * similarity_kl(z, f, args.temperature) * (step >= args.feat_delay)
    return out


# ------------------------------------------------------------------------------------------------ data and evaluation
def load_data(args, split):
    """'train' / 'test' of args.dataset under the DML protocol (disjoint classes; digits, fashionmnist and a
    single labelled folder: the first half of the classes train, the second half test)."""
    if args.dataset == "synthetic":
        n, classes = SYNTHETIC_SIZE[split]
        return common.load_split("synthetic", args.data_root, split, synthetic_size=(n, classes, args.image_size))
    name = ("dml_" if args.dataset in ("digits", "fashionmnist", "folder") else "") + split
    in_memory = args.dataset in ("digits", "fashionmnist")  # resized once at load (file datasets: per image)
    out = common.load_split(args.dataset, args.data_root, name, image_size=args.image_size if in_memory else None)
    if split == "train" and args.train_subset:  # a fixed seeded subset
        out = common.random_subset(out, args.train_subset)
    return out


def train_batches(args, data, epoch, skip, device):
    """This epoch's (images, labels) on the device from batch `skip` on: the released class-balanced sampler. Batch j
    draws its randomness (views, then the step's sampling) from seed_step, so a resumed epoch repeats exactly."""
    batches = common.epoch_batches(data["split"].labels, args.batch_size, args.seed, epoch,
                                   samples_per_class=args.samples_per_class)
    if "loader" in data:  # image files: DataLoader workers, RandomResizedCrop(224) + flip (code train transform)
        for j, (x, y) in enumerate(common.loader_batches(data["loader"], batches[skip:], device, (args.seed, epoch), skip), skip):
            seed_step(args, epoch * len(batches) + j)
            yield x, y
        return
    for j, b in enumerate(batches[skip:], skip):
        seed_step(args, epoch * len(batches) + j)
        x = data["images"][b.to(device)]
        if args.crop_scale:  # the same view, batched on the device
            x = common.random_hflip(common.random_resized_crop(x, args.image_size, scale=(args.crop_scale, 1.0)))
        yield common.normalize(x, data["split"].mean, data["split"].std), data["labels"][b.to(device)]


EVAL_ARGS = ("dataset", "image_size", "arch", "in_channels", "num_classes", "embed_dim", "target_dims",
             "loss")  # eval.py: the arguments that define the network, the test data and the evaluation


def model_from_args(args):
    """eval.py contract: the network whose state_dict is model.pt's "model" (no download)."""
    return EmbeddingNet(args)


@torch.no_grad()
def embeddings(model, args, device):
    """eval.py contract: {"emb": base embeddings z [N, d], "labels": [N]} of the test split, fp32."""
    model.eval()
    split = load_data(args, "test")
    tf = None if split.images is not None else common.eval_transform(round(args.image_size * 256 / 224), args.image_size)
    emb, labels = common.embed(lambda x: model(x)[0], split, device, workers=args.workers, transform=tf,
                               batch_size=256 if args.arch == "resnet50" else 1024)
    return {"emb": emb, "labels": labels}


def evaluate(model, args, device):
    """Test-set R@1/2/4/8, MAP@R and NMI (percent) of the base embedding z only (test cost = baseline)."""
    out = embeddings(model, args, device)
    return common.retrieval_metrics(out["emb"], out["labels"])


# ------------------------------------------------------------------------------------------------ training
def run(args):
    device, rank, world = setup(args)
    split = load_data(args, "train")
    load_data(args, "test")  # a missing test split fails now, not after the first epoch
    args.in_channels, args.num_classes = (split.images.shape[1] if split.images is not None else 3), split.num_classes
    if len(split) < args.batch_size:
        raise RunError(f"--batch-size {args.batch_size} is larger than the {len(split)} training images")
    if split.images is not None:  # small images live on the device as uint8; batches are augmented there
        data = dict(split=split, images=split.images.to(device), labels=split.labels.to(device))
    else:
        data = dict(split=split, loader=common.make_loader(common.ImageFiles(
            split.paths, split.labels, common.dml_train_transform(args.image_size, args.crop_scale)), args.workers))
    run_ = start_run(args, device, rank)
    try:
        model = EmbeddingNet(args, pretrained=args.pretrained and not args.resume)
    except OSError as e:  # the ImageNet weights cannot be downloaded (offline machine)
        raise RunError(f"cannot download the ResNet-50 ImageNet weights ({e}); use --no-pretrained")
    model = model.to(device, memory_format=memory_format(args, device))
    # code: backbone + embedding with weight decay; aux heads and loss parameters without (Sec. 4.2)
    optimizer = torch.optim.Adam([g for g in (
        dict(params=[*model.body.parameters(), *model.embed.parameters()], weight_decay=args.weight_decay),
        dict(params=list(model.aux.parameters()), weight_decay=0.0),
        dict(params=list(model.betas.parameters()), lr=args.beta_lr, weight_decay=0.0)) if g["params"]], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[])  # constant lr (code)
    epoch, batch, step = resume(args, run_, model, optimizer, scheduler)
    net = torch.compile(model) if args.compile else model
    with training():  # a first SIGINT / SIGTERM stops after the step in flight, with a last.pt
        meter = train(args, model, net, optimizer, scheduler, data, run_, device, epoch, batch, step)
    save_checkpoint(args, run_, "model.pt", model, metrics=final_metrics(run_))
    print_summary(run_, meter)


def train(args, model, net, optimizer, scheduler, data, run, device, epoch, batch, step):
    steps_per_epoch = len(data["split"]) // args.batch_size  # the released sampler: floor(N / B) batches
    total = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    meter = Meter(args, run, device, step, total)
    while epoch < args.epochs and step < total:
        model.train()
        for x, y in train_batches(args, data, epoch, batch, device):
            with autocast(args, device):
                losses = step_losses(net, x.contiguous(memory_format=memory_format(args, device)), y, step, args)  # METHOD
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            step, batch = step + 1, batch + 1
            meter.add(losses, len(y), epoch, step, optimizer.param_groups[0]["lr"])
            if step >= total or stop_requested(1):
                break
        meter.check()
        if batch == steps_per_epoch:  # the epoch is complete
            epoch, batch = epoch + 1, 0
            scheduler.step()
            if (args.eval_every and epoch % args.eval_every == 0) or epoch == args.epochs or step >= total:
                with meter.paused():
                    log_eval(run, meter, epoch, step, evaluate(model, args, device))
        with meter.paused():
            save_checkpoint(args, run, "last.pt", model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            epoch=epoch, batch=batch, step=step)
        if stop_requested(1) and step < total:
            stop(run, step, 1)
    if not run["history"] or run["history"][-1]["step"] != step:  # stopped inside an epoch, or resumed at the end
        log_eval(run, meter, epoch + 1 if batch else epoch, step, evaluate(model, args, device))
    return meter


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
