"""Where a build's arithmetic runs (`--device`), and each worker's way there.

Without `--device` (or `auto` where torch sees no GPU) a build runs on the
CPU as it always has: workers compute on the inputs' memory maps. With a
device, even `cpu`, a build takes the device path: each worker copies its
key's operands through a host buffer of its own (pinned memory on CUDA) to
the device on a stream of its own, runs the methods there, and copies each
result back through another buffer to be hashed and written. Device memory
holds, per worker, one key's operands (or a row range of them), its
intermediate values and result, and the buffers; `--device-memory` caps the
sum over the workers (a key larger than the cap alone runs alone).

Methods run on the device where the registry says they can (see
`MergeMethod.device`); the others, and any node that adds a LoRA's factors,
run on the CPU with their operands copied back, so they give the CPU's bytes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdrecipe.engine.options import check_device
from sdrecipe.errors import RecipeError
from sdrecipe.methods.registry import CPU

if TYPE_CHECKING:
    import torch

CUDA_INSTALL = (
    "install a CUDA build of torch in this environment first, e.g. "
    "`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128` "
    "(the CUDA version your driver supports: https://pytorch.org/get-started/locally/)"
)


@dataclass(frozen=True)
class Placement:
    """A build on `device`, its buffers and values within `memory` bytes
    (None: no cap)."""

    device: torch.device
    memory: int | None = None

    @property
    def device_class(self) -> str:
        """`cpu`, `cuda` or `mps`: what the bytes of device-dependent methods follow."""
        return self.device.type

    def describe(self) -> str:
        """The device in words, e.g. `cuda:0 (NVIDIA H100 80GB HBM3)`."""
        import torch

        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return "the CPU, by the device path" if self.device.type == "cpu" else str(self.device)


def device_class(placement: Placement | None) -> str:
    """The device class a build computes on (the direct CPU path's is `cpu`)."""
    return CPU if placement is None else placement.device_class


def named_class(spec: str | None) -> str:
    """The device class `--device spec` names, whether or not this machine has
    the device (`auto`: the class it picks here); for what only files entries
    by class, as `cache pull` and `push` do."""
    if spec is None or spec == "auto":
        return device_class(place(spec))
    check_device(spec)
    return spec.partition(":")[0]


def place(spec: str | None, memory: int | None = None) -> Placement | None:
    """The placement `--device spec` asks for; None for the direct CPU path
    (no `--device`, or `auto` where torch sees no GPU). A device this torch
    cannot use is a RecipeError (exit 2) that says why."""
    if spec is None:
        return None
    import torch

    check_device(spec)
    # A CUDA device without an index is the first visible one (current_device() in
    # a fresh process), named without initialising CUDA in this process: `serve`
    # and `status` ask for placements and compute nothing.
    if spec == "auto":
        if torch.cuda.is_available():
            return Placement(torch.device("cuda", 0), memory)
        if torch.backends.mps.is_available():
            return Placement(torch.device("mps"), memory)
        return None
    try:
        device = torch.device(spec)
    except RuntimeError as exc:  # an index past what torch parses
        raise RecipeError(f"--device {spec}: {exc}") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise RecipeError(
                f"--device {spec}: this torch ({torch.__version__}) was built for the CPU "
                f"only; {CUDA_INSTALL}"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RecipeError(
                f"--device {spec}: torch {torch.__version__} sees no CUDA device (is the "
                "driver loaded? is CUDA_VISIBLE_DEVICES empty?)"
            )
        index = device.index if device.index is not None else 0
        if index >= count:
            raise RecipeError(
                f"--device {spec}: there are {count} CUDA devices here (cuda:0 to cuda:{count - 1})"
            )
        device = torch.device("cuda", index)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(
            f"--device {spec}: torch sees no Metal (MPS) device; it needs Apple silicon "
            "and macOS 12.3 or later"
        )
    return Placement(device, memory)


class DeviceMemory:
    """The device bytes that running keys hold, within the placement's cap: a
    key waits until its share fits, and one larger than the cap waits until
    it is alone."""

    def __init__(self, cap: int | None):
        self.cap = cap
        self.held = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def holding(self, size: int) -> Iterator[None]:
        if self.cap is None:
            yield
            return
        with self._changed:
            self._changed.wait_for(lambda: self.held == 0 or self.held + size <= self.cap)  # type: ignore[operator]
            self.held += size
        try:
            yield
        finally:
            with self._changed:
                self.held -= size
                self._changed.notify_all()


class Lane:
    """One worker's way to the device: its stream (CUDA), host buffers by
    slot (pinned on CUDA) and the copies through them.

    An upload through a slot first waits for the last copy out of that slot's
    buffer (an event on the stream); a download returns the host buffer,
    valid until the next download."""

    def __init__(self, placement: Placement):
        import torch

        self.device = placement.device
        cuda = self.device.type == "cuda"
        self.pinned = cuda
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self._buffers: dict[str, torch.Tensor] = {}
        self._copied: dict[str, torch.cuda.Event] = {}  # each slot's last copy to the device

    def running(self) -> contextlib.AbstractContextManager[object]:
        """The context in which this lane's device work is queued (its stream)."""
        import torch

        if self.stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.stream)

    def upload(self, tensor: torch.Tensor, slot: str) -> torch.Tensor:
        """A copy of CPU `tensor` on the device, through slot `slot`'s host buffer."""
        import torch

        copied = self._copied.get(slot)
        if copied is not None:
            copied.synchronize()  # the buffer's last copy has left it
        staged = self._host(slot, tensor)
        staged.copy_(tensor)
        with self.running():
            placed = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
            placed.copy_(staged, non_blocking=self.pinned)
            if self.stream is not None:
                self._copied[slot] = torch.cuda.Event()
                self._copied[slot].record(self.stream)
        return placed

    def download(self, tensor: torch.Tensor) -> torch.Tensor:
        """Device `tensor` in this lane's host buffer for results (valid until the
        next download)."""
        staged = self._host("result", tensor)
        with self.running():
            staged.copy_(tensor, non_blocking=self.pinned)
        if self.stream is not None:
            self.stream.synchronize()
        return staged

    def _host(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        """Slot `slot`'s host buffer as a tensor like `like` (grown as needed)."""
        import torch

        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < like.nbytes:
            buffer = torch.empty(max(like.nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned)
            self._buffers[slot] = buffer
        return buffer[: like.nbytes].view(like.dtype).view(like.shape)
