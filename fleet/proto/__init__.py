"""The fleet protocol, v1: `flotilla/v1/flotilla.proto` is the contract (package flotilla.v1, frozen and
guarded by `buf lint` and `buf breaking` against `flotilla_v1.binpb`, see tests/test_proto_v1.py); the
`flotilla_pb2*` modules are generated from it and re-exported here (`from fleet.proto import flotilla_pb2`).

Regenerate after editing the .proto (tests/test_proto_current.py fails while they are stale):

    python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. fleet/proto/flotilla/v1/flotilla.proto

run from the repository root, so the generated code imports `fleet.proto.flotilla.v1.flotilla_pb2`.
"""

from fleet.proto.flotilla.v1 import flotilla_pb2, flotilla_pb2_grpc

PROTO_FILE = "fleet/proto/flotilla/v1/flotilla.proto"
GENERATED_FILES = ("flotilla_pb2.py", "flotilla_pb2.pyi", "flotilla_pb2_grpc.py")

__all__ = ["GENERATED_FILES", "PROTO_FILE", "flotilla_pb2", "flotilla_pb2_grpc"]
