"""CAMD: Collaborative Adaptive Metric Distillation (teacher -> student, for classification AND retrieval).

H. Liu, M. Ye, Y. Wang, S. Zhao, P. Li, J. Shen, "A New Framework of Collaborative Learning for Adaptive Metric
Distillation", IEEE TNNLS 2023. No public code: this file is the reference (open choices: shared/notes/camd.md).
Idea: teacher features are anchors; the batch's hardest positive / negative STUDENT embeddings are pulled / pushed by
a soft-margin triplet weighted by the gaps to the teacher's own distances (zero once the student beats the teacher).
This embedding branch teaches the baseline classifier via a stop-gradient KL; only the baseline is kept at test time.
The algorithm: step_losses().

Usage:
  python camd.py                       # digits on CPU (the teacher is CE-trained and cached first)
  python camd.py --dataset cifar100 --teacher-path cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth [--variant kd]
  python camd.py --dataset cifar100 --teacher-arch ResNet50 --student-arch MobileNetV2   # Table II (student lr 0.01)
  python camd.py --dataset tinyimagenet                # Table III: vgg13 -> vgg8 at 64 px
  torchrun --nproc_per_node=8 camd.py --dataset imagenet --data-root /data   # ResNet-34 -> ResNet-18, DDP
  python camd.py --dataset folder --data-root DIR     # your images: DIR/train/<class>/, DIR/val/<class>/
  python camd.py --dataset synthetic --variant {camd,kd,ce}   # 32 steps: images/s, ms/step, peak memory

Implementation details:
 1. Teacher frozen (eval, no grad); feature = pooled penultimate vector. --teacher-path: this repo's model.pt, a
    RepDistiller ckpt ({"model": sd}, trusted pickle) or a state_dict, strict; else CE-trained with the same recipe
    and cached under a name spkd.py shares; ImageNet: torchvision's ResNet-34 weights (Sec. IV-A). The CIFAR zoo is
    RepDistiller's, its names included (ResNet50, MobileNetV2, ShuffleV1, ShuffleV2 of Tables II-III).
 2. Embedding block e = Linear(d_s -> d_t) -> BatchNorm1d -> ReLU + classifier z^m (Sec. III-B.4, Table V).
 3. L_amd (Eq. 2-4, Alg. 1), vectorised: normalised features, d_ij = ||t_i - s_j||; per teacher anchor the hardest
    positive (y_j = y_i, j = i included) and negative; constants a^p = [d^p - D(t_i, t_j)]_+, a^n = [D(t_i, t_k) -
    d^n]_+; mean over anchors with a negative of softplus(gamma (a^p d^p - a^n d^n)).
 4. camd = CE(z^b) + [CE(z^m) + L_amd] (Eq. 5) + tau^2 KL(stopgrad(p^m) || p^b) (Eq. 7) = Eq. 8. amd_b = CE(z^b) +
    L_amd on the backbone feature (d_s = d_t); amd_e = no KL; camd_kd = Eq. 8 + kd_beta KD; kd = 0.1 CE + 0.9 KD;
    ce: vanilla student. Table VII: --weights fixed (a = 1), --mining all (mean over (i, j, k)), --no-stopgrad (Eq. 6).
 5. Sec. IV-A: the RepDistiller recipe (SGD 0.9, wd 5e-4, 240 epochs, batch 64, lr 0.05 (0.01 for a MobileNetV2 /
    ShuffleV1 / ShuffleV2 student, or teacher trained here, unless --lr is given), x0.1 at 150/180/210, pad-crop +
    flip), gamma 80, tau 4; ImageNet: "the standard 100 epoch training of ImageNet on PyTorch" (lr 0.1,
    wd 1e-4, batch 256, x0.1 at 30/60/90), gamma 30. Metrics: top-1 of z^b (the only test head); Rank-1/2 on the
    test set vs itself (query excluded), the backbone feature averaged over image + flip, L2-normalised; fp32.
 6. torchrun DDP: --batch-size is global, each rank takes its slice of the seeded epoch order; L_amd mines the
    hardest pairs over the GLOBAL batch (teacher features, student embeddings with their gradient, and labels
    gathered), so several GPUs optimise the single-device objective.
Deviations: batch means where Eq. 5/6 sum; the stop-gradient on a^p, a^n is our reading (--no-detach-weights), as are
Table V's hidden widths (--embed-layers 2, 3: Linear(d_t, d_t)-BN-ReLU after the first layer);
kd_beta = 1 is ours; TinyImageNet pads crops by 8 (size / 8); global pooling (RepDistiller's fixed pools of its
MobileNetV2 / ShuffleNets / ResNets do not run at 64 px); BatchNorm statistics stay per rank under DDP; bf16 autocast
on CUDA (--no-amp = fp32). The digits / fashionmnist / folder / synthetic presets (and their gamma) are ours. Flags
that do nothing with the chosen variant (e.g. --gamma with kd or ce) are refused.
Paper (mean of 3 runs; top-1 / Rank-1 / Rank-2 of the rows Student and CAMD): Table I resnet32x4 -> resnet8x4 72.80 /
60.04 / 70.75 -> 76.58 / 68.01 / 76.51; Table II ResNet50 -> MobileNetV2 64.60 / 53.60 / 64.61 -> 70.10 / 63.48 /
71.96; Table III (TinyImageNet) vgg13 -> vgg8 56.94 / 38.27 / 48.95 -> 62.97 / 50.46 / 60.17. Measured here
(README "Results"; Fashion-MNIST, resnet20 -> resnet8, 3 seeds, top-1 / Rank-1): CAMD gamma 1 86.88 / 86.12, gamma 80
79.70 / 82.36, KD 86.33 / 86.41, CE 85.17 / 84.70. CIFAR-100 and ImageNet: not yet measured.
"""
import argparse
import contextlib
import datetime
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import pickle
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

METHOD, DATA_PARALLEL = "camd", True
CE_ONLY = dict(variant="ce")  # how this script trains a teacher (or the vanilla student)
_RD = dict(teacher_arch="resnet32x4", student_arch="resnet8x4", image_size=32, epochs=240, batch_size=64,  # Sec. IV-A
           lr=0.05, weight_decay=5e-4, momentum=0.9, nesterov=False, lr_milestones=[150, 180, 210], lr_decay=0.1,
           crop_padding=4, pad_mode="constant", variant="camd", gamma=80.0, tau=4.0,  # = RepDistiller train_student.py
           weights="adaptive", mining="hard", stopgrad=True, detach_weights=True,  # Eq. 2-4, Eq. 7; notes/camd.md
           kd_alpha=0.9, kd_beta=1.0, embed_layers=1, workers=0, eval_every=1,  # RepDistiller KD 0.9; kd_beta ours;
           log_every=100)  # embed_layers: Table V (one Linear-BN-ReLU is best; 2, 3 its deeper blocks)
PRESETS = {
    "cifar100": _RD,
    "tinyimagenet": dict(_RD, teacher_arch="vgg13", student_arch="vgg8", image_size=64,  # Table III, first pair;
                         crop_padding=8),  # Sec. IV-A: the CIFAR-100 recipe on 64-px images
    "imagenet": dict(_RD, teacher_arch="resnet34", student_arch="resnet18", image_size=224, epochs=100,  # Table IV;
                     batch_size=256, lr=0.1, weight_decay=1e-4, lr_milestones=[30, 60, 90], gamma=30.0,  # torchvision
                     workers=8, log_every=100),  # references/classification 100-epoch recipe; gamma 30 (Sec. IV-A)
    # Offline presets (ours); their teacher recipes match spkd.py's, so both scripts share one teacher per seed.
    "digits": dict(_RD, teacher_arch="resnet14", student_arch="resnet8", teacher_epochs=8, epochs=8,
                   lr_milestones=[6], gamma=10.0, log_every=50),  # gamma 10 (Fig. 5 range): short runs
    # ~3 minutes per run on 2 CPU cores: a fixed random 10,000 of the 60,000 training images, the full 10,000 test
    # images; resnet20 -> resnet8 at 28 px, the CIFAR recipe shortened to 8 epochs (x0.1 after 6); gamma 1: in 8
    # epochs the paper's 80 (a 240-epoch recipe) lets L_amd dominate CE (README: the gamma sweep).
    "fashionmnist": dict(_RD, teacher_arch="resnet20", student_arch="resnet8", image_size=28, teacher_epochs=8,
                         epochs=8, lr_milestones=[6], gamma=1.0, train_subset=10000, eval_every=2),
    "folder": dict(_RD, teacher_arch="resnet34", student_arch="resnet18", image_size=224, pretrained=True, epochs=30,
                   lr=0.01, lr_milestones=[20, 25], gamma=30.0, workers=8, log_every=50),  # ours: fine-tune ImageNet
    "synthetic": dict(_RD, teacher_epochs=0, epochs=1, synthetic_n=2048, log_every=10),  # the paper's runtime pair
}
VARIANTS = ("amd_b", "amd_e", "camd", "camd_kd", "kd", "ce")


# ------------------------------------------------------------------------------------------------ arguments
def get_args(argv=None):
    p = Parser(description="CAMD (Liu et al., TNNLS 2023): adaptive metric distillation with a collaborative branch")
    experiment_args(p)
    m = p.add_argument_group("method")
    m.add_argument("--variant", choices=VARIANTS, help="objective (Tables I-III; kd / ce: the baselines)"
                   + preset("variant"))
    teacher_student_args(m)
    m.add_argument("--gamma", type=number(float, 0, low_open=True), help="scale of Eq. 3" + preset("gamma"))
    m.add_argument("--tau", type=number(float, 0, low_open=True), help="temperature of Eq. 6 and KD" + preset("tau"))
    m.add_argument("--weights", choices=["adaptive", "fixed"], help="Eq. 4, or a = 1 (Table VII)" + preset("weights"))
    m.add_argument("--mining", choices=["hard", "all"], help="batch hard (Eq. 2) or all (Table VII)" + preset("mining"))
    m.add_argument("--stopgrad", action=argparse.BooleanOptionalAction, help="Eq. 7, or Eq. 6" + preset("stopgrad"))
    m.add_argument("--detach-weights", action=argparse.BooleanOptionalAction, help="a^p, a^n constant"
                   + preset("detach_weights"))
    m.add_argument("--kd-alpha", type=number(float, 0, 1), help="kd: (1 - a) CE + a KD" + preset("kd_alpha"))
    m.add_argument("--kd-beta", type=number(float, 0), help="camd_kd: the KD weight" + preset("kd_beta"))
    m.add_argument("--embed-layers", type=number(int, 1, 3), help="Linear-BN-ReLU layers of the embedding block "
                   "(Table V)" + preset("embed_layers"))
    parsed = p.parse_args(argv)
    given = {k for k, v in vars(parsed).items() if v is not None}  # on the command line (not preset, not --resume)
    args = resolve_args(parsed)
    check_teacher_student_args(args, given)
    v = args.variant  # refuse what would do nothing with this variant
    if v in ("kd", "ce"):
        refuse_unused(given, ("gamma", "weights", "mining", "detach_weights"), f"with --variant {v} (no L_amd)")
    if v not in ("camd", "camd_kd", "kd"):
        refuse_unused(given, ("tau",), f"with --variant {v} (no KL term)")
    if v not in ("camd", "camd_kd"):
        refuse_unused(given, ("stopgrad",), f"with --variant {v} (no L_c)")
    if v not in ("amd_e", "camd", "camd_kd"):
        refuse_unused(given, ("embed_layers",), f"with --variant {v} (no embedding block)")
    refuse_unused(given, ("kd_beta",) if v != "camd_kd" else (), f"with --variant {v} (camd_kd only)")
    refuse_unused(given, ("kd_alpha",) if v != "kd" else (), f"with --variant {v} (kd only)")
    if v == "ce":
        refuse_unused(given, ("teacher_arch", "teacher_path", "teacher_epochs"), "with --variant ce (no teacher)")
    if args.weights == "fixed":
        refuse_unused(given, ("detach_weights",), "with --weights fixed (a^p = a^n = 1)")
    if not args.run_name:
        args.run_name = f"{args.dataset}_{args.variant}_{args.teacher_arch}_{args.student_arch}_s{args.seed}"
    return args


# ------------------------------------------------------------------------------------------------ METHOD: networks, losses
def feat_dim(model):  # width of the pooled backbone feature = in_features of the last Linear (the classifier)
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features


class CAMDNet(nn.Module):
    """Student (backbone f^s + baseline classifier z^b) and, if branch, the embedding block e with its classifier z^m
    (Sec. III-B.4). forward(x) -> (f^s [B, d_s], z^b [B, C], e [B, d_t] or None, z^m [B, C] or None)."""

    def __init__(self, student, d_t, num_classes, branch, layers=1):
        super().__init__()
        self.student = student
        d_s = feat_dim(student)  # Table V's deeper blocks: more Linear(d_t, d_t)-BN-ReLU (their widths: our reading)
        self.embed = nn.Sequential(*[m for i in range(layers) for m in (
            nn.Linear(d_t if i else d_s, d_t), nn.BatchNorm1d(d_t), nn.ReLU())]) if branch else None
        self.head = nn.Linear(d_t, num_classes) if branch else None

    def forward(self, x):
        _, f, z_b = self.student(x, with_features=True)
        e = None if self.embed is None else self.embed(f)
        return f, z_b, e, None if e is None else self.head(e)


def amd_loss(t_feat, s_emb, labels, gamma, weights="adaptive", mining="hard", detach_weights=True):
    """Adaptive metric distillation, Eq. 2-4. t_feat [N, D] teacher features (anchors), s_emb [N, D] student embeddings
    (unnormalised; L2-normalised here), labels [N] -> scalar: mean over anchors with a negative of softplus(gamma
    (a^p d^p - a^n d^n)), 0 if none. weights="fixed": a = 1; mining="all": mean over all (i, j, k) (Table VII)."""
    dtype = torch.promote_types(torch.promote_types(t_feat.dtype, s_emb.dtype), torch.float32)  # >= fp32 (autocast)
    t, s = F.normalize(t_feat.to(dtype), dim=1), F.normalize(s_emb.to(dtype), dim=1)
    # METHOD: d_ij = ||t_i - s_j||, teacher templates D(t_i, t_j); direct cdist: exact, zero (not NaN) gradient at 0
    d = torch.cdist(t[None], s[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    d_tt = torch.cdist(t[None], t[None], compute_mode="donot_use_mm_for_euclid_dist")[0].detach()
    same = labels[:, None] == labels[None, :]
    has_neg = (~same).any(1)
    if not has_neg.any():
        return s.sum() * 0.0
    if mining == "hard":  # Eq. 2: hardest positive (j = i allowed) and hardest negative per teacher anchor
        d_p, j = d.masked_fill(~same, -math.inf).max(1)
        d_n, k = d.masked_fill(same, math.inf).min(1)
        t_p, t_n = d_tt.gather(1, j[:, None])[:, 0], d_tt.gather(1, k[:, None])[:, 0]
    else:  # batch all: a weight per pair, then every (i, j, k) combination
        d_p, d_n, t_p, t_n = d, d, d_tt, d_tt
    a_p, a_n = (d_p - t_p).clamp_min(0), (t_n - d_n).clamp_min(0)  # Eq. 4, "cut-off at zero"
    if weights == "fixed":
        a_p, a_n = torch.ones_like(a_p), torch.ones_like(a_n)
    elif detach_weights:
        a_p, a_n = a_p.detach(), a_n.detach()
    if mining == "hard":
        return F.softplus(gamma * (a_p * d_p - a_n * d_n))[has_neg].mean()  # Eq. 3
    x = gamma * ((a_p * d_p)[:, :, None] - (a_n * d_n)[:, None, :])  # [anchor i, positive j, negative k]
    return F.softplus(x)[same[:, :, None] & ~same[:, None, :]].mean()


def collaborative_kl(z_m, z_b, tau, stopgrad=True):
    """Collaborative loss, Eq. 6-7: tau^2 * batch-mean KL(softmax(z_m/tau) || softmax(z_b/tau)) with no gradient into
    z_m (stopgrad=False: Eq. 6). z_m, z_b [N, C] logits, computed in fp32. With z_m = teacher logits: Hinton KD."""
    dtype = torch.promote_types(torch.promote_types(z_m.dtype, z_b.dtype), torch.float32)  # >= fp32, fp64 stays
    z_m = z_m.detach() if stopgrad else z_m
    log_p_m, log_p_b = F.log_softmax(z_m.to(dtype) / tau, dim=1), F.log_softmax(z_b.to(dtype) / tau, dim=1)
    return tau ** 2 * F.kl_div(log_p_b, log_p_m, reduction="batchmean", log_target=True)


def step_losses(net, teacher, x, y, args, world=1):
    """The algorithm of one step: {name: term}; their sum is args.variant's objective (Eq. 8 for camd). Under DDP the
    hardest pairs are mined over the global batch (teacher features, embeddings with their gradient, labels)."""
    f, z_b, e, z_m = net(x)
    out = {"ce": F.cross_entropy(z_b.float(), y) * (1 - args.kd_alpha if args.variant == "kd" else 1.0)}  # L_b
    if args.variant == "ce":
        return out
    with torch.no_grad():
        _, t_feat, z_t = teacher(x, with_features=True)
    if args.variant in ("kd", "camd_kd"):  # Hinton KD on the baseline logits
        out["kd"] = (args.kd_alpha if args.variant == "kd" else args.kd_beta) * collaborative_kl(z_t, z_b, args.tau)
    if args.variant != "kd":  # METHOD: L_amd (Eq. 2-4) on the embedding (amd_b: on the backbone feature)
        out["amd"] = amd_loss(gather(t_feat, world), gather(f if e is None else e, world, grad=True), gather(y, world),
                              args.gamma, args.weights, args.mining, args.detach_weights)
    if e is not None:  # L_m = CE(z^m) + L_amd (Eq. 5)
        out["ce_m"] = F.cross_entropy(z_m.float(), y)
    if args.variant in ("camd", "camd_kd"):  # L_c, Eq. 7: the branch teaches the baseline classifier
        out["col"] = collaborative_kl(z_m, z_b, args.tau, stopgrad=args.stopgrad)
    return out


# ------------------------------------------------------------------------------------------------ training
def run(args):
    device, rank, world = setup(args)
    if args.batch_size % world:
        raise RunError(f"--batch-size {args.batch_size} does not divide into {world} processes")
    split = load_data(args, "train")
    load_data(args, "test")  # a missing test split fails now, not after the first epoch
    args.num_classes = split.num_classes
    if len(split) < args.batch_size:
        raise RunError(f"--batch-size {args.batch_size} is larger than the {len(split)} training images")
    d_t, d_s = (feat_dim(build_model(arch, args.num_classes)) for arch in (args.teacher_arch, args.student_arch))
    if args.variant == "amd_b" and d_s != d_t:
        raise RunError(f"--variant amd_b needs equal feature widths, but student {args.student_arch} has {d_s} and "
                       f"teacher {args.teacher_arch} {d_t}; use amd_e or camd (they add the embedding block)")
    teacher = get_teacher(args, device, rank, world) if args.variant != "ce" else None
    run_ = start_run(args, device, rank)
    references = [(f"teacher {args.teacher_arch}", evaluate(teacher, args, device))] if teacher and rank == 0 else []
    torch.manual_seed(args.seed)  # the student's initial weights do not depend on how the teacher was obtained
    try:
        student = build_model(args.student_arch, args.num_classes, pretrained=args.pretrained and not args.resume)
    except OSError as e:  # the ImageNet weights cannot be downloaded (offline machine)
        raise RunError(f"cannot download the ImageNet weights ({e}); use --no-pretrained")
    model = CAMDNet(student, d_t, args.num_classes, args.variant in ("amd_e", "camd", "camd_kd"), args.embed_layers)
    model = model.to(device, memory_format=memory_format(args, device))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_milestones, gamma=args.lr_decay)
    epoch, batch, step = resume(args, run_, model, optimizer, scheduler)
    net = data_parallel(torch.compile(model) if args.compile else model, device, world)
    with training():  # a first SIGINT / SIGTERM stops after the step in flight, with a last.pt
        meter = train(args, model, net, teacher, optimizer, scheduler, train_data(args, split, device), run_, device,
                      epoch, batch, step, rank, world)
    if rank == 0:
        save_checkpoint(args, run_, "model.pt", model.student, metrics=final_metrics(run_), references=dict(references))
        print_summary(run_, meter, references)
    if world > 1:
        dist.barrier()  # the other ranks wait for rank 0's last evaluation


def train(args, model, net, teacher, optimizer, scheduler, data, run, device, epoch, batch, step, rank, world):
    steps_per_epoch = epoch_length(len(data["split"]), args.batch_size, world)[0]
    total = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    meter = Meter(args, run, device, step, total)
    while epoch < args.epochs and step < total:
        model.train()
        for x, y in train_batches(args, data, epoch, batch, device, rank, world):
            with autocast(args, device):
                losses = step_losses(net, teacher, x.contiguous(memory_format=memory_format(args, device)), y, args,
                                     world)  # METHOD
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
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
                    log_eval(run, meter, epoch, step, evaluate(model.student, args, device))
        with meter.paused():
            save_checkpoint(args, run, "last.pt", model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            epoch=epoch, batch=batch, step=step)
        if stop_requested(world) and step < total:  # all ranks take the same decision
            stop(run, step, world)
    if rank == 0 and (not run["history"] or run["history"][-1]["step"] != step):  # stopped in an epoch
        log_eval(run, meter, epoch + 1 if batch else epoch, step, evaluate(model.student, args, device))
    return meter


# ================================================================================================ zoo, data, teacher
# The same text in camd.py and spkd.py (test_smoke.py checks): edit both copies together.
# The CIFAR zoo is HobbitLong/RepDistiller's models/ (resnet, resnetv2, wrn, vgg, mobilenetv2, ShuffleNetv1/v2) under
# its own model_dict names, with its module names, shapes, init and forward, so the benchmark's teachers
# (<arch>_vanilla/ckpt_epoch_240.pth) load strictly and give the same logits. model(x) -> logits; model(x,
# with_features=True) -> (stage outputs, pooled feature, logits): the stage outputs are RepDistiller's feat[1:-1] (what
# AT uses), the last of them its feat[-2] (what SP uses), the pooled vector its feat[-1] (the retrieval / CAMD
# feature). Every network pools globally: RepDistiller's fixed AvgPool2d(8) / avg_pool2d(4) / AvgPool2d(2) equal that
# at 32 px; at 64 px (TinyImageNet) only its VGG and ResNet50 (adaptive pools) would fit their classifiers.
BasicBlock = torchvision.models.resnet.BasicBlock  # = RepDistiller resnet.py's BasicBlock in keys and forward
channel_shuffle = torchvision.models.shufflenetv2.channel_shuffle  # = RepDistiller's ShuffleBlock


def repdistiller_init(model, linear_std=None):
    """RepDistiller wrn.py / vgg.py / mobilenetv2.py init, in module order: conv N(0, sqrt(2 / (k k out))), BN weight
    1, every bias 0 (and, for vgg / mobilenetv2, Linear weight N(0, linear_std))."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
        if isinstance(m, nn.Linear) and linear_std:
            m.weight.data.normal_(0, linear_std)
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and m.bias is not None:
            m.bias.data.zero_()


def kaiming_init(model):
    """RepDistiller resnet.py / resnetv2.py init: Kaiming normal (fan_out) convs, BN 1/0, Linear left at default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def forward_stages(x, stages, pool, classifier, with_features):
    """The zoo's forward after the stem: the stages in turn (their outputs: the features), pool, classifier."""
    feats = []
    for stage in stages:
        x = stage(x)
        feats.append(x)
    pooled = pool(x)
    logits = classifier(pooled)
    return (feats, pooled, logits) if with_features else logits


def global_avg_pool(x):  # == RepDistiller's AvgPool2d(8) on the 8x8 map of 32-px input (and its other fixed pools)
    return F.avg_pool2d(x, x.shape[-2:]).flatten(1)


def conv_bn(c_in, c_out, kernel, stride=1, groups=1):  # an unnamed-index conv + BN pair, as RepDistiller's Sequentials
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


class CifarResNet(nn.Module):
    """resnet8..110 (widths 16|16/32/64) and resnet8x4/32x4 (widths 32|64/128/256); n = (depth-2)/6 post-activation
    BasicBlocks per stage: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut)."""

    def __init__(self, depth, widths, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        for i, (inplanes, planes, stride) in enumerate(zip(widths, widths[1:], (1, 2, 2))):
            # 1x1 conv + BN shortcut whenever the shape changes (also layer1 of the x4 nets: 32 -> 64, stride 1)
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(*conv_bn(inplanes, planes, 1, stride))
            blocks = [BasicBlock(inplanes, planes, stride, down)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(widths[3], num_classes)
        kaiming_init(self)

    def forward(self, x, with_features=False):  # post-ReLU stage outputs (RepDistiller f1, f2, f3 with preact=False)
        x = F.relu(self.bn1(self.conv1(x)))
        return forward_stages(x, (self.layer1, self.layer2, self.layer3), global_avg_pool, self.fc, with_features)


class Bottleneck(nn.Module):
    """RepDistiller resnetv2.py Bottleneck: 1x1 -> 3x3 (the stride) -> 1x1 (4x wide) convs, BN after each, ReLU after
    the first two and after the sum; a 1x1 conv + BN `shortcut` when the shape changes. (torchvision's Bottleneck
    computes the same but names the shortcut `downsample`, so RepDistiller's checkpoints would not load.)"""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_planes, planes, 1)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = conv_bn(planes, 4 * planes, 1)
        changes = stride != 1 or in_planes != 4 * planes
        self.shortcut = nn.Sequential(*(conv_bn(in_planes, 4 * planes, 1, stride) if changes else []))

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNet50(nn.Module):
    """RepDistiller resnetv2.py ResNet50 (CAMD Tables II-III's teacher): a 3x3 stride-1 stem (64) without max-pool,
    Bottleneck stages of 3/4/6/3 blocks at widths 64/128/256/512 (x4 out), strides 1/2/2/2, pool, `linear`."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, 64, 3)
        in_planes = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2))):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(Bottleneck(in_planes, planes, s))
                in_planes = 4 * planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(2048, num_classes)
        kaiming_init(self)

    def forward(self, x, with_features=False):  # post-ReLU layer1-4 outputs (RepDistiller f1-f4)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        return forward_stages(F.relu(self.bn1(self.conv1(x))), layers, global_avg_pool, self.linear, with_features)


class WRNBlock(nn.Module):
    """Pre-activation WRN block (RepDistiller wrn.py, dropout 0). When in != out the BN-ReLU'd input also feeds
    the 1x1 convShortcut; otherwise the shortcut is the raw input."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.convShortcut = None if in_planes == out_planes else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.convShortcut is None else self.convShortcut(a))


class WRNGroup(nn.Module):
    """RepDistiller's NetworkBlock: holds the blocks under `.layer` (state_dict keys block1.layer.0.*)."""

    def __init__(self, n, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-d-k: n = (d-4)/6 blocks per group, widths 16 | 16k/32k/64k, strides 1/2/2, final BN-ReLU, pool, fc."""

    def __init__(self, depth, widen, num_classes):
        super().__init__()
        n, c = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = WRNGroup(n, c[0], c[1], 1)
        self.block2 = WRNGroup(n, c[1], c[2], 2)
        self.block3 = WRNGroup(n, c[2], c[3], 2)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = nn.Linear(c[3], num_classes)
        repdistiller_init(self)

    def forward(self, x, with_features=False):  # group outputs; the last is BEFORE the final BN-ReLU (RepDistiller f3)
        groups = (self.block1, self.block2, self.block3)
        return forward_stages(self.conv1(x), groups, lambda out: global_avg_pool(F.relu(self.bn1(out))), self.fc,
                              with_features)


class CifarVGG(nn.Module):
    """RepDistiller vgg*_bn: blocks of conv3x3(bias)+BN(+ReLU between, the block's last ReLU in forward); max-pool
    after blocks 0-2 (block 3 only for 64-px input), adaptive avg-pool after block 4, Linear(512, classes)."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        in_ch = 3
        for i, widths in enumerate(cfg):
            layers = []
            for v in widths:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_ch = v
            setattr(self, f"block{i}", nn.Sequential(*layers[:-1]))  # drop the trailing ReLU (indices as official)
        self.classifier = nn.Linear(512, num_classes)
        repdistiller_init(self, linear_std=0.01)

    def forward(self, x, with_features=False):
        h = x.shape[2]
        feats = []
        for i, block in enumerate((self.block0, self.block1, self.block2, self.block3, self.block4)):
            if i in (1, 2, 3) or (i == 4 and h == 64):  # pool0..pool2 always, pool3 only at 64 px (official quirk)
                x = F.max_pool2d(x, 2, 2)
            x = F.relu(block(x))
            feats += [x] if i else []  # post-ReLU outputs of blocks 1-4 (RepDistiller f1-f4; block 0's f0 is no stage)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.classifier(pooled)
        return (feats, pooled, logits) if with_features else logits


class InvertedResidual(nn.Module):
    """RepDistiller mobilenetv2.py block, keys conv.0-7: 1x1 expansion (even when t = 1) -> 3x3 depthwise (the stride)
    -> 1x1 linear projection, BN after each, ReLU after the first two; residual when stride 1 and in = out.
    (torchvision's block drops the expansion at t = 1 and nests its keys: another network.)"""

    def __init__(self, c_in, c_out, stride, t):
        super().__init__()
        hidden = c_in * t
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(*conv_bn(c_in, hidden, 1), nn.ReLU(inplace=True),
                                  *conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU(inplace=True),
                                  *conv_bn(hidden, c_out, 1))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class CifarMobileNetV2(nn.Module):
    """RepDistiller's 'MobileNetV2' = mobilenetv2.py mobile_half: expansion 6, width 0.5 with plain int() rounding, a
    stride-2 3x3 stem (16), the seven (t, c, n, s) groups of the MobileNetV2 paper in blocks.0-6, a 1x1 conv to 1280,
    pool, classifier.0. Stages = RepDistiller f1-f4, the outputs of groups 1, 2, 4 and 6 (f4: 160 channels, before
    the 1x1 conv); the pooled feature is the 1280-wide conv's."""

    def __init__(self, num_classes, t=6, width=0.5):
        super().__init__()
        c_in = int(32 * width)
        self.conv1 = nn.Sequential(*conv_bn(3, c_in, 3, 2), nn.ReLU(inplace=True))
        groups = []
        for expand, c, n, s in ((1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1),
                                (t, 160, 3, 2), (t, 320, 1, 1)):
            blocks = []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(c_in, int(c * width), stride, expand))
                c_in = int(c * width)
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        last = int(1280 * width) if width > 1 else 1280
        self.conv2 = nn.Sequential(*conv_bn(c_in, last, 1), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        repdistiller_init(self, linear_std=0.01)

    def forward(self, x, with_features=False):
        b = self.blocks
        stages = (lambda h: b[1](b[0](h)), b[2], lambda h: b[4](b[3](h)), lambda h: b[6](b[5](h)))
        return forward_stages(self.conv1(x), stages, lambda out: global_avg_pool(self.conv2(out)), self.classifier,
                              with_features)


class ShuffleV1Unit(nn.Module):
    """RepDistiller ShuffleNetv1.py Bottleneck: grouped 1x1 (1 group on the 24-channel stem output) -> channel
    shuffle -> 3x3 depthwise (the stride) -> grouped 1x1, BN after each, ReLU after the first two; stride 2: concat
    with the 3x3 avg-pooled input, else add; ReLU."""

    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        mid, self.stride, self.groups = out_planes // 4, stride, 1 if in_planes == 24 else groups
        self.conv1, self.bn1 = conv_bn(in_planes, mid, 1, groups=self.groups)
        self.conv2, self.bn2 = conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3, self.bn3 = conv_bn(mid, out_planes, 1, groups=groups)

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.groups)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else out + x)


class ShuffleNetV1(nn.Module):
    """RepDistiller ShuffleNetv1.py ShuffleV1 (3 groups): a 1x1 conv stem (24) + BN + ReLU at full resolution, stages
    of 4 / 8 / 4 units with outputs 240 / 480 / 960, each opening with a stride-2 unit, pool, `linear`. PyTorch's
    default init (RepDistiller sets none). Stages = RepDistiller f1-f3 (post-ReLU)."""

    def __init__(self, num_classes, widths=(240, 480, 960), units=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, 24, 1)
        in_planes = 24
        for i, (width, n) in enumerate(zip(widths, units)):  # the stride-2 unit adds the pooled input's channels
            blocks = [ShuffleV1Unit(in_planes, width - in_planes, 2, groups)]
            blocks += [ShuffleV1Unit(width, width, 1, groups) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_planes = width
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x, with_features=False):
        layers = (self.layer1, self.layer2, self.layer3)
        return forward_stages(F.relu(self.bn1(self.conv1(x))), layers, global_avg_pool, self.linear, with_features)


class ShuffleV2Down(nn.Module):
    """RepDistiller ShuffleNetv2.py DownBlock (stride 2), keys conv1-5: left 3x3 dw s2 -> BN -> 1x1 -> BN-ReLU;
    right 1x1 -> BN-ReLU -> 3x3 dw s2 -> BN -> 1x1 -> BN-ReLU; concat (left, right), channel shuffle."""

    def __init__(self, c_in, c_out):
        super().__init__()
        mid = c_out // 2
        self.conv1, self.bn1 = conv_bn(c_in, c_in, 3, 2, groups=c_in)
        self.conv2, self.bn2 = conv_bn(c_in, mid, 1)
        self.conv3, self.bn3 = conv_bn(c_in, mid, 1)
        self.conv4, self.bn4 = conv_bn(mid, mid, 3, 2, groups=mid)
        self.conv5, self.bn5 = conv_bn(mid, mid, 1)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        return channel_shuffle(torch.cat([left, F.relu(self.bn5(self.conv5(right)))], 1), 2)


class ShuffleV2Unit(nn.Module):
    """RepDistiller ShuffleNetv2.py BasicBlock (stride 1), keys conv1-3: the first half of the channels passes, the
    second goes 1x1 -> BN-ReLU -> 3x3 dw -> BN -> 1x1 -> BN-ReLU; concat (first, branch), channel shuffle."""

    def __init__(self, c):
        super().__init__()
        half = c // 2
        self.conv1, self.bn1 = conv_bn(half, half, 1)
        self.conv2, self.bn2 = conv_bn(half, half, 3, groups=half)
        self.conv3, self.bn3 = conv_bn(half, half, 1)

    def forward(self, x):
        keep, x = x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))))
        return channel_shuffle(torch.cat([keep, out], 1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2: a stem conv (24) + BN + ReLU at full resolution, three stages of a stride-2 unit and 3 / 7 / 3
    stride-1 units at widths[0:3], a 1x1 conv to widths[3] + BN + ReLU, pool, `linear`; PyTorch's default init.
    RepDistiller's ShuffleV2 (ShuffleNetv2.py, net_size 1): 1x1 stem, widths 116/232/464/1024. SP Table 6's
    ShuffleNetV2-k: 3x3 stem; 0.5 and 1.0 have RepDistiller's widths, 2.0 is 244/488/976/2048 (RepDistiller's
    configs[2] has 224). Stages = RepDistiller f1-f3 (after the shuffle, non-negative)."""

    def __init__(self, widths, stem_kernel, num_classes):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, 24, stem_kernel)
        c_in = 24
        for i, (width, n) in enumerate(zip(widths[:3], (3, 7, 3))):
            units = [ShuffleV2Down(c_in, width)] + [ShuffleV2Unit(width) for _ in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
            c_in = width
        self.conv2, self.bn2 = conv_bn(c_in, widths[3], 1)
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x, with_features=False):
        layers = (self.layer1, self.layer2, self.layer3)
        head = lambda out: global_avg_pool(F.relu(self.bn2(self.conv2(out))))  # the 1x1 conv, then pool
        return forward_stages(F.relu(self.bn1(self.conv1(x))), layers, head, self.linear, with_features)


class TorchvisionResNet(torchvision.models.ResNet):
    """torchvision resnet18/34/50 (224-px data) with the zoo's forward contract; state_dict keys unchanged."""

    def __init__(self, block, layers, num_classes):
        super().__init__(block, layers, num_classes=num_classes)

    def forward(self, x, with_features=False):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        return forward_stages(x, layers, global_avg_pool, self.fc, with_features)


class TorchvisionMobileNetV2(torchvision.models.MobileNetV2):
    """torchvision's MobileNetV2 at width k (SP Table 4: 0.35, 1.0, 1.4; channels rounded to multiples of 8, the last
    conv 1280 unless k > 1), its keys and init. Stages end at 1/4, 1/8, 1/16, 1/32 of the input (features 3, 6, 13,
    18); the last is the final 1x1 conv, SP's 'last convolution layer' (Sec. 3.1)."""

    def __init__(self, width, num_classes):
        super().__init__(num_classes=num_classes, width_mult=width)

    def forward(self, x, with_features=False):
        f = self.features
        return forward_stages(x, (f[:4], f[4:7], f[7:14], f[14:]), global_avg_pool, self.classifier, with_features)


class MobileNetV1(nn.Module):
    """MobileNet (Howard et al. 2017) at width k, SP Table 3 (0.25, 0.5, 1.0): a stride-2 3x3 conv (32k) and 13
    depthwise-separable blocks (3x3 dw, 1x1; BN-ReLU6 after each, as the released TF-slim models; the paper writes
    ReLU), pool, fc. torchvision has no MobileNet V1: built from its Conv2dNormActivation, with torchvision's
    MobileNetV2 init. Stages end at 1/4, 1/8, 1/16, 1/32 of the input (features 3, 5, 11, 13)."""

    def __init__(self, width, num_classes):
        super().__init__()
        block = functools.partial(torchvision.ops.Conv2dNormActivation, activation_layer=nn.ReLU6)
        c = int(32 * width)
        layers = [block(3, c, 3, 2)]
        for out, stride in ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2),
                            (1024, 1)):
            layers.append(nn.Sequential(block(c, c, 3, stride, groups=c), block(c, int(out * width), 1)))
            c = int(out * width)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x, with_features=False):
        f = self.features
        return forward_stages(x, (f[:4], f[4:6], f[6:12], f[12:]), global_avg_pool, self.fc, with_features)


CIFAR_ARCHS = {  # name (RepDistiller's model_dict, plus SP Table 6's ShuffleNetV2-k): (class, arguments before classes)
    **{f"resnet{d}": (CifarResNet, d, [16, 16, 32, 64]) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (CifarResNet, 8, [32, 64, 128, 256]), "resnet32x4": (CifarResNet, 32, [32, 64, 128, 256]),
    "ResNet50": (CifarResNet50,),
    **{f"wrn_{d}_{k}": (WideResNet, d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2), (16, 8))},
    "vgg8": (CifarVGG, [[64], [128], [256], [512], [512]]),  # RepDistiller cfg 'S' (+BN)
    "vgg13": (CifarVGG, [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]),  # cfg 'B' (+BN)
    "MobileNetV2": (CifarMobileNetV2,), "ShuffleV1": (ShuffleNetV1,),
    "ShuffleV2": (ShuffleNetV2, (116, 232, 464, 1024), 1),
    **{f"shufflenetv2_{k}": (ShuffleNetV2, widths, 3) for k, widths in  # SP Table 6: 3x3 stem, 2.0 wider than RD's
       (("0.5", (48, 96, 192, 1024)), ("1.0", (116, 232, 464, 1024)), ("2.0", (244, 488, 976, 2048)))},
}
LIGHT_ARCHS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # RepDistiller train_*.py (and CAMD Sec. IV-A): lr 0.01
TV_ARCHS = {  # 224-px networks: name: (class, arguments before classes, torchvision's ImageNet weights or None)
    "resnet18": (TorchvisionResNet, (BasicBlock, [2, 2, 2, 2]), "ResNet18_Weights"),
    "resnet34": (TorchvisionResNet, (BasicBlock, [3, 4, 6, 3]), "ResNet34_Weights"),
    "resnet50": (TorchvisionResNet, (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]), "ResNet50_Weights"),
    **{f"mobilenetv2_{k}": (TorchvisionMobileNetV2, (float(k),), "MobileNet_V2_Weights" if k == "1.0" else None)
       for k in ("0.35", "1.0", "1.4")},  # SP Table 4; torchvision 0.29 has ImageNet weights for width 1.0 only
    **{f"mobilenet_{k}": (MobileNetV1, (float(k),), None) for k in ("0.25", "0.5", "1.0")},  # SP Table 3
}
ARCHS = tuple(CIFAR_ARCHS) + tuple(TV_ARCHS)


def imagenet_weights_file(arch):
    """Where build_model looks for ImageNet weights torchvision does not publish (a state_dict in this zoo's keys)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"{arch}_imagenet.pth")


def build_model(arch, num_classes, pretrained=False):
    """Zoo constructor. CIFAR archs: RepDistiller-compatible (pretrained ignored). 224-px archs: weights=None, or with
    pretrained=True ImageNet weights for everything but a re-sized classifier: torchvision's, else the file at
    imagenet_weights_file(arch). Unknown arch, or no weights -> RunError."""
    if arch in CIFAR_ARCHS:
        cls, *spec = CIFAR_ARCHS[arch]
        return cls(*spec, num_classes)
    if arch not in TV_ARCHS:
        raise RunError(f"unknown architecture '{arch}' (choose from {', '.join(ARCHS)})")
    cls, spec, weights_name = TV_ARCHS[arch]
    model = cls(*spec, num_classes)
    if not pretrained:
        return model
    path = imagenet_weights_file(arch)
    if weights_name:
        state = getattr(torchvision.models, weights_name).IMAGENET1K_V1.get_state_dict(progress=True)
    elif os.path.isfile(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # only torch.load is inside: a foreign or corrupt file fails in many ways
            raise RunError(f"ImageNet weights for {arch}: {path} is not a readable state_dict ({why(e)})") from None
    else:
        raise RunError(f"--pretrained: torchvision publishes no ImageNet weights for {arch} (of the MobileNets only "
                       f"mobilenetv2_1.0); put a state_dict with this zoo's keys at {path}, or use --no-pretrained")
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]  # re-sized for these classes
    own = model.state_dict()
    state = {k: v for k, v in state.get("model", state).items()
             if not k.startswith(head + ".") or v.shape == own[k].shape}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a mis-shaped tensor
        raise RunError(f"ImageNet weights for {arch} ({path}) do not fit it: {why(e)}") from None
    if unexpected or any(not k.startswith(head + ".") for k in missing):
        raise RunError(f"ImageNet weights for {arch} ({path}) do not fit it: {len(missing)} missing, "
                       f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]}")
    return model


def teacher_student_args(m):
    """The method flags camd.py and spkd.py share: the two networks, the teacher, the SGD recipe and its data."""
    m.add_argument("--teacher-arch", choices=ARCHS, help="teacher network" + preset("teacher_arch"))
    m.add_argument("--student-arch", choices=ARCHS, help="student network" + preset("student_arch"))
    m.add_argument("--teacher-path", help="teacher checkpoint (a model.pt of this repo, RepDistiller's ckpt_epoch_240"
                   ".pth, or a state_dict); default: the cached CE teacher of this recipe, trained first if missing")
    m.add_argument("--teacher-epochs", type=number(int, 0), help="CE epochs of a teacher trained here (default: "
                   "--epochs; 0 = a random teacher, for benchmarks)" + preset("teacher_epochs"))
    m.add_argument("--pretrained", action=argparse.BooleanOptionalAction, help="start the 224-px networks (student "
                   "and a teacher trained here) from ImageNet weights (default off)" + preset("pretrained"))
    m.add_argument("--momentum", type=number(float, 0, 1), help="SGD momentum" + preset("momentum"))
    m.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum" + preset("nesterov"))
    m.add_argument("--lr-milestones", type=number(int, 1), nargs="*", help="lr *= --lr-decay after these epochs"
                   + preset("lr_milestones"))
    m.add_argument("--lr-decay", type=number(float, 0, 1), help="step factor" + preset("lr_decay"))
    m.add_argument("--crop-padding", type=number(int, 0), help="pad-crop pixels (small images)"
                   + preset("crop_padding"))
    m.add_argument("--pad-mode", choices=["constant", "reflect"], help="pad-crop fill" + preset("pad_mode"))
    m.add_argument("--train-subset", type=number(int, 1), help="train on a fixed random subset of N images"
                   + preset("train_subset"))


def refuse_unused(given, flags, setting):
    """RunError for the first of `flags` (argument names) given on the command line: it does nothing in `setting`."""
    for flag in (f for f in flags if f in given):
        raise RunError(f"--{flag.replace('_', '-')} does nothing {setting}; drop it")


def check_teacher_student_args(args, given):
    """Resolve the shared flags after resolve_args (`given`: the argument names on the command line); refuse a
    teacher's last.pt given to --resume, and given flags that would do nothing."""
    if getattr(args, "cached_teacher", False):  # saved by get_teacher: resumed alone, it would end as the headline
        raise RunError(f"--resume {args.resume} is a cached teacher's checkpoint: run the student's command again "
                       "(without --resume): it continues an unfinished teacher, then trains the student")
    args.teacher_epochs = args.epochs if args.teacher_epochs is None else args.teacher_epochs
    args.pretrained = bool(args.pretrained)
    if args.teacher_path and not os.path.isfile(args.teacher_path):
        raise RunError(f"--teacher-path {args.teacher_path}: no such file")
    # RepDistiller train_teacher.py / train_student.py (CAMD Sec. IV-A: "For MobileNet and ShuffleNet, the initial
    # learning rate is 0.01"): on the CIFAR-100 recipe each network's lr follows its architecture unless --lr is given
    light = args.dataset in ("cifar100", "tinyimagenet") and "lr" not in given and not args.resume
    if getattr(args, "teacher_lr", None) is None:  # the lr of a teacher trained here (a resumed run keeps its own)
        args.teacher_lr = 0.01 if light and args.teacher_arch in LIGHT_ARCHS else args.lr
    args.lr = 0.01 if light and args.student_arch in LIGHT_ARCHS else args.lr
    if args.teacher_path:
        refuse_unused(given, ("teacher_epochs",), "with --teacher-path (the teacher is not trained here)")
    if args.dataset not in TENSOR_FORM:
        refuse_unused(given, ("crop_padding", "pad_mode"), f"on {args.dataset}'s image files (RandomResizedCrop)")
    if args.student_arch in CIFAR_ARCHS and args.teacher_arch in CIFAR_ARCHS:
        refuse_unused(given, ("pretrained",), "for CIFAR networks (ImageNet weights exist for the 224-px ones)")


TENSOR_FORM = ("digits", "fashionmnist", "synthetic", "cifar10", "cifar100", "cinic10", "tinyimagenet")


def load_data(args, split):
    """'train' / 'test' of args.dataset for teacher -> student classification: the official splits (digits:
    stratified 80/20; folder: DIR/train and DIR/val; dtd: the --split-th of the ten standard train / test splits),
    tensor-form images at --image-size (grey -> RGB)."""
    name = split if split == "train" else {"tinyimagenet": "val", "imagenet": "val"}.get(args.dataset, "test")
    name += str(args.split) if args.dataset == "dtd" else ""  # spkd.py's --split (its only file dataset with splits)
    kw = dict(image_size=args.image_size, channels=3) if args.dataset in TENSOR_FORM else {}
    if args.dataset == "synthetic":
        kw["synthetic_size"] = (args.synthetic_n if split == "train" else args.synthetic_n // 4, 100, args.image_size)
    out = common.load_split(args.dataset, args.data_root, name, **kw)
    if split == "train" and args.train_subset:  # a fixed seeded subset
        out = common.random_subset(out, args.train_subset)
    return out
def train_data(args, split, device):
    """The training split for train_batches: uint8 images on the device, or a DataLoader over image files."""
    if split.images is not None:
        return dict(split=split, images=split.images.to(device), labels=split.labels.to(device))
    ds = common.ImageFiles(split.paths, split.labels, common.dml_train_transform(args.image_size))
    return dict(split=split, loader=common.make_loader(ds, args.workers))


def epoch_length(n, batch_size, world=1):
    """(batches per epoch, drop_last) for n images: no drop_last (RepDistiller), unless the last batch would hold one
    image per process: it is dropped then (BatchNorm in train mode cannot normalise one image: CAMD's embedding)."""
    padded = n + (-n) % world  # epoch_batches pads by wrapping around, as DistributedSampler
    drop = padded % batch_size == world
    return (padded // batch_size if drop else math.ceil(padded / batch_size)), drop


def train_batches(args, data, epoch, skip, device, rank=0, world=1):
    """This epoch's (images, labels) on the device from batch `skip` on: a seeded permutation (epoch_length), each
    rank its slice; pad-crop + flip (RepDistiller CIFAR), or RandomResizedCrop + flip. Batch j draws its randomness
    from seed_step, so a resumed epoch repeats exactly."""
    drop = epoch_length(len(data["split"]), args.batch_size, world)[1]
    batches = common.epoch_batches(data["split"].labels, args.batch_size, args.seed, epoch, rank, world, drop_last=drop)
    if "loader" in data:
        loaded = common.loader_batches(data["loader"], batches[skip:], device, (args.seed, epoch, rank), skip)
        for j, (x, y) in enumerate(loaded, skip):
            seed_step(args, epoch * len(batches) + j, rank)
            yield x, y
        return
    for j, b in enumerate(batches[skip:], skip):
        seed_step(args, epoch * len(batches) + j, rank)
        x = common.random_crop_flip(data["images"][b.to(device)], args.crop_padding, args.pad_mode)
        yield common.normalize(x, data["split"].mean, data["split"].std), data["labels"][b.to(device)]


EVAL_ARGS = ("dataset", "image_size", "student_arch", "num_classes", "synthetic_n") + (  # eval.py: network, test data,
    ("split",) if METHOD == "spkd" else ())  # evaluation (synthetic_n: the synthetic test size; spkd: which DTD split)


def model_from_args(args):
    """eval.py contract: the deployable student (backbone + classifier), model.pt's "model" (no download)."""
    return build_model(args.student_arch, args.num_classes)


@torch.no_grad()
def embeddings(model, args, device):
    """eval.py contract, CAMD's protocol: the pooled backbone feature averaged over image and flip, then
    L2-normalised ("emb"), the logits of the plain image, and the labels of the test split; fp32. Image files:
    resize the shorter side to 8/7 of --image-size (dtd: the whole image to that square, SP Sec. 3.2), centre crop."""
    model.eval()
    split = load_data(args, "test")
    side = args.image_size * 8 // 7  # 256 for 224
    tf = None if split.images is not None else common.eval_transform((side, side) if args.dataset == "dtd" else side,
                                                                    args.image_size)
    emb, logits, labels = common.embed(lambda x: model(x, with_features=True)[1:], split, device, flip_average=True,
                                       workers=args.workers, transform=tf)
    return {"emb": F.normalize(emb, dim=1), "logits": logits, "labels": labels}


def evaluate(model, args, device):
    """Top-1 of the logits and Rank-1 / Rank-2 retrieval of the test set against itself (percent)."""
    out = embeddings(model, args, device)
    ranked = common.retrieval_metrics(out["emb"], out["labels"], ks=(1, 2), with_map=False, with_nmi=False)
    return {"top1": 100 * common.topk_accuracy(out["logits"], out["labels"], ks=(1,))[1], "Rank-1": ranked["R@1"],
            "Rank-2": ranked["R@2"], **({"collapsed": True} if ranked.get("collapsed") else {})}


TEACHER_RECIPE = ("dataset", "teacher_arch", "teacher_epochs", "batch_size", "weight_decay", "momentum", "nesterov",
                  "lr_milestones", "lr_decay", "image_size", "crop_padding", "pad_mode", "train_subset", "pretrained",
                  "seed")


def teacher_folder(args):
    """runs/teachers/<dataset>_<arch>_e<epochs>_s<seed>_<hash>: the hash covers the whole CE recipe and what the
    teacher learns from (the training split's classes, its size and, for image files, their paths relative to
    --data-root), so camd.py and spkd.py share one teacher, and a changed folder or another dtd split trains anew."""
    split = load_data(args, "train")
    paths = "\n".join(os.path.relpath(p, args.data_root) for p in split.paths or [])
    recipe = {**{k: getattr(args, k) for k in TEACHER_RECIPE}, "lr": args.teacher_lr,
              "data": [split.classes or split.num_classes, len(split), hashlib.sha1(paths.encode()).hexdigest()]}
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{args.dataset}_{args.teacher_arch}_e{args.teacher_epochs}_s{args.seed}_{digest}"
    return os.path.join(args.save_dir, "teachers", name)


def load_teacher(path, arch, num_classes, cache=None):
    """Strictly load a teacher: this repo's model.pt, the RepDistiller/mdistiller {"model": state_dict, "epoch", ...}
    pickle, or a bare state_dict. RunError naming the file otherwise (and, for the teacher `cache` folder, saying to
    delete it)."""
    fix = f"delete {cache} (the teacher is then trained again)" if cache else "pass another --teacher-path"
    if not os.path.isfile(path):
        raise RunError(f"teacher checkpoint {path}: no such file")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # RepDistiller pickles hold more than tensors; the user vouches for the file
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # only torch.load is inside: a foreign or corrupt file fails in many ways
        raise RunError(f"teacher checkpoint {path} is unreadable ({why(e)}); {fix}") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise RunError(f"teacher checkpoint {path}: no state_dict in it (expected a dict with 'model', or a "
                       f"state_dict); {fix}")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    model = build_model(arch, num_classes)
    own = model.state_dict()
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape] + [k for k in state if k not in own]
    if bad:
        raise RunError(f"teacher checkpoint {path} does not fit --teacher-arch {arch} with {num_classes} classes "
                       f"({len(bad)} missing, unexpected or mis-shaped tensors, e.g. {bad[0]}); {fix}")
    model.load_state_dict(state)
    return model


def resumable_teacher(folder):
    """folder/last.pt if this script wrote it (the other script's interrupted teacher holds another network), else
    None; a corrupt one is None too (it is trained again)."""
    last = os.path.join(folder, "last.pt")
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception:  # only torch.load is inside: unreadable means not resumable
        return None
    return last if isinstance(ckpt, dict) and ckpt.get("method") == METHOD else None


def get_teacher(args, device, rank, world):
    """The frozen teacher (eval mode, no grad): --teacher-path; torchvision's ImageNet weights (imagenet); else the
    CE teacher of this recipe, trained now by this script's own loop (CE only, --max-steps not applied) unless it
    is cached. Only a finished teacher run writes model.pt; an interrupted one resumes from its last.pt when the
    same command runs again (its checkpoints carry cached_teacher, so --resume refuses them)."""
    arch = args.student_arch  # ImageNet weights torchvision lacks: refused now, not after the teacher has trained
    if args.pretrained and not args.resume and arch in TV_ARCHS and not TV_ARCHS[arch][2]:
        build_model(arch, 2, pretrained=not os.path.isfile(imagenet_weights_file(arch)))
    if args.teacher_path:
        model = load_teacher(args.teacher_path, args.teacher_arch, args.num_classes)
    elif args.dataset == "imagenet":  # CAMD Sec. IV-A: the torchvision ResNet-34
        if args.teacher_arch not in TV_ARCHS:
            raise RunError(f"--dataset imagenet: --teacher-arch {args.teacher_arch} has no ImageNet weights; choose "
                           f"{', '.join(TV_ARCHS)} or give --teacher-path")
        try:
            model = build_model(args.teacher_arch, args.num_classes, pretrained=True)
        except OSError as e:  # offline machine
            raise RunError(f"cannot download the teacher's ImageNet weights ({e}); give --teacher-path") from None
    elif args.teacher_epochs == 0:
        print("warning: --teacher-epochs 0: a randomly initialised teacher (speed benchmarks only)")
        model = build_model(args.teacher_arch, args.num_classes)
    else:
        folder = teacher_folder(args)
        if not os.path.isfile(os.path.join(folder, "model.pt")):
            last = resumable_teacher(folder)
            if rank == 0 and os.path.isdir(folder) and last is None:  # died before its first checkpoint, or the
                lock(folder)  # (RunError if a process trains it now)      # other script's unfinished run
                STATE["locks"].pop().close()
                print(f"teacher: {folder} holds no run this script can resume; training the teacher again")
                shutil.rmtree(folder)
            print(f"teacher: training {args.teacher_arch} with CE for {args.teacher_epochs} epochs in {folder}")
            try:
                run(argparse.Namespace(**{**vars(args), **CE_ONLY, "student_arch": args.teacher_arch,
                                          "lr": args.teacher_lr, "max_steps": None, "epochs": args.teacher_epochs,
                                          "save_dir": os.path.dirname(folder), "run_name": os.path.basename(folder),
                                          "tensorboard": False, "resume": last, "cached_teacher": True}))
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the hint must continue the whole run, not the teacher alone
                last = os.path.join(folder, "last.pt")
                state = f"{last} holds it" if os.path.isfile(last) else "before its first checkpoint"
                raise KeyboardInterrupt(f"the teacher was stopped ({state}); run the same command again: it continues "
                                        "the teacher, then trains the student") from None
            if STATE["signal"]:  # it came during the teacher's final evaluation: the teacher is complete
                raise KeyboardInterrupt("the teacher is trained and cached; run the same command again to train the "
                                        "student")
            if world > 1:
                dist.barrier()  # rank 0 writes model.pt
        print(f"teacher: {os.path.join(folder, 'model.pt')}")
        model = load_teacher(os.path.join(folder, "model.pt"), args.teacher_arch, args.num_classes, cache=folder)
    return model.to(device, memory_format=memory_format(args, device)).eval().requires_grad_(False)
# ================================================================================================ end of zoo, data, teacher


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
