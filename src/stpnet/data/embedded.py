"""The CIFAR-10 subset shipped inside the package, for tests, demos and quick experiments.

``cifar10_subset.tar.gz`` (about 1.9 MB) is an ImageFolder tarball with the first 500 training and
the first 100 test images of each class of CIFAR-10 (JPEG q75), 5,000 + 1,000 in all; it is
rebuilt by ``scripts/make_cifar10_subset.py``. Numbers measured on it should be reported as
"CIFAR-10 (JPEG q75) subset".
"""

from __future__ import annotations

import dataclasses
from importlib import resources

from .cifar import load_cifar10
from .dataset import ImageDataset
from .errors import DataError

__all__ = ["load_embedded_cifar10", "EMBEDDED_CIFAR10"]

EMBEDDED_CIFAR10 = "cifar10_subset.tar.gz"


def load_embedded_cifar10(cache: bool = True) -> ImageDataset:
    """Load the embedded CIFAR-10 subset: 5,000 train and 1,000 test 3 x 32 x 32 images, 10 classes.

    Parameters
    ----------
    cache : bool
        Cache the decoded arrays (see :mod:`stpnet.data.cache`).

    Returns
    -------
    ImageDataset
        Named ``"cifar10-subset"``, classes in sorted order (which is the official CIFAR-10 order).

    Raises
    ------
    DataError
        If the package was installed without its data file.
    """
    resource = resources.files(__package__) / EMBEDDED_CIFAR10
    if not resource.is_file():
        raise DataError(
            f"the embedded subset {EMBEDDED_CIFAR10} is missing from the installed stpnet.data package; "
            "reinstall stpnet with its package data, or rebuild it with scripts/make_cifar10_subset.py"
        )
    with resources.as_file(resource) as path:
        data = load_cifar10(path, cache=cache)
    return dataclasses.replace(data, name="cifar10-subset")
