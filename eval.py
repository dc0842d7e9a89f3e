"""Evaluate a checkpoint saved by any method script, or a file of precomputed embeddings.

    python eval.py runs/<run>/model.pt                      # the metrics the run logged, recomputed
    python eval.py runs/<run>/model.pt --data-root /data    # data moved since training
    python eval.py runs/<run>/model.pt --linear-probe       # ISD: + the linear protocol
    python eval.py --embeddings file.npz                    # arrays emb, labels [, train_emb, train_labels]

Writes eval.json next to the checkpoint (or <name>_eval.json next to the .npz) with the same
metric names the run logged to metrics.jsonl, and prints a table beside the run's own numbers.

The contract every method file (s2sd.py, camd.py, spkd.py, isd.py) follows
---------------------------------------------------------------------------
A checkpoint `model.pt` is `{"method": <module name>, "args": vars(args), "model": state_dict,
"metrics": {...}}`, where args holds only plain values (it is loaded with weights_only=True).
The module named by "method" defines:

    model_from_args(args) -> nn.Module
        rebuilds the saved network from the saved arguments without downloading anything;
    evaluate(model, args, device) -> dict[str, float]
        the method's test metrics (percent), the very function its training loop calls, so the
        numbers here equal the run's final numbers;
    features(model, args, device, split) -> (emb, labels)      [optional; needed by --linear-probe]
        frozen features of a split ("train" / "test") for the ISD linear protocol.

eval.py loads the checkpoint, imports that module, applies --dataset / --data-root overrides,
rebuilds the model, loads the weights strictly and calls evaluate(). Bad input (missing or corrupt
file, unknown method, weights that do not fit, data that do not fit the model) gives one line on
stderr and exit code 2.
"""
import argparse
import importlib
import json
import os
import sys

import numpy as np
import torch

import common


class EvalError(Exception):
    """Bad input; main() prints the message and exits with code 2."""


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda requested but CUDA is not available")
    return name


def linear_probe(train_feat, train_labels, test_feat, test_labels, epochs=40, lr=0.01, batch_size=256,
                 momentum=0.9, weight_decay=1e-4, milestones=(15, 30), seed=0):
    """The ISD linear protocol on frozen features (shared/notes/isd.md).

    Features are L2-normalised, then standardised with the train mean and std; Linear(D, C);
    SGD(lr 0.01, momentum 0.9, wd 1e-4), batch 256, 40 epochs, lr x0.1 at epochs 15 and 30.
    Returns top-1 test accuracy (percent) of the LAST epoch.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = train_feat.device
    train_feat = torch.nn.functional.normalize(train_feat.float(), dim=1)
    test_feat = torch.nn.functional.normalize(test_feat.float(), dim=1)
    mean, std = train_feat.mean(0), train_feat.std(0).clamp_min(1e-6)
    train_feat, test_feat = (train_feat - mean) / std, (test_feat - mean) / std
    keep = train_labels >= 0
    train_feat, train_labels = train_feat[keep], train_labels[keep]
    num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_feat.shape[1], num_classes).to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), 0.1)
    for _ in range(epochs):
        order = torch.randperm(len(train_feat), generator=g).to(dev)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = torch.nn.functional.cross_entropy(head(train_feat[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return 100 * common.topk_accuracy(head(test_feat), test_labels, ks=(1,))[1]


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise EvalError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or not {"method", "args", "model"} <= set(ckpt):
        raise EvalError(f"{path} is not a checkpoint of this repository (expected keys method, "
                        f"args, model; a training script's model.pt)")
    return ckpt


def evaluate_checkpoint(path, dataset=None, data_root=None, device="cpu", probe=False):
    """Returns (metrics, logged metrics) for a model.pt."""
    ckpt = load_checkpoint(path)
    method = str(ckpt["method"])
    if not method.isidentifier():
        raise EvalError(f"{path}: invalid method name {method!r}")
    try:
        module = importlib.import_module(method)
    except ImportError as e:
        raise EvalError(f"{path} names method '{method}', which cannot be imported ({e})") from None
    if not hasattr(module, "model_from_args") or not hasattr(module, "evaluate"):
        raise EvalError(f"module '{method}' does not follow the eval contract "
                        f"(model_from_args, evaluate)")
    args = argparse.Namespace(**ckpt["args"])
    if dataset is not None:
        args.dataset = dataset
    if data_root is not None:
        args.data_root = data_root
    args.device = device
    try:
        model = module.model_from_args(args)
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise EvalError(f"weights in {path} do not fit the '{method}' model rebuilt from its "
                        f"arguments: {str(e).splitlines()[0]}") from None
    model.to(device)
    try:
        metrics = module.evaluate(model, args, device)
        if probe:
            if not hasattr(module, "features"):
                raise EvalError(f"--linear-probe needs {method}.features(); this method has no linear protocol")
            train_f, train_y = module.features(model, args, device, "train")
            test_f, test_y = module.features(model, args, device, "test")
            metrics["linear"] = linear_probe(train_f, train_y, test_f, test_y)
    except common.DatasetError:
        raise
    except EvalError:
        raise
    except (RuntimeError, IndexError, ValueError) as e:
        raise EvalError(f"cannot evaluate {path} on dataset '{args.dataset}': "
                        f"{str(e).splitlines()[0]}") from None
    return metrics, ckpt.get("metrics", {})


def evaluate_embeddings(path, device="cpu", with_nmi=True):
    """Retrieval metrics of `emb`/`labels`, plus k-NN ones when `train_emb`/`train_labels` exist."""
    if not os.path.isfile(path):
        raise EvalError(f"embeddings file {path} does not exist")
    try:
        data = np.load(path)
        emb, labels = data["emb"], data["labels"]
        train = (data["train_emb"], data["train_labels"]) if "train_emb" in data else None
    except KeyError as e:
        raise EvalError(f"{path} lacks array {e} (expected emb, labels [, train_emb, train_labels])") from None
    except Exception as e:
        raise EvalError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if emb.ndim != 2 or labels.ndim != 1 or len(emb) != len(labels):
        raise EvalError(f"{path}: emb must be [N, D] and labels [N], got {emb.shape} and {labels.shape}")
    emb_t = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)).to(device)
    labels_t = torch.from_numpy(labels.astype(np.int64)).to(device)
    metrics = common.retrieval_metrics(emb_t, labels_t, with_nmi=with_nmi)
    if train is not None:
        tr_emb = torch.from_numpy(np.ascontiguousarray(train[0], dtype=np.float32)).to(device)
        if tr_emb.ndim != 2 or tr_emb.shape[1] != emb.shape[1] or len(train[1]) != len(tr_emb):
            raise EvalError(f"{path}: train_emb must be [M, {emb.shape[1]}] with one train label per row")
        metrics.update(common.knn_metrics(tr_emb, torch.from_numpy(train[1].astype(np.int64)).to(device),
                                          emb_t, labels_t))
    return metrics


def print_table(metrics, logged):
    print(f"{'metric':<22}{'eval.py':>10}{'run log':>10}{'diff':>10}")
    for name, value in metrics.items():
        ref = logged.get(name)
        ref_s = f"{ref:10.2f}" if isinstance(ref, (int, float)) else f"{'-':>10}"
        diff_s = f"{value - ref:10.2g}" if isinstance(ref, (int, float)) else f"{'':>10}"
        print(f"{name:<22}{value:10.2f}{ref_s}{diff_s}")


def main():
    p = argparse.ArgumentParser(description="Evaluate a saved checkpoint or an embeddings file.")
    p.add_argument("checkpoint", nargs="?", help="runs/<run>/model.pt written by a method script")
    p.add_argument("--embeddings", help=".npz with emb, labels [, train_emb, train_labels]")
    p.add_argument("--dataset", help="override the dataset saved in the checkpoint")
    p.add_argument("--data-root", help="override the data root saved in the checkpoint")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--linear-probe", action="store_true", help="ISD: also run the linear protocol")
    p.add_argument("--no-nmi", action="store_true", help="--embeddings: skip NMI (k-means)")
    p.add_argument("--out", help="where to write the JSON (default: next to the input)")
    args = p.parse_args()
    if (args.checkpoint is None) == (args.embeddings is None):
        p.error("give exactly one of CHECKPOINT or --embeddings")
    try:
        device = pick_device(args.device)
        if args.embeddings:
            metrics, logged = evaluate_embeddings(args.embeddings, device, not args.no_nmi), {}
            out = args.out or os.path.splitext(args.embeddings)[0] + "_eval.json"
        else:
            metrics, logged = evaluate_checkpoint(args.checkpoint, args.dataset, args.data_root,
                                                  device, args.linear_probe)
            out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval.json")
    except (EvalError, common.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_table(metrics, logged)
    with open(out + ".tmp", "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
