"""Image data for class-incremental runs: labelled train/test splits, a class order, and the tasks cut from it.

Sources: Fashion-MNIST from Debian's `dataset-fashion-mnist` (offline, real), any image folder laid out as
`ROOT/{train,test}/<class>/<image>` (ImageNet-R after the authors' split, ImageNet-100, CUB-200, ...), CIFAR-100 in
its official `cifar-100-python` pickle form, and in-memory arrays (tests, notebooks). Images stay uint8 until an
encoder preprocesses them; a split's fingerprint identifies its exact content for the feature cache.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetNotFoundError, EmptyTaskError, UnknownClassError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


class ImageSplit:
    """Labelled images: uint8 arrays in memory (N×C×H×W) or image files decoded on demand."""

    def __init__(self, labels: torch.Tensor, *, pixels: torch.Tensor | None = None,
                 files: Sequence[Path] | None = None, fingerprint: str) -> None:
        if (pixels is None) == (files is None):
            raise ValueError("give exactly one of pixels and files")
        self.labels, self.pixels, self.files, self.fingerprint = labels.long(), pixels, files, fingerprint

    def __len__(self) -> int:
        return int(self.labels.numel())

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The images at `indices` as uint8 C×H×W tensors (sizes may differ for files)."""
        if self.pixels is not None:
            return list(self.pixels[list(indices)])
        from PIL import Image

        images = []
        for i in indices:
            with Image.open(self.files[i]) as image:
                rgb = np.asarray(image.convert("RGB"))
            images.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1))
        return images


@dataclass(frozen=True)
class ImageDataset:
    """A dataset with class names (indexed by label) and its two splits."""

    name: str
    class_names: list[str]
    train: ImageSplit
    test: ImageSplit


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def first_per_class(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """Indices of the first `per_class` images of each class in file order (all when None): deterministic, so a
    subset is the same on every machine and its features can be cached."""
    if per_class is None:
        return torch.arange(labels.numel())
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for c in labels.unique():
        keep[(labels == c).nonzero().flatten()[:per_class]] = True
    return keep.nonzero().flatten()


def array_dataset(name: str, class_names: Sequence[str], train: tuple[torch.Tensor, torch.Tensor],
                  test: tuple[torch.Tensor, torch.Tensor]) -> ImageDataset:
    """A dataset from uint8 images (N×C×H×W or N×H×W) and integer labels held in memory."""
    splits = []
    for which, (pixels, labels) in (("train", train), ("test", test)):
        pixels = pixels if pixels.dim() == 4 else pixels.unsqueeze(1)
        if pixels.dtype != torch.uint8:
            raise ValueError(f"{which} images must be uint8, got {pixels.dtype}")
        content = _digest(name, which, pixels.contiguous().numpy().tobytes(), labels.long().numpy().tobytes())
        splits.append(ImageSplit(labels, pixels=pixels, fingerprint=content))
    return ImageDataset(name, list(class_names), splits[0], splits[1])


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def fashion_mnist(root: str | Path | None = None, *, train_per_class: int | None = None,
                  test_per_class: int | None = None) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017, MIT) from Debian's `dataset-fashion-mnist`: 28×28 greyscale, 10 classes.

    Raises:
        DatasetNotFoundError: if the IDX files are missing.
    """
    folder = Path(root) if root is not None else FASHION_MNIST_ROOT
    splits = {}
    for which, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        images_file, labels_file = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
        if not (images_file.is_file() and labels_file.is_file()):
            raise DatasetNotFoundError(
                f"Fashion-MNIST not found in {folder} (no {images_file.name}); install it with "
                "`apt-get install dataset-fashion-mnist` or set data.root to the folder holding the IDX files."
            )
        pixels = torch.from_numpy(_read_idx(images_file, 16).reshape(-1, 1, 28, 28).copy())
        labels = torch.from_numpy(_read_idx(labels_file, 8).astype(np.int64))
        chosen = first_per_class(labels, per_class)
        splits[which] = (pixels[chosen], labels[chosen])
    return array_dataset(f"fashion-mnist[{train_per_class},{test_per_class}]", FASHION_MNIST_CLASSES,
                         splits["train"], splits["test"])


def image_folder(root: str | Path, *, train_per_class: int | None = None, test_per_class: int | None = None,
                 class_names: dict[str, str] | None = None, split_file: str | Path | None = None) -> ImageDataset:
    """Images in class folders: `root/train/<class>/*` and `root/test/<class>/*` (ImageNet-100, CUB-200, ...), or
    `root/<class>/*` with a `split_file` that lists the train and test images (ImageNet-R with the authors'
    `imgr_split/imgr_train_test_split.txt`: a line `train`, paths `<class>/<image>` relative to root, a line
    `test`, paths). Class folders are sorted by name; images keep their order (sorted names, or the split file's).

    `class_names` maps folder names to the names used in prompts (e.g. WordNet ids to words); folders it does not
    name keep their folder name, with underscores, as RAPF keeps them.

    Raises:
        DatasetNotFoundError: a missing folder, split file or listed image, or no class folder.
    """
    root = Path(root)
    if split_file is not None:
        listed = _read_split_file(Path(split_file))
        folders = sorted({rel.split("/", 1)[0] for paths in listed.values() for rel in paths})
        by_class = {which: {f: [root / rel for rel in paths if rel.split("/", 1)[0] == f] for f in folders}
                    for which, paths in listed.items()}
    else:
        train_root = root / "train"
        folders = sorted(p.name for p in train_root.iterdir() if p.is_dir()) if train_root.is_dir() else []
        if not folders or not (root / "test").is_dir():
            raise DatasetNotFoundError(
                f"no image folder at {root}: expected {root}/train/<class>/<image> and {root}/test/<class>/<image>, "
                "or root/<class>/<image> with data.split_file."
            )
        by_class = {which: {f: sorted(p for p in (root / which / f).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                            for f in folders} for which in ("train", "test")}
    splits = {}
    for which, per_class in (("train", train_per_class), ("test", test_per_class)):
        files, labels = [], []
        for label, folder in enumerate(folders):
            chosen = by_class[which][folder][:per_class] if per_class is not None else by_class[which][folder]
            files += chosen
            labels += [label] * len(chosen)
        missing = next((p for p in files if not p.is_file()), None)
        if missing is not None:
            raise DatasetNotFoundError(f"image {missing} is listed but missing; check data.root and data.split_file.")
        stamp = _digest(str(root.resolve()), which,
                        *[f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files])
        splits[which] = ImageSplit(torch.tensor(labels, dtype=torch.long), files=files, fingerprint=stamp)
    names = [(class_names or {}).get(folder, folder) for folder in folders]
    return ImageDataset(f"image-folder:{root}", names, splits["train"], splits["test"])


def _read_split_file(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"split file {path} not found; set data.split_file to the list of train and test images."
        )
    sections: dict[str, list[str]] = {"train": [], "test": []}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if entry in sections:
            current = entry
        elif entry:
            if current is None:
                raise DatasetNotFoundError(f"{path}: the first line must be 'train' or 'test', then image paths.")
            sections[current].append(entry)
    return sections


def cifar100(root: str | Path, *, train_per_class: int | None = None,
             test_per_class: int | None = None) -> ImageDataset:
    """CIFAR-100 from the official `cifar-100-python` folder (files `train`, `test`, `meta`), fine labels.

    These are the files torchvision downloads; they are Python pickles, so load only the official archive.

    Raises:
        DatasetNotFoundError: if the folder or one of its files is missing.
    """
    folder = Path(root)
    folder = folder / "cifar-100-python" if (folder / "cifar-100-python").is_dir() else folder
    if not all((folder / f).is_file() for f in ("train", "test", "meta")):
        raise DatasetNotFoundError(
            f"CIFAR-100 not found in {folder}: expected the official cifar-100-python folder (train, test, meta)."
        )
    names = _read_cifar_pickle(folder / "meta")["fine_label_names"]
    splits = {}
    for which, per_class in (("train", train_per_class), ("test", test_per_class)):
        batch = _read_cifar_pickle(folder / which)
        pixels = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
        labels = torch.tensor(batch["fine_labels"])
        chosen = first_per_class(labels, per_class)
        splits[which] = (pixels[chosen], labels[chosen])
    return array_dataset(f"cifar100[{train_per_class},{test_per_class}]", names, splits["train"], splits["test"])


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle that names any other callable (os.system, …) is
    refused instead of run, so a hostile dataset folder cannot execute code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-100 file")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            content = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError) as err:
        raise DatasetNotFoundError(
            f"{path} is not an official CIFAR-100 pickle ({err}); re-download cifar-100-python."
        ) from None
    if not isinstance(content, dict):
        raise DatasetNotFoundError(f"{path} is not an official CIFAR-100 pickle; re-download cifar-100-python.")
    return content


@dataclass(frozen=True)
class TaskSplit:
    """The class order and the tasks: `order[i]` is the dataset label shown as class i; task t holds positions
    `tasks[t]`. Every label inside the trainer is a position in `order`, so logits over seen classes are a prefix."""

    order: list[int]
    tasks: list[list[int]]

    def position_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Dataset labels → positions in the class order (−1 for classes outside it)."""
        largest = max(max(self.order), int(labels.max()) if labels.numel() else 0)
        lookup = torch.full((largest + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(self.order)] = torch.arange(len(self.order))
        return lookup[labels]


def split_tasks(dataset: ImageDataset, *, initial: int, increment: int,
                class_order: Sequence[int | str] | int | None = None) -> TaskSplit:
    """Cut the dataset's classes into a first task of `initial` classes, then tasks of `increment` classes.

    `class_order` is a list of class names or labels, a seed (a random permutation), or None (label order).

    Raises:
        UnknownClassError: a name or label the dataset does not have.
        EmptyTaskError: a task without classes, a repeated class, or a class without images in a split.
    """
    names = dataset.class_names
    if class_order is None:
        order = list(range(len(names)))
    elif isinstance(class_order, int) and not isinstance(class_order, bool):
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(class_order)).tolist()
    else:
        order = []
        for entry in class_order:
            if isinstance(entry, str):
                if entry not in names:
                    raise UnknownClassError(entry, names)
                order.append(names.index(entry))
            elif isinstance(entry, int) and 0 <= entry < len(names):
                order.append(entry)
            else:
                raise UnknownClassError(entry, names)
    if len(set(order)) != len(order):
        repeats = len(order) - len(set(order))
        raise EmptyTaskError(f"class_order repeats a class ({repeats} duplicates); list each class once.")
    if initial < 1 or increment < 1:
        raise EmptyTaskError(f"initial ({initial}) and increment ({increment}) must be at least 1 class per task.")
    if initial > len(order):
        raise EmptyTaskError(f"the first task asks for {initial} classes but the class order has {len(order)}.")
    tasks = [list(range(initial))]
    while tasks[-1][-1] + 1 < len(order):
        start = tasks[-1][-1] + 1
        tasks.append(list(range(start, min(start + increment, len(order)))))
    for which, split in (("train", dataset.train), ("test", dataset.test)):
        present = set(split.labels.unique().tolist())
        missing = [names[label] for label in order if label not in present]
        if missing:
            raise EmptyTaskError(f"class {missing[0]!r} has no {which} images; check the data or leave it out of "
                                 "class_order.")
    return TaskSplit(order=order, tasks=tasks)
