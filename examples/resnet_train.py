"""The paper's image-classification experiments: ResNet-18 on CIFAR-10 and
ResNet-50 on a class-balanced 40% subset of ImageNet, ADOPT against AdamW,
with mixed precision and checkpoint/resume.

    python examples/resnet_train.py --dataset cifar10 --data ~/data/cifar10 --epochs 100 --device cuda
    python examples/resnet_train.py --dataset imagenet --data ~/data/imagenet --epochs 50 \\
        --batch-size 256 --device cuda --optimizer adamw
    python examples/resnet_train.py --dataset cifar10 --fake-data --epochs 1   # no data: wiring check

Data in torchvision's layouts, read without torchvision: CIFAR-10 as
DATA/cifar-10-batches-py/{data_batch_1..5,test_batch} (the python pickles);
ImageNet as DATA/{train,val}/<class>/<image> (ImageFolder), decoded with
Pillow. The models are torchvision's ResNet-18/50 architectures (same module
names, so torchvision state dicts load), written out here. Defaults follow
the paper: ImageNet lr 0.1/sqrt(t) (t = iteration), batch 256, weight decay
1e-4; CIFAR-10 lr 1e-3/sqrt(t/1000 + 1), batch 128, weight decay 5e-4.

Writes <out>/resnet_<dataset>_<optimizer>.csv (per epoch: train loss, test
accuracy, seconds) and .png, and <out>/<run>.ckpt after every epoch
(--resume continues from it).
"""
import argparse
import csv
import pathlib
import pickle
import random
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from adopt_triton import ADOPT

MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "imagenet": (0.485, 0.456, 0.406)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "imagenet": (0.229, 0.224, 0.225)}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet; `small_input` swaps the 7x7/stride-2 stem and
    max-pool for a 3x3/stride-1 stem, the usual CIFAR adaptation."""

    def __init__(self, block, layers, num_classes, small_input=False):
        super().__init__()
        self.inplanes = 64
        self.conv1 = (nn.Conv2d(3, 64, 3, 1, 1, bias=False) if small_input
                      else nn.Conv2d(3, 64, 7, 2, 3, bias=False))
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, 64, layers[0], 1)
        self.layer2 = self._layer(block, 128, layers[1], 2)
        self.layer3 = self._layer(block, 256, layers[2], 2)
        self.layer4 = self._layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_model(dataset):
    if dataset == "cifar10":
        return ResNet(BasicBlock, [2, 2, 2, 2], 10, small_input=True)
    return ResNet(Bottleneck, [3, 4, 6, 3], 1000)


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 HWC images in memory (CIFAR-10, fake data) with CIFAR augmentation."""

    def __init__(self, images, labels, dataset, train):
        self.images, self.labels, self.train = images, labels, train
        self.mean = torch.tensor(MEAN[dataset]).view(3, 1, 1)
        self.std = torch.tensor(STD[dataset]).view(3, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1).float() / 255
        if self.train:  # random crop with 4-pixel padding, horizontal flip
            size = image.shape[-1]
            padded = nn.functional.pad(image, (4, 4, 4, 4), mode="reflect")
            i, j = random.randint(0, 8), random.randint(0, 8)
            image = padded[:, i:i + size, j:j + size]
            if random.random() < 0.5:
                image = image.flip(-1)
        return (image - self.mean) / self.std, int(self.labels[index])


class FolderDataset(torch.utils.data.Dataset):
    """ImageFolder layout, decoded with Pillow: random-resized crop + flip for
    training, resize 256 / centre crop 224 for evaluation."""

    def __init__(self, files, labels, train, size=224):
        self.files, self.labels, self.train, self.size = files, labels, train, size
        self.mean = torch.tensor(MEAN["imagenet"]).view(3, 1, 1)
        self.std = torch.tensor(STD["imagenet"]).view(3, 1, 1)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from PIL import Image
        image = Image.open(self.files[index]).convert("RGB")
        width, height = image.size
        if self.train:
            area = width * height * random.uniform(0.08, 1.0)
            ratio = np.exp(random.uniform(np.log(3 / 4), np.log(4 / 3)))
            w = int(min(width, round((area * ratio) ** 0.5)))
            h = int(min(height, round((area / ratio) ** 0.5)))
            left, top = random.randint(0, width - w), random.randint(0, height - h)
            image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
            if random.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            scale = 256 / min(width, height)
            image = image.resize((round(width * scale), round(height * scale)), Image.BILINEAR)
            left, top = (image.size[0] - self.size) // 2, (image.size[1] - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        return (tensor - self.mean) / self.std, self.labels[index]


def load_cifar10(root):
    folder = pathlib.Path(root).expanduser() / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise SystemExit(f"CIFAR-10 not found in {folder}: missing {', '.join(missing)}. Expected "
                         f"torchvision's layout: {folder}/{{data_batch_1..5,test_batch}} (python pickles)")
    batches = {}
    for name in names:
        try:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            batches[name] = (entry["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(entry["labels"]))
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
            raise SystemExit(f"{folder / name} is not a CIFAR-10 python batch: {error!r}") from error
    train = [batches[n] for n in names[:5]]
    return ((np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])), batches["test_batch"])


def load_imagenet(root, fraction, seed):
    """ImageFolder split; the training set keeps `fraction` of every class."""
    root = pathlib.Path(root).expanduser()
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not classes:
            raise SystemExit(f"ImageNet split not found: {folder} has no class folders. Expected "
                             f"torchvision's ImageFolder layout: {root}/{{train,val}}/<class>/<image>")
        splits[split] = classes
    if splits["train"] != splits["val"]:
        raise SystemExit(f"{root}/train and {root}/val do not have the same class folders")
    rng = random.Random(seed)
    out = {}
    for split, classes in splits.items():
        files, labels = [], []
        for label, name in enumerate(classes):
            images = sorted(p for p in (root / split / name).iterdir() if p.is_file())
            if split == "train":
                rng.shuffle(images)
                images = images[:max(1, round(fraction * len(images)))]  # class-balanced subset
            files += images
            labels += [label] * len(images)
        out[split] = (files, labels)
    return out["train"], out["val"]


def datasets(args):
    if args.fake_data:
        gen = np.random.default_rng(args.seed)
        size = args.image_size or (32 if args.dataset == "cifar10" else 224)
        classes = 10 if args.dataset == "cifar10" else 1000
        make = lambda n: (gen.integers(0, 256, (n, size, size, 3), dtype=np.uint8),  # noqa: E731
                          gen.integers(0, classes, n))
        return (ArrayDataset(*make(args.fake_size), args.dataset, True),
                ArrayDataset(*make(max(2, args.fake_size // 4)), args.dataset, False))
    if args.dataset == "cifar10":
        train, test = load_cifar10(args.data)
        return ArrayDataset(*train, "cifar10", True), ArrayDataset(*test, "cifar10", False)
    train, val = load_imagenet(args.data, args.subset, args.seed)
    return FolderDataset(*train, True), FolderDataset(*val, False)


def make_optimizer(args, model):
    if args.optimizer == "adopt":
        return ADOPT(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, decouple=args.decouple)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def lr_factor(dataset):
    """lr_t / lr: 1/sqrt(t) on ImageNet (the paper's), gentler on CIFAR-10."""
    if dataset == "imagenet":
        return lambda t: 1 / (t + 1) ** 0.5
    return lambda t: 1 / (t / 1000 + 1) ** 0.5


def evaluate(model, loader, device, autocast):
    model.eval()
    correct = total = 0
    with torch.no_grad(), autocast():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    model.train()
    return correct / max(total, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["cifar10", "imagenet"], default="cifar10")
    parser.add_argument("--data", help="dataset directory (torchvision layout)")
    parser.add_argument("--fake-data", action="store_true", help="random images: a wiring check, no data needed")
    parser.add_argument("--fake-size", type=int, default=64, help="training images with --fake-data")
    parser.add_argument("--image-size", type=int, help="image side with --fake-data")
    parser.add_argument("--optimizer", choices=["adopt", "adamw"], default="adopt")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--decouple", action="store_true", help="ADOPT's AdamW-style weight decay")
    parser.add_argument("--subset", type=float, default=0.4, help="ImageNet: fraction of each class kept")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16",
                        help="autocast dtype of forward/backward (fp16 adds a GradScaler)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/out"))
    parser.add_argument("--resume", action="store_true", help="continue from <out>/<run>.ckpt")
    args = parser.parse_args()
    imagenet = args.dataset == "imagenet"
    args.epochs = args.epochs or (50 if imagenet else 100)
    args.batch_size = args.batch_size or (256 if imagenet else 128)
    args.lr = args.lr or (0.1 if imagenet else 1e-3)
    args.weight_decay = args.weight_decay if args.weight_decay is not None else (1e-4 if imagenet else 5e-4)
    if not args.fake_data and not args.data:
        parser.error("give --data DIR (torchvision layout) or --fake-data")

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_set, test_set = datasets(args)
    loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=args.device != "cpu")
    test_loader = torch.utils.data.DataLoader(test_set, args.batch_size, num_workers=args.workers)
    model = make_model(args.dataset).to(args.device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.dataset))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    autocast = lambda: torch.autocast(torch.device(args.device).type, dtype=dtype,  # noqa: E731
                                      enabled=args.precision != "fp32")
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.precision == "fp16")

    run = f"resnet_{args.dataset}_{args.optimizer}"
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path, rows, start_epoch = args.out / f"{run}.ckpt", [], 0
    if args.resume:
        if not checkpoint_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, rows = checkpoint["epoch"], checkpoint["rows"]
        print(f"resumed {run} at epoch {start_epoch}")

    for epoch in range(start_epoch, args.epochs):
        started, losses = time.perf_counter(), []
        for images, labels in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            images = images.to(args.device, non_blocking=True).to(memory_format=torch.channels_last)
            labels = labels.to(args.device, non_blocking=True)
            with autocast():
                loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.detach())
        accuracy = evaluate(model, test_loader, args.device, autocast)
        rows.append(dict(epoch=epoch + 1, train_loss=float(torch.stack(losses).mean()) if losses else float("nan"),
                         test_accuracy=accuracy, seconds=time.perf_counter() - started))
        print(f"epoch {epoch + 1:3d}  train loss {rows[-1]['train_loss']:.4f}  "
              f"test accuracy {accuracy:.4f}  {rows[-1]['seconds']:.0f} s")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch + 1, "rows": rows}, checkpoint_path)

    with open(args.out / f"{run}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "train_loss", "test_accuracy", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / f"{run}.png", run)
    print(f"wrote {args.out / run}.csv/.png and {checkpoint_path}")


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [r["epoch"] for r in rows]
    loss_axis.plot(epochs, [r["train_loss"] for r in rows])
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss")
    accuracy_axis.plot(epochs, [r["test_accuracy"] for r in rows])
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("test accuracy")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
