"""The ONNX export folder's format: what `onnx_export.py` writes and `onnx_backend.py` reads.

    prefix.onnx   prefix_ids (1, P)                              -> prefix_k, prefix_v (layers, P, Hkv, D)
    items.onnx    item_ids (N, L) right-padded, item_lengths (N,),
                  prefix_k, prefix_v (one copy, not per item)    -> probs (N, K), scores (N,)

beside the tokenizer and darl.json, whose "onnx" section records the format version, the graphs'
inputs and outputs and each file's sha256. Loading validates that section and every checksum and
names the file at fault. Small on purpose: reading an export needs neither torch.onnx nor the
exporter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import SPEC_FILE, CheckpointError, read_spec

ONNX_SECTION = "onnx"  # the darl.json key that makes a checkpoint directory an export
ONNX_FORMAT_VERSION = 1
PREFIX_GRAPH, ITEMS_GRAPH = "prefix.onnx", "items.onnx"
GRAPH_IO = {
    PREFIX_GRAPH: {"inputs": ["prefix_ids"], "outputs": ["prefix_k", "prefix_v"]},
    ITEMS_GRAPH: {"inputs": ["item_ids", "item_lengths", "prefix_k", "prefix_v"], "outputs": ["probs", "scores"]},
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_onnx_export(spec: dict) -> bool:
    """Whether darl.json's content `spec` is an export's: it carries an "onnx" section."""
    return ONNX_SECTION in spec


@dataclass
class OnnxExport:
    """A validated export folder: every listed file present and unchanged since the export."""

    directory: Path
    section: dict
    num_labels: int

    @classmethod
    def load(cls, directory: str | Path, verify_checksums: bool = True) -> "OnnxExport":
        return cls.from_spec(directory, read_spec(directory), verify_checksums)

    @classmethod
    def from_spec(cls, directory: str | Path, spec: dict, verify_checksums: bool = True) -> "OnnxExport":
        """Validate the export in `directory`, whose darl.json content is `spec`."""
        directory = Path(directory)
        path = directory / SPEC_FILE

        def bad(fld: str, why: str):
            return CheckpointError(f"{path}: field {fld!r} {why}")

        section = spec.get(ONNX_SECTION)
        if not isinstance(section, dict):
            raise bad(ONNX_SECTION, "is missing: not an ONNX export; create one with `darl-infer export CHECKPOINT OUT_DIR`")
        if section.get("format_version") != ONNX_FORMAT_VERSION:
            raise bad(
                "onnx.format_version",
                f"is {section.get('format_version')!r}; this darl_infer reads {ONNX_FORMAT_VERSION} (re-export the checkpoint)",
            )
        if section.get("graphs") != GRAPH_IO:
            raise bad("onnx.graphs", f"must be {GRAPH_IO}")
        files = section.get("files")
        if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
            raise bad("onnx.files", "must map file names to sha256 hex digests")
        for graph in GRAPH_IO:
            if graph not in files:
                raise bad("onnx.files", f"does not list {graph}")
        for name, digest in files.items():
            file = directory / name
            if Path(name).name != name:
                raise bad("onnx.files", f"names {name!r}, which is not a file inside the export")
            if not file.is_file():
                raise CheckpointError(f"{file}: missing")
            if verify_checksums and sha256(file) != digest:
                raise CheckpointError(f"{file}: sha256 does not match darl.json (changed or corrupt since export); re-export")
        labels = spec.get("labels")
        if not isinstance(labels, list):
            raise bad("labels", "must be a list")
        return cls(directory, section, len(labels))
