"""`exert-ds export --format compressed-tensors`: the expert in the sparse formats of the `compressed-tensors`
package (what llm-compressor writes and vLLM reads), written by that package's own compressors.

- `sparse-24-bitmask` when the run pruned N:M 2:4 (the manifest's promise: n = 2 zeros in every group of m = 4):
  per pruned weight `<module>.compressed` (rows, cols/2 kept values), `<module>.bitmask` (rows, ⌈cols/8⌉ uint8)
  and `<module>.shape`.
- `sparse-bitmask` otherwise (unstructured or another N:M): `<module>.compressed` (nnz values),
  `<module>.bitmask`, `<module>.row_offsets` (rows, int64) and `<module>.shape`.

Every other tensor (embeddings, norms, lm_head) stays dense under its Hugging Face name. config.json gets the
`quantization_config` that `ModelCompressor.update_config` writes (quant_method `compressed-tensors`, the
`sparsity_config` with format, targets ["Linear"], the dense 2-D weights' modules under ignore, measured
global_sparsity in percent of all parameters, as llm-compressor reports it, and sparsity_structure).

Streaming: the safetensors header is written before any byte, so every stored piece's shape must be known first.
They follow from the manifest's shapes and, for `sparse-bitmask`, from each tensor's non-zero count, read from the
headers of the expert's rank files (its kept values, `.low`, have one row per non-zero). `SafetensorsStream`
refuses any piece whose dtype or shape differs from that plan, so a change in the package's layout stops the
export instead of writing a wrong file. Host memory per tensor: the assembled tensor, plus what the compressor
allocates for it (a byte mask of its shape, the kept values, the packed bitmask); not measured at 7B yet.

Requires `pip install exert_ds[deploy]` (compressed-tensors 0.13.0, the newest release that still ships the sparse
compressors and installs next to transformers 5).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from exert_ds.errors import ConfigError
from exert_ds.storage.expert import rank_file, read_tensor

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"


def _require_package():
    try:
        import compressed_tensors
    except ImportError as err:
        raise ConfigError(
            "--format compressed-tensors needs the compressed-tensors package: pip install 'exert_ds[deploy]'"
        ) from err
    return compressed_tensors


def compression_format(promise: dict) -> str:
    """`sparse-24-bitmask` for an N:M 2:4 promise (2 zeros in every group of 4), else `sparse-bitmask`."""
    return BITMASK_24 if (promise["n"], promise["m"]) == (2, 4) else BITMASK


def sparsity_structure(promise: dict) -> str:
    """compressed-tensors' spelling: 'N:M' counts the kept values (M − zeros) of every group of M."""
    n, m = promise["n"], promise["m"]
    return f"{m - n}:{m}" if m else "unstructured"


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _nonzeros(expert: Path, name: str, manifest: dict) -> int:
    """Non-zeros of a sparse-stored tensor: the rows of its kept values (`.low`) in every rank file."""
    world, total = manifest["world_size"], 0
    for rank, (start, end) in enumerate(manifest["tensors"][name]["ranges"]):
        if start < end:
            with safe_open(expert / rank_file(rank, world), framework="pt") as fh:
                total += fh.get_slice(f"{name}.low").get_shape()[0]
    return total


class CompressedTensorsExport:
    """The plan (piece name → dtype, shape, in file order) and the stream of pieces for one expert.

    `expert`: a verified expert directory; `manifest`: its manifest. Raises ConfigError when compressed-tensors is
    not installed or a 2:4 tensor's width is not a multiple of 4."""

    def __init__(self, expert: Path, manifest: dict) -> None:
        _require_package()
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.config import SparsityCompressionConfig

        self.format = compression_format(manifest["promise"])
        self._sparse = {name for name, e in manifest["tensors"].items() if e["storage"] == "sparse"}
        ignore = [
            _module(name)
            for name, e in manifest["tensors"].items()
            if e["storage"] == "dense" and len(e["shape"]) == 2 and name.endswith(".weight")
        ]
        self.config = SparsityCompressionConfig.load_from_registry(
            self.format, targets=["Linear"], ignore=ignore, sparsity_structure=sparsity_structure(manifest["promise"])
        )
        self.compressor = BaseCompressor.load_from_registry(self.format, config=self.config)
        self.expert, self.manifest = expert, manifest
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._source: dict[str, str] = {}  # stored name → the expert tensor it comes from
        for name, entry in manifest["tensors"].items():
            dtype, shape = getattr(torch, entry["dtype"]), tuple(entry["shape"])
            pieces = self._piece_specs(expert, manifest, name, dtype, shape) if name in self._sparse else {}
            pieces = pieces or {name: (dtype, shape)}
            self.specs |= pieces
            self._source |= dict.fromkeys(pieces, name)
        self._held_name: str | None = None
        self._held: dict[str, Tensor] = {}
        self._counted: set[str] = set()
        self._zeros = self._numel = 0

    def _piece_specs(self, expert: Path, manifest: dict, name: str, dtype: torch.dtype, shape: tuple[int, ...]):
        rows, cols = shape
        module, mask = _module(name), (rows, -(-cols // 8))
        if self.format == BITMASK_24:
            if cols % 4:
                raise ConfigError(f"{name}: {cols} columns, not a multiple of 4; 2:4 storage needs one")
            return {
                f"{module}.shape": (torch.int64, (2, 1)),
                f"{module}.compressed": (dtype, (rows, cols // 2)),
                f"{module}.bitmask": (torch.uint8, mask),
            }
        return {
            f"{module}.shape": (torch.int64, (2,)),
            f"{module}.compressed": (dtype, (_nonzeros(expert, name, manifest),)),
            f"{module}.bitmask": (torch.uint8, mask),
            f"{module}.row_offsets": (torch.int64, (rows,)),
        }

    def pieces(self, names: list[str]) -> Iterator[tuple[str, Tensor]]:
        """(stored name, tensor) for the stored names `names` (one shard of the plan), in that order. Each source
        tensor is read from the expert (its promise checked) and its sparse weight goes through the package's
        `compress`; its pieces are kept until written, so a tensor whose pieces lie in one run is read once."""
        for piece in names:
            source = self._source[piece]
            if source != self._held_name:
                self._held_name, self._held = source, self._read(source)
            yield piece, self._held.pop(piece)

    def _read(self, name: str) -> dict[str, Tensor]:
        tensor = read_tensor(self.expert, self.manifest, name, True)
        if name not in self._counted:
            self._counted.add(name)
            self._zeros += int((tensor == 0).sum())
            self._numel += tensor.numel()
        if name not in self._sparse:
            return {name: tensor}
        return dict(self.compressor.compress({name: tensor}, compression_targets={_module(name)}))

    def update_config(self, out: Path) -> None:
        """Add the compression config to `out/config.json` (ModelCompressor's own writer), with the measured
        global sparsity (percent of all parameters that are zero) once every tensor has streamed."""
        from compressed_tensors.compressors import ModelCompressor

        self.config.global_sparsity = 100.0 * self._zeros / max(self._numel, 1)
        ModelCompressor(sparsity_config=self.config).update_config(str(out))
