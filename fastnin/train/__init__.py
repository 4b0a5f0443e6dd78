"""fastnin.train: train and evaluate the models of fastnin.models (`python -m fastnin.train`, `fastnin-train`).

    python -m fastnin.train --model nin_cifar10 --epochs 10          # the embedded digits, offline
    python -m fastnin.train --model nin --data ~/fmnist --dataset fashion-mnist --batch-size 128
    torchrun --nproc_per_node 2 -m fastnin.train --model lenet --device cpu

loop.py holds the command and the training loop, data.py the datasets, dist.py the torchrun / DDP
plumbing (and the batch-size convention: --batch-size is the global batch).
"""

from .data import DATASETS, load_dataset, read_cifar10_batch, read_idx
from .loop import build_parser, load_checkpoint, main, parse_args, run, train

__all__ = ["DATASETS", "build_parser", "load_checkpoint", "load_dataset", "main", "parse_args", "read_cifar10_batch",
           "read_idx", "run", "train"]
