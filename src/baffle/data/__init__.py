"""Data sets (digits, MNIST, CIFAR-10/100) as in-memory tensors, and client partitioners."""

from baffle.data.cifar import CIFAR10, CIFAR100, CifarSpec, load_cifar, random_crop_flip
from baffle.data.dataset import ArrayDataset, Augment, DataBundle
from baffle.data.partition import PARTITIONERS, Partition, available_partitioners, partition
from baffle.data.registry import DATASETS, Loader, available_datasets, load_dataset

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "DATASETS",
    "PARTITIONERS",
    "ArrayDataset",
    "Augment",
    "CifarSpec",
    "DataBundle",
    "Loader",
    "Partition",
    "available_datasets",
    "available_partitioners",
    "load_cifar",
    "load_dataset",
    "partition",
    "random_crop_flip",
]
