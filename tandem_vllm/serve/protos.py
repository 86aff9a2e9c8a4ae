"""Generate the gRPC stubs from ``protos/`` into ``tandem_vllm/serve/pb/`` (gitignored).

``make install`` runs this (``python -m tandem_vllm.serve.protos``); the stubs are never edited by
hand. ``load()`` regenerates them when the .proto files changed since the last generation, so a
checkout that edited a contract cannot run stale stubs.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path
from types import ModuleType

from tandem_vllm.errors import TandemError

REPO_PROTOS = Path(__file__).resolve().parents[2] / "protos"
PB_DIR = Path(__file__).resolve().parent / "pb"
PROTO = "tandem/v1/tandem.proto"


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.proto")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def generate(protos: Path = REPO_PROTOS, out: Path = PB_DIR) -> Path:
    """protoc the contract into ``out`` as a flat package: tandem_pb2.py, tandem_pb2_grpc.py."""
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise TandemError("generating gRPC stubs needs grpcio-tools: pip install 'tandem-vllm[serve]'") from e
    if not (protos / PROTO).is_file():
        raise TandemError(f"{protos / PROTO} not found: stubs are generated from a source checkout")
    out.mkdir(parents=True, exist_ok=True)
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    rc = protoc.main(["protoc", f"-I{protos}", f"-I{include}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", str(protos / PROTO)])
    if rc != 0:
        raise TandemError(f"protoc failed on {protos / PROTO} (exit {rc})")
    # protoc writes tandem/v1/*.py with absolute imports of `tandem.v1`; flatten into one package.
    nested = out / "tandem" / "v1"
    for f in nested.glob("tandem_pb2*"):
        # ... and name the messages' module by its real import path, so Ray can pickle them.
        text = (f.read_text().replace("from tandem.v1 import tandem_pb2", "from . import tandem_pb2")
                .replace("'tandem.v1.tandem_pb2'", "'tandem_vllm.serve.pb.tandem_pb2'"))
        (out / f.name).write_text(text)
        f.unlink()
    for d in (nested, out / "tandem"):
        d.rmdir()
    (out / "__init__.py").write_text(f'"""Generated from protos/ by tandem_vllm.serve.protos; do not edit."""\n'
                                     f'PROTO_FINGERPRINT = "{_fingerprint(protos)}"\n')
    importlib.invalidate_caches()
    return out


def load() -> tuple[ModuleType, ModuleType]:
    """(tandem_pb2, tandem_pb2_grpc), regenerating first when missing or older than the protos."""
    stamp = PB_DIR / "__init__.py"
    fresh = stamp.is_file() and (not REPO_PROTOS.is_dir()
                                 or f'"{_fingerprint(REPO_PROTOS)}"' in stamp.read_text())
    if not fresh:
        generate()
        for name in [m for m in sys.modules if m.startswith("tandem_vllm.serve.pb")]:
            del sys.modules[name]
    pb2 = importlib.import_module("tandem_vllm.serve.pb.tandem_pb2")
    pb2_grpc = importlib.import_module("tandem_vllm.serve.pb.tandem_pb2_grpc")
    return pb2, pb2_grpc


if __name__ == "__main__":
    print(f"gRPC stubs written to {generate()}")
