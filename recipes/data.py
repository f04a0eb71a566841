"""Datasets without downloads: the embedded digits task, CIFAR from a local folder, ImageFolder.

`load_data("digits" | "cifar10:PATH" | "cifar100:PATH" | "imagefolder:PATH", image_size)`
gives a `DataSplits`; an ImageFolder tree may be Tiny ImageNet's, with its annotated val/.
Augmentation is seeded by (seed, epoch, sample index), so an epoch's batches are the same
however it is split over ranks, workers or a resume.

The embedded default is built from scikit-learn's 8x8 digits (1,797 images, shipped with
the package): each digit is rendered at 32x32 RGB in four visual contexts that the model is
not told about (plain, inverted, rotated by 90 degrees, coloured on a striped background),
after a fixed 80/20 split of the digits, so no digit is seen in training under another
context. Ten classes, 5,752 training and 1,436 test images: small enough for a laptop, and
a task where routing by context has something to find.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets.folder import default_loader
from torchvision.transforms import v2

from rmn_fx.errors import RMNError

CONTEXTS = ("plain", "inverted", "rotated", "coloured")
DIGITS_SPLIT_SEED = 0


class DataError(RMNError):
    """A dataset cannot be read or does not fit the run."""


@dataclass
class DataSplits:
    """Train and test sets of one task, with what the run needs to know about them."""

    name: str
    train: Dataset
    test: Dataset
    classes: list[str]
    image_size: int
    test_contexts: torch.Tensor | None = None  # context index of each test sample (digits)
    context_names: tuple[str, ...] = field(default_factory=tuple)


class ImageTensors(Dataset):
    """Images held in memory as uint8 [N, 3, H, W], with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class Augmented(Dataset):
    """`base` with `transform` applied under a seed fixed by (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform, seed: int = 0) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            return self.transform(image), label


def load_data(spec: str, image_size: int | None = None, seed: int = 0) -> DataSplits:
    """Parse a --data value and load the splits (nothing is downloaded); the training
    split's augmentation draws from `seed` (the run's --seed)."""
    splits = _load_splits(spec, image_size)
    return replace(splits, train=Augmented(splits.train.base, splits.train.transform, seed))


def _load_splits(spec: str, image_size: int | None) -> DataSplits:
    kind, _, path = spec.partition(":")
    kind = kind.lower()
    if kind == "digits":
        if path:
            raise DataError("the digits data is embedded; write --data digits without a path")
        return digits(image_size or 32)
    if kind in ("cifar10", "cifar100"):
        return cifar(kind, _existing_dir(path, spec), image_size or 32)
    if kind == "imagefolder":
        return image_folder(_existing_dir(path, spec), image_size or 224)
    raise DataError(f"unknown data '{spec}'; use digits, cifar10:PATH, cifar100:PATH or imagefolder:PATH")


def _existing_dir(path: str, spec: str) -> str:
    if not path:
        raise DataError(f"--data {spec} needs a folder, e.g. {spec.rstrip(':')}:/data/folder")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise DataError(f"data folder '{path}' does not exist or is not a folder")
    return path


def _pipeline(image_size: int, mean, std, train: bool, crop_padding: int, flip: bool, native: int):
    steps = [v2.ToImage()]
    if image_size != native:
        steps.append(v2.Resize(image_size, antialias=True))
    if train:
        steps.append(v2.RandomCrop(image_size, padding=crop_padding))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def _in_memory(name, train, test, classes, image_size, flip, padding, test_contexts=None, context_names=()):
    native = train.images.shape[-1]
    scaled = train.images.float() / 255
    mean, std = scaled.mean((0, 2, 3)).tolist(), scaled.std((0, 2, 3)).tolist()
    return DataSplits(
        name,
        Augmented(train, _pipeline(image_size, mean, std, True, padding, flip, native)),
        Augmented(test, _pipeline(image_size, mean, std, False, padding, flip, native)),
        classes,
        image_size,
        test_contexts,
        context_names,
    )


def digits(image_size: int = 32) -> DataSplits:
    """The embedded task (see the module docstring)."""
    images, labels, contexts = render_digits()
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    test_digits = []
    base_labels = labels[: len(labels) // len(CONTEXTS)]
    for c in range(10):  # a stratified 20% of the digits, in every context
        members = (base_labels == c).nonzero().flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[: round(0.2 * len(members))]]
        test_digits.append(chosen)
    is_test = torch.zeros(len(base_labels), dtype=torch.bool)
    is_test[torch.cat(test_digits)] = True
    is_test = is_test.repeat(len(CONTEXTS))
    train = ImageTensors(images[~is_test], labels[~is_test])
    test = ImageTensors(images[is_test], labels[is_test])
    classes = [str(c) for c in range(10)]
    return _in_memory("digits", train, test, classes, image_size, False, 2, contexts[is_test], CONTEXTS)


def render_digits(seed: int = DIGITS_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All 1,797 digits in each context: uint8 images [4*1797, 3, 32, 32], labels, contexts."""
    from sklearn.datasets import load_digits

    data = load_digits()
    ink = torch.from_numpy(data.images).float().div(16).unsqueeze(1)  # [n, 1, 8, 8] in 0..1
    labels = torch.from_numpy(data.target).long()
    n = len(labels)
    generator = torch.Generator().manual_seed(seed)
    glyph = F.interpolate(ink, size=24, mode="bilinear", align_corners=False).clamp(0, 1)
    canvas = torch.zeros(n, 1, 32, 32)
    offsets = torch.randint(0, 9, (n, 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        canvas[i, :, dy : dy + 24, dx : dx + 24] = glyph[i]
    grey = canvas.expand(n, 3, 32, 32)
    plain = grey
    inverted = 0.95 - 0.8 * grey
    rotated = torch.rot90(grey, 1, dims=(2, 3))
    colour = torch.rand(n, 3, 1, 1, generator=generator) * 0.6 + 0.4
    phase = torch.rand(n, 1, 1, 1, generator=generator) * 2 * math.pi
    angle = torch.rand(n, 1, 1, 1, generator=generator) * math.pi
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    stripes = 0.5 + 0.5 * torch.sin((xx * torch.cos(angle) + yy * torch.sin(angle)) * 0.9 + phase)
    background = stripes * torch.rand(n, 3, 1, 1, generator=generator) * 0.5
    coloured = background * (1 - grey) + colour * grey
    images = torch.cat([plain, inverted, rotated, coloured]).clamp(0, 1).mul(255).round().to(torch.uint8)
    contexts = torch.arange(len(CONTEXTS)).repeat_interleave(n)
    return images.contiguous(), labels.repeat(len(CONTEXTS)), contexts


def cifar(kind: str, path: str, image_size: int = 32) -> DataSplits:
    """CIFAR-10/100 in torchvision's format: PATH is the extracted folder or its parent."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, folder = (CIFAR10, "cifar-10-batches-py") if kind == "cifar10" else (CIFAR100, "cifar-100-python")
    root = os.path.dirname(os.path.abspath(path)) if os.path.basename(os.path.normpath(path)) == folder else path
    if not os.path.isdir(os.path.join(root, folder)):
        raise DataError(f"no '{folder}' folder in '{root}'; give the folder extracted from the {kind} python archive")
    try:
        splits = [cls(root, train=t, download=False) for t in (True, False)]
    except Exception as exc:  # torchvision raises RuntimeError on missing files, pickle errors on damage
        raise DataError(f"cannot read {kind} from '{root}/{folder}' ({str(exc).splitlines()[0]}); re-extract the archive") from exc
    train, test = (ImageTensors(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in splits)
    return _in_memory(kind, train, test, list(splits[0].classes), image_size, True, 4)


def image_folder(path: str, image_size: int = 224) -> DataSplits:
    """PATH/train/<class>/... and PATH/val/<class>/... (or test/): ImageNet's layout.

    Tiny ImageNet's val/ (val/images/* listed with their class in val/val_annotations.txt)
    is read too. Sub-folders inside a class folder are searched, as ImageFolder does.
    """
    from torchvision.datasets import ImageFolder

    test_dir = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
    train_dir = os.path.join(path, "train")
    if not os.path.isdir(train_dir) or test_dir is None:
        raise DataError(f"'{path}' needs train/ and val/ (or test/) folders with one sub-folder per class")
    try:
        train = ImageFolder(train_dir)
        annotations = os.path.join(test_dir, "val_annotations.txt")
        test = annotated_images(test_dir, annotations, train.class_to_idx) if os.path.isfile(annotations) else ImageFolder(test_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read images under '{path}' ({str(exc).splitlines()[0]})") from exc
    if train.classes != test.classes:
        raise DataError(f"'{train_dir}' and '{test_dir}' hold different classes; give both the same class folders")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's recipes
    train_tf = v2.Compose(
        [v2.ToImage(), v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )
    test_tf = v2.Compose(
        [v2.ToImage(), v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )
    return DataSplits("imagefolder", Augmented(train, train_tf), Augmented(test, test_tf), list(train.classes), image_size)


def annotated_images(folder: str, annotations: str, class_to_idx: dict[str, int]) -> ListedImages:
    """Tiny ImageNet's val/: images/NAME for each `NAME<TAB>CLASS<TAB>...` line of `annotations`."""
    samples = []
    with open(annotations) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or fields[1] not in class_to_idx:
                raise DataError(f"{annotations}, line {number}: expected 'FILE<TAB>CLASS' with a class of train/, got '{line.strip()[:60]}'")
            image = os.path.join(folder, "images", fields[0])
            if not os.path.isfile(image):
                raise DataError(f"{annotations}, line {number}: '{image}' does not exist")
            samples.append((image, class_to_idx[fields[1]]))
    if not samples:
        raise DataError(f"{annotations} lists no images")
    return ListedImages(samples, sorted(class_to_idx, key=class_to_idx.get))


class ListedImages(Dataset):
    """Image files with their class index, read with ImageFolder's loader (PIL, RGB)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.samples, self.classes = samples, classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return default_loader(path), label
