"""The official PyTorch DETR train step, timed on request, for side-by-side benchmarks.

Run with a Python that has what official ``main.py`` imports (torch, torchvision, scipy, pycocotools,
pillow, packaging; not this project's environment), given a checkout of facebookresearch/detr:

  TORCH_PYTHON bench/official_detr_step.py --official=/path/to/detr [--batch 2] [--size 512x512] [OFFICIAL ARGS]

where OFFICIAL ARGS are official ``main.py`` options for the model (``--backbone resnet101``, ``--dilation``,
``--pre_norm``).

The step is official ``engine.train_one_epoch``'s body: ``model(samples)``, ``SetCriterion`` (Hungarian
matching, aux loss), ``backward``, ``clip_grad_norm_(0.1)``, AdamW with the backbone lr group, with
``main.py``'s default arguments in train mode (dropout 0.1), random weights (torchvision's init; no
download) and random images (N(0, 1), no padding) with about 7 boxes each. A protocol on stdin/stdout,
so that a JAX benchmark can alternate with it in one run (``bench/bench_train.py --official``):

  -> {"ready": true, "torch": ..., "threads": ...}   once built
  <- N                                               run N steps
  -> {"seconds": [s_1, ..., s_N]}                    each step's wall time
  <- quit

Only what the official code needs of torchvision is loaded: its operator registrations, which a
torchvision built for another torch cannot make, are skipped (DETR does not use them).
"""
import argparse
import json
import sys
import time
import types


def import_official(official_dir: str):
    """(main module, models.backbone module) of the official checkout, importable without
    torchvision's compiled operators."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    sys.path.insert(0, official_dir)
    import main as official_main
    import models.backbone as official_backbone
    return official_main, official_backbone


def make_targets(torch, batch: int, seed: int) -> list:
    """Per image about 7 (Poisson, 1..20) random boxes (cx, cy, w, h in [0, 1]) and COCO labels 1..90."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        count = int(min(max(torch.poisson(torch.tensor(7.0), generator=generator).item(), 1), 20))
        centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        extents = torch.rand(count, 2, generator=generator) * 0.25 + 0.05
        targets.append({"labels": torch.randint(1, 91, (count,), generator=generator),
                        "boxes": torch.cat([centers, extents], 1)})
    return targets


def build_step(official_dir: str, official_args: list, batch: int, size: tuple[int, int], seed: int = 0):
    """A closure running one official train step on a fixed random batch (the model of ``main.py``
    with ``official_args``); and the torch module."""
    official_main, official_backbone = import_official(official_dir)
    import torch
    from util.misc import nested_tensor_from_tensor_list

    official_backbone.is_main_process = lambda: False  # torchvision would download ImageNet weights
    args = official_main.get_args_parser().parse_args(["--device", "cpu", *official_args])
    torch.manual_seed(seed)
    model, criterion, _ = official_main.build_model(args)
    model.train()
    criterion.train()
    param_dicts = [
        {"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
         "lr": args.lr_backbone},
    ]
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    samples = nested_tensor_from_tensor_list([torch.randn(3, *size, generator=generator) for _ in range(batch)])
    targets = make_targets(torch, batch, seed)

    def step():
        outputs = model(samples)
        loss_dict = criterion(outputs, targets)
        losses = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
        optimizer.zero_grad()
        losses.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()
        return float(losses)

    return step, torch


def serve(step, stdin, stdout) -> None:
    """Answer each line N of ``stdin`` with the seconds of N steps, until 'quit' or end of input."""
    for line in stdin:
        command = line.strip()
        if command == "quit" or not command:
            break
        seconds = []
        for _ in range(int(command)):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        stdout.write(json.dumps({"seconds": seconds}) + "\n")
        stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="checkout of facebookresearch/detr")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", default="512x512", help="image size HxW")
    args, official_args = parser.parse_known_args(argv)
    height, _, width = args.size.partition("x")
    step, torch = build_step(args.official, official_args, args.batch, (int(height), int(width)))
    sys.stdout.write(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}) + "\n")
    sys.stdout.flush()
    serve(step, sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
