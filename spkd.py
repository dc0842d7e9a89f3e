"""SP: Similarity-Preserving Knowledge Distillation (with the KD and AT baselines).

F. Tung and G. Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. https://arxiv.org/abs/1907.09682
Benchmark code: HobbitLong/RepDistiller (distiller_zoo/SP.py, AT.py, train_student.py).

Idea: inputs with similar teacher activations should get similar student activations. Per batch, the student's
b x b Gram matrix of flattened activation maps, row-L2-normalised (G, Eq. 2-3), must match the teacher's (Eq. 4).
Only pairwise similarities transfer, so widths and map sizes may differ. The algorithm: step_losses().

Usage:
    python spkd.py                                  # digits preset, CPU, ~1 min (the teacher is trained + cached first)
    python spkd.py --dataset cifar10                # Sec. 3.1, Table 2 row 3: WRN-40-2 -> WRN-16-2, gamma 3000
    python spkd.py --dataset cinic10 [--at-weight 30]   # Sec. 3.3, Table 7: ShuffleNetV2 1.0 -> 0.5, gamma 2000 [AT+SP]
    python spkd.py --dataset dtd --split 1          # Sec. 3.2, Table 5: MobileNetV2 1.0 -> 0.35 fine-tuned (see 7.)
    python spkd.py --dataset cifar100 --teacher-path resnet32x4_vanilla/ckpt_epoch_240.pth   # RepDistiller pair
    python spkd.py --dataset cifar100 --sp-weight 0 --ce-weight 0.1 --kd-weight 0.9          # the KD baseline
    python spkd.py --dataset cifar100 --sp-weight 0                                          # the vanilla student
    python spkd.py --dataset folder --data-root DIR # your images: DIR/train/<class>/, DIR/val/<class>/
    python spkd.py --dataset synthetic              # throughput, 32 steps (random teacher)
    python eval.py runs/<run>/model.pt

Implementation details:
 1. L_SP (Eq. 2-4) = sum over layer pairs of ||G_T - G_S||_F^2 / b^2, G = F.normalize(Q Q^T, dim=1) (row-wise, as
    RepDistiller distiller_zoo/SP.py); fp32, autocast off (Q Q^T over 16k-dim rows overflows fp16, imprecise in bf16).
 2. --sp-layers last (Sec. 3.1: per-block pairs gave no improvement): the last stage's map before pooling
    (RepDistiller feat[-2]): the WRN block3 output BEFORE the final BN-ReLU, ResNet/VGG post-ReLU, the MobileNets'
    final 1x1 conv (torchvision's) or last bottleneck group (RepDistiller's MobileNetV2).
 3. Loss = ce_weight CE + kd_weight T^2 KL(p_t || p_s) + sp_weight L_SP + at_weight L_AT: Eq. 5 plus the baselines
    (RepDistiller: gamma CE + alpha KD + beta SP/AT; its SP runs: -r 1 -a 0 -b 3000, T 4; KL summed over classes,
    batch mean). Teacher in eval mode under no_grad. KD baseline: 0.1 CE + 0.9 KD, T 4 (Sec. 3.1).
 4. AT (Zagoruyko & Komodakis 2017), at_loss: attention = channel mean of squared activations (p = 2), flattened,
    L2-normalised; beta * mean squared difference, summed over the stage pairs (the residual groups; RepDistiller
    feat[1:-1], zipped), as their code (utils.at_loss, cifar.py: beta * sum, no 1/2) and RepDistiller AT.py; a larger
    map is first average-pooled to the smaller one's size (RepDistiller). beta 1000 on CIFAR-10 (Sec. 3.1).
 5. Teacher: --teacher-path (this repo's model.pt, the benchmark's {"model", "epoch", "accuracy", "optimizer"}
    pickle, or a bare state_dict; strict), else CE-trained with the same recipe and cached in runs/teachers/ under
    a name camd.py shares (a teacher trained by either is reused by the other). CIFAR zoo = RepDistiller's models/
    (its teachers load strictly, same logits); torchvision resnet18/34/50 and MobileNetV2 for large images.
 6. Small images on the device; per batch a 4-px pad-crop + flip, normalise, no drop_last; CIFAR-100 pads with zeros
    (RepDistiller), CIFAR-10 / CINIC-10 by reflection (the WRN protocol Sec. 3.1 follows: attention-transfer cifar.py
    Pad(4, padding_mode='reflect'); Sec. 3.3: "CIFAR-style"). SGD; lr x decay at the start of each milestone epoch
    (1-indexed epoch milestone + 1, as RepDistiller). Image files: RandomResizedCrop + flip in DataLoader workers.
 7. dtd (Sec. 3.2): ImageNet-pretrained students fine-tuned with CE + SP from a teacher fine-tuned here with CE
    (ImageNet start); RandomResizedCrop 224 + flip, test 256 x 256 -> centre 224; --split k of the ten standard
    splits (train<k> / test<k>; the paper reports the median test error over the ten). torchvision has ImageNet
    weights for mobilenetv2_1.0 only: the other widths (mobilenetv2_0.35 / 1.4, mobilenet_0.25 / 0.5 / 1.0 of
    Tables 3-4) need a state_dict in this zoo's keys at ~/.cache/torch/hub/checkpoints/<arch>_imagenet.pth (none is
    provided), else --no-pretrained (not the paper's protocol).
 8. Metrics (CAMD's protocol, so SP and CAMD compare): top-1 (error = 100 - top-1); Rank-1 / Rank-2 on the test
    set (query excluded), the pooled feature averaged over image + flip, L2-normalised; fp32.

Deviations:
 - sp_loss returns a 0-dim tensor (RepDistiller: shape [1]). Seeds are set (RepDistiller set none).
 - KD is weight * T^2 KL (RepDistiller, the AT code after its "fix KL"), not Eq. 1's (1-a) CE + 2a T^2 CE(soft).
 - Weight decay 5e-4 (CIFAR-10: the WRN / AT code's) and reflection padding on CINIC-10 are not stated in the paper;
   nor is the DTD gamma: 2000 is ours (the CINIC-10 value at the same batch size 96).
 - SP Table 6's ShuffleNetV2-2.0 has 244/488/976 channels (our shufflenetv2_2.0: 5.37M parameters with 10 classes);
   its Table 7 states 5.3M, which fits RepDistiller's / kuangliu's 224-channel typo (5.34M) better.
 - Global pooling over the whole map (== the official fixed pools at 32 px; also valid at other sizes).
 - bf16 autocast on CUDA (the papers: fp32; --no-amp). The digits / fashionmnist / folder / synthetic presets are ours.
 - Flags that do nothing (--kd-T without --kd-weight, every weight 0, ...) are refused.
 - DTD (Table 5): the teacher is fine-tuned on the split with CE first (our reading: Sec. 3.2 says SP "can be applied
   directly ... without first fine-tuning the teacher", yet Table 5's Teacher column reports errors on DTD).

Paper (median top-1 error %; rows student / KD / AT / SP (/ KD+SP / AT+SP) / teacher): Table 2 row 3 (CIFAR-10,
WRN-16-2 <- WRN-40-2): 6.07 / 6.00 / 5.89 / 5.52 / 5.18. Table 7 row 1 (CINIC-10, ShuffleNetV2-0.5 <- 1.0): 20.09 /
18.62 / 18.50 / 18.56 / 18.35 / 18.20 / 17.26. Table 5 row 4 (DTD, MobileNetV2-0.35 <- 1.0; student / AT / SP /
teacher): 41.25 / 41.60 / 40.29 / 36.62. CIFAR-100 resnet32x4 -> resnet8x4 in the CAMD paper's Table I (top-1 %,
mean of 3): student 72.80, KD 73.44, SP 73.48 (Rank-1 63.45).
Measured here (README "Results"; Fashion-MNIST, resnet20 -> resnet8, 3 seeds, top-1): SP 87.10, KD 86.33,
student 85.17. The paper settings: not yet measured (no GPU, no datasets here).
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

METHOD, DATA_PARALLEL = "spkd", False
CE_ONLY = dict(ce_weight=1.0, kd_weight=0.0, sp_weight=0.0, at_weight=0.0)  # how this script trains a teacher
_RD = dict(ce_weight=1.0, kd_weight=0.0, kd_T=4.0, sp_weight=3000.0, sp_layers="last",  # Eq. 5, gamma 3000 (Sec. 3.1);
           at_weight=0.0, momentum=0.9, weight_decay=5e-4, crop_padding=4, workers=0,  # RepDistiller -r 1 -a 0 -b 3000
           teacher_arch="resnet32x4", student_arch="resnet8x4", image_size=32, pad_mode="constant", epochs=240,
           batch_size=64, lr=0.05, nesterov=False, lr_milestones=[150, 180, 210], lr_decay=0.1,  # RepDistiller
           eval_every=1, log_every=100)  # train_student.py (notes/kd_cifar.md)
PRESETS = {
    "cifar10": dict(_RD, teacher_arch="wrn_40_2", student_arch="wrn_16_2",  # paper Table 2, row 3
                    epochs=200, batch_size=128, lr=0.1, nesterov=True,  # paper Sec. 3.1 (the WRN protocol [40])
                    lr_milestones=[60, 120, 160], lr_decay=0.2, pad_mode="reflect"),  # ibid.; AT code
    "cifar100": _RD,
    "cinic10": dict(_RD, teacher_arch="shufflenetv2_1.0", student_arch="shufflenetv2_0.5",  # Table 7, row 1
                    epochs=140, batch_size=96, lr=0.01, nesterov=True, lr_milestones=[100, 120], lr_decay=0.1,  # 3.3
                    sp_weight=2000.0, kd_T=16.0, pad_mode="reflect"),  # Sec. 3.3: gamma 2000; KD T 16 (alpha 0.6)
    "dtd": dict(_RD, teacher_arch="mobilenetv2_1.0", student_arch="mobilenetv2_0.35",  # Table 5, row 4
                image_size=224, split=1, pretrained=True, epochs=60, batch_size=96, lr=0.01, nesterov=True,  # Sec. 3.2
                lr_milestones=[30], sp_weight=2000.0, workers=8, log_every=10),  # gamma not stated: Sec. 3.3's (b 96)
    # Offline presets (ours): the CIFAR recipe in 8 epochs (x0.1 after 6); camd.py's teacher recipe (one shared teacher
    # per seed). fashionmnist: ~3 minutes per run on 2 CPU cores, a fixed random 10,000 of the 60,000 training images.
    "digits": dict(_RD, teacher_arch="resnet14", student_arch="resnet8", teacher_epochs=8, epochs=8,
                   lr_milestones=[6], log_every=50),
    "fashionmnist": dict(_RD, teacher_arch="resnet20", student_arch="resnet8", image_size=28, teacher_epochs=8,
                         epochs=8, lr_milestones=[6], train_subset=10000, eval_every=2),
    "folder": dict(_RD, teacher_arch="resnet34", student_arch="resnet18", image_size=224, pretrained=True, epochs=30,
                   lr=0.01, lr_milestones=[20, 25], workers=8, log_every=50),  # ours: fine-tune ImageNet weights
    "synthetic": dict(_RD, teacher_epochs=0, epochs=2, synthetic_n=1024, log_every=10),  # benchmark pair, 32 px
}


# ------------------------------------------------------------------------------------------------ arguments
def get_args(argv=None):
    p = Parser(description="SP: similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019)")
    experiment_args(p)
    m = p.add_argument_group("method")
    teacher_student_args(m)
    m.add_argument("--ce-weight", type=number(float, 0), help="CE weight (RepDistiller -r)" + preset("ce_weight"))
    m.add_argument("--kd-weight", type=number(float, 0), help="Hinton KD weight (RepDistiller -a; Sec. 3.1: 0.9 with "
                   "--ce-weight 0.1, Sec. 3.3: 0.6 with 0.4)" + preset("kd_weight"))
    m.add_argument("--kd-T", type=number(float, 0, low_open=True), help="KD temperature (Sec. 3.1: 4, 3.3: 16)"
                   + preset("kd_T"))
    m.add_argument("--sp-weight", type=number(float, 0), help="gamma of Eq. 5 (RepDistiller -b)" + preset("sp_weight"))
    m.add_argument("--sp-layers", choices=["last", "all"], help="the last stage (paper) or every stage end"
                   + preset("sp_layers"))
    m.add_argument("--at-weight", type=number(float, 0), help="AT beta (Sec. 3.1: 1000; 3.3: 50, with SP 30)"
                   + preset("at_weight"))
    m.add_argument("--split", type=number(int, 1, 10), help="dtd: which of the ten standard splits" + preset("split"))
    parsed = p.parse_args(argv)
    given = {k for k, v in vars(parsed).items() if v is not None}  # on the command line (not preset, not --resume)
    args = resolve_args(parsed)
    check_teacher_student_args(args, given)
    if not (args.ce_weight or args.kd_weight or args.sp_weight or args.at_weight):
        raise RunError("--ce-weight, --kd-weight, --sp-weight and --at-weight are all 0: nothing to train")
    refuse_unused(given, ("kd_T",) if not args.kd_weight else (), "without --kd-weight")
    refuse_unused(given, ("sp_layers",) if not args.sp_weight else (), "without --sp-weight")
    refuse_unused(given, ("split",) if args.dataset != "dtd" else (), f"on {args.dataset} (dtd only)")
    if not (args.kd_weight or args.sp_weight or args.at_weight):
        refuse_unused(given, ("teacher_arch", "teacher_path", "teacher_epochs"), "without a teacher term")
    args.run_name = args.run_name or f"spkd_{args.dataset}_{args.teacher_arch}-{args.student_arch}_s{args.seed}"
    return args


# ------------------------------------------------------------------------------------------------ METHOD: losses
def sp_loss(f_s, f_t):
    """Similarity-preserving loss, Eq. 2-4 for one layer pair (RepDistiller Similarity.similarity_loss).
    f_s, f_t: [b, ...] student / teacher activations (any trailing shapes). Returns the 0-dim ||G_t - G_s||_F^2 / b^2,
    G = row-L2-normalised Q Q^T, Q = A.reshape(b, -1), in fp32 (fp64 for fp64 input)."""
    with torch.autocast(f_s.device.type, enabled=False):  # METHOD: in fp32 (Q Q^T over chw-dim rows overflows fp16)
        b, dt = f_s.shape[0], torch.promote_types(f_s.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays fp64
        q_s, q_t = f_s.reshape(b, -1).to(dt), f_t.reshape(b, -1).to(dt)
        g_s = F.normalize(q_s @ q_s.t(), dim=1)  # Eq. 3
        g_t = F.normalize(q_t @ q_t.t(), dim=1)  # Eq. 2
        return (g_t - g_s).pow(2).sum() / (b * b)  # Eq. 4


def at_loss(f_s, f_t):
    """Attention transfer for one pair of maps (attention-transfer utils.py at / at_loss, RepDistiller AT.py): the
    attention of an image = its channel mean of squared activations, flattened, L2-normalised; returns the 0-dim mean
    over images and positions of the squared difference, in fp32 (fp64 for fp64 input). f_s [b, c, h, w], f_t
    [b, c', h', w']: channels may differ; a larger map is average-pooled to the smaller size first (RepDistiller)."""
    with torch.autocast(f_s.device.type, enabled=False):
        dt = torch.promote_types(f_s.dtype, torch.float32)
        size = [min(a, b) for a, b in zip(f_s.shape[2:], f_t.shape[2:])]
        a_s, a_t = (F.normalize(F.adaptive_avg_pool2d(f.to(dt), size).pow(2).mean(1).flatten(1), dim=1)
                    for f in (f_s, f_t))
        return (a_s - a_t).pow(2).mean()


def kd_loss(logits_s, logits_t, T):
    """Hinton KD term T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, mean over the batch
    (RepDistiller DistillKL). logits_*: [b, classes]. Returns a 0-dim fp32 (fp64 for fp64 input) tensor."""
    with torch.autocast(logits_s.device.type, enabled=False):
        dt = torch.promote_types(logits_s.dtype, torch.float32)
        log_p_s = F.log_softmax(logits_s.to(dt) / T, dim=1)
        log_p_t = F.log_softmax(logits_t.to(dt) / T, dim=1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean() * T * T


def step_losses(student, teacher, x, y, args):
    """The algorithm of one step: {"ce", "kd", "sp", "at"} weighted terms (only those with a weight); their sum is
    Eq. 5 plus the optional baselines. teacher None: the vanilla student (CE only)."""
    feats_s, _, logits_s = student(x, with_features=True)
    out = {"ce": args.ce_weight * F.cross_entropy(logits_s.float(), y)}
    if teacher is None:
        return out
    with torch.no_grad():
        feats_t, _, logits_t = teacher(x, with_features=True)
    if args.kd_weight:
        out["kd"] = args.kd_weight * kd_loss(logits_s, logits_t, args.kd_T)
    if args.sp_weight:  # METHOD: Eq. 5, gamma * sum over the layer pairs of L_SP
        pairs = [(feats_s[-1], feats_t[-1])] if args.sp_layers == "last" else zip(feats_s, feats_t)
        out["sp"] = args.sp_weight * sum(sp_loss(f_s, f_t) for f_s, f_t in pairs)
    if args.at_weight:  # the AT baseline: beta * sum over stage pairs (zip: a deeper network's extra stages unused)
        out["at"] = args.at_weight * sum(at_loss(f_s, f_t) for f_s, f_t in zip(feats_s, feats_t))
    return out


# ------------------------------------------------------------------------------------------------ training
def run(args):
    device, rank, world = setup(args)
    split = load_data(args, "train")
    load_data(args, "test")  # a missing test split fails now, not after the first epoch
    args.num_classes = split.num_classes
    if len(split) < args.batch_size:
        raise RunError(f"--batch-size {args.batch_size} is larger than the {len(split)} training images")
    teacher = get_teacher(args, device, rank, world) if args.kd_weight or args.sp_weight or args.at_weight else None
    if teacher is not None and args.sp_layers == "all":
        probe = torch.zeros(2, 3, args.image_size, args.image_size, device=device)
        stages = [len(m.to(device)(probe, with_features=True)[0]) for m in (build_model(args.student_arch, 2), teacher)]
        if stages[0] != stages[1]:
            raise RunError(f"--sp-layers all needs equal stage counts ({args.student_arch} {stages[0]}, "
                           f"{args.teacher_arch} {stages[1]})")
    run_ = start_run(args, device, rank)
    references = [(f"teacher {args.teacher_arch}", evaluate(teacher, args, device))] if teacher is not None else []
    torch.manual_seed(args.seed)  # the student's initial weights do not depend on how the teacher was obtained
    try:
        model = build_model(args.student_arch, args.num_classes, pretrained=args.pretrained and not args.resume)
    except OSError as e:  # the ImageNet weights cannot be downloaded (offline machine)
        raise RunError(f"cannot download the ImageNet weights ({e}); use --no-pretrained")
    model = model.to(device, memory_format=memory_format(args, device))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_milestones, gamma=args.lr_decay)
    epoch, batch, step = resume(args, run_, model, optimizer, scheduler)
    net = torch.compile(model) if args.compile else model
    with training():  # a first SIGINT / SIGTERM stops after the step in flight, with a last.pt
        meter = train(args, model, net, teacher, optimizer, scheduler, train_data(args, split, device), run_, device,
                      epoch, batch, step)
    save_checkpoint(args, run_, "model.pt", model, metrics=final_metrics(run_), references=dict(references))
    print_summary(run_, meter, references)


def train(args, model, net, teacher, optimizer, scheduler, data, run, device, epoch, batch, step):
    steps_per_epoch = epoch_length(len(data["split"]), args.batch_size)[0]
    total = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    meter = Meter(args, run, device, step, total)
    while epoch < args.epochs and step < total:
        model.train()
        for x, y in train_batches(args, data, epoch, batch, device):
            with autocast(args, device):
                losses = step_losses(net, teacher, x.contiguous(memory_format=memory_format(args, device)), y, args)  # METHOD
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
