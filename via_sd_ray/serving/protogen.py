"""Generate the gRPC stubs from ``proto/via_sd.proto``: ``python -m via_sd_ray.serving.protogen``.

The stubs live in ``via_sd_ray/serving/grpc_gen/`` so Serve's gRPC proxy can import them
(``grpc_options.grpc_servicer_functions``). They are generated, never edited; a test
regenerates them and fails when the committed files differ.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "via_sd.proto"
OUT = Path(__file__).resolve().parent / "grpc_gen"


def generate(out: Path = OUT) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={tmp}",
                            f"--grpc_python_out={tmp}", str(PROTO)])
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        written = []
        for name in ("via_sd_pb2.py", "via_sd_pb2_grpc.py"):
            text = (Path(tmp) / name).read_text()
            # protoc assumes top-level modules; the stubs live inside a package (imports, and the
            # module name the message classes carry, which pickling looks up)
            text = re.sub(r"^import via_sd_pb2 as", "from . import via_sd_pb2 as", text, flags=re.M)
            text = text.replace("(DESCRIPTOR, 'via_sd_pb2', _globals)", "(DESCRIPTOR, __name__, _globals)")
            (out / name).write_text(text)
            written.append(out / name)
    header = '"""Generated from proto/via_sd.proto by `python -m via_sd_ray.serving.protogen`."""\n'
    (out / "__init__.py").write_text(header)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(path)
