"""The :class:`Dataset` type every loader returns, and :class:`DatasetError`.

A dataset is flat float32 features in ``[0, 1]`` and int64 class labels,
already split into a training and a test part; the constructor checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "DatasetError"]


class DatasetError(ValueError):
    """A data file or dataset argument is missing, malformed or inconsistent.

    The message names the file or field and what was wrong with it.
    """


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """A classification dataset split into a training and a test part.

    Construct it with keywords only (four arrays of the same kind are easy to swap).
    Arrays that are not C-contiguous are copied into C order.

    Attributes:
        x_train: ``[n_train, features]`` float32, every value in ``[0, 1]`` (stored C-contiguous).
        y_train: ``[n_train]`` int64 class labels in ``[0, num_classes)``.
        x_test: ``[n_test, features]`` float32, every value in ``[0, 1]``.
        y_test: ``[n_test]`` int64 class labels in ``[0, num_classes)``.
        name: short human-readable name, e.g. ``"digits"``.
        num_classes: number of classes (output units of a classifier).

    Raises:
        DatasetError: on construction, if a field has the wrong dtype, rank
            or length, a feature is outside ``[0, 1]`` or not finite, or a
            label is outside ``[0, num_classes)``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        for field in ("x_train", "y_train", "x_test", "y_test"):
            value = getattr(self, field)
            if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
                object.__setattr__(self, field, np.ascontiguousarray(value))
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise DatasetError(f"{self.name}: num_classes must be a positive int, got {self.num_classes!r}")
        for part in ("train", "test"):
            x = getattr(self, f"x_{part}")
            y = getattr(self, f"y_{part}")
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
                raise DatasetError(
                    f"{self.name}: x_{part} must be a 2-D float32 array [n, features], "
                    f"got {_describe(x)}"
                )
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
                raise DatasetError(
                    f"{self.name}: y_{part} must be a 1-D int64 array [n], got {_describe(y)}"
                )
            if x.shape[0] != y.shape[0]:
                raise DatasetError(
                    f"{self.name}: x_{part} has {x.shape[0]} rows but y_{part} has {y.shape[0]} labels"
                )
            if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
                raise DatasetError(f"{self.name}: x_{part} values must be finite and in [0, 1]")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise DatasetError(
                    f"{self.name}: y_{part} labels must be in [0, {self.num_classes}), "
                    f"got range [{y.min()}, {y.max()}]"
                )
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise DatasetError(
                f"{self.name}: x_train has {self.x_train.shape[1]} features but x_test has {self.x_test.shape[1]}"
            )

    @property
    def features(self) -> int:
        """Number of input features (columns of ``x_train``)."""
        return int(self.x_train.shape[1])


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {list(a.shape)}"
    return type(a).__name__
