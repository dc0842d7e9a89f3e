"""CAMD: Collaborative Adaptive Metric Distillation (teacher -> student, for classification AND retrieval).

Paper: H. Liu, M. Ye, Y. Wang, S. Zhao, P. Li, J. Shen, "A New Framework of Collaborative Learning for Adaptive
Metric Distillation", IEEE TNNLS 2023. No public code: this file is the reference (open choices: notes/camd.md).
Idea: teacher features are anchors; the batch's hardest positive / negative STUDENT embeddings are pulled / pushed by
a soft-margin triplet weighted by the gaps to the teacher's own distances (zero once the student beats the teacher).
This embedding branch teaches the baseline classifier via a stop-gradient KL; only the baseline is kept.

Usage:
  python camd.py                        # digits on CPU (teacher, then vanilla student CE-trained and cached first)
  python camd.py --dataset cifar100 --teacher-path cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth [--variant kd]
  torchrun --nproc_per_node=8 camd.py --dataset imagenet --data-root /data   # ResNet-34 -> ResNet-18, DDP
  python camd.py --dataset synthetic --max-steps 40 --variant {camd,kd,ce}   # images/s, ms/step, peak memory

Implementation details:
 1. Teacher frozen (eval, no_grad); feature = pooled penultimate vector. --teacher-path: this repo's model.pt, a
    RepDistiller ckpt ({"model": sd}, trusted pickle) or a state_dict, strict; else CE-trained and cached (reused).
    --vanilla (digits default): the student CE-trained (= --variant ce), cached beside it, reported as a reference.
 2. Embedding block e = Linear(d_s -> d_t) -> BatchNorm1d -> ReLU + classifier z^m (Sec. III-B.4, Table V).
 3. L_amd (Eq. 2-4, Alg. 1), vectorised: normalised features, d_ij = ||t_i - s_j||; per teacher anchor the hardest
    positive (y_j = y_i, j = i included) and negative; constants a^p = [d^p - D(t_i, t_j)]_+, a^n = [D(t_i, t_k) -
    d^n]_+; mean over anchors with a negative of softplus(gamma (a^p d^p - a^n d^n)).
 4. camd = CE(z^b) + [CE(z^m) + L_amd] (Eq. 5) + tau^2 KL(stopgrad(p^m) || p^b) (Eq. 7) = Eq. 8. amd_b = CE(z^b) +
    L_amd on the backbone feature (d_s = d_t); amd_e = no KL; camd_kd = Eq. 8 + kd_beta KD; kd = 0.1 CE + 0.9 KD.
    Table VII: --weights fixed (a = 1), --mining all (mean over all (i, j, k)), --no-stopgrad (Eq. 6).
 5. Sec. IV-A: RepDistiller recipe (SGD 0.9, wd 5e-4, 240 ep, batch 64, lr 0.05, x0.1 at 150/180/210, pad-crop +
    flip), gamma 80, tau 4; ImageNet: torchvision 100-epoch recipe, gamma 30. Metrics: top-1 of z^b (the only test
    head); Rank-1/2 on the test set vs itself (query excluded), feature averaged over image + flip, L2-normalised.
 6. torchrun DDP: global --batch-size; each rank takes its shard of the epoch permutation (same seed everywhere) or
    of a DistributedSampler; L_amd mines within the local batch.
Deviations: batch means where Eq. 5/6 sum; stop-gradient on a^p, a^n is our reading (--no-detach-weights);
kd_beta = 1 is ours; TinyImageNet crops pad by 8 (size / 8); 1-sample batches are skipped.
Measured (idle 2-core AMD EPYC CPU, torch 2.15, default threads, seed 0; top-1 / Rank-1 / Rank-2, last epoch):
 - `python camd.py` (digits, resnet14 teacher 6 CE epochs -> resnet8, 6 epochs, gamma 10; 22.7 s wall incl. the
   teacher and the vanilla student): teacher 91.11 / 91.94 / 95.83; vanilla 80.28 / 82.22 / 89.72; CAMD 80.83 /
   88.33 / 94.17. With gamma 80 L_amd dominates such short runs (1 thread: 36.11 / 59.72 / 71.11 after 6 epochs).
 - `python camd.py --dataset synthetic --max-steps 16 --log-every 8 --variant {ce,kd,camd}` (resnet32x4 ->
   resnet8x4, batch 64, 32 px, random teacher): 220 / 600 / 592 ms per step (CAMD = KD within noise), peak RSS
   ~1.2 GB. Paper Table I (CIFAR-100, resnet32x4 -> resnet8x4, CAMD, mean of 3 runs): 76.58 / 68.01 / 76.51.
"""
import argparse
import copy
import itertools
import json
import math
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

RD = dict(epochs=240, batch_size=64, lr=0.05, weight_decay=5e-4, momentum=0.9, milestones=(150, 180, 210), workers=0,
          teacher_arch="resnet32x4", student_arch="resnet8x4", gamma=80.0, tau=4.0, image_size=32, vanilla=False)
PRESETS = {
    "cifar100": RD,  # Sec. IV-A = RepDistiller train_student.py recipe (kd_cifar.md); gamma 80, tau 4 (Sec. IV-A)
    "tinyimagenet": {**RD, "image_size": 64},  # Sec. IV-A: the CIFAR-100 recipe on 64-px images
    "imagenet": dict(  # Table IV pair; torchvision references/classification 100-epoch recipe; gamma 30 (Sec. IV-A)
        epochs=100, batch_size=256, lr=0.1, weight_decay=1e-4, momentum=0.9, milestones=(30, 60, 90), vanilla=False,
        teacher_arch="resnet34", student_arch="resnet18", gamma=30.0, tau=4.0, image_size=224, workers=8),
    "digits": {**RD, "epochs": 6, "milestones": (4, 5), "teacher_arch": "resnet14", "vanilla": True,  # ours: CPU run;
               "student_arch": "resnet8", "gamma": 10.0},  # gamma 10 (Fig. 5 range): 80 needs longer runs (below)
    "synthetic": {**RD, "epochs": 1, "teacher_epochs": 0},  # ours: speed at the paper's runtime pair (Sec. IV-A)
}
VARIANTS = ("amd_b", "amd_e", "camd", "camd_kd", "kd", "ce")
METRICS = ("top1", "Rank-1", "Rank-2")


class CAMDError(Exception):
    """Bad input (flags, checkpoint) or a diverged loss: main() prints one line and exits 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CAMD (Liu et al., TNNLS 2023)")
    g = p.add_argument_group("experiment")
    g.add_argument("--dataset", default="digits", help=f"{'|'.join(PRESETS)} (default digits)")
    g.add_argument("--data-root", default="./data", help="dataset folder (default ./data)")
    g.add_argument("--epochs", type=int, help="default: preset (240 CIFAR, Sec. IV-A; 100 ImageNet)")
    g.add_argument("--batch-size", type=int, help="global batch (default: preset; 64 CIFAR, 256 ImageNet)")
    g.add_argument("--lr", type=float, help="default: preset (0.05 CIFAR, Sec. IV-A; 0.1 ImageNet)")
    g.add_argument("--weight-decay", type=float, help="default: preset (5e-4 CIFAR, 1e-4 ImageNet)")
    g.add_argument("--milestones", type=int, nargs="+", help="epochs where lr *= 0.1 (default: preset)")
    g.add_argument("--image-size", type=int, help="default: preset (32 CIFAR/digits, 64 TinyImageNet, 224 ImageNet)")
    g.add_argument("--seed", type=int, default=0, help="default 0")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="default auto")
    g.add_argument("--workers", type=int, help="DataLoader workers, file-form data (default: preset, 8 ImageNet)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast, CUDA (on)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="CUDA (default on)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile (off)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (default 1)")
    g.add_argument("--log-every", type=int, default=50, help="log (and check losses) every N steps (default 50)")
    g.add_argument("--save-dir", default="runs", help="default runs")
    g.add_argument("--run-name", help="default <dataset>_<variant>_<teacher>_<student>_s<seed>")
    g.add_argument("--max-steps", type=int, help="stop after N optimizer steps (teacher and student; smoke/benchmark)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False, help="default off")
    g.add_argument("--resume", help="last.pt to continue from (pass the same flags)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="ImageNet: tv teacher")
    m = p.add_argument_group("method")
    m.add_argument("--variant", default="camd", help=f"{'|'.join(VARIANTS)} (default camd = Eq. 8; Tables I-III)")
    m.add_argument("--teacher-arch", help="default: preset (resnet32x4 CIFAR, resnet34 ImageNet)")
    m.add_argument("--student-arch", help="default: preset (resnet8x4 CIFAR, resnet18 ImageNet)")
    m.add_argument("--teacher-path", help="teacher checkpoint: this repo's, RepDistiller's, or a state_dict")
    m.add_argument("--teacher-epochs", type=int, help="CE epochs to train a missing teacher (default: --epochs)")
    m.add_argument("--vanilla", action=argparse.BooleanOptionalAction, help="report a CE student (default: digits)")
    m.add_argument("--gamma", type=float, help="scale in Eq. 3 (default 80 CIFAR/TinyImageNet, 30 ImageNet)")
    m.add_argument("--tau", type=float, help="temperature of Eq. 6 and KD (default 4, Sec. IV-A)")
    m.add_argument("--weights", default="adaptive", choices=["adaptive", "fixed"], help="Eq. 4 or a=1 (Table VII)")
    m.add_argument("--mining", default="hard", choices=["hard", "all"], help="batch hard Eq. 2 or all (Table VII)")
    m.add_argument("--stopgrad", action=argparse.BooleanOptionalAction, default=True, help="Eq. 7 (default) / Eq. 6")
    m.add_argument("--detach-weights", action=argparse.BooleanOptionalAction, default=True, help="a^p, a^n constant")
    m.add_argument("--kd-alpha", type=float, default=0.9, help="kd: (1-a) CE + a KD (0.9, RepDistiller)")
    m.add_argument("--kd-beta", type=float, default=1.0, help="camd_kd: weight of KD (default 1, ours)")
    return p.parse_args(argv)


# ---- CIFAR model zoo (RepDistiller-compatible) ----
# Module names, shapes, init and forward follow HobbitLong/RepDistiller models/{resnet,wrn,vgg}.py, so the
# benchmark's teacher checkpoints (<arch>_vanilla/ckpt_epoch_240.pth) load with strict=True and give the
# same logits. Contract: model(x) -> logits; model(x, with_features=True) -> (feature_maps, pooled, logits)
# with feature_maps = stage outputs (last = the map SP/RepDistiller feat[-2] uses) and pooled = the
# penultimate vector (retrieval / CAMD "backbone feature").
class CifarBasicBlock(nn.Module):
    """Post-activation BasicBlock (RepDistiller resnet.py): relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """resnet8..110 (widths 16|16/32/64) and resnet8x4/32x4 (widths 32|64/128/256); n = (depth-2)/6 blocks per stage."""

    def __init__(self, depth, widths, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        inplanes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            # 1x1 conv + BN shortcut whenever the shape changes (also layer1 of the x4 nets: 32 -> 64, stride 1)
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            blocks = [CifarBasicBlock(inplanes, planes, stride, down)] + [CifarBasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # RepDistiller init: Kaiming normal fan_out, BN 1/0, Linear default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x, with_features=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x)
            feats.append(x)  # post-ReLU stage outputs (RepDistiller f1, f2, f3 with preact=False)
        pooled = F.avg_pool2d(x, x.shape[-2:]).flatten(1)  # == AvgPool2d(8) on the 8x8 map of 32-px input
        logits = self.fc(pooled)
        return (feats, pooled, logits) if with_features else logits


class WRNBlock(nn.Module):
    """Pre-activation WRN block (RepDistiller wrn.py, dropout 0). When in != out the BN-ReLU'd input also feeds
    the 1x1 convShortcut; otherwise the shortcut is the raw input."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.equal_in_out else self.convShortcut(a))


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
        for m in self.modules():  # RepDistiller init: conv N(0, sqrt(2/(k*k*out))), BN 1/0, fc bias 0
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x, with_features=False):
        x = self.conv1(x)
        feats = []
        for group in (self.block1, self.block2, self.block3):
            x = group(x)
            feats.append(x)  # block outputs; the last is BEFORE the final BN-ReLU (RepDistiller f3)
        x = F.relu(self.bn1(x))
        pooled = F.avg_pool2d(x, x.shape[-2:]).flatten(1)  # == F.avg_pool2d(out, 8) at 32 px
        logits = self.fc(pooled)
        return (feats, pooled, logits) if with_features else logits


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
        for m in self.modules():  # RepDistiller init
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward(self, x, with_features=False):
        h = x.shape[2]
        feats = []
        for i, block in enumerate((self.block0, self.block1, self.block2, self.block3, self.block4)):
            if i in (1, 2, 3) or (i == 4 and h == 64):  # pool0..pool2 always, pool3 only at 64 px (official quirk)
                x = F.max_pool2d(x, 2, 2)
            x = F.relu(block(x))
            feats.append(x)  # post-ReLU block outputs (RepDistiller f0..f4)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.classifier(pooled)
        return (feats, pooled, logits) if with_features else logits


class TorchvisionResNet(torchvision.models.ResNet):
    """torchvision resnet18/34/50 (224-px data) with the zoo's forward contract; state_dict keys unchanged."""

    def forward(self, x, with_features=False):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        pooled = torch.flatten(self.avgpool(x), 1)
        logits = self.fc(pooled)
        return (feats, pooled, logits) if with_features else logits


CIFAR_ARCHS = {
    "resnet8": (CifarResNet, 8, [16, 16, 32, 64]), "resnet14": (CifarResNet, 14, [16, 16, 32, 64]),
    "resnet20": (CifarResNet, 20, [16, 16, 32, 64]), "resnet32": (CifarResNet, 32, [16, 16, 32, 64]),
    "resnet44": (CifarResNet, 44, [16, 16, 32, 64]), "resnet56": (CifarResNet, 56, [16, 16, 32, 64]),
    "resnet110": (CifarResNet, 110, [16, 16, 32, 64]),
    "resnet8x4": (CifarResNet, 8, [32, 64, 128, 256]), "resnet32x4": (CifarResNet, 32, [32, 64, 128, 256]),
    "wrn_16_1": (WideResNet, 16, 1), "wrn_16_2": (WideResNet, 16, 2), "wrn_40_1": (WideResNet, 40, 1),
    "wrn_40_2": (WideResNet, 40, 2), "wrn_16_8": (WideResNet, 16, 8),
    "vgg8": (CifarVGG, None, [[64], [128], [256], [512], [512]]),  # RepDistiller cfg 'S' (+BN)
    "vgg13": (CifarVGG, None, [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]),  # cfg 'B' (+BN)
}
TV_ARCHS = {"resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], "ResNet18_Weights"),
            "resnet34": (torchvision.models.resnet.BasicBlock, [3, 4, 6, 3], "ResNet34_Weights"),
            "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], "ResNet50_Weights")}
ARCHS = tuple(CIFAR_ARCHS) + tuple(TV_ARCHS)


def build_model(arch, num_classes, pretrained=False):
    """Zoo constructor. CIFAR archs: RepDistiller-compatible. resnet18/34/50: torchvision (weights=None unless
    pretrained=True, then ImageNet weights for everything but a re-sized fc). Unknown arch -> ValueError."""
    if arch in CIFAR_ARCHS:
        cls, depth, spec = CIFAR_ARCHS[arch]
        return cls(spec, num_classes) if cls is CifarVGG else cls(depth, spec, num_classes)
    if arch in TV_ARCHS:
        block, layers, weights_name = TV_ARCHS[arch]
        model = TorchvisionResNet(block, layers, num_classes=num_classes)
        if pretrained:
            state = getattr(torchvision.models, weights_name).IMAGENET1K_V1.get_state_dict(progress=True)
            if state["fc.weight"].shape[0] != num_classes:
                state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            model.load_state_dict(state, strict=False)
        return model
    raise ValueError(f"unknown architecture '{arch}' (choose from {', '.join(ARCHS)})")
# ---- end of model zoo ----


# ---- CAMD: networks and losses ----
def feat_dim(model):  # width of the pooled backbone feature = in_features of the last Linear (the classifier)
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features


class CAMDNet(nn.Module):
    """Student (backbone f^s + baseline classifier z^b) and, if branch, the embedding block e with its classifier z^m
    (Sec. III-B.4). forward(x) -> (f^s [B, d_s], z^b [B, C], e [B, d_t] or None, z^m [B, C] or None)."""

    def __init__(self, student, d_t, num_classes, branch):
        super().__init__()
        self.student = student
        self.embed = nn.Sequential(nn.Linear(feat_dim(student), d_t), nn.BatchNorm1d(d_t), nn.ReLU()) if branch else None
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


def camd_losses(net, teacher, x, y, args):
    """Loss components of one step for args.variant: dict name -> scalar; the total is their sum."""
    f, z_b, e, z_m = net(x)
    out = {"ce": F.cross_entropy(z_b.float(), y) * (1 - args.kd_alpha if args.variant == "kd" else 1.0)}  # L_b
    if args.variant == "ce":
        return out
    with torch.no_grad():
        _, t_feat, z_t = teacher(x, with_features=True)
    if args.variant in ("kd", "camd_kd"):  # Hinton KD on the baseline logits
        out["kd"] = (args.kd_alpha if args.variant == "kd" else args.kd_beta) * collaborative_kl(z_t, z_b, args.tau)
    if args.variant != "kd":  # amd_b: on the backbone feature; otherwise on the embedding, plus CE(z^m) = L_m (Eq. 5)
        out["amd"] = amd_loss(t_feat, f if e is None else e, y, args.gamma, args.weights, args.mining,
                              args.detach_weights)
    if e is not None:
        out["ce_m"] = F.cross_entropy(z_m.float(), y)
    if args.variant in ("camd", "camd_kd"):
        out["col"] = collaborative_kl(z_m, z_b, args.tau, stopgrad=args.stopgrad)  # L_c, Eq. 7
    return out


# ---- data, evaluation, checkpoints ----
def load_data(args, train):
    split = "train" if train else ("val" if args.dataset in ("tinyimagenet", "imagenet") else "test")
    kw = {"digits": {"channels": 3},  # 8x8 grey digits -> RGB at --image-size for the CIFAR zoo
          "synthetic": {"synthetic_size": (2048 if train else 512, 100, args.image_size)}}.get(args.dataset, {})
    return common.load_split(args.dataset, root=args.data_root, split=split, image_size=args.image_size, **kw)


def model_from_args(args):
    """The deployable student (backbone + baseline classifier): model.pt["model"] is its state_dict."""
    return build_model(args.student_arch, args.num_classes)


def evaluate(model, args, device, split=None):
    """Top-1 of the baseline classifier and Rank-1/2 retrieval with the flip-averaged, L2-normalised backbone feature
    (query excluded), in percent, on the test split. Used by the training loop and by eval.py."""
    split = split if split is not None else load_data(args, train=False)
    tf = common.eval_transform(args.image_size * 8 // 7, args.image_size) if split.images is None else None  # 256/224
    model.eval()
    with torch.autocast("cuda", torch.bfloat16, enabled=args.amp and torch.device(device).type == "cuda"):
        f, z, y = common.embed(lambda x: model(x, with_features=True)[1:], split, device, batch_size=256,
                               flip_average=True, workers=args.workers or 0, transform=tf)
    r = common.retrieval_metrics(F.normalize(f, dim=1), y, ks=(1, 2), with_map=False, with_nmi=False)
    return {"top1": 100.0 * common.topk_accuracy(z, y, ks=(1,))[1], "Rank-1": r["R@1"], "Rank-2": r["R@2"]}


def load_teacher(model, path, arch):
    """Strictly load this repo's checkpoint, a RepDistiller ckpt ({"model": sd, ...}) or a bare state_dict."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # RepDistiller ckpts pickle more than tensors: trusted file, full unpickling
            obj = torch.load(path, map_location="cpu", weights_only=False)
        sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.get("model", obj).items()}
    except Exception as e:
        raise CAMDError(f"cannot read teacher checkpoint {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
    own = model.state_dict()
    bad = [[k for k in own if k not in sd], [k for k in sd if k not in own],
           [k for k in own if k in sd and getattr(sd[k], "shape", None) != own[k].shape]]
    if any(bad):
        raise CAMDError(f"teacher checkpoint {path} does not match --teacher-arch {arch}: " + ", ".join(
            f"{len(v)} {what} (e.g. {v[0]})" for v, what in zip(bad, ("missing", "unexpected", "mis-shaped")) if v))
    model.load_state_dict(sd)


def atomic_save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def train(args, net, teacher, data, ctx, run_dir=None, state=None, test_split=None):
    """SGD loop for teacher pre-training (variant ce, run_dir None: no evaluation or checkpoints) and distillation.
    Returns the evaluation history; prints the steady-state speed (after warm-up, evaluation time excluded)."""
    dev, world, main_rank, cuda = ctx["device"], ctx["world"], ctx["rank"] == 0, ctx["device"].type == "cuda"
    model = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if cuda else None) if world > 1 else net
    model = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(args.milestones), 0.1)
    start, skip, step, hist = (state[k] for k in ("epoch", "batch", "step", "hist")) if state else (0, 0, 0, [])
    if state:  # exact continuation (run() loaded the weights): optimizer, schedule, epoch position, RNG streams
        opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"]), torch.set_rng_state(state["rng"])
        if cuda and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
    sync, log = torch.cuda.synchronize if cuda else (lambda: None), print if main_rank else (lambda *a: None)
    bs, t0, paused, ips, epoch, pos = max(1, args.batch_size // world), time.time(), 0.0, 0.0, start, skip
    acc, cnt, seen, ran, nb = {}, 0, 0, 0, 1
    warm, t_warm, seen_warm = max(1, min(10, (args.max_steps or 40) // 4)), 0.0, 0

    def save_last(epoch, pos):
        if run_dir and main_rank:
            atomic_save({"method": "camd", "args": vars(args), "net": net.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "epoch": epoch, "batch": pos, "step": step, "hist": hist,
                         "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(dev) if cuda else None},
                        os.path.join(run_dir, "last.pt"))

    def do_eval(epoch):  # rank 0 only; the other ranks wait in their next all-reduce. The next epoch re-enters train()
        nonlocal paused
        if run_dir and main_rank:
            tic = time.time()
            row = {"epoch": round(epoch, 3), "step": step, **evaluate(net.student, args, dev, test_split),
                   "elapsed_s": round(tic - t0, 1), "images_per_s": round(ips, 1)}
            hist.append(row)
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"eval epoch {row['epoch']} step {step}: " + "  ".join(f"{k} {row[k]:.2f}" for k in METRICS))
            paused += time.time() - tic

    try:
        for epoch in range(start, args.epochs):
            net.train()
            if "loader" in data:  # file-form data: DistributedSampler (one process too: a seeded epoch order)
                data["sampler"].set_epoch(epoch)
                batches, nb = data["loader"], len(data["loader"])
            else:  # the same permutation on every rank (own generator), padded like DistributedSampler, sharded
                perm = torch.randperm(data["n"], generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
                perm = torch.cat([perm, perm[:(-data["n"]) % world]])[ctx["rank"]::world]
                batches, nb = perm.split(bs), math.ceil(len(perm) / bs)
            pos, skip, stop, t_log, seen_log = skip, 0, False, time.time(), seen  # skip: resumed inside this epoch
            for batch in itertools.islice(batches, pos, None):
                pos += 1
                if "loader" in data:
                    x, y = (t.to(dev, non_blocking=True) for t in batch)
                else:  # device-resident uint8 images: batched pad-crop + flip (RepDistiller aug), normalise
                    x, y = data["x"][batch.to(dev)], data["y"][batch.to(dev)]
                    x = common.normalize(common.random_crop_flip(x, args.image_size // 8), data["mean"], data["std"])
                if len(y) < 2:  # BatchNorm cannot train on a single sample
                    continue
                x = x.contiguous(memory_format=torch.channels_last) if args.channels_last and cuda else x
                with torch.autocast("cuda", torch.bfloat16, enabled=args.amp and cuda):
                    losses = camd_losses(model, teacher, x, y, args)
                opt.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                opt.step()
                step, ran, cnt, seen = step + 1, ran + 1, cnt + 1, seen + len(y) * world
                acc = {k: acc.get(k, 0.0) + v.detach() for k, v in losses.items()}
                if ran == warm:  # steady-state timing starts after the warm-up steps (minus later evaluation time)
                    sync()
                    t_warm, seen_warm = time.time() - paused, seen
                stop = args.max_steps is not None and step >= args.max_steps
                if step % args.log_every == 0 or pos == nb or stop:  # the only host syncs of a step (float())
                    vals = {k: float(v) / cnt for k, v in acc.items()}
                    for k in [k for k, v in vals.items() if not math.isfinite(v)][:1]:
                        raise CAMDError(f"non-finite {k} loss at step {step} (checked every --log-every steps)")
                    ips = (seen - seen_log) / (time.time() - t_log)
                    eta = (time.time() - t0 - paused) / ran * max(nb * args.epochs - step, 0) / 60
                    log(f"epoch {epoch + 1}/{args.epochs} step {step} " + " ".join(f"{k} {v:.4f}" for k, v in
                        vals.items()) + f" lr {opt.param_groups[0]['lr']:.1e} {ips:.0f} img/s eta {eta:.1f} min")
                    acc, cnt, t_log, seen_log = {}, 0, time.time(), seen
                if stop:
                    break
            if pos < nb:  # stopped inside the epoch (--max-steps): last.pt below keeps the position
                break
            sched.step()
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs or stop:
                do_eval(epoch + 1)
            save_last(epoch + 1, 0)
            if stop:
                break
    except KeyboardInterrupt:
        save_last(epoch, pos)
        sys.exit(f"interrupted: resumable last.pt written (epoch {epoch}, batch {pos})")
    sync()
    if main_rank and ran > warm:
        dt = time.time() - t_warm - paused
        mem = torch.cuda.max_memory_allocated(dev) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
        print(f"speed ({args.variant}): {(seen - seen_warm) / dt:.1f} images/s, {1000 * dt / (ran - warm):.1f} ms/step "
              f"(steady state, steps {warm + 1}-{ran}); peak {'device' if cuda else 'RSS'} memory {mem >> 20} MiB")
    if pos < nb:
        save_last(epoch, pos)
    if not hist or hist[-1]["step"] != step:
        do_eval(epoch + pos / nb)
    return hist


def main(argv=None):
    try:
        run(parse_args(argv))
    except (CAMDError, common.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args):
    vars(args).update({k: list(v) if isinstance(v, tuple) else v for k, v in PRESETS.get(args.dataset, {}).items()
                       if getattr(args, k, None) is None})  # explicit flags win over the preset
    for what, name, known in (("dataset", args.dataset, PRESETS), ("variant", args.variant, VARIANTS),
                              ("architecture", args.teacher_arch, ARCHS), ("architecture", args.student_arch, ARCHS)):
        if name not in known:
            raise CAMDError(f"unknown {what} '{name}' (choose from {', '.join(known)})")
    if args.batch_size < 2 or min(args.epochs, args.max_steps or 1, args.log_every, args.eval_every) < 1:
        raise CAMDError("--batch-size must be >= 2; --epochs, --max-steps, --log-every, --eval-every >= 1")
    args.teacher_epochs = args.epochs if args.teacher_epochs is None else args.teacher_epochs
    args.run_name = args.run_name or "_".join([args.dataset, args.variant, args.teacher_arch, args.student_arch,
                                               f"s{args.seed}"])
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    kind = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CAMDError("--device cuda: CUDA is not available")
    dev, main_rank = torch.device(f"cuda:{local}" if kind == "cuda" else kind), rank == 0
    if kind == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)
    if world > 1:  # torchrun: one process per device (CPU: gloo, the cores split between the processes)
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    ctx, log = {"device": dev, "rank": rank, "world": world}, print if main_rank else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP broadcasts them anyway)

    # data: small images stay on the device as uint8; file-form data (ImageNet) go through a DataLoader
    train_split, test_split = load_data(args, train=True), load_data(args, train=False)
    args.num_classes = train_split.num_classes
    if train_split.images is not None:
        x, y = common.to_device(train_split, dev)
        data = {"x": x, "y": y, "n": len(y), "mean": train_split.mean, "std": train_split.std}
    else:
        ds = common.ImageFiles(train_split.paths, train_split.labels, common.imagenet_train_transform(args.image_size))
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        data = {"sampler": sampler, "loader": common.make_loader(ds, max(1, args.batch_size // world),
                                                                 workers=args.workers, sampler=sampler)}
    cl = (lambda m: m.to(memory_format=torch.channels_last)) if args.channels_last and kind == "cuda" else (lambda m: m)

    # teacher: --teacher-path, torchvision weights (ImageNet), the cached CE teacher, or CE-train it now (Sec. IV-A)
    tv_teacher = args.dataset == "imagenet" and args.pretrained and not args.teacher_path and args.variant != "ce"
    teacher = build_model(args.teacher_arch, args.num_classes, pretrained=tv_teacher)
    student = build_model(args.student_arch, args.num_classes)
    d_t, d_s = feat_dim(teacher), feat_dim(student)
    if args.variant == "amd_b" and d_s != d_t:
        raise CAMDError(f"--variant amd_b needs equal feature widths, but student {args.student_arch} has {d_s} and "
                        f"teacher {args.teacher_arch} has {d_t}; use --variant amd_e or camd (embedding block)")
    smoke = f"_max{args.max_steps}" if args.max_steps else ""  # --max-steps also caps CE pre-training: keep apart
    key = f"_bs{args.batch_size}_lr{args.lr:g}_s{args.seed}{smoke}.pt"
    cache = os.path.join(args.save_dir, "teachers", f"{args.dataset}_{args.teacher_arch}_e{args.teacher_epochs}{key}")
    v_cache = os.path.join(args.save_dir, "teachers", f"{args.dataset}_vanilla_{args.student_arch}_e{args.epochs}{key}")

    def ce_train(who, model, arch, epochs, path):  # CE training (variant ce) of the teacher / vanilla student, cached
        targs = argparse.Namespace(**{**vars(args), "variant": "ce", "epochs": epochs, "student_arch": arch,
                                      "teacher_path": None})
        log(f"training {who} {arch} with CE for {epochs} epochs -> {path}")
        train(targs, cl(CAMDNet(model, d_t, args.num_classes, False).to(dev)), None, data, ctx)
        if main_rank:  # stored like a model.pt, so eval.py can evaluate it as well
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_save({"method": "camd", "args": vars(targs), "model": model.state_dict(), "metrics": {}}, path)
    src = args.teacher_path or (cache if os.path.isfile(cache) else None)
    if args.variant == "ce":
        teacher = None
    elif src:
        load_teacher(teacher, src, args.teacher_arch)
        log(f"teacher {args.teacher_arch} loaded from {src}")
    elif not tv_teacher and args.teacher_epochs > 0:
        ce_train("teacher", teacher, args.teacher_arch, args.teacher_epochs, cache)
    elif not tv_teacher:
        log("warning: --teacher-epochs 0: randomly initialised teacher (speed benchmarks only)")
    show, t_metrics, v_metrics = lambda r: "  ".join(f"{k} {r[k]:.2f}" for k in METRICS), None, None
    if teacher is not None:
        teacher = cl(teacher.to(dev)).eval().requires_grad_(False)
        t_metrics = evaluate(teacher, args, dev, test_split) if main_rank else None
        log(f"teacher {args.teacher_arch} test: {show(t_metrics) if main_rank else ''}")
    if args.vanilla and args.variant != "ce":  # the --variant ce run: same initial weights, same RNG stream
        vanilla = copy.deepcopy(student)
        torch.manual_seed(args.seed + 1 + rank)
        if os.path.isfile(v_cache):
            load_teacher(vanilla, v_cache, args.student_arch)
            log(f"vanilla student {args.student_arch} loaded from {v_cache}")
        else:
            ce_train("vanilla student", vanilla, args.student_arch, args.epochs, v_cache)
        v_metrics = evaluate(cl(vanilla.to(dev)), args, dev, test_split) if main_rank else None
        log(f"vanilla student {args.student_arch} test: {show(v_metrics) if main_rank else ''}")
    ref = {"teacher_metrics": t_metrics, "vanilla_metrics": v_metrics}  # reference numbers, not this run's "metrics"

    # student + embedding block; run directory (a resumed run continues in place), resume
    torch.manual_seed(args.seed + 1 + rank)  # per-rank augmentation stream (the epoch permutation has its own seed)
    net = cl(CAMDNet(student, d_t, args.num_classes, args.variant in ("amd_e", "camd", "camd_kd")).to(dev))
    run_dir = os.path.join(args.save_dir, args.run_name)
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else run_dir
    try:
        state = torch.load(args.resume, map_location="cpu", weights_only=True) if args.resume else None
        net.load_state_dict(state["net"] if state else net.state_dict())
    except Exception as e:
        raise CAMDError(f"cannot resume from {args.resume}: {' '.join(str(e).split())[:300]}")
    if main_rank:
        os.makedirs(run_dir, exist_ok=True)
        print("config: " + json.dumps(vars(args)))
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))) if shutil.which("git") else None
        with open(os.path.join(run_dir, "config.json"), "w") as fh:
            json.dump({**vars(args), "torch": torch.__version__, "torchvision": torchvision.__version__,
                       "world_size": world, "device_name": torch.cuda.get_device_name(dev) if kind == "cuda" else kind,
                       "git_commit": git and git.stdout.strip() or None, **ref}, fh, indent=1)
    hist = train(args, net, teacher, data, ctx, run_dir, state, test_split)

    if main_rank:
        final, best, path = hist[-1], max(hist, key=lambda r: r["top1"]), os.path.join(run_dir, "model.pt")
        atomic_save({"method": "camd", "args": vars(args), "model": net.student.state_dict(),
                     **ref, "metrics": {k: final[k] for k in METRICS}}, path)
        if t_metrics:
            print(f"teacher {args.teacher_arch}: {show(t_metrics)}")
        if v_metrics:
            print(f"vanilla student {args.student_arch}: {show(v_metrics)}")
        print(f"final (last epoch {final['epoch']}, step {final['step']}) student {args.student_arch}: {show(final)}")
        print(f"best epoch (chosen on the test set) {best['epoch']}: {show(best)}")
        print(f"saved {path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
