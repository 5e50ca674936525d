"""Person re-identification with a torchvision ResNet-50 trained through QAConv-GS (Market-1501 layout).

The backbone is a ResNet-50 cut after layer3 (conv1 .. layer3, 1024 channels, stride 16: a 384 x 128 image
gives a 24 x 8 map), as QAConv does, followed by a 1x1 conv neck + BatchNorm (128 channels by default). Its
feature maps go straight into ``qaconv_gs.torch.QAConvGSLoss`` (class embeddings, each sample scored against
its class and its k nearest classes); batches come from ``qaconv_gs.GraphSampler`` (a centre identity and its
nearest identities, ``--sampler graph``) or plain P x K batches (``--sampler pk``). Evaluation extracts the
query and gallery maps, scores every pair with QAConv (``criterion.match``) and reports CMC rank-1/5/10 and
mAP with ``qaconv_gs.metrics.cmc_map`` under the Market-1501 rules.

Data: a folder with ``bounding_box_train/``, ``query/`` and ``bounding_box_test/`` holding images named like
``0002_c1s1_000451_03.jpg`` (person id 0002, camera 1). Id -1 is junk and 0000 a distractor (Market-1501):
junk images are dropped everywhere (the ranking would ignore them anyway), distractors stay in the gallery
as non-matching images and are dropped from training and from the queries. DukeMTMC-reID's names
(``0001_c2_f0046182.jpg``) parse the same way.

    pip install '.[examples]'                                       # torch + torchvision
    python examples/reid_torchvision.py --data-dir /data/Market-1501-v15.09.15 --pretrained --epochs 60
    python examples/reid_torchvision.py --make-toy /tmp/toy_reid --height 64 --width 32 --epochs 3

``--pretrained`` loads torchvision's ImageNet weights (downloads them once, needs network); the default
``weights=None`` trains from scratch and works offline. Where torchvision cannot be imported (not installed,
or a wheel built for another torch: PyPI's Linux torchvision needs PyPI's CUDA torch and fails to import next
to a CPU-only torch from another index), the same ResNet-50 defined in this file is used instead (same
module names, so its state dicts interchange with torchvision's); images are read with Pillow either way.

``--make-toy DIR`` writes a tiny synthetic data set in this layout (coloured patterns, two cameras) and trains
on it, so the whole pipeline runs offline in seconds. Scoring every query x gallery pair with QAConv is exact
and O(Q x G): on Market-1501 (3,368 queries x about 17,000 gallery images, maps [128, 24, 8], 9.4 MFLOP a
pair) that is roughly an hour on 2 cores at the kernel's measured 165 GF/s (see ``qaconv_gs.two_stage_search``
for big galleries).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS = ("bounding_box_train", "query", "bounding_box_test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "qaconv-gs/examples/reid_torchvision/1"

_NAME = re.compile(r"^(-?\d+)_c(\d+)")


# ---------------------------------------------------------------------------------------------- data


def parse_market_name(name: str | os.PathLike) -> tuple[int, int]:
    """Person id and camera of a Market-1501 / DukeMTMC-reID file name.

    >>> parse_market_name("0002_c1s1_000451_03.jpg")
    (2, 1)
    >>> parse_market_name("-1_c3s2_012345_01.jpg")  # junk
    (-1, 3)
    """
    base = os.path.basename(os.fspath(name))
    m = _NAME.match(base)
    if m is None:
        raise ValueError(f"name: expected '<id>_c<camera>...' (e.g. 0002_c1s1_000451_03.jpg), got {base!r}")
    return int(m.group(1)), int(m.group(2))


def list_split(
    folder: str | os.PathLike, *, keep_distractors: bool
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Images of one split folder, sorted by name: (paths, person ids [n], cameras [n]).

    Junk (id -1) is always dropped; distractors (id 0) are kept only if `keep_distractors` (the gallery)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data: missing folder {folder} (expected the Market-1501 layout {SPLITS})")
    paths, ids, cams = [], [], []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTS:
            continue  # Thumbs.db and the like
        pid, cam = parse_market_name(p.name)
        if pid == -1 or (pid == 0 and not keep_distractors):
            continue
        paths.append(str(p))
        ids.append(pid)
        cams.append(cam)
    if not paths:
        raise ValueError(f"data: no usable images in {folder}")
    return paths, np.asarray(ids, dtype=np.int64), np.asarray(cams, dtype=np.int64)


def make_toy(
    root: str | os.PathLike,
    num_ids: int = 12,
    num_cams: int = 2,
    per_cam: int = 3,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
) -> Path:
    """Write a tiny synthetic data set in the Market-1501 layout under `root` and return its path.

    Every identity is a distinct pattern (upper and lower colours, a stripe / check pattern of a third colour
    on the upper part); each camera has its own background, colour cast and brightness, and every image a
    random shift and pixel noise. Training uses ids 1..num_ids, testing ids num_ids+1..2*num_ids (disjoint,
    as in Market-1501), each seen by every camera `per_cam` times: the first image of each (id, camera) is a
    query, the rest are gallery images, plus two distractors (id 0000) and two junk images (id -1).

    A folder made by an earlier call (it holds the marker file TOY_DATASET) is rewritten; a folder that holds
    images of another data set is refused, never touched."""
    from PIL import Image

    root = Path(root)
    H, W = int(height), int(width)
    if H < 16 or W < 8:
        raise ValueError(f"height, width: expected at least 16 x 8 pixels, got {H} x {W}")
    if num_ids < 2 or num_cams < 2 or per_cam < 2:
        raise ValueError(
            f"num_ids, num_cams, per_cam: expected >= 2 each (every query needs a match in another camera), "
            f"got {num_ids}, {num_cams}, {per_cam}"
        )
    marker = root / "TOY_DATASET"
    old = [p for s in SPLITS if (root / s).is_dir() for p in (root / s).iterdir() if p.suffix in IMAGE_EXTS]
    if old and not marker.is_file():
        raise FileExistsError(f"{root}: holds images but was not made by make_toy; choose an empty folder")
    for p in old:
        p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text("a synthetic data set written by examples/reid_torchvision.py (make_toy)\n")
    rng = np.random.default_rng(seed)
    cam_gain = 0.75 + 0.5 * rng.random((num_cams + 1, 3))
    cam_bg = rng.integers(40, 200, size=(num_cams + 1, 3))
    yy, xx = np.mgrid[0:H, 0:W]

    def person(pid: int) -> dict:
        r = np.random.default_rng([seed, pid])
        return {
            "upper": r.integers(0, 256, 3),
            "lower": r.integers(0, 256, 3),
            "mark": r.integers(0, 256, 3),
            "kind": int(r.integers(0, 3)),
            "period": int(r.integers(3, 7)) * max(1, H // 64),
        }

    def draw(p: dict | None, cam: int) -> np.ndarray:
        img = np.empty((H, W, 3), np.float64)
        img[:] = cam_bg[cam]
        dy, dx = rng.integers(-H // 16, H // 16 + 1), rng.integers(-W // 10, W // 10 + 1)
        top, bottom = H // 10 + dy, H - H // 12 + dy
        left, right = W // 5 + dx, W - W // 5 + dx
        waist = top + (bottom - top) * 9 // 20
        body = (yy >= top) & (yy < bottom) & (xx >= left) & (xx < right)
        if p is None:  # junk / distractor: a random blob
            img[body] = rng.integers(0, 256, 3)
        else:
            upper, lower = body & (yy < waist), body & (yy >= waist)
            img[upper], img[lower] = p["upper"], p["lower"]
            per = p["period"]
            ph = [
                (yy - top) // per % 2 == 0,
                (xx - left) // per % 2 == 0,
                ((yy - top) // per + (xx - left) // per) % 2 == 0,
            ]
            img[upper & ph[p["kind"]]] = p["mark"]
        img = img * cam_gain[cam] + rng.normal(0.0, 10.0, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    frame = 0

    def save(split: str, pid: int, cam: int, p: dict | None) -> None:
        nonlocal frame
        frame += 1
        name = f"{pid:04d}" if pid >= 0 else str(pid)
        Image.fromarray(draw(p, cam)).save(root / split / f"{name}_c{cam}s1_{frame:06d}_00.jpg", quality=95)

    for pid in range(1, 2 * num_ids + 1):
        p = person(pid)
        for cam in range(1, num_cams + 1):
            for i in range(per_cam):
                if pid <= num_ids:
                    save("bounding_box_train", pid, cam, p)
                else:
                    save("query" if i == 0 else "bounding_box_test", pid, cam, p)
    for pid in (0, 0, -1, -1):
        save("bounding_box_test", pid, 1 + int(rng.integers(0, num_cams)), None)
    return root


def _torch():
    try:
        import torch
    except ImportError:
        raise SystemExit("this example needs PyTorch: pip install '.[examples]'") from None
    return torch


@functools.cache
def _torchvision():
    """torchvision, or None with the reason when it cannot be imported: missing, or a build whose compiled
    ops do not match the installed torch (PyPI's Linux torchvision wheels need a CUDA torch; with a CPU-only
    torch from another index their import raises RuntimeError)."""
    try:
        import torchvision
    except Exception as exc:  # ImportError, or RuntimeError from mismatched compiled ops
        return None, f"{type(exc).__name__}: {exc}"
    return torchvision, None


class ImageList:
    """Map-style data set for torch's DataLoader: item i = (image tensor [3, H, W], label) of paths[i]."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            x = self.transform(im.convert("RGB"))
        return x, int(self.labels[i])


class Transform:
    """PIL image -> float tensor [3, height, width]: bilinear resize, a random horizontal flip in training
    (torch's RNG, so torch.manual_seed makes it reproducible), ImageNet mean / std normalisation. (What
    torchvision's Resize + RandomHorizontalFlip + ToTensor + Normalize do, without needing torchvision.)"""

    def __init__(self, height: int, width: int, train: bool):
        self.size, self.train = (int(width), int(height)), bool(train)

    def __call__(self, im):
        from PIL import Image

        torch = _torch()
        im = im.resize(self.size, Image.BILINEAR)
        if self.train and float(torch.rand(())) < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(im, dtype=np.float32) / 255.0
        x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------- model


def _resnet50_to_layer3():
    """torchvision's ResNet-50 (v1.5: stride on the 3x3 conv, the same module names, parameter shapes and
    initialisation) up to layer3, for when torchvision cannot be imported. State dicts interchange with
    torchvision.models.resnet50 (minus layer4 and fc)."""
    torch = _torch()
    nn = torch.nn

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    r = nn.Module()
    r.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    r.bn1 = nn.BatchNorm2d(64)
    r.relu = nn.ReLU(inplace=True)
    r.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = 64
    for name, planes, blocks, stride in (("layer1", 64, 3, 1), ("layer2", 128, 4, 2), ("layer3", 256, 6, 2)):
        down = None
        if stride != 1 or inplanes != planes * 4:
            down = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        layers = [Bottleneck(inplanes, planes, stride, down)]
        inplanes = planes * 4
        layers += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
        setattr(r, name, nn.Sequential(*layers))
    for m in r.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return r


def build_backbone(neck: int = 128, pretrained: bool = False, *, verbose: bool = False):
    """ResNet-50 conv1 .. layer3 (1024 channels, stride 16) + 1x1 conv neck + BatchNorm2d -> [B, neck, h, w].

    torchvision's resnet50 (weights=None, or ImageNet weights with `pretrained`); where torchvision cannot
    be imported, the same network defined here (weights=None only)."""
    torch = _torch()
    nn = torch.nn
    torchvision, why = _torchvision()
    if torchvision is not None:
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
        r = torchvision.models.resnet50(weights=weights)
    elif pretrained:
        raise SystemExit(f"--pretrained needs torchvision, which cannot be imported ({why})")
    else:
        if verbose:
            print(
                f"note: torchvision cannot be imported ({why.splitlines()[0]}); using this file's ResNet-50"
            )
        r = _resnet50_to_layer3()
    base = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)
    head = nn.Sequential(nn.Conv2d(1024, neck, kernel_size=1, bias=False), nn.BatchNorm2d(neck))
    return nn.Sequential(base, head)


def feature_shape(net, height: int, width: int) -> tuple[int, int, int]:
    """(C, H, W) of the maps `net` makes from height x width images."""
    torch = _torch()
    was = net.training
    net.eval()
    with torch.no_grad():
        shape = tuple(net(torch.zeros(1, 3, height, width)).shape[1:])
    net.train(was)
    return shape


def extract(net, dataset, batch_size: int = 64, workers: int = 0, desc: str = "extract", progress=True):
    """Feature maps [n, C, H, W] float32 (NumPy) of every image of `dataset`, eval mode, no gradient."""
    torch = _torch()
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    net.eval()
    out = []
    with torch.no_grad():
        for x, _ in tqdm(loader, desc=desc, unit="batch", disable=not progress, file=sys.stderr):
            out.append(net(x).float().numpy())
    return np.concatenate(out)


def save_checkpoint(path: str | os.PathLike, net, criterion, meta: dict) -> str:
    """torch.save of the backbone, the QAConv-GS loss (class embeddings + head) and `meta`, atomically."""
    torch = _torch()
    path = os.fspath(path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "net": net.state_dict(),
        "criterion": criterion.state_dict(),
        "criterion_config": dict(criterion.config),
        "meta": meta,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike):
    """(net, criterion, meta) from a save_checkpoint file (weights only: no code is unpickled)."""
    torch = _torch()
    from qaconv_gs.torch import QAConvGSLoss

    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    meta = state["meta"]
    net = build_backbone(neck=int(meta["neck"]), pretrained=False)
    net.load_state_dict(state["net"])
    criterion = QAConvGSLoss(**state["criterion_config"])
    criterion.load_state_dict(state["criterion"])
    return net.eval(), criterion.eval(), meta


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data-dir", help="Market-1501-layout folder (bounding_box_train/, query/, bounding_box_test/)"
    )
    src.add_argument("--make-toy", metavar="DIR", help="write a tiny synthetic data set to DIR and use it")
    ap.add_argument("--toy-ids", type=int, default=12, help="identities per split of --make-toy (default 12)")
    ap.add_argument("--epochs", type=int, default=60, help="training epochs (default 60; 0: evaluate only)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    ap.add_argument("--num-instances", type=int, default=4, help="images per identity in a batch (default 4)")
    ap.add_argument(
        "--sampler",
        choices=("graph", "pk"),
        default="graph",
        help="graph: a centre identity + its nearest identities (QAConv-GS); pk: random identities",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=0.01,
        help="lr of the neck and the QAConv-GS loss (default 0.01; cosine decay over the epochs)",
    )
    ap.add_argument(
        "--base-lr-mult",
        type=float,
        default=None,
        help="backbone lr = lr x this (default 0.1 with --pretrained, else 1)",
    )
    ap.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default 5e-4)")
    ap.add_argument("--height", type=int, default=384, help="image height (default 384, as QAConv)")
    ap.add_argument("--width", type=int, default=128, help="image width (default 128)")
    ap.add_argument("--neck", type=int, default=128, help="channels of the feature maps (default 128)")
    ap.add_argument(
        "--k-nearest", type=int, default=32, help="neighbour classes scored per sample (capped at N-1)"
    )
    ap.add_argument(
        "--pretrained", action="store_true", help="ImageNet weights from torchvision (needs network)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch and qaconv-gs threads (default: their own)"
    )
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps (tests)")
    ap.add_argument("--seed", type=int, default=0, help="seed of torch, the sampler and the loss (default 0)")
    ap.add_argument("--save", metavar="PATH", help="write a checkpoint (backbone + loss + metrics) to PATH")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch_size", "num_instances", "height", "width", "neck", "k_nearest", "toy_ids"):
        lo = {"epochs": 0, "toy_ids": 2}.get(name, 1)
        if getattr(args, name) < lo:
            ap.error(f"--{name.replace('_', '-')}: expected >= {lo}, got {getattr(args, name)}")
    if args.batch_size < args.num_instances:
        ap.error(f"--batch-size: expected >= --num-instances = {args.num_instances}, got {args.batch_size}")
    if args.max_steps is not None and args.max_steps < 1:
        ap.error(f"--max-steps: expected >= 1, got {args.max_steps}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch = _torch()
    import qaconv_gs as qg
    from qaconv_gs import metrics
    from qaconv_gs.torch import QAConvGSLoss
    from tqdm.auto import tqdm

    progress = not args.no_progress
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.make_toy:
        data_dir = make_toy(
            args.make_toy, num_ids=args.toy_ids, height=args.height, width=args.width, seed=args.seed
        )
        print(f"wrote a toy Market-1501-layout data set to {data_dir}")
    else:
        data_dir = Path(args.data_dir)

    # Data: training ids remapped to 0..N-1 (the class-embedding rows); query / gallery keep their ids.
    tr_paths, tr_pids, _ = list_split(data_dir / "bounding_box_train", keep_distractors=False)
    q_paths, q_ids, q_cams = list_split(data_dir / "query", keep_distractors=False)
    g_paths, g_ids, g_cams = list_split(data_dir / "bounding_box_test", keep_distractors=True)
    train_ids, labels = np.unique(tr_pids, return_inverse=True)
    labels = labels.reshape(-1).astype(np.int64)
    N = int(train_ids.size)
    if N < 2:
        raise SystemExit(f"data: training needs at least 2 identities, got {N}")
    train_set = ImageList(tr_paths, labels, Transform(args.height, args.width, train=True))
    print(
        f"{data_dir}: {len(tr_paths)} training images of {N} identities; {len(q_paths)} queries, "
        f"{len(g_paths)} gallery images ({int(np.sum(g_ids == 0))} distractors); "
        f"images resized to {args.height}x{args.width}"
    )

    # Model: backbone + neck -> [B, C, h, w] maps -> QAConv-GS loss (class embeddings [N, C, h, w] + head).
    net = build_backbone(args.neck, args.pretrained, verbose=True)
    C, H, W = feature_shape(net, args.height, args.width)
    k = min(args.k_nearest, N - 1)
    criterion = QAConvGSLoss(N, C, H, W, k_nearest=k, seed=args.seed, n_threads=args.threads)
    print(f"ResNet-50 to layer3 + 1x1 neck: maps [{C}, {H}, {W}]; QAConvGSLoss({criterion.extra_repr()})")

    neighbors = (lambda: criterion.class_neighbors) if args.sampler == "graph" else None
    sampler = qg.GraphSampler(
        labels, args.batch_size, args.num_instances, neighbors=neighbors, seed=args.seed
    )
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers)
    base_mult = args.base_lr_mult if args.base_lr_mult is not None else (0.1 if args.pretrained else 1.0)
    groups = [
        {"params": net[0].parameters(), "lr": args.lr * base_mult},
        {"params": list(net[1].parameters()) + list(criterion.parameters()), "lr": args.lr},
    ]
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.epochs))

    step, t0 = 0, time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        criterion.train()
        criterion.on_epoch_start()  # neighbour table rebuilt from the current class embeddings
        sampler.set_epoch(epoch)
        total = len(sampler) if args.max_steps is None else min(len(sampler), args.max_steps - step)
        sums = {"loss": 0.0, "acc": 0.0, "n": 0}
        bar = tqdm(
            total=total,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            unit="batch",
            disable=not progress,
            file=sys.stderr,
        )
        for images, y in loader:
            loss = criterion(net(images), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            b = int(y.shape[0])
            sums["loss"] += loss.item() * b
            sums["acc"] += float(criterion.last_result.acc_cls) * b
            sums["n"] += b
            bar.update(1)
            bar.set_postfix(
                loss=f"{sums['loss'] / sums['n']:.4f}", acc=f"{sums['acc'] / sums['n']:.3f}", refresh=False
            )
            if args.max_steps is not None and step >= args.max_steps:
                break
        bar.close()
        sched.step()
        if sums["n"]:
            print(
                f"epoch {epoch + 1}/{args.epochs}: loss {sums['loss'] / sums['n']:.4f}  "
                f"train acc {sums['acc'] / sums['n']:.3f}  steps {step}  {time.perf_counter() - t0:.1f} s"
            )
        if args.max_steps is not None and step >= args.max_steps:
            break

    # Evaluation: QAConv scores of every query x gallery pair, Market-1501 ranking rules.
    test_tf = Transform(args.height, args.width, train=False)
    qf = extract(net, ImageList(q_paths, q_ids, test_tf), args.batch_size, args.workers, "query", progress)
    gf = extract(net, ImageList(g_paths, g_ids, test_tf), args.batch_size, args.workers, "gallery", progress)
    t1 = time.perf_counter()
    scores = criterion.match(qf, gf).numpy()  # [Q, G], eval-mode head
    t_match = time.perf_counter() - t1
    r = metrics.cmc_map(scores, q_ids, g_ids, q_cams, g_cams)
    result = {
        "rank1": r.rank(1),
        "rank5": r.rank(5),
        "rank10": r.rank(10),
        "mAP": r.mAP,
        "num_valid_queries": r.num_valid_queries,
        "steps": step,
    }
    print(
        f"rank-1 {result['rank1']:.4f}  rank-5 {result['rank5']:.4f}  rank-10 {result['rank10']:.4f}  "
        f"mAP {result['mAP']:.4f}  ({r.num_valid_queries} queries, {r.num_skipped_queries} skipped; "
        f"{scores.size} QAConv pair scores in {t_match:.1f} s)"
    )
    if not all(math.isfinite(result[m]) for m in ("rank1", "mAP")):
        print("warning: no query has a valid match in the gallery", file=sys.stderr)
    if args.save:
        meta = {
            "neck": args.neck,
            "height": args.height,
            "width": args.width,
            "train_ids": [int(i) for i in train_ids],
            "epochs": args.epochs,
            "steps": step,
            "metrics": {k: float(v) for k, v in result.items()},
        }
        result["checkpoint"] = save_checkpoint(args.save, net, criterion, meta)
        print(f"wrote {result['checkpoint']}")
    return result


if __name__ == "__main__":
    main()
