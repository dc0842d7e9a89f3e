"""SP: Similarity-Preserving Knowledge Distillation.

Paper: F. Tung and G. Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
https://arxiv.org/abs/1907.09682 . Benchmark code: HobbitLong/RepDistiller (distiller_zoo/SP.py, train_student.py).

Idea: inputs with similar teacher activations should get similar student activations. Per batch, the student's
b x b Gram matrix of flattened activation maps, row-L2-normalised (G, Eq. 2-3), must match the teacher's (Eq. 4).
Only pairwise similarities transfer: widths/sizes may differ, rotating the teacher's channels changes nothing.

Usage:
    python spkd.py                                   # digits preset, CPU, < 1 min (teacher trained + cached)
    python spkd.py --dataset cifar100                # RepDistiller recipe, resnet32x4 -> resnet8x4, gamma 3000
    python spkd.py --dataset cifar100 --teacher-path resnet32x4_vanilla/ckpt_epoch_240.pth
    python spkd.py --dataset cifar10                 # paper Sec. 3.1: WRN-40-2 -> WRN-16-2
    python spkd.py --dataset cifar100 --kd-weight 0 --sp-weight 0   # vanilla student (KD: --ce-weight 0.1 --kd-weight 0.9)
    python spkd.py --dataset synthetic --max-steps 50                        # throughput (random teacher)
    python eval.py runs/<run>/model.pt

Implementation details:
 1. L_SP (Eq. 2-4) = sum over layer pairs of ||G_T - G_S||_F^2 / b^2 with G = F.normalize(Q Q^T, dim=1), the
    row-wise normalisation of RepDistiller distiller_zoo/SP.py ("verified by original author"). fp32 with
    autocast off: Q Q^T over 16k-dim rows overflows fp16 and loses precision in bf16.
 2. --sp-layers last (default; paper Sec. 3.1 found per-block pairs no better): the last stage's map before
    pooling (RepDistiller feat[-2]): WRN block3 output BEFORE the final BN-ReLU, ResNet/VGG post-ReLU.
    --sp-layers all sums Eq. 4 over every stage end (needs equal stage counts).
 3. Loss = ce_weight * CE + kd_weight * T^2 * KL(p_t || p_s) + sp_weight * L_SP: Eq. 5 plus an optional Hinton
    term exactly as RepDistiller (gamma*CE + alpha*KD + beta*SP; its SP runs use -r 1 -a 0 -b 3000, T 4;
    KL summed over classes, mean over the batch). Teacher in eval mode under no_grad.
 4. Teacher: --teacher-path (this repo's model.pt, the benchmark's {"model","epoch","accuracy","optimizer"}
    pickle, or a bare state_dict; strict load), else trained here with CE under the same preset and cached in
    <save-dir>/teachers/. Its test metrics are printed before distillation.
 5. CIFAR zoo = RepDistiller models/{resnet,wrn,vgg}.py (names, shapes, init, forward): benchmark teachers
    load strictly and give identical logits. torchvision resnet18/34/50 for large images.
 6. Data on the device; per batch 4-px zero-pad crop + flip, normalise (RepDistiller CIFAR transform), no
    drop_last. SGD; lr x decay for 1-indexed epochs > milestone (RepDistiller) == MultiStepLR stepped per epoch.
 7. Metrics (CAMD protocol, so SP and CAMD compare): top-1 / error; Rank-1/Rank-2 retrieval on the test set
    (query excluded) with the pooled feature averaged over image + flip, then L2-normalised.

Deviations:
 - sp_loss returns a 0-dim tensor (RepDistiller: shape [1]). Seeds are set (RepDistiller set none).
 - Paper Eq. 1 writes KD as (1-a) CE + 2a T^2 CE(soft); we use the benchmark's weights * T^2 KL form.
 - cifar100 lr 0.01 for MobileNet/ShuffleNet students (RepDistiller) does not apply: not in this zoo.
 - Global pooling covers the whole map (== official AvgPool2d(8) at 32 px; also valid at other sizes).

Measured results (idle 2-core AMD EPYC CPU, torch 2.15, default threads, seed 0; last epoch).
`python spkd.py` (digits, resnet14 -> resnet8, 5 + 8 epochs, 49.5 s wall incl. the teacher): teacher top-1
88.61 / Rank-1 93.33; SP student top-1 89.44, error 10.56, Rank-1 90.00, Rank-2 94.17; vanilla student
(--kd-weight 0 --sp-weight 0) 92.78 / 94.44 / 96.39 (a toy teacher: SP does not help on digits).
`python spkd.py --dataset synthetic --max-steps 10 --log-every 5` (resnet32x4 -> resnet8x4, batch 64, 32 px,
random teacher): CE (--kd-weight 0 --sp-weight 0) 233.9, KD (--ce-weight 0.1 --kd-weight 0.9 --sp-weight 0) 99.8,
SP 96.0 img/s: SP costs +4% over KD (the teacher's forward pass is KD's cost; sp_loss fwd+bwd on 64x256x8x8
alone: 20.7 ms, measured on a loaded machine). No CIFAR runs here (no GPU); paper: CIFAR-10 WRN-40-2 ->
WRN-16-2 error 5.52; RepDistiller CIFAR-100 resnet32x4 -> resnet8x4 SP top-1 72.94 (as reported by CRD).
"""
import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

_COMMON = dict(momentum=0.9, weight_decay=5e-4, ce_weight=1.0, kd_weight=0.0, kd_T=4.0, sp_weight=3000.0)
PRESETS = {  # _COMMON: SGD 0.9, wd 5e-4 (paper Sec. 3.1 and RepDistiller); Eq. 5 = CE + 3000 * L_SP; KD T 4
    "cifar10": dict(_COMMON, teacher_arch="wrn_40_2", student_arch="wrn_16_2",  # paper Table 2, row 3
                    epochs=200, batch_size=128, lr=0.1, nesterov=True,  # paper Sec. 3.1 (WRN protocol [40])
                    lr_milestones=[60, 120, 160], lr_decay=0.2),  # paper Sec. 3.1
    "cifar100": dict(_COMMON, teacher_arch="resnet32x4", student_arch="resnet8x4",  # RepDistiller run_cifar_distill.sh
                     epochs=240, batch_size=64, lr=0.05, nesterov=False,  # RepDistiller train_student.py defaults
                     lr_milestones=[150, 180, 210], lr_decay=0.1),  # ibid.; SP line: -r 1 -a 0 -b 3000
    "digits": dict(_COMMON, teacher_arch="resnet14", student_arch="resnet8", teacher_epochs=5,  # ours: offline smoke,
                   epochs=8, batch_size=64, lr=0.05, nesterov=False, lr_milestones=[6], lr_decay=0.1),  # < 60 s CPU
    "synthetic": dict(_COMMON, teacher_arch="resnet32x4", student_arch="resnet8x4", teacher_epochs=0,  # ours: speed,
                      epochs=2, batch_size=64, lr=0.05, nesterov=False, lr_milestones=[150, 180, 210], lr_decay=0.1,
                      synthetic_size=[1024, 100, 32]),  # benchmark pair at 32 px, batch 64 (--max-steps <= 32)
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SP: similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019)")
    g = p.add_argument_group("experiment")
    g.add_argument("--dataset", default="digits", help="digits | synthetic | cifar10 | cifar100 (default digits: offline smoke)")
    g.add_argument("--data-root", default="./data", help="dataset folder (default ./data)")
    g.add_argument("--epochs", type=int, default=None, help="student epochs (preset: cifar100 240, cifar10 200)")
    g.add_argument("--batch-size", type=int, default=None, help="preset: cifar100 64 (RepDistiller), cifar10 128 (paper)")
    g.add_argument("--lr", type=float, default=None, help="preset: cifar100 0.05 (RepDistiller), cifar10 0.1 (paper)")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (preset 0.9)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="preset: cifar10 on (paper), cifar100 off")
    g.add_argument("--lr-milestones", type=int, nargs="*", default=None, help="epochs after which lr *= --lr-decay (preset: 150 180 210 / 60 120 160)")
    g.add_argument("--lr-decay", type=float, default=None, help="step factor (preset: cifar100 0.1, cifar10 0.2)")
    g.add_argument("--weight-decay", type=float, default=None, help="preset 5e-4 (both recipes)")
    g.add_argument("--synthetic-size", type=int, nargs=3, default=None, metavar=("N", "CLASSES", "PX"), help="synthetic data (preset 1024 100 32)")
    g.add_argument("--seed", type=int, default=0, help="default 0")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda, else mps, else cpu")
    g.add_argument("--workers", type=int, default=0, help="unused: small-image data stays on the device (default 0)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA (default on)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False, help="channels_last memory format")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the student")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (default 1; last epoch always)")
    g.add_argument("--log-every", type=int, default=50, help="print a training line every N steps (default 50)")
    g.add_argument("--save-dir", default="runs", help="default runs/")
    g.add_argument("--run-name", default=None, help="default spkd_<dataset>_<teacher>-<student>_s<seed>")
    g.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (smoke tests / benchmarks)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False, help="deterministic kernels, no cudnn.benchmark")
    g.add_argument("--resume", default=None, help="path to a last.pt to continue from")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False, help="ImageNet weights for a resnet18/34/50 student (default off)")
    m = p.add_argument_group("method")
    m.add_argument("--teacher-arch", default=None, help="preset: cifar100 resnet32x4, cifar10 wrn_40_2")
    m.add_argument("--student-arch", default=None, help="preset: cifar100 resnet8x4, cifar10 wrn_16_2")
    m.add_argument("--teacher-path", default=None, help="teacher checkpoint (model.pt, RepDistiller ckpt_epoch_240.pth, or state_dict); default: train + cache one")
    m.add_argument("--teacher-epochs", type=int, default=None, help="epochs when training the teacher here (default: --epochs; 0 = random teacher)")
    m.add_argument("--ce-weight", type=float, default=None, help="CE weight (preset 1.0; RepDistiller -r)")
    m.add_argument("--kd-weight", type=float, default=None, help="Hinton KD weight (preset 0: RepDistiller SP runs use -a 0)")
    m.add_argument("--kd-T", type=float, default=None, help="KD temperature (preset 4)")
    m.add_argument("--sp-weight", type=float, default=None, help="gamma of Eq. 5 (preset 3000: paper Sec. 3.1, RepDistiller -b)")
    m.add_argument("--sp-layers", default="last", choices=["last", "all"], help="last stage only (default, paper Sec. 3.1) or every stage end")
    args = p.parse_args(argv)
    if args.dataset not in PRESETS:
        raise ValueError(f"unknown dataset '{args.dataset}' (choose from {', '.join(PRESETS)})")
    for k, v in dict({"synthetic_size": [512, 10, 32]}, **PRESETS[args.dataset]).items():
        setattr(args, k, v if getattr(args, k, None) is None else getattr(args, k))
    args.teacher_epochs = args.epochs if args.teacher_epochs is None else args.teacher_epochs
    args.run_name = args.run_name or f"spkd_{args.dataset}_{args.teacher_arch}-{args.student_arch}_s{args.seed}"
    for a in (args.teacher_arch, args.student_arch):
        if a not in ARCHS:
            raise ValueError(f"unknown architecture '{a}' (choose from {', '.join(ARCHS)})")
    if args.epochs < 1 or args.batch_size < 1 or args.teacher_epochs < 0 or args.eval_every < 1:
        raise ValueError("--epochs, --batch-size and --eval-every must be >= 1, --teacher-epochs >= 0")
    return args


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


# ---- losses ----
def sp_loss(f_s, f_t):
    """Similarity-preserving loss, Eq. 2-4 for one layer pair (RepDistiller Similarity.similarity_loss).

    f_s: [b, ...] student, f_t: [b, ...] teacher activations (any trailing shapes). Returns a 0-dim tensor (fp32;
    fp64 for fp64 input) ||G_t - G_s||_F^2 / b^2 with G = row-L2-normalised Q Q^T, Q = A.reshape(b, -1).
    """
    # METHOD: b x b similarity matrices in fp32 (autocast off: Q Q^T over chw-dim rows overflows fp16)
    with torch.autocast(f_s.device.type, enabled=False):
        b = f_s.shape[0]
        dt = torch.promote_types(f_s.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays fp64
        q_s, q_t = f_s.reshape(b, -1).to(dt), f_t.reshape(b, -1).to(dt)
        g_s = F.normalize(q_s @ q_s.t(), dim=1)  # Eq. 3
        g_t = F.normalize(q_t @ q_t.t(), dim=1)  # Eq. 2
        return (g_t - g_s).pow(2).sum() / (b * b)  # Eq. 4


def kd_loss(logits_s, logits_t, T):
    """Hinton KD term T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, mean over the batch
    (RepDistiller DistillKL). logits_*: [b, classes]. Returns a 0-dim fp32 (fp64 for fp64 input) tensor."""
    with torch.autocast(logits_s.device.type, enabled=False):
        dt = torch.promote_types(logits_s.dtype, torch.float32)
        log_p_s = F.log_softmax(logits_s.to(dt) / T, dim=1)
        log_p_t = F.log_softmax(logits_t.to(dt) / T, dim=1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean() * T * T


# ---- data, checkpoints, evaluation ----
@functools.lru_cache(maxsize=4)
def load_split(dataset, data_root, split, synthetic_size):  # digits: 8x8 grey -> 32-px RGB for the zoo
    kw = dict(image_size=32, channels=3) if dataset == "digits" else dict(synthetic_size=synthetic_size)
    return common.load_split(dataset, root=data_root, split=split, **kw)


def model_from_args(args):
    """eval.py contract: the student network (no download; the state_dict overwrites everything)."""
    return build_model(args.student_arch, args.num_classes)


@torch.no_grad()
def evaluate(model, args, device):
    """Top-1/error of the logits, Rank-1/Rank-2 of the flip-averaged, L2-normalised pooled feature (percent)."""
    model.eval()
    fn = lambda x: model(x, with_features=True)[1:]  # noqa: E731  (pooled feature, logits); fp32 (no autocast)
    emb, logits, labels = common.embed(fn, load_split(args.dataset, args.data_root, "test", tuple(args.synthetic_size)), device, batch_size=256, flip_average=True)
    top1 = 100.0 * common.topk_accuracy(logits, labels, ks=(1,))[1]
    r = common.retrieval_metrics(F.normalize(emb, dim=1), labels, ks=(1, 2), with_map=False, with_nmi=False)
    return {"top1": top1, "error": 100.0 - top1, "Rank-1": r["R@1"], "Rank-2": r["R@2"]}


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_teacher(path, arch, num_classes):
    """Teacher from this repo's model.pt, the benchmark's {"model", "epoch", "accuracy", "optimizer"} pickle
    (trusted: weights_only=False fallback), or a bare state_dict; strict load. ValueError on any problem."""
    if not os.path.isfile(path):
        raise ValueError(f"teacher checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # RepDistiller/mdistiller pickles hold non-tensor objects; the user vouches for the file
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"teacher checkpoint {path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"teacher checkpoint {path}: no state_dict found (expected a dict with 'model' or a state_dict)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    model = build_model(arch, num_classes)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"teacher checkpoint {path} does not match --teacher-arch {arch} with {num_classes} classes: {len(missing)} "
                         f"missing {missing[:2]}.., {len(unexpected)} unexpected {unexpected[:2]}.., {len(shapes)} shape mismatches {shapes[:1]}..")
    model.load_state_dict(state, strict=True)
    return model


# ---- training ----
def train(student, teacher, images, labels, split, args, device, epochs, log_dir=None, resume=None, tag="student"):
    """SGD loop shared by the teacher (teacher=None: CE only) and the student. Returns final metrics."""
    use_teacher = teacher is not None and (args.kd_weight > 0 or args.sp_weight > 0)
    ce_w, kd_w, sp_w = (args.ce_weight, args.kd_weight, args.sp_weight) if teacher is not None else (1.0, 0.0, 0.0)
    amp = args.amp and device.type == "cuda"
    opt = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                          weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.lr_milestones, gamma=args.lr_decay)
    net = torch.compile(student) if args.compile else student
    start_epoch, step, best = 0, 0, None
    if resume is not None:
        student.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start_epoch, step, best = resume["epoch"], resume["step"], resume["best"]
        torch.set_rng_state(resume["rng_cpu"])
        if device.type == "cuda" and resume.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(resume["rng_cuda"])
    n, bs = len(labels), args.batch_size
    total = min(epochs * math.ceil(n / bs), args.max_steps or 1 << 62)  # optimizer steps this run will reach
    first_bad = torch.full((3,), -1, dtype=torch.long, device=device)  # first non-finite step per component
    t0, step0, metrics, warm = time.time(), step, None, None

    def checkpoint(epoch):
        return {"model": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": epoch, "step": step, "best": best, "args": vars(args),
                "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}

    def check_finite():
        bad = first_bad.tolist()
        if max(bad) >= 0:
            i = min((s, i) for i, s in enumerate(bad) if s >= 0)[1]
            print(f"error: non-finite {('ce', 'kd', 'sp')[i]} loss at step {bad[i]} ({tag})", file=sys.stderr)
            sys.exit(2)

    epoch = start_epoch
    try:
        for epoch in range(start_epoch, epochs):
            if step >= total:
                break
            student.train()
            sums, n_seen, t_log = torch.zeros(3, device=device), 0, time.time()
            for idx in common.batch_indices(n, bs, shuffle=True, drop_last=False, device=device):
                x = common.normalize(common.random_crop_flip(images[idx], padding=4), split.mean, split.std)
                x, y = x.contiguous(memory_format=_mf(args)), labels[idx]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    feats_s, _, logits_s = net(x, with_features=True)
                    if use_teacher:
                        with torch.no_grad():
                            feats_t, _, logits_t = teacher(x, with_features=True)
                # METHOD: Eq. 5 (+ optional Hinton term): CE + kd_w * T^2 KL + gamma * sum_{(l,l')} L_SP
                ce = F.cross_entropy(logits_s.float(), y)
                kd = kd_loss(logits_s, logits_t, args.kd_T) if use_teacher and kd_w > 0 else ce.new_zeros(())
                sp = ce.new_zeros(())
                if use_teacher and sp_w > 0:
                    pairs = [(feats_s[-1], feats_t[-1])] if args.sp_layers == "last" else zip(feats_s, feats_t)
                    sp = sum(sp_loss(fs, ft) for fs, ft in pairs)
                loss = ce_w * ce + kd_w * kd + sp_w * sp
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                comps = torch.stack([ce, kd, sp]).detach()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(comps), torch.full_like(first_bad, step), first_bad)
                sums, n_seen, step = sums + comps, n_seen + 1, step + 1
                if warm is None and step - step0 >= min(10, max(1, (total - step0) // 5)):
                    torch.cuda.synchronize() if device.type == "cuda" else None
                    warm = [time.time(), step]  # steady-state clock; evaluation time is excluded below
                if step % args.log_every == 0 or step == total:
                    check_finite()
                    c = (sums / n_seen).tolist()
                    ips = n_seen * bs / max(time.time() - t_log, 1e-9)
                    eta = (total - step) * bs / max(ips, 1e-9)
                    print(f"[{tag}] epoch {epoch + 1} step {step}/{total} ce {c[0]:.4f} kd {c[1]:.4f} sp {c[2]:.6f} "
                          f"lr {opt.param_groups[0]['lr']:.4g} {ips:.0f} img/s eta {eta:.0f}s", flush=True)
                if step >= total:
                    break
            check_finite()
            sched.step()
            last = epoch + 1 == epochs or step >= total
            if (epoch + 1) % args.eval_every == 0 or last:
                t_eval = time.time()
                metrics = evaluate(student, args, device)
                if warm is not None:
                    warm[0] += time.time() - t_eval
                if best is None or metrics["top1"] > best["top1"]:
                    best = dict(metrics, epoch=epoch + 1)
                print(f"[{tag}] eval epoch {epoch + 1}: " + _fmt(metrics), flush=True)
                if log_dir:
                    with open(os.path.join(log_dir, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(dict(epoch=epoch + 1, step=step, **metrics, elapsed_s=time.time() - t0,
                                                images_per_s=_throughput(warm, step, bs, device))) + "\n")
            if log_dir:
                atomic_save(checkpoint(epoch + 1), os.path.join(log_dir, "last.pt"))
    except KeyboardInterrupt:
        if log_dir:  # resumable: the interrupted epoch restarts from its first batch
            atomic_save(checkpoint(epoch), os.path.join(log_dir, "last.pt"))
        sys.exit(130)
    if metrics is None:  # resumed run that was already complete
        metrics = evaluate(student, args, device)
    return metrics, best, _throughput(warm, step, bs, device)


def _throughput(warm, step, bs, device):
    """Steady-state images/s since the warm-up point, evaluation time excluded (None if too few steps)."""
    if warm is None or step <= warm[1]:
        return None
    torch.cuda.synchronize() if device.type == "cuda" else None
    return (step - warm[1]) * bs / max(time.time() - warm[0], 1e-9)


def get_teacher(args, images, labels, split, device):
    """Teacher from --teacher-path, else from the cache <save-dir>/teachers/, else trained here with CE under the
    same preset (then cached as a model.pt that eval.py reads). Frozen, eval mode. Returns (teacher, metrics)."""
    metrics = None
    if args.teacher_path:
        teacher = load_teacher(args.teacher_path, args.teacher_arch, args.num_classes)
    else:
        key = f"{args.dataset}_{args.teacher_arch}_e{args.teacher_epochs}_b{args.batch_size}_lr{args.lr}_s{args.seed}"
        key += "_{}x{}x{}".format(*args.synthetic_size) if args.dataset == "synthetic" else ""
        cache = os.path.join(args.save_dir, "teachers", key + ".pt")
        if os.path.isfile(cache):
            print(f"teacher: reusing {cache}")
            teacher = load_teacher(cache, args.teacher_arch, args.num_classes)
        else:
            print(f"teacher: training {args.teacher_arch} with CE for {args.teacher_epochs} epochs -> {cache}")
            teacher = build_model(args.teacher_arch, args.num_classes).to(device, memory_format=_mf(args))
            targs = dict(vars(args), student_arch=args.teacher_arch, kd_weight=0.0, sp_weight=0.0, epochs=args.teacher_epochs,
                         eval_every=max(args.teacher_epochs, 1), max_steps=None, compile=False, resume=None)
            if args.teacher_epochs > 0:
                metrics = train(teacher, None, images, labels, split, argparse.Namespace(**targs), device, args.teacher_epochs, tag="teacher")[0]
            metrics = metrics or evaluate(teacher, args, device)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            atomic_save({"method": "spkd", "args": targs, "model": teacher.state_dict(), "metrics": metrics}, cache)
    teacher = teacher.to(device, memory_format=_mf(args)).eval().requires_grad_(False)
    metrics = metrics or evaluate(teacher, args, device)
    if args.sp_layers == "all":
        with torch.no_grad():
            probe = torch.zeros(2, *images.shape[1:], device=device)
            n_s = len(build_model(args.student_arch, args.num_classes).to(device)(probe, with_features=True)[0])
            n_t = len(teacher(probe, with_features=True)[0])
        if n_s != n_t:
            raise ValueError(f"--sp-layers all needs equal stage counts ({args.student_arch}: {n_s}, {args.teacher_arch}: {n_t})")
    return teacher, metrics


def _fmt(metrics):
    return " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k != "epoch")


def main(argv=None):
    try:
        args = get_args(argv)
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        device = torch.device(args.device)
        torch.manual_seed(args.seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = not args.deterministic
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if args.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        train_split = load_split(args.dataset, args.data_root, "train", tuple(args.synthetic_size))
        args.num_classes = train_split.num_classes
        images, labels = common.to_device(train_split, device)
        run_dir = os.path.join(args.save_dir, args.run_name)
        os.makedirs(run_dir, exist_ok=True)
        resume = None
        if args.resume:
            try:
                resume = torch.load(args.resume, map_location="cpu", weights_only=False)
                build_model(args.student_arch, args.num_classes).load_state_dict(resume["model"])
            except Exception as e:
                raise ValueError(f"cannot resume from {args.resume}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        print("config: " + json.dumps(vars(args)), flush=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dict(vars(args), torch=torch.__version__, torchvision=torchvision.__version__,
                           device_name=torch.cuda.get_device_name() if device.type == "cuda" else args.device,
                           git_commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                     cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None), f, indent=1)
        teacher, teacher_metrics = None, None
        if args.kd_weight > 0 or args.sp_weight > 0:
            teacher, teacher_metrics = get_teacher(args, images, labels, train_split, device)
            print(f"teacher {args.teacher_arch}: " + _fmt(teacher_metrics), flush=True)
        else:
            print("kd-weight = sp-weight = 0: vanilla student (CE only), no teacher")
        torch.manual_seed(args.seed)  # student init independent of whether the teacher was trained or loaded
        student = build_model(args.student_arch, args.num_classes, pretrained=args.pretrained).to(device, memory_format=_mf(args))
        t0 = time.time()
        metrics, best, ips = train(student, teacher, images, labels, train_split, args, device, args.epochs,
                                   log_dir=run_dir, resume=resume)
        atomic_save({"method": "spkd", "args": vars(args), "model": student.state_dict(), "metrics": metrics,
                     "teacher_metrics": teacher_metrics, "best": best}, os.path.join(run_dir, "model.pt"))
    except (ValueError, common.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    mem = (f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (cuda max allocated)" if device.type == "cuda"
           else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (maxrss)")
    print(f"== summary ({args.run_name}) ==")
    if teacher_metrics:
        print("teacher      : " + _fmt(teacher_metrics))
    print("student last : " + _fmt(metrics) + "   <- headline (last epoch)")
    if best:
        print(f"student best : epoch {best['epoch']} " + _fmt(best) + "   (best epoch, chosen on the test set)")
    print(f"throughput   : {f'{ips:.1f} img/s steady state' if ips else 'n/a (too few steps)'} | peak memory {mem}"
          f" | student wall {time.time() - t0:.1f}s | saved {os.path.join(run_dir, 'model.pt')}")


def _mf(args):
    return torch.channels_last if args.channels_last else torch.contiguous_format


if __name__ == "__main__":
    main()
