"""Weights one block at a time: a model skeleton without weights, a checkpoint reader, a writer.

The block-streamed engine (`cfsp.engine.streamed`) never materialises the whole model. It
builds the model on the meta device (`accelerate.init_empty_weights`: parameters on meta,
buffers such as rotary tables real, since they are computed, not loaded), then for each block
loads only that block's tensors from the checkpoint directory (sharded with
`model.safetensors.index.json`, or any set of `*.safetensors` files) onto the device, and puts
them back on meta after use.

The writer writes one shard per block (plus one for the tensors outside the blocks) and the
index at the end, the layout `from_pretrained` and `cfsp.load_pruned` read.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from cfsp.devices import resolve_device  # noqa: F401  (re-exported: one resolver)
from cfsp.errors import CfspError
from cfsp.io import read_json, save_safetensors

INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Where each tensor of a safetensors checkpoint directory lives, and reading a few of them.

    With an index file, its weight map names the shard of every tensor; without one, every
    `*.safetensors` file's header is read (headers only). A name in two files is refused.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files: dict[str, Path] = {}
        self._spans: dict[Path, dict[str, tuple[int, int]]] = {}  # prefetch: byte ranges
        index = self.directory / INDEX
        if index.is_file():
            weight_map = read_json(index, expect=dict).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CfspError(f"{index} has no weight_map")
            for name, file in weight_map.items():
                self.files[name] = self._shard(str(file))
        else:
            for path in sorted(self.directory.glob("*.safetensors")):
                with safe_open(str(path), "pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                        if name in self.files:
                            raise CfspError(
                                f"tensor {name} is in both {self.files[name]} and {path}"
                            )
                        self.files[name] = path

    def _shard(self, file: str) -> Path:
        path = self.directory / file
        if "/" in file or "\\" in file or not path.is_file():
            raise CfspError(f"{self.directory / INDEX} names a shard {file!r} that is not there")
        return path

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the headers."""
        shapes = {}
        for path, names in self._by_file(list(self.files)).items():
            with safe_open(str(path), "pt") as handle:
                for name in names:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes

    def _by_file(self, names: list[str]) -> dict[Path, list[str]]:
        grouped: dict[Path, list[str]] = {}
        for name in names:
            grouped.setdefault(self.files[name], []).append(name)
        return grouped

    def read(self, names: list[str], device: torch.device, dtype: torch.dtype) -> dict:
        """{name: tensor} on `device` in `dtype` (floating tensors only are converted)."""
        out = {}
        for path, group in self._by_file(names).items():
            with safe_open(str(path), "pt", device=str(device)) as handle:
                for name in group:
                    tensor = handle.get_tensor(name)
                    out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return out

    def prefetch(self, names: list[str]) -> None:
        """Ask the kernel to start reading these tensors' bytes into the page cache now
        (POSIX_FADV_WILLNEED: returns at once, the disk works while the current block
        computes), so that the `read` of the next block finds them in memory. Only a hint:
        where the platform has no posix_fadvise nothing happens, and `read` is unchanged."""
        for path, group in self._by_file(names).items():
            if path not in self._spans:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    self._spans[path] = tensor_spans(path)
            spans = self._spans.get(path, {})
            _will_need(path, [spans[name] for name in group if name in spans])


def checkpoint_names(module: nn.Module, prefix: str) -> list[str]:
    """The checkpoint names of `module`'s parameters (what `load_into` reads)."""
    return [prefix + name for name, _ in module.named_parameters()]


def tensor_spans(path: Path) -> dict[str, tuple[int, int]]:
    """{tensor name: (byte offset in the file, byte length)} from a safetensors header (an
    8-byte little-endian header size, the JSON header, then the data its offsets point into)."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    start = 8 + size
    return {
        name: (start + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
        for name, info in header.items()
        if name != "__metadata__"
    }


def prefetch_file(path: Path) -> None:
    """POSIX_FADV_WILLNEED on a whole file (see CheckpointReader.prefetch); a hint only."""
    _will_need(path, [(0, 0)])  # length 0: to the end of the file


def _will_need(path: Path, spans: list[tuple[int, int]]) -> None:
    """POSIX_FADV_WILLNEED on these (offset, length) spans of `path`; nothing where the
    platform lacks posix_fadvise or the file cannot be opened (a hint, never an error)."""
    if not spans or not hasattr(os, "posix_fadvise"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, length in spans:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The model with parameters on the meta device and real buffers (rotary tables, scales)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from cfsp.models import _LOAD_LOCK  # init_empty_weights patches nn.Module process-wide

    with _LOAD_LOCK, init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied LM head is the embedding (not a tensor of its own on meta)
    return model.eval()


def buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the (real) buffers to `device`; parameters stay where they are (on meta)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)


def module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def load_into(module: nn.Module, prefix: str, reader: CheckpointReader, device, dtype) -> None:
    """Give `module`'s parameters the checkpoint's tensors `prefix + name` (on `device`)."""
    tensors = reader.read(checkpoint_names(module, prefix), device, dtype)
    # Straight into `_parameters`, as `release` does: `setattr` / load_state_dict(assign=True)
    # go through nn.Module.register_parameter, which accelerate's init_empty_weights patches
    # process-wide while another thread builds a skeleton (the tensor would land on meta).
    for name, tensor in tensors.items():
        owner, _, leaf = name[len(prefix) :].rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        sub._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def release(module: nn.Module) -> None:
    """Put every parameter of `module` back on the meta device (its memory is freed)."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = nn.Parameter(
                    torch.empty_like(p, device="meta"), requires_grad=False
                )


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Write a checkpoint shard by shard (`shard_name`), then the index of all of them. Writing
    a shard again replaces it, in the index too (names it no longer holds are dropped)."""

    def __init__(self, directory: Path, total: int):
        self.directory, self.total = Path(directory), total
        self.shards: dict[str, dict[str, int]] = {}  # shard -> {tensor name: bytes}

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        name = shard_name(index, self.total)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_safetensors(cpu, str(self.directory / name), metadata={"format": "pt"})
        self.shards[name] = {k: v.numel() * v.element_size() for k, v in cpu.items()}

    def finish(self) -> None:
        weight_map = {k: shard for shard, sizes in self.shards.items() for k in sizes}
        index = {
            "metadata": {"total_size": sum(sum(s.values()) for s in self.shards.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def consolidate(directory: Path, limit: int) -> bool:
    """Merge the shards of a checkpoint written by ShardWriter into one `model.safetensors`
    (and drop the index) when their total is at most `limit` bytes: the layout the in-memory
    engine's save_checkpoint writes for a checkpoint that fits one shard. Holds at most `limit`
    bytes of tensors; returns whether it merged."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = read_json(directory / INDEX, expect=dict)
    if index["metadata"]["total_size"] > limit:
        return False
    shards = sorted(set(index["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(directory / shard)))
    save_safetensors(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    for shard in shards:
        (directory / shard).unlink()
    (directory / INDEX).unlink()
    return True
